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

from collections.abc import Iterable

from engine.models.handle import LoadedModel
from engine.speculative.truncated import layer_view


def layer_skipped_model(model: LoadedModel, skip: Iterable[int]) -> LoadedModel:
    """``model`` without the decoder layers in ``skip`` (0-based), as a model of its own with shared weights."""
    total = model.num_layers
    skipped = sorted(set(skip))
    if any(not 0 <= layer < total for layer in skipped):
        raise ValueError(f"skip_layers must lie between 0 and {total - 1} (the target has {total} layers), got {skipped}")
    kept = [layer for layer in range(total) if layer not in skipped]
    if not kept:
        raise ValueError(f"skip_layers cannot skip all {total} layers of the target")
    name = f"{model.name}[skip {','.join(map(str, skipped))}]"
    return layer_view(model, kept, name, {"skipped_layers": skipped}, purpose="layer skipping")
