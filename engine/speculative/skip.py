"""A draft model made of the target with some decoder layers skipped (identity residual), sharing every weight.

Self-speculation by layer skipping (Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025): the kept layers,
the final norm and the LM head run as a model of their own with its own KV cache. transformers indexes the cache by
each attention module's ``layer_idx`` and reads the cache length from layer 0, so a view that merely left the
skipped layers out would write into sparse cache slots and, with layer 0 skipped, see an empty cache. The view
therefore renumbers its kept layers 0..k-1: each is a shallow copy of the target's layer (same parameters) whose
attention module carries the new index, and its config lists k layers with their original attention types
(Gemma 3's sliding-window layers keep their window).
"""

from __future__ import annotations

import copy
from typing import Iterable

from torch import nn

from engine.models.handle import LoadedModel
from engine.speculative.truncated import _shallow_module_copy


def layer_skipped_model(model: LoadedModel, skip: Iterable[int]) -> LoadedModel:
    """``model`` without the decoder layers in ``skip`` (0-based), as a model of its own with shared weights."""
    total = model.num_layers
    skipped = sorted(set(skip))
    if any(not 0 <= layer < total for layer in skipped):
        raise ValueError(f"skip_layers must lie between 0 and {total - 1} (the target has {total} layers), got {skipped}")
    kept = [layer for layer in range(total) if layer not in skipped]
    if not kept:
        raise ValueError(f"skip_layers cannot skip all {total} layers of the target")
    causal_lm = model.model
    base = getattr(causal_lm, "model", None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise ValueError(
            f"layer skipping needs a Llama- or Gemma-style model (model.model.layers); {type(causal_lm).__name__} has none"
        )
    config = copy.deepcopy(causal_lm.config)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[layer] for layer in kept]
    draft_base = _shallow_module_copy(base)
    draft_base.config = config
    draft_base._modules["layers"] = nn.ModuleList(_renumbered(base.layers[layer], index) for index, layer in enumerate(kept))
    draft_lm = _shallow_module_copy(causal_lm)
    draft_lm.config = config
    draft_lm._modules["model"] = draft_base
    label = ",".join(map(str, skipped))
    details = {**model.details, "draft_of": model.name, "skipped_layers": skipped}
    return LoadedModel(f"{model.name}[skip {label}]", draft_lm, model.tokenizer, model.source, details)


def _renumbered(layer: nn.Module, index: int) -> nn.Module:
    """A shallow copy of a decoder layer whose attention reads and writes cache layer ``index``."""
    clone = _shallow_module_copy(layer)
    attention = _shallow_module_copy(layer._modules["self_attn"])
    attention.layer_idx = index
    clone._modules["self_attn"] = attention
    if hasattr(clone, "layer_idx"):  # Gemma 3 layers keep their own copy of the index
        clone.layer_idx = index
    return clone
