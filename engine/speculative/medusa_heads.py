"""Medusa-1's heads (Cai et al. 2024, speculative.md §10): K residual blocks on the target's last hidden state.

Head k (1-based) reads the target's feature ``f_t`` (its last hidden state after the final norm, what its LM head
reads) and predicts the token ``x_{t+k+1}``, one further than the target's own next token: ``f + SiLU(W_k f)``
then the target's frozen LM head, shared by every head (over a reduced draft vocabulary's rows when the head has
one). ``W_k`` (and its bias) starts at zero as in Medusa, so an untrained head proposes the target's own next token. Saved and
loaded as every LM-head drafter (:mod:`engine.speculative.feature_head`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.models.handle import LoadedModel
from engine.speculative.feature_head import LMHeadDrafter


class MedusaHeads(LMHeadDrafter):
    """``heads`` Medusa heads for ``target``; ``draft_vocab`` (target ids) restricts their logits to those tokens."""

    kind, title = "medusa", "Medusa"

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None, heads: int = 4) -> None:
        super().__init__(target, draft_vocab)
        self.blocks = nn.ModuleList(nn.Linear(self.hidden_size, self.hidden_size) for _ in range(heads))
        for block in self.blocks:  # Medusa zeroes W; the bias too here, so an untrained block is exactly the identity
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.match_target(target)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> MedusaHeads:
        return cls(target, draft_vocab, config["heads"])

    @property
    def heads(self) -> int:
        return len(self.blocks)

    def shape(self) -> dict[str, Any]:
        return {"heads": self.heads}

    def forward(self, features: Tensor) -> Tensor:
        """Each head's residual block on features [..., H]: [K, ..., H], ready for :meth:`logits`."""
        return torch.stack([features + F.silu(block(features)) for block in self.blocks])
