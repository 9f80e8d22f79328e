"""SpecDec++ (Huang, Guo, Wang; COLM 2025): stop drafting once some drafted token is likely to be rejected.

SpecDec++ casts the draft length as a decision problem whose optimal policy stops drafting once P(at least one
of the current drafts will be rejected) exceeds a threshold; it estimates each draft's acceptance with a trained
head. This training-free version (speculative.md §8) uses the draft's own probability as the estimate:
``acc_1 = 1`` (the first draft is always worth verifying), ``acc_i = q_i(d_i)`` after it, ``cum_i = prod acc``;
drafting stops after token i once ``1 - cum_i > stop_threshold``, the length kept within [min_draft, max_draft].
Each node's ``cum_i`` is recorded as its score. Verification is standard: lossless.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param, ParamError
from engine.speculative.drafts import DRAFTER_PARAMS, DraftModelDrafter, draft_model_drafter
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Outcome, Sampling, speculative_rounds


def acceptance_estimates(probs: list[float]) -> list[float]:
    """``cum_i``: the estimated chance that drafts 1..i are all accepted (the first draft's estimate forced to 1)."""
    return [math.prod(probs[1 : i + 1]) for i in range(len(probs))]


class SpecDecStop:
    """The SpecDec++ stop rule on the training-free estimate, never before ``min_draft`` tokens."""

    def __init__(self, stop_threshold: float, min_draft: int) -> None:
        self.stop_threshold = stop_threshold
        self.min_draft = min_draft

    def __call__(self, probs: list[float]) -> bool:
        return len(probs) >= self.min_draft and 1 - math.prod(probs[1:]) > self.stop_threshold


class SpecDecPPDrafter(Drafter):
    """A draft model whose drafts end by the SpecDec++ rule, each node scored by its estimate."""

    partial_verify = True  # as its draft model's

    def __init__(self, drafter: DraftModelDrafter) -> None:
        self.drafter = drafter
        self.source = drafter.source

    def propose(self, context: list[int], max_depth: int) -> Draft:
        draft = self.drafter.propose(context, max_depth)
        return replace(draft, scores=acceptance_estimates(draft.probs))

    def observe(self, outcome: Outcome) -> None:
        self.drafter.observe(outcome)


def specdec_pp(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    if params["min_draft"] > params["max_draft"]:
        raise ParamError(f"min_draft={params['min_draft']} must not exceed max_draft={params['max_draft']}")
    sampling = Sampling.of(ctx)
    stop = SpecDecStop(params["stop_threshold"], params["min_draft"])
    drafter = draft_model_drafter(ctx, sampling, params["max_draft"], stop_rule=stop)
    return speculative_rounds(ctx, SpecDecPPDrafter(drafter), sampling)


SPEC = register(
    DecoderSpec(
        name="specdec_pp",
        family="speculative",
        summary="SpecDec++: draft until the estimated chance of a rejection passes a threshold, then verify.",
        params=(
            *DRAFTER_PARAMS,
            Param("stop_threshold", "float", 0.3, "Stop drafting once 1 - prod(draft probs after the first) exceeds this.", 0.0, 1.0),
            Param("min_draft", "int", 2, "Fewest tokens per draft (the stop rule is not asked before).", 1, 64, limit="draft_tokens"),
            Param("max_draft", "int", 20, "Most tokens per draft.", 1, 64, limit="draft_tokens"),
            *SAMPLING_PARAMS,
        ),
        run=specdec_pp,
        lossless=True,
    )
)
