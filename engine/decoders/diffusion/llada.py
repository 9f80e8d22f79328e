"""LLaDA remasking (Nie et al. 2025, ML-GSAI/LLaDA ``generate.py``): a fixed number of tokens per step.

Each block of the canvas gets ``steps / num_blocks`` steps and commits LLaDA's linear schedule of tokens per
step: the most confident proposals (``low_confidence`` remasking throws the rest back to MASK) or a uniformly
random choice (``random``). Committed tokens are never revised. ``steps = gen_length`` is one token per step.
"""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.unmask import (
    CANVAS_PARAMS, FullForward, canvas_settings, one_step_per_position, predictor_for, top_k_rule, unmask,
)
from engine.events import Event
from engine.params import Param
from engine.shared_params import REMASKING, SCHEDULE_PARAMS


def llada(ctx: DecodeContext) -> Iterator[Event]:
    predictor = predictor_for(ctx.model)
    settings = canvas_settings(ctx, one_step_per_position, confidence=REMASKING[ctx.params["remasking"]])
    return unmask(ctx, predictor, top_k_rule, settings, FullForward(predictor, ctx.params["cfg_scale"]))


SPEC = register(
    DecoderSpec(
        name="llada",
        family="diffusion",
        summary="LLaDA remasking: commit the schedule's most confident (or random) proposals each step, block by block.",
        params=(
            *CANVAS_PARAMS,
            *SCHEDULE_PARAMS,
            Param("cfg_scale", "float", 0.0, "Classifier-free guidance weight (unconditional = prompt masked); "
                  "0 = off, > 0 doubles the model calls.", 0.0, 10.0),
        ),
        run=llada,
    )
)
