"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023), chain drafts.

The drafter is a second model with the target's tokenizer, or, offline, the target's own first N layers plus
its head (weights shared). It drafts k tokens autoregressively with its own KV cache; the target verifies them
in one forward. Lossless: greedy output equals greedy decoding, sampled output follows the processed target.
"""

from __future__ import annotations

from typing import Iterator

import torch

from engine.decoders.base import DecodeContext, DecoderSpec, register
from engine.events import Event, r7
from engine.models import load_model
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds
from engine.speculative.truncated import truncated_model

# Draft models loaded by name, kept so repeated runs (benchmarks, the app) do not reload them.
_DRAFT_MODELS: dict[tuple[str, str, str], LoadedModel] = {}


class DraftModelDrafter(Drafter):
    """Drafts ``num_draft_tokens`` tokens autoregressively with its own rolled-back cache."""

    def __init__(self, model: LoadedModel, source: str, sampling: Sampling, num_draft_tokens: int = 4) -> None:
        self.cache = PrefixCache(model)
        self.source = source
        self.sampling = sampling
        self.num_draft_tokens = num_draft_tokens

    def propose(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.num_draft_tokens, max_depth)
        tokens: list[int] = []
        probs: list[float] = []
        rows: list[torch.Tensor] = []
        feed = self.cache.sync(context) if k else []
        for _ in range(k):
            out = self.cache.forward(feed)
            logprobs = self.sampling.process(out.logits[0, -1]).logprobs
            token = self.sampling.choose(logprobs)
            tokens.append(token)
            probs.append(r7(logprobs[token].exp()))
            rows.append(logprobs)
            feed = [token]
        return Draft(tokens, probs, torch.stack(rows) if rows else None, calls=k)


def draft_model_drafter(ctx: DecodeContext, sampling: Sampling, num_draft_tokens: int = 4) -> DraftModelDrafter:
    """The drafter the ``draft_model``/``draft_layers`` parameters describe (DRAFTER_PARAMS)."""
    name = ctx.params["draft_model"]
    if not name:
        layers = ctx.params["draft_layers"]
        try:
            draft = truncated_model(ctx.model, layers)
        except ValueError as error:
            raise ParamError(str(error)) from None
        return DraftModelDrafter(draft, f"draft_layers:{layers}", sampling, num_draft_tokens)
    draft = _load_draft(name)
    if draft.vocab_size != ctx.model.vocab_size:
        raise ParamError(
            f"draft model {name!r} has a vocabulary of {draft.vocab_size}, the target {ctx.model.vocab_size}: "
            "a draft model needs the target's tokenizer"
        )
    return DraftModelDrafter(draft, "draft_model", sampling, num_draft_tokens)


def _load_draft(name: str, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    key = (name, dtype, device)
    if key not in _DRAFT_MODELS:
        _DRAFT_MODELS[key] = load_model(name, dtype=dtype, device=device)
    return _DRAFT_MODELS[key]


def speculative(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    return speculative_rounds(ctx, draft_model_drafter(ctx, sampling, ctx.params["num_draft_tokens"]), sampling)


# The parameters that pick a draft model, shared by every decoder that drafts with one.
DRAFTER_PARAMS = (
    Param("draft_model", "str", "", "Draft model with the target's tokenizer (empty = the target's first draft_layers layers)."),
    Param("draft_layers", "int", 2, "Without draft_model: draft with the target's first N layers plus its head.", 1, 1000),
)


SPEC = register(
    DecoderSpec(
        name="speculative",
        family="speculative",
        summary="Speculative decoding: a draft model proposes k tokens, the target verifies them in one forward.",
        params=(
            *DRAFTER_PARAMS,
            Param("num_draft_tokens", "int", 4, "Tokens drafted per round (k).", 1, 64),
            *SAMPLING_PARAMS,
        ),
        run=speculative,
        lossless=True,
    )
)
