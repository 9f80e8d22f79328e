"""A draft model made of the target with some decoder layers skipped (identity residual), sharing every weight.

Self-speculation by layer skipping (Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2025): the kept layers,
the final norm and the LM head run as a model of their own with its own KV cache. transformers indexes the cache by
each attention module's ``layer_idx`` and reads the cache length from layer 0, so a view that merely left the
skipped layers out would write into sparse cache slots and, with layer 0 skipped, see an empty cache. The view
therefore renumbers its kept layers 0..k-1: each is a shallow copy of the target's layer (same parameters) whose
attention module carries the new index, and its config lists k layers with their original attention types
(Gemma 3's sliding-window layers keep their window). :class:`SharedSkipCache` lets the view draft into the target's
own KV cache instead.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from engine.models.handle import ForwardResult, LoadedModel
from engine.speculative.cache import PrefixCache
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


class SharedSkipCache:
    """The skip view's cache as Draft & Verify shares it: the view's kept layers read and extend the target's own
    cache layers (same weights, so the target's KV of the verified context stands in for the draft's), and
    :meth:`release` crops what a draft added, so the target's cache is as the round loop left it.

    It has the slice of :class:`PrefixCache` a drafter uses (``sync``, ``forward``). The skipped layers' cache
    layers never change; transformers reads the positions from the view's first layer, which is a kept one.
    """

    def __init__(self, view: LoadedModel, target: PrefixCache) -> None:
        skipped = set(view.details["skipped_layers"])
        self.model = view
        self.target = target
        self.cache = copy.copy(target.cache)
        self.cache.layers = [layer for index, layer in enumerate(target.cache.layers) if index not in skipped]
        self.added = 0  # positions the view appended since the last release

    def ready(self, context: list[int]) -> bool:
        """Whether a draft after ``context`` can run here: the target holds all of it but its newest token (not in
        the prompt's round, before the target ran anything)."""
        held = self.target.tokens
        return len(held) == len(context) - 1 and context[:-1] == held

    def sync(self, context: list[int]) -> list[int]:
        """Back to the target's verified context (what a draft added is cropped); the tokens of ``context`` after
        those the target holds (``context`` extends them)."""
        self.release()
        return context[len(self.target.tokens) :]

    def forward(self, tokens: list[int], keep: int = 0) -> ForwardResult:
        out = self.model.forward(torch.tensor([tokens], dtype=torch.long), self.cache, keep=keep)
        self.added += len(tokens)
        return out

    def release(self) -> None:
        """Crop the kept layers back to the target's verified context."""
        if self.added:
            for layer in self.cache.layers:
                layer.crop(-self.added)
        self.added = 0
