"""Fast-dLLM (Wu et al. 2025, NVlabs/Fast-dLLM ``llada/generate.py``): confidence-aware parallel decoding.

Inside the active block every masked position whose proposal is confident enough is committed at once (the most
confident one always, so each model call makes progress), and the block loops until it is full: the number of
steps adapts to the model's certainty. Two rules: a fixed threshold ``c >= tau``, or the factor rule of the
paper's v2, which accepts the r-th most confident position while ``(r + 1)(1 - c(r)) < f`` (greedy decoding of
the marginals equals joint greedy decoding when ``(n + 1) eps <= 1``). An optional prefix or dual KV cache
(engine/diffusion/cache.py) recomputes only part of the canvas after each block's first step.
"""

from __future__ import annotations

from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.blockwise import BLOCK_PARAMS, decode_until_blocks_full
from engine.diffusion.unmask import CommitRule, StepView, at_least_top_one
from engine.events import Event
from engine.params import Param

RULES = ("threshold", "factor")


def threshold_rule(threshold: float) -> CommitRule:
    """Commit every eligible position with confidence >= ``threshold``, and at least the most confident one."""

    def rule(view: StepView) -> torch.Tensor:
        return at_least_top_one(view, view.confidence >= threshold)

    return rule


def factor_rule(factor: float) -> CommitRule:
    """Commit the r-th most confident eligible position (r from 1) iff ``(r + 1)(1 - c(r)) < factor``; rank 1
    always. The left side grows with r, so the accepted positions are the top ones."""

    def rule(view: StepView) -> torch.Tensor:
        ranked = view.confidence.sort(descending=True)
        ranks = torch.arange(1, len(ranked.values) + 1)
        accepted = (ranks + 1) * (1 - ranked.values) < factor  # -inf (ineligible) gives +inf: never accepted
        chosen = torch.zeros_like(view.eligible)
        chosen[ranked.indices[accepted]] = True
        return at_least_top_one(view, chosen)

    return rule


def fast_dllm(ctx: DecodeContext) -> Iterator[Event]:
    if ctx.params["rule"] == "factor":
        return decode_until_blocks_full(ctx, factor_rule(ctx.params["factor"]))
    return decode_until_blocks_full(ctx, threshold_rule(ctx.params["threshold"]))


SPEC = register(
    DecoderSpec(
        name="fast_dllm",
        family="diffusion",
        summary="Fast-dLLM: commit every confident proposal of the block at once (threshold or factor rule), "
                "optionally with a prefix or dual KV cache.",
        params=(
            *BLOCK_PARAMS,
            Param("rule", "choice", "threshold", "threshold: confidence >= threshold; factor: accept the r-th most "
                  "confident while (r + 1)(1 - c) < factor.", choices=RULES),
            Param("threshold", "float", 0.9, "Confidence a proposal needs to be committed (rule=threshold).",
                  0.0, 1.0, sets_parallelism=True),
            Param("factor", "float", 1.0, "f of the factor rule; larger commits more per step (rule=factor).",
                  0.0, 10.0, sets_parallelism=True),
        ),
        run=fast_dllm,
    )
)
