"""Attention capture: reduce per-layer, per-head weights to a bounded float16 map per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.events import AttentionMap

LayerChoice = Literal["last", "mean", "all"]
HeadReduction = Literal["mean", "max"]


@dataclass
class AttentionCapture:
    """Which layers to keep and how to reduce heads; stops capturing once ``max_bytes`` are used.

    The budget bounds a run's attention storage whatever its length: the prompt's full matrix is
    captured first, then one row per generated token while the budget lasts.
    """

    layers: LayerChoice = "last"
    heads: HeadReduction = "mean"
    max_bytes: int = 8 * 2**20
    used_bytes: int = 0

    def summarize(self, attentions: tuple[torch.Tensor, ...], step: int, query_positions: list[int]) -> AttentionMap | None:
        """Map from one forward's attentions (per layer [batch, heads, queries, keys]; batch row 0)."""
        stacked = torch.stack([a[0, :, -len(query_positions):, :].float() for a in attentions])  # [L, H, Q, K]
        reduced = stacked.mean(dim=1) if self.heads == "mean" else stacked.amax(dim=1)  # [L, Q, K]
        layer_ids = list(range(reduced.shape[0]))
        if self.layers == "last":
            reduced, layer_ids = reduced[-1:], layer_ids[-1:]
        elif self.layers == "mean":
            reduced = reduced.mean(dim=0, keepdim=True)
        data = reduced.to(torch.float16).numpy().astype(np.float16).tobytes()
        if self.used_bytes + len(data) > self.max_bytes:
            return None
        self.used_bytes += len(data)
        return AttentionMap(
            step=step,
            layers=layer_ids,
            head_reduction=self.heads,
            layer_reduction=self.layers,
            query_positions=query_positions,
            shape=list(reduced.shape),
            data=data,
        )


def attention_array(event: AttentionMap) -> np.ndarray:
    """The stored map back as a float32 array of ``event.shape``."""
    return np.frombuffer(event.data, dtype=np.float16).astype(np.float32).reshape(event.shape)
