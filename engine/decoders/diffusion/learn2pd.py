"""Learn2PD (Bao et al. 2025, ims-kdks/Learning-to-Parallel-Decoding ``generate_learn2parallel``/``_l2p_eot``).

Each step commits the schedule's most confident proposal(s), as LLaDA does, plus every masked position of the
active block that a small learnt filter (engine/diffusion/learn2pd.py, trained by engine/offline/learn2pd_train.py)
judges already final: sigmoid of its logit above ``accept_threshold``. End-of-Text Prediction: once an end of text
is committed, every position after it is end of text too, filled without model calls.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.learn2pd import (
    ACCEPT_THRESHOLD, BLOCK_LENGTH, DEFAULT_FILTER_DIR, check_block_length, filter_rule, load_filter,
    one_token_per_step,
)
from engine.diffusion.unmask import CANVAS_PARAMS, canvas_settings, predictor_for, unmask
from engine.events import Event
from engine.params import Param

# The filter reads blocks of at most its training length: default to that rather than one block over the canvas.
BLOCK_PARAM = dataclasses.replace(
    next(p for p in CANVAS_PARAMS if p.name == "block_length"), default=BLOCK_LENGTH,
    help=f"Semi-autoregressive block length, at most the filter's ({BLOCK_LENGTH} for the built-in one).",
)
PARAMS = tuple(BLOCK_PARAM if p.name == "block_length" else p for p in CANVAS_PARAMS)


def learn2pd(ctx: DecodeContext) -> Iterator[Event]:
    predictor = predictor_for(ctx.model)
    learnt = load_filter(ctx.params["filter"] or DEFAULT_FILTER_DIR)
    settings = canvas_settings(ctx, one_token_per_step, end_at_eos=ctx.params["eot_prediction"])
    check_block_length(settings.block_length, learnt.block_length)
    return unmask(ctx, predictor, filter_rule(learnt, ctx.params["accept_threshold"]), settings)


SPEC = register(
    DecoderSpec(
        name="learn2pd",
        family="diffusion",
        summary="Learn2PD: a learnt filter commits every proposal it judges final, on top of LLaDA's quota; "
        "end-of-text prediction fills the canvas after an end of text.",
        params=(
            *PARAMS,
            Param("steps", "int", 0, "Quota schedule steps over the canvas; 0 = one quota token per step "
                  "(the filter's commits come on top).", 0, 4096, sets_parallelism=True),
            Param("accept_threshold", "float", ACCEPT_THRESHOLD, "Commit a masked position when the filter's "
                  "probability that its proposal is final exceeds this (1 = quota only, plain LLaDA).", 0.0, 1.0,
                  sets_parallelism=True),
            Param("eot_prediction", "bool", True, "End-of-Text Prediction: after a committed end of text, fill "
                  "the rest of the canvas with end of text and stop decoding it."),
            Param("filter", "str", "", f"Folder of a trained filter; empty = the built-in {DEFAULT_FILTER_DIR.name}.",
                  loads_files=True),
        ),
        run=learn2pd,
    )
)
