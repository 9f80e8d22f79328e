"""Attention through transformers' attention-function registry: capture, steering and cache masks in one place.

``explorer_attention`` is eager attention registered under :data:`ATTENTION_FUNCTION` (with eager's mask
function), so any model whose attention layers dispatch through ``ALL_ATTENTION_FUNCTIONS`` runs it: no
per-architecture hooks. Around a forward, :func:`attention_hooks` installs :class:`AttentionHooks` that may hide
keys (a compressed KV cache), edit the post-softmax weights (GIFT) and observe them (capture, H2O scores). The
hooks live in a context variable, set and reset around one forward, so concurrent runs in other threads never
see each other's hooks. Hooks apply to the language model's layers (those with a ``layer_idx``), not to a
vision tower's.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from engine.events import AttentionMap
from engine.params import ParamError

ATTENTION_FUNCTION = "decoding_explorer"
LAYER_CHOICES = ("last", "mean", "all")
HEAD_CHOICES = ("mean", "max")


@dataclass(frozen=True)
class AttentionHooks:
    """Per-layer callbacks of :func:`explorer_attention`; ``layer`` is the attention module's ``layer_idx``.

    ``key_mask(layer, keys)`` returns a bool tensor broadcastable to [batch, heads, queries, keys], True where a key
    is hidden, or None. ``edit(layer, weights)`` returns replacement post-softmax weights [batch, heads, queries,
    keys]. ``observe(layer, weights)`` sees the weights the values are finally mixed with.
    """

    key_mask: Callable[[int, int], Tensor | None] | None = None
    edit: Callable[[int, Tensor], Tensor] | None = None
    observe: Callable[[int, Tensor], None] | None = None


_ACTIVE: ContextVar[tuple[AttentionHooks, ...]] = ContextVar("decoding_explorer_attention_hooks", default=())


@contextmanager
def attention_hooks(*hooks: AttentionHooks | None) -> Iterator[None]:
    """Install hooks (None entries skipped) for the forwards run inside the block, on top of any already active."""
    token = _ACTIVE.set(_ACTIVE.get() + tuple(h for h in hooks if h is not None))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def explorer_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **_: object,
) -> tuple[Tensor, Tensor]:
    """Eager attention (as in transformers' Llama / Gemma modelling code) with the active hooks applied."""
    if getattr(module, "sinks", None) is not None:
        raise NotImplementedError("attention sinks (gpt-oss) are not supported by the explorer's attention function")
    groups = getattr(module, "num_key_value_groups", 1)
    keys = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    values = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, keys.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : keys.shape[-2]]
    layer = getattr(module, "layer_idx", None)
    hooks = _ACTIVE.get() if layer is not None else ()  # a layer without an index is a vision tower's, not the LM's
    for hook in hooks:
        hidden = hook.key_mask(layer, scores.shape[-1]) if hook.key_mask else None
        if hidden is not None:
            scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
    for hook in hooks:
        if hook.edit:
            weights = hook.edit(layer, weights)
    for hook in hooks:
        if hook.observe:
            hook.observe(layer, weights)
    weights = nn.functional.dropout(weights.to(query.dtype), p=dropout, training=module.training)
    return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights


def use_explorer_attention(model: nn.Module) -> None:
    """Register the explorer's attention function (once per process) and switch ``model`` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if ATTENTION_FUNCTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTENTION_FUNCTION, explorer_attention)
        AttentionMaskInterface.register(ATTENTION_FUNCTION, eager_mask)  # eager's additive float masks
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_FUNCTION:
        model.set_attn_implementation(ATTENTION_FUNCTION)


@dataclass
class AttentionCapture:
    """Which layers to keep and how to reduce heads; stops capturing once ``max_bytes`` are used.

    ``layers``: "last", "mean" (over layers), "all", or comma-separated layer indices ("0,5,11"). ``heads``: "mean",
    "max", or one head's index. The budget bounds a run's attention storage whatever its length: the prompt's full
    matrix is captured first, then one row per generated token while the budget lasts. A prompt with lines that
    start with ``passage_marker`` before a ``question_marker`` gets its passages recorded (a ``PromptPassages``
    event), so the views can show how much attention stays within a passage; an empty marker turns that off.
    """

    layers: str = "last"
    heads: str = "mean"
    max_bytes: int = 8 * 2**20
    passage_marker: str = "Passage"
    question_marker: str = "Question:"
    used_bytes: int = 0
    _rows: dict[int, Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        layer_list = self.layers if self.layers in LAYER_CHOICES else _indices(self.layers, "layers")
        if self.heads not in HEAD_CHOICES and len(_indices(self.heads, "heads")) > 1:
            raise ParamError(f"attention heads takes one head's index, not {self.heads!r}")
        self._layer_list = None if isinstance(layer_list, str) else layer_list

    def check(self, layers: int, heads: int) -> None:
        """Refuse, before any forward, a layer or head that the model does not have."""
        if self._layer_list is not None and max(self._layer_list) >= layers:
            raise ParamError(f"attention layer {max(self._layer_list)} does not exist: the model has {layers} layers "
                             f"(0 to {layers - 1})")
        if self.heads not in HEAD_CHOICES and int(self.heads) >= heads:
            raise ParamError(f"attention head {int(self.heads)} does not exist: the model has {heads} heads "
                             f"(0 to {heads - 1})")

    def hooks(self) -> AttentionHooks:
        """Hooks that keep each layer's head-reduced weights of the next forward (batch row 0)."""
        self._rows = {}
        return AttentionHooks(observe=self._observe)

    def _observe(self, layer: int, weights: Tensor) -> None:
        if self._layer_list is not None and layer not in self._layer_list:
            return
        per_head = weights[0].float()  # [heads, queries, keys]
        if self.heads == "mean":
            reduced = per_head.mean(dim=0)
        elif self.heads == "max":
            reduced = per_head.amax(dim=0)
        else:
            head = int(self.heads)
            if head >= per_head.shape[0]:
                raise ValueError(f"attention head {head} does not exist: layer {layer} has {per_head.shape[0]} heads")
            reduced = per_head[head]
        self._rows[layer] = reduced.detach()

    def take(self, step: int, query_positions: list[int]) -> AttentionMap | None:
        """The map of the forward the hooks last observed, for its last ``len(query_positions)`` query rows."""
        if not self._rows:
            return None
        layer_ids = sorted(self._rows)
        stacked = torch.stack([self._rows[i][-len(query_positions):] for i in layer_ids])  # [L, Q, K]
        self._rows = {}
        if self.layers == "last":
            stacked, layer_ids = stacked[-1:], layer_ids[-1:]
        elif self.layers == "mean":
            stacked, layer_ids = stacked.mean(dim=0, keepdim=True), [-1]
        data = stacked.to(torch.float16).numpy().astype(np.float16).tobytes()
        if self.used_bytes + len(data) > self.max_bytes:
            return None
        self.used_bytes += len(data)
        return AttentionMap(
            step=step,
            layers=layer_ids,
            head_reduction=self.heads,
            layer_reduction=self.layers,
            query_positions=query_positions,
            shape=list(stacked.shape),
            data=data,
        )


def _indices(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        allowed = LAYER_CHOICES if what == "layers" else HEAD_CHOICES
        raise ParamError(f"attention {what} must be one of {', '.join(allowed)} or non-negative indices, not {text!r}")
    return values
