"""Parallel prompt decoding's prompt tokens (Chen et al. 2024, arXiv 2405.18628): m trained input embeddings.

Appended after the input x_1..x_t (positions t, t+1, ...; each sees the input and the prompt tokens before it),
prompt token i's output through the frozen target predicts ``x_{t+i+1}``, i + 1 places ahead; the target's own
output at x_t predicts ``x_{t+1}``. Only the m x H embeddings are trained, the target stays frozen. With
``ensemble`` e > 1 (PPD's ensemble prompt tokens) each prompt token is e embeddings in e separate chains at the
same positions (chain j sees only chain j's earlier tokens), whose logits are averaged.

Training: PPD's distillation objective (``engine.offline.drafter_losses.ppd_loss``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from engine.models.handle import LoadedModel
from engine.speculative.feature_head import LMHeadDrafter


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
