"""Parallel prompt decoding's prompt tokens (Chen et al. 2024, arXiv 2405.18628): m trained input embeddings.

Appended after the input x_1..x_t (positions t, t+1, ...; each sees the input and the prompt tokens before it),
prompt token i's output through the frozen target predicts ``x_{t+i+1}``, i + 1 places ahead; the target's own
output at x_t predicts ``x_{t+1}``. Only the m x H embeddings are trained, the target stays frozen. With
``ensemble`` e > 1 (PPD's ensemble prompt tokens) each prompt token is e embeddings in e separate chains at the
same positions (chain j sees only chain j's earlier tokens), whose logits are averaged.

Training (:func:`ppd_loss`, PPD's distillation objective): the frozen target runs a window of a self-distilled
sequence with the prompt tokens attached after several answer positions t at once (one 4D mask: the real tokens
never see them); prompt token i pays ``0.8^(i-1)`` times KL(target || prompt) between the target's own distribution
at position t + i (the same forward's output there, which the prompt tokens cannot change) and its output; the sum
is divided by m, as PPD's DistillationTrainer. Gradients reach the embeddings only. Windows are cut to
:data:`WINDOW` tokens so a step stays cheap on a CPU; the sliding window of Gemma-style layers is not applied
(windows are shorter than it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.handle import LoadedModel
from engine.offline.drafter_data import DrafterSequence
from engine.speculative.feature_head import LMHeadDrafter

DECAY = 0.8  # PPD's weight 0.8^(i-1) for prompt token i
WINDOW = 64  # tokens of a training sequence in one forward (the cost of a step grows with it)
ANCHORS = 16  # answer positions per sequence that get the prompt tokens attached in one training forward


class PromptTokens(LMHeadDrafter):
    """``prompt_tokens`` trained prompt embeddings (``ensemble`` chains of them) for ``target``."""

    kind, title = "ppd", "PPD"

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None, prompt_tokens: int = 3,
                 ensemble: int = 1) -> None:
        super().__init__(target, draft_vocab)
        self._target = target  # the frozen model the training forward runs (a LoadedModel: never saved)
        table = target.model.get_input_embeddings().weight.detach().float()
        # Each starts at the mean embedding plus noise at the table's scale: chains must differ to learn apart.
        start = table.mean(0) + 0.1 * table.std() * torch.randn(ensemble, prompt_tokens, self.hidden_size)
        self.embeddings = nn.Parameter(start)
        self.match_target(target)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> PromptTokens:
        return cls(target, draft_vocab, config["prompt_tokens"], config.get("ensemble", 1))

    @property
    def prompt_tokens(self) -> int:
        return self.embeddings.shape[1]

    @property
    def ensemble(self) -> int:
        return self.embeddings.shape[0]

    def shape(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "ensemble": self.ensemble}

    def vocab_logits(self, logits: Tensor) -> Tensor:
        """The target's logits [..., V] restricted to the draft vocabulary (unchanged without one)."""
        return logits if self.draft_vocab is None else logits[..., self.draft_vocab.to(logits.device)]


def ppd_loss(prompts: PromptTokens, sequences: list[DrafterSequence],
             generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """PPD's distillation loss on ``sequences`` and its parts (each prompt token's KL and top-1 agreement with the
    target); ``generator`` draws the windows and anchors (None: the last window, evenly spread anchors)."""
    m, e = prompts.prompt_tokens, prompts.ensemble
    windows, anchors = zip(*(_window(s, m, generator) for s in sequences))
    width = max(len(w) for w in windows)
    riders = ANCHORS * e * m
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    positions = torch.zeros(len(windows), width + riders, dtype=torch.long)
    visible = torch.zeros(len(windows), width + riders, width + riders, dtype=torch.bool)
    for row, (window, points) in enumerate(zip(windows, anchors)):
        ids[row, : len(window)] = window
        positions[row, :width] = torch.arange(width)
        visible[row, :width, :width] = torch.ones(width, width, dtype=torch.bool).tril()
        for a in range(ANCHORS):
            t = points[a] if a < len(points) else 0  # a missing anchor: riders at 0, never scored
            for chain in range(e):
                start = width + (a * e + chain) * m
                rows = slice(start, start + m)
                positions[row, rows] = torch.arange(t + 1, t + 1 + m)
                visible[row, rows, : t + 1] = True
                visible[row, rows, rows] = torch.ones(m, m, dtype=torch.bool).tril()
    target = prompts._target
    embedded = target.model.get_input_embeddings()(ids.to(target.device))
    attached = prompts.embeddings.repeat(ANCHORS, 1, 1).flatten(0, 1)  # [ANCHORS * e * m, H]
    inputs = torch.cat([embedded, attached[None].expand(len(windows), -1, -1)], dim=1)
    mask = torch.zeros(visible.shape, dtype=inputs.dtype).masked_fill_(~visible, torch.finfo(inputs.dtype).min)
    hidden = target.model.get_decoder()(inputs_embeds=inputs, attention_mask=mask[:, None].to(target.device),
                                        position_ids=positions.to(target.device)).last_hidden_state
    scored = torch.tensor([[a < len(points) for a in range(ANCHORS)] for points in anchors])  # [B, ANCHORS]
    at = torch.tensor([[(points + [0] * ANCHORS)[a] for a in range(ANCHORS)] for points in anchors])
    rows = torch.arange(len(windows))[:, None, None]
    teacher_rows = (at[:, :, None] + torch.arange(1, m + 1)).clamp(max=width - 1)  # the target's output at t + i
    with torch.no_grad():
        teacher = prompts.logits(hidden[rows, teacher_rows.to(hidden.device)][scored]).float().log_softmax(-1)
    student = prompts.logits(hidden[:, width:].unflatten(1, (ANCHORS, e, m)).mean(2)[scored]).float()
    student = student.log_softmax(-1)  # [N, m, V']: the ensemble chains' mean logits, PPD's mean aggregation
    loss = torch.zeros(())
    parts: dict[str, float] = {}
    for i in range(m):
        kl = F.kl_div(student[:, i], teacher[:, i], log_target=True, reduction="batchmean")
        loss = loss + DECAY**i * kl
        parts[f"kl{i + 1}"] = kl.item()
        parts[f"accuracy{i + 1}"] = (student[:, i].argmax(-1) == teacher[:, i].argmax(-1)).float().mean().item()
    loss = loss / m
    return loss, {"loss": loss.item(), **parts}


def _window(sequence: DrafterSequence, m: int, generator: torch.Generator | None) -> tuple[Tensor, list[int]]:
    """A window of at most WINDOW tokens ending in the answer, and up to ANCHORS answer positions t in it (window
    indices) with m tokens after them."""
    ids = sequence.input_ids
    latest = max(len(ids) - WINDOW, 0)  # the last window start
    earliest = min(max(sequence.answer_start - WINDOW // 2, 0), latest)  # half a window of answer at least
    start = int(torch.randint(earliest, latest + 1, (1,), generator=generator)) if generator else latest
    window = ids[start: start + WINDOW]
    first, last = max(sequence.answer_start - 1 - start, 0), len(window) - 1 - m
    if last < first:
        return window, []
    choices = torch.arange(first, last + 1)
    if generator is None:
        picks = torch.linspace(0, len(choices) - 1, min(ANCHORS, len(choices))).round().long()
    else:
        picks = torch.randperm(len(choices), generator=generator)[:ANCHORS].sort().values
    return window, choices[picks].tolist()
