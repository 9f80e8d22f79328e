"""Learn2PD's filter, trained (Bao et al. 2025, "Learning to Parallel Decode"): reference decodes of waiting-line
prompts, labelled once each final canvas is known, and a plain BCE fit of the filter in
:mod:`engine.diffusion.learn2pd`:

    python -m engine.offline.learn2pd_train --model waitline-mdlm --examples 300 --seed 20000 \
        --out assets/models/learn2pd-filter
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.context import DecodeContext
from engine.diffusion.learn2pd import (
    ACCEPT_THRESHOLD, BLOCK_LENGTH, HIDDEN, TRAINING_SEED, Learn2PDFilter, block_features, one_token_per_step,
    save_filter,
)
from engine.diffusion.unmask import MaskPredictor, StepView, UnmaskSettings, predictor_for, top_k_rule, unmask
from engine.events import DiffusionStep
from engine.models import load_model
from engine.models.registry import rebuild_command
from engine.offline.waitline_data import OPERATIONS, WaitlineGenerator

HELD_OUT_SHARE = 0.2  # of the examples (whole decodes, so no step of a held-out decode is trained on)


# --- data: reference decodes, labelled once the final tokens are known ---------------------------------------


@dataclass
class StepRecord:
    """What the filter saw at one step of a reference decode, and the proposals it judged."""

    block: tuple[int, int]
    features: Tensor  # [2B]
    proposals: Tensor  # [block size] proposal per block position
    masked: Tensor  # [block size] bool: the positions whose label counts


def step_labels(records: list[StepRecord], final: Tensor, block_length: int) -> tuple[Tensor, Tensor]:
    """Per step, labels ``[B]`` (1 = the proposal equals the final token) and which of them count (masked)."""
    labels = torch.zeros(len(records), block_length)
    counted = torch.zeros(len(records), block_length, dtype=torch.bool)
    for row, record in enumerate(records):
        start, end = record.block
        labels[row, : end - start] = (record.proposals == final[start:end]).float()
        counted[row, : end - start] = record.masked
    return labels, counted


def reference_decode(predictor: MaskPredictor, prompt_ids: list[int], gen_length: int,
                     block_length: int) -> tuple[list[StepRecord], Tensor]:
    """One token per step, argmax, most confident first (LLaDA low-confidence remasking); the filter's view of
    every step and the final canvas."""
    records: list[StepRecord] = []

    def recording_top_k(view: StepView) -> Tensor:
        start, end = view.block
        records.append(StepRecord(view.block, block_features(view.confidence, view.block, block_length),
                                  view.proposals[start:end].clone(), view.eligible[start:end].clone()))
        return top_k_rule(view)

    ctx = DecodeContext(predictor.model, prompt_ids, {}, gen_length, set(), torch.Generator().manual_seed(0),
                        record_top_k=1, cancel=threading.Event())
    settings = UnmaskSettings(gen_length, block_length, one_token_per_step(gen_length, block_length))
    steps = [event for event in unmask(ctx, predictor, recording_top_k, settings) if isinstance(event, DiffusionStep)]
    return records, torch.tensor(steps[-1].canvas)


@dataclass
class Dataset:
    features: Tensor  # [N, 2B]
    labels: Tensor  # [N, B]
    counted: Tensor  # [N, B] bool
    example: Tensor  # [N] index of the decode each step comes from


def collect(predictor: MaskPredictor, prompts: list[list[int]], gen_length: int, block_length: int,
            log: Callable[[str], None] = print, log_every: int = 25) -> Dataset:
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    started = time.monotonic()
    for index, prompt in enumerate(prompts):
        records, final = reference_decode(predictor, prompt, gen_length, block_length)
        labels, counted = step_labels(records, final, block_length)
        features = torch.stack([record.features for record in records])
        parts.append((features, labels, counted, torch.full((len(records),), index)))
        if (index + 1) % log_every == 0 or index + 1 == len(prompts):
            log(f"decoded {index + 1}/{len(prompts)} examples ({time.monotonic() - started:.0f} s)")
    return Dataset(*(torch.cat(column) for column in zip(*parts)))


def waitline_prompts(model_encode: Callable[[str], list[int]], count: int, seed: int) -> list[list[int]]:
    """``count`` waiting-line prompts cycling through every operation, from a seeded generator."""
    generator = WaitlineGenerator(seed, split="train")
    return [model_encode(generator.example(OPERATIONS[i % len(OPERATIONS)]).prompt) for i in range(count)]


# --- training -------------------------------------------------------------------------------------------------


def train_filter(data: Dataset, block_length: int, hidden: int, epochs: int, seed: int,
                 batch_size: int = 256, lr: float = 3e-3) -> Learn2PDFilter:
    """Plain BCE over the counted positions. Positives dominate (most proposals are already final), but no
    re-weighting: calibrated probabilities keep the accept threshold meaning "this sure"."""
    torch.manual_seed(seed)
    model = Learn2PDFilter(block_length, hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data.features), generator=order).split(batch_size):
            counted = data.counted[batch]
            loss = F.binary_cross_entropy_with_logits(model(data.features[batch])[counted], data.labels[batch][counted])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def evaluate(model: Learn2PDFilter, data: Dataset, threshold: float) -> dict[str, float | None]:
    """Precision and recall of "accept" (sigmoid > threshold) on the counted positions, plus context."""
    with torch.no_grad():
        probs = torch.sigmoid(model(data.features))[data.counted]
    labels = data.labels[data.counted].bool()
    accepted = probs > threshold
    true_positives = int((accepted & labels).sum())
    return {
        "positions": int(labels.numel()),
        "positive_rate": _ratio(int(labels.sum()), labels.numel()),
        "accepted_rate": _ratio(int(accepted.sum()), labels.numel()),
        "precision": _ratio(true_positives, int(accepted.sum())),
        "recall": _ratio(true_positives, int(labels.sum())),
        "accuracy_at_0.5": _ratio(int(((probs > 0.5) == labels).sum()), labels.numel()),
    }


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None  # None: nothing to divide (e.g. no position accepted)


def split(data: Dataset, examples: int) -> tuple[Dataset, Dataset]:
    """Train on the first examples, hold out the last ``HELD_OUT_SHARE`` (at least one) whole decodes."""
    held_out = max(1, round(examples * HELD_OUT_SHARE)) if examples > 1 else 0
    train_rows = data.example < examples - held_out
    return (Dataset(*(column[train_rows] for column in _columns(data))),
            Dataset(*(column[~train_rows] for column in _columns(data))))


def _columns(data: Dataset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return data.features, data.labels, data.counted, data.example


def card(config: dict[str, Any]) -> str:
    scores = config["held_out"]
    rows = "\n".join(f"| {name} | {value} |" for name, value in scores.items())
    return f"""# learn2pd-filter

