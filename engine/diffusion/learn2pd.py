"""Learn2PD's filter (Bao et al. 2025, "Learning to Parallel Decode"): which proposals are already final?

In one-token-per-step decoding most positions propose their final token long before they are committed. A tiny
MLP reads the active block's confidences and predicts, per position, "the current proposal already equals the
token this position will end with"; the ``learn2pd`` decoder commits every position it is sure of, on top of the
usual quota. This module holds the filter and the commit rule; :mod:`engine.offline.learn2pd_train` collects
the data (reference decodes, labelled afterwards) and trains it:

    python -m engine.offline.learn2pd_train --model waitline-mdlm --examples 300 --seed 20000 \
        --out assets/models/learn2pd-filter

Input (2B values for a block of B): the top-1 probability of each still-masked position of the block (0 where a
position is committed or beyond a short last block), then a 0/1 "still masked" vector so the MLP can tell a
0-confidence mask from a sentinel. The paper feeds the B confidences alone; the flags cost nothing and keep
committed positions from looking like unsure ones. Output: B logits, one per position.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from engine.diffusion.unmask import CommitRule, StepView, blocks, top_k_rule
from engine.models.registry import ASSET_MODELS_DIR, rebuild_command
from engine.params import ParamError

DEFAULT_FILTER_DIR = ASSET_MODELS_DIR / "learn2pd-filter"
WEIGHTS_FILE, CONFIG_FILE = "filter.safetensors", "config.json"
BLOCK_LENGTH, HIDDEN = 32, 64
ACCEPT_THRESHOLD = 0.96  # the released LLaDA script's accept_thres
TRAINING_SEED = 20_000  # waiting-line lists unseen by the models' held-out score (seed 10_000)


def build_command(out: Path | str = "assets/models/learn2pd-filter") -> str:
    """How to (re)build the filter folder: the shipped filter's recipe (engine/offline/recipes.py)."""
    return f"{rebuild_command('learn2pd-filter')} --out {out}"


# --- the filter -----------------------------------------------------------------------------------------------


class Learn2PDFilter(nn.Module):
    """Two-layer MLP: block features ``[..., 2B]`` -> one logit per block position ``[..., B]``."""

    def __init__(self, block_length: int = BLOCK_LENGTH, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.block_length, self.hidden = block_length, hidden
        self.layers = nn.Sequential(nn.Linear(2 * block_length, hidden), nn.ReLU(), nn.Linear(hidden, block_length))

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


def block_features(scores: Tensor, block: tuple[int, int], block_length: int) -> Tensor:
    """The filter's input for ``block`` from a ``StepView.confidence`` (``-inf`` = not eligible)."""
    start, end = block
    check_block_length(end - start, block_length)
    in_block = scores[start:end].float()
    masked = torch.isfinite(in_block)
    features = torch.zeros(2 * block_length)
    features[: end - start] = torch.where(masked, in_block, torch.zeros_like(in_block))
    features[block_length: block_length + end - start] = masked.float()
    return features


def check_block_length(block_length: int, filter_block_length: int) -> None:
    """The filter reads a fixed number of positions; shorter blocks are padded, longer ones cannot be read."""
    if block_length > filter_block_length:
        raise ParamError(f"block_length {block_length} is longer than the filter's {filter_block_length}; "
                         f"use block_length <= {filter_block_length} or train a filter for longer blocks")


def filter_rule(model: Learn2PDFilter, threshold: float) -> CommitRule:
    """Commit the block's masked positions the filter accepts (sigmoid > ``threshold``) and the step's quota."""

    def rule(view: StepView) -> Tensor:
        start, end = view.block
        with torch.no_grad():
            logits = model(block_features(view.confidence, view.block, model.block_length))
        accepted = torch.zeros_like(view.eligible)
        accepted[start:end] = torch.sigmoid(logits[: end - start]) > threshold
        return (accepted & view.eligible) | top_k_rule(view)

    return rule


def save_filter(model: Learn2PDFilter, out: Path, config: dict[str, Any], card: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({name: value.contiguous() for name, value in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    shape = {"block_length": model.block_length, "hidden": model.hidden}
    (out / CONFIG_FILE).write_text(json.dumps({**shape, **config}, indent=1))
    (out / "README.md").write_text(card)


def load_filter(folder: Path | str = DEFAULT_FILTER_DIR) -> Learn2PDFilter:
    """The filter saved in ``folder``; a ParamError naming the command that builds it when it is missing."""
    folder = Path(folder).expanduser()
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ParamError(f"no Learn2PD filter in {folder} ({WEIGHTS_FILE} and {CONFIG_FILE} expected); "
                         f"build it with `{build_command(folder)}`")
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = Learn2PDFilter(int(config["block_length"]), int(config["hidden"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval()


def one_token_per_step(gen_length: int, block_length: int) -> int:
    """Schedule steps that give every block one commit per step (the engine splits steps evenly over blocks)."""
    return len(blocks(gen_length, block_length)) * block_length
