"""LocalLeap (Kong et al. 2025, arXiv 2510.07081): a relaxed threshold next to confident anchors.

Many masked positions already predict their final token long before a conservative sampler commits them, and
that certainty spreads locally: next to a high-confidence *anchor* (``c >= threshold``) a neighbour with a
moderately lower confidence usually agrees with the final output, less so the farther it is. So within
``radius`` positions of any anchor a proposal needs only ``relaxed_threshold``; elsewhere the plain threshold
applies (Fast-dLLM's rule when there is no anchor), and the most confident position is always committed.
Blocks, the loop until a block is full and the optional KV cache are Fast-dLLM's.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.blockwise import BLOCK_PARAMS, decode_until_blocks_full
from engine.diffusion.unmask import CommitRule, StepView, at_least_top_one
from engine.events import Event
from engine.params import Param, ParamError


def local_leap_rule(threshold: float, relaxed_threshold: float, radius: int) -> CommitRule:
    """Anchors (eligible, ``c >= threshold``) and eligible positions within ``radius`` of one with
    ``c >= relaxed_threshold``; at least the most confident position."""

    def rule(view: StepView) -> torch.Tensor:
        anchors = view.confidence >= threshold
        near = F.max_pool1d(anchors.float()[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
        return at_least_top_one(view, anchors | (near & (view.confidence >= relaxed_threshold)))

    return rule


def localleap(ctx: DecodeContext) -> Iterator[Event]:
    threshold, relaxed = ctx.params["threshold"], ctx.params["relaxed_threshold"]
    if relaxed > threshold:
        raise ParamError(f"relaxed_threshold ({relaxed}) must not exceed threshold ({threshold}): it relaxes it")
    return decode_until_blocks_full(ctx, local_leap_rule(threshold, relaxed, ctx.params["radius"]))


SPEC = register(
    DecoderSpec(
        name="localleap",
        family="diffusion",
        summary="LocalLeap: commit confident anchors and, within a radius of them, proposals above a relaxed "
                "threshold.",
        params=(
            *BLOCK_PARAMS,
            Param("threshold", "float", 0.9, "Confidence of an anchor; also what a proposal far from every anchor "
                  "needs.", 0.0, 1.0, sets_parallelism=True),
            Param("relaxed_threshold", "float", 0.75, "Confidence a proposal needs within radius of an anchor.",
                  0.0, 1.0, sets_parallelism=True),
            Param("radius", "int", 4, "How far (in positions) an anchor relaxes the threshold.", 0, 64),
        ),
        run=localleap,
    )
)
