"""dKV-Cache (Ma et al. 2025, horseee/dKV-Cache): LLaDA decoding with a delayed KV cache.

A token's keys and values change sharply at the step it is decoded and barely afterwards, so its K/V are cached
one step *after* its decoding. ``decode``: between full forwards (every ``cache_reloading_step`` steps of a
block) only the positions masked one step earlier are recomputed. ``greedy``: the decoding order is random and
drawn up front, so the cache knows which tokens come next and recomputes only those, the ones just decoded, and
``window_size`` masked neighbours of each (faster, less exact). The commit rule is LLaDA's schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.cache import DelayedCacheDenoiser, WindowCacheDenoiser
from engine.diffusion.unmask import (
    CANVAS_PARAMS, StepView, blocks, canvas_settings, one_step_per_position, predictor_for, top_k_positions, top_k_rule,
    transfer_counts, unmask,
)
from engine.events import Event
from engine.params import Param, ParamError
from engine.shared_params import REMASKING, SCHEDULE_PARAMS

VARIANTS = ("decode", "greedy")


@dataclass
class RandomOrder:
    """dKV-Cache-Greedy's decoding order: random priorities drawn once, shared by the commit rule and the cache
    (which must recompute exactly the positions the rule commits next)."""

    priority: Tensor  # per generated position; higher = decoded earlier
    steps_per_block: int

    def rule(self, view: StepView) -> Tensor:
        return self._first(view.eligible, view.quota)

    def upcoming(self, masked: Tensor, block: tuple[int, int], step_in_block: int) -> Tensor:
        """The positions the rule will commit at ``step_in_block`` (the engine's LLaDA schedule for the block)."""
        in_block = masked.clone()
        in_block[: block[0]] = in_block[block[1]:] = False
        schedule = transfer_counts(block[1] - block[0], self.steps_per_block)
        quota = schedule[step_in_block] if step_in_block < len(schedule) else int(in_block.sum())
        return self._first(in_block, max(1, quota))

    def _first(self, eligible: Tensor, count: int) -> Tensor:
        return top_k_positions(self.priority.masked_fill(~eligible, -math.inf), count)


def dkv_cache(ctx: DecodeContext) -> Iterator[Event]:
    predictor = predictor_for(ctx.model)
    settings = canvas_settings(ctx, one_step_per_position, confidence=REMASKING[ctx.params["remasking"]])
    reload_every = ctx.params["cache_reloading_step"]
    if ctx.params["variant"] == "decode":
        return unmask(ctx, predictor, top_k_rule, settings, DelayedCacheDenoiser(predictor, reload_every))
    if ctx.params["remasking"] != "random":
        raise ParamError("variant=greedy decodes in a random order fixed up front: set remasking=random "
                         "(or use variant=decode)")
    order = RandomOrder(torch.rand(settings.gen_length, generator=ctx.generator),
                        max(1, settings.steps // len(blocks(settings.gen_length, settings.block_length))))
    denoiser = WindowCacheDenoiser(predictor, order.upcoming, reload_every, ctx.params["window_size"])
    return unmask(ctx, predictor, order.rule, settings, denoiser)


SPEC = register(
    DecoderSpec(
        name="dkv_cache",
        family="diffusion",
        summary="dKV-Cache: LLaDA's schedule with a delayed KV cache (a decoded token's K/V cached one step later).",
        params=(
            *CANVAS_PARAMS,
            *SCHEDULE_PARAMS,  # variant=greedy needs remasking=random
            Param("variant", "choice", "decode", "decode: recompute the positions masked one step earlier; "
                  "greedy: only the next tokens in a fixed random order plus a window.", choices=VARIANTS),
            Param("cache_reloading_step", "int", 8, "A full forward every this many steps of a block (1 = always, "
                  "no cache).", 1, 4096),
            Param("window_size", "int", 4, "greedy: masked neighbours recomputed around each next token.", 0, 4096),
        ),
        run=dkv_cache,
    )
)
