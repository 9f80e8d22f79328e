"""KV-cache rollback for speculative decoding: one crop, and a cache that knows which tokens it holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from engine.models.handle import ForwardResult, LoadedModel


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the KV of the first ``length`` positions.

    transformers' ``crop`` takes the (negative) number of positions to remove. It is called even when nothing
    is removed: sliding-window layers that record their past shrink back to their window only in ``crop``.
    """
    remove = cache.get_seq_length() - length
    if remove < 0:
        raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {length}")
    if cache.get_seq_length() > 0:  # an empty sliding-window layer fails on crop
        cache.crop(-remove)


@dataclass(frozen=True)
class SetAside:
    """The last positions a :class:`PrefixCache` held: their tokens, every layer's keys and values, and the logits
    after them when the cache had them (:attr:`PrefixCache.ahead`)."""

    tokens: list[int]
    states: list[tuple[torch.Tensor, torch.Tensor]]
    ahead: torch.Tensor | None


class PrefixCache:
    """A model's KV cache together with the tokens it holds, rolled back to whatever prefix stays valid."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.cache = model.new_cache()
        # Sliding-window layers (Gemma 3) otherwise drop states past the window that a rollback needs back.
        self.cache.activate_past_recording()
        self.tokens: list[int] = []
        # Set by a drafter that reads the target's features (EAGLE): every forward then keeps its last hidden states
        # (True), or those of the named ``hidden_states`` layers side by side (EAGLE-3's fusion).
        self.record_hidden: bool | tuple[int, ...] = False
        self.last_hidden: torch.Tensor | None = None  # [tokens, hidden] of the last forward, when recorded
        # The logits after the last held token, kept by the forward that ran it; dropped by anything else that
        # changes what the cache holds. A round that holds its whole context reads them instead of running its
        # last token again (layer_skip's prompt tail ends with that token's timed step).
        self.ahead: torch.Tensor | None = None

    def sync(self, context: list[int]) -> list[int]:
        """Crop to the longest cached prefix of ``context`` and return the tokens still to run.

        At least the last token of ``context`` is left to run, so its forward yields the next distribution.
        """
        held = len(self.tokens)
        # The usual step holds a prefix (a tree forward leaves uncounted positions, which the crop removes): one
        # comparison in C instead of a Python walk.
        if held < len(context) and self.cache.get_seq_length() == held and context[:held] == self.tokens:
            keep = held
        else:
            keep, limit = 0, min(held, len(context) - 1)
            while keep < limit and self.tokens[keep] == context[keep]:
                keep += 1
        crop_cache(self.cache, keep)
        if keep < held:
            self.ahead = None
        del self.tokens[keep:]
        return context[keep:]

    def logits_after(self, context: list[int]) -> torch.Tensor | None:
        """The logits after ``context`` [V] when the cache holds exactly ``context`` and kept them, else None."""
        if self.ahead is None or self.cache.get_seq_length() != len(context) or self.tokens != context:
            return None
        return self.ahead

    def forward(self, tokens: list[int], inputs: dict[str, torch.Tensor] | None = None, keep: int = 0) -> ForwardResult:
        """Run ``tokens`` after the cached ones, extending the cache; ``inputs`` and ``keep`` (logits of the last
        positions only) as for LoadedModel.forward."""
        out = self.model.forward(torch.tensor([tokens], dtype=torch.long), self.cache, inputs=inputs,
                                 hidden=self.record_hidden, keep=keep)
        self.tokens.extend(tokens)
        self.last_hidden = out.hidden[0] if out.hidden is not None else None
        self.ahead = out.logits[0, -1]
        return out

    def set_aside(self, count: int) -> SetAside:
        """Remove the last ``count`` positions but keep their KV, to :meth:`put_back` after some work on the shorter
        context (instead of running them again). Every layer must still hold them: a sliding-window layer keeps
        them only until its next crop."""
        if not 0 < count <= len(self.tokens):
            raise ValueError(f"cannot set aside {count} of {len(self.tokens)} cached positions")
        layers = self.cache.layers
        if any(layer.keys.shape[-2] < count for layer in layers):
            raise ValueError(f"a cache layer no longer holds the last {count} positions")
        states = [(layer.keys[..., -count:, :], layer.values[..., -count:, :]) for layer in layers]
        aside = SetAside(self.tokens[-count:], states, self.ahead)
        crop_cache(self.cache, len(self.tokens) - count)
        del self.tokens[-count:]
        self.ahead = None
        return aside

    def put_back(self, aside: SetAside) -> None:
        """Append positions :meth:`set_aside` removed, as they were."""
        for layer, (keys, values) in zip(self.cache.layers, aside.states):
            layer.update(keys, values)
        self.tokens.extend(aside.tokens)
        self.ahead = aside.ahead