Learn2PD's confidence filter for `{config['model']}` (used by the `learn2pd` decoder): a two-layer MLP
(2x{config['block_length']} -> {config['hidden']} -> {config['block_length']}, ReLU) that predicts, per position of
the active block, whether the current argmax proposal already equals the token the position ends with.

- **Input**: {config['input']}
- **Data**: {config['data']}
- **Labels**: 1 where the proposal equals the final token of the same reference decode; only still-masked
  positions count. Positive rate {scores['positive_rate']} (trained with plain BCE, not re-weighted, so the
  probabilities stay calibrated for the accept threshold).
- **Training**: `{config['command']}`, {config['epochs']} epochs of Adam on {config['train_steps']} decode
  steps ({config['train_examples']} decodes), {config['seconds']} s on CPU.
- **Rebuild** the shipped filter: `{rebuild_command("learn2pd-filter")}` (the command above, seeded).

## Held-out decodes ({config['held_out_examples']} examples), accept threshold {config['threshold']}

| metric | value |
|---|---|
{rows}
"""


def progress(line: str) -> None:
    print(line, flush=True)  # progress lines: tqdm is off without a TTY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="waitline-mdlm", help="a diffusion LM: built-in name or folder")
    parser.add_argument("--examples", type=int, default=300)
    parser.add_argument("--seed", type=int, default=TRAINING_SEED, help="waiting-line generator and training seed")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gen-length", type=int, default=0, help="canvas length; 0 = the model's (else 72)")
    parser.add_argument("--block-length", type=int, default=BLOCK_LENGTH)
    parser.add_argument("--hidden", type=int, default=HIDDEN)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threshold", type=float, default=ACCEPT_THRESHOLD, help="accept threshold to report at")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--log-every", type=int, default=25, help="print progress every N decoded examples")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    loaded = load_model(args.model)
    predictor = predictor_for(loaded)
    gen_length = args.gen_length or int(getattr(loaded.model.config, "diffusion_gen_length", 72))
    block_length = min(args.block_length, gen_length)
    prompts = waitline_prompts(loaded.encode, args.examples, args.seed)
    data = collect(predictor, prompts, gen_length, block_length, progress, args.log_every)
    training, held_out = split(data, args.examples)
    progress(f"training on {len(training.features)} steps, holding out {len(held_out.features)}")
    model = train_filter(training, block_length, args.hidden, args.epochs, args.seed)
    scores = evaluate(model, held_out, args.threshold)
    progress(json.dumps(scores))
    held_out_examples = int(held_out.example.unique().numel())
    config = {
        "model": args.model,
        "threshold": args.threshold,
        "input": "top-1 probability of each still-masked block position (0 elsewhere), then 0/1 still-masked flags",
        "data": f"{args.examples} waiting-line prompts (WaitlineGenerator seed {args.seed}, operations cycled: "
                f"{', '.join(OPERATIONS)}), each decoded by the reference sampler: canvas {gen_length}, blocks of "
                f"{block_length}, one token per step, argmax, most confident first",
        "gen_length": gen_length,
        "epochs": args.epochs,
        "train_examples": args.examples - held_out_examples,
        "train_steps": len(training.features),
        "held_out_examples": held_out_examples,
        "held_out": scores,
        "seconds": round(time.monotonic() - started),
        "command": (f"python -m engine.offline.learn2pd_train --model {args.model} --examples {args.examples} "
                    f"--seed {args.seed} --gen-length {gen_length} --block-length {block_length} "
                    f"--hidden {args.hidden} --epochs {args.epochs} --out {args.out}"),
    }
    save_filter(model, args.out, config, card({**config, "block_length": block_length, "hidden": args.hidden}))
    progress(f"saved {args.out}")


if __name__ == "__main__":
    main()
