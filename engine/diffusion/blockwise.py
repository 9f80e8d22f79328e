"""Fast-dLLM's block loop, shared by Fast-dLLM and LocalLeap: blocks decoded left to right, each looped until
full by a commit rule, with an optional prefix or dual KV cache; and the parameters that loop reads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from engine.context import DecodeContext
from engine.diffusion.cache import BLOCK_CACHES, block_cache
from engine.diffusion.unmask import (
    CANVAS_PARAMS, CommitRule, blocks, canvas_settings, predictor_for, unmask,
)
from engine.events import Event
from engine.params import Param

# Fast-dLLM's scripts decode in blocks of 32.
BLOCK_PARAMS = (
    *(replace(p, default=32, help="Semi-autoregressive block length (Fast-dLLM uses 32); 0 = one block over the "
                                  "whole canvas.") if p.name == "block_length" else p for p in CANVAS_PARAMS),
    Param("cache", "choice", "none", "KV cache: none (full forward each step), prefix (reuse the K/V before the "
          "block, refreshed each block) or dual (also the masked suffix after it). Approximate.",
          choices=BLOCK_CACHES),
)


def decode_until_blocks_full(ctx: DecodeContext, rule: CommitRule) -> Iterator[Event]:
    """Blocks left to right, each looped until full: one schedule step per block, the rule ignoring its quota."""
    predictor = predictor_for(ctx.model)
    settings = canvas_settings(ctx, lambda gen_length, block_length: len(blocks(gen_length, block_length)))
    return unmask(ctx, predictor, rule, settings, block_cache(predictor, ctx.params["cache"]))
