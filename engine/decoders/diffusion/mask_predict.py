"""Mask-Predict (Ghazvininejad et al. 2019, facebookresearch/Mask-Predict): predict everything, then revise.

Iteration 0 predicts every position of the block. Iteration ``t`` (1 .. T-1) sends the ``n = int(N (T - t) / T)``
least probable tokens back to MASK and predicts them again; a kept token keeps the probability it had when it was
predicted. Unlike LLaDA-style samplers, committed tokens can change: the engine's ``revise`` hook does the
re-masking and each step records it in ``remasked_positions``. ``T`` model calls per block, whatever N is.
The paper also predicts the target length; here the canvas length is fixed (``gen_length``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.unmask import (
    CANVAS_PARAMS, StepView, blocks, canvas_settings, predictor_for, top_k_positions, unmask,
)
from engine.events import Event
from engine.params import Param


class MaskPredict:
    """Commit rule and revision of Mask-Predict, sharing the probability each token had when predicted."""

    def __init__(self, gen_length: int) -> None:
        self.token_probs = torch.zeros(gen_length)

    def commit(self, view: StepView) -> Tensor:
        """Every masked position of the block takes its new prediction (confidence = its probability)."""
        self.token_probs[view.eligible] = view.confidence[view.eligible]
        return view.eligible

    def remask(self, view: StepView) -> Tensor:
        """After iteration ``t - 1``: the ``int(N (T - t) / T)`` least probable tokens of the block go back to MASK."""
        start, end = view.block
        iteration, iterations = view.step_in_block + 1, view.block_steps
        count = max(0, (end - start) * (iterations - iteration) // iterations)
        scores = torch.full_like(self.token_probs, -math.inf)
        scores[start:end] = -self.token_probs[start:end]
        return top_k_positions(scores, count)


def mask_predict(ctx: DecodeContext) -> Iterator[Event]:
    predictor = predictor_for(ctx.model)
    iterations = ctx.params["iterations"]
    settings = canvas_settings(ctx, lambda gen_length, block_length: iterations * len(blocks(gen_length, block_length)),
                               confidence="probability")
    settings.max_steps = settings.steps
    method = MaskPredict(settings.gen_length)
    return unmask(ctx, predictor, method.commit, settings, revise=method.remask)


SPEC = register(
    DecoderSpec(
        name="mask_predict",
        family="diffusion",
        summary="Mask-Predict: predict every position, then re-mask and re-predict the least probable tokens "
                "for a fixed number of iterations (committed tokens may change).",
        params=(
            # its committed tokens may change, so an answer is never settled before the last iteration
            *(p for p in CANVAS_PARAMS if p.name != "stop_when_settled"),
            Param("iterations", "int", 10, "Iterations T per block (model calls); iteration t re-masks "
                  "N (T - t) / T tokens.", 1, 1000, sets_parallelism=True),
        ),
        run=mask_predict,
    )
)
