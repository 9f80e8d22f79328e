"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023), chain drafts.

The drafter is a second model with the target's tokenizer, or, offline, the target's own first N layers plus
its head (weights shared). It drafts k tokens autoregressively with its own KV cache; the target verifies them
in one forward. Lossless: greedy output equals greedy decoding, sampled output follows the processed target.

Draft-length schedules (transformers' assisted generation, speculative.md §1): ``constant`` drafts k tokens every
round; ``heuristic`` (``num_assistant_tokens_schedule="heuristic"``) sets k += 2 after a round whose drafts were all
accepted and k = max(1, k - 1) otherwise; ``confidence`` (``assistant_confidence_threshold``) keeps the token the
draft just produced but stops drafting once the draft's probability for it is below the threshold, k being the
most it drafts. Schedules only change what is proposed, so every one of them stays lossless.
"""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param
from engine.speculative.drafts import DRAFTER_PARAMS, SCHEDULE_HELP, SCHEDULES, draft_model_drafter
from engine.speculative.rounds import SAMPLING_PARAMS, Sampling, speculative_rounds


def speculative(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    params = ctx.params
    drafter = draft_model_drafter(
        ctx, sampling, params["num_draft_tokens"], schedule=params["schedule"], confidence_threshold=params["confidence_threshold"]
    )
    return speculative_rounds(ctx, drafter, sampling)


SPEC = register(
    DecoderSpec(
        name="speculative",
        family="speculative",
        summary="Speculative decoding: a draft model proposes k tokens, the target verifies them in one forward.",
        params=(
            *DRAFTER_PARAMS,
            Param("num_draft_tokens", "int", 4, "Tokens per draft (k): always, first (heuristic) or at most (confidence).", 1, 64, limit="draft_tokens"),
            Param("schedule", "choice", "constant", SCHEDULE_HELP, choices=SCHEDULES),
            Param("confidence_threshold", "float", 0.4, "confidence schedule: stop once the draft's p(token) is below this.", 0.0, 1.0),
            *SAMPLING_PARAMS,
        ),
        run=speculative,
        lossless=True,
    )
)
