"""EasySpec on one device (Wu et al., NeurIPS 2025, arXiv 2502.02493): layer-parallel drafting, simulated.

The drafter is the draft model of ``speculative`` (``draft_model`` or the target's first ``draft_layers``). Each
round its first forward is exact: it re-runs the tokens accepted last round (and the bonus) through the draft
model layer after layer, refreshing the KV cache that fuzzy forwards left approximate (EasySpec's bonus
calibration). The remaining draft tokens come from fuzzy forwards, whose consecutive layers run in groups of
``parallel_layers`` on a shared input with their residual updates summed (engine/speculative/fuzzy.py); their KV
entries are dropped before the next round. Lossless, as the target verifies every draft.

On one device the groups still run one layer after another, so each round records its measured draft time and the
time it would take with each group's layers on their own devices (the slowest layer of a group counts); the run
sums both. The acceptance drop is the price: compare the run's acceptance with ``speculative`` on the same draft
model (``decoding-explorer bench spec``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.models.handle import ForwardResult
from engine.params import Param
from engine.speculative.drafts import DRAFTER_PARAMS, DraftModelDrafter, same_tokenizer_model
from engine.speculative.fuzzy import LayerClock, fuzzy_view
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Sampling, speculative_rounds


class LayerParallelDrafter(DraftModelDrafter):
    """One exact forward (the calibration), then fuzzy forwards over the same cache."""

    def __init__(self, ctx: DecodeContext, sampling: Sampling) -> None:
        params = ctx.params
        model = same_tokenizer_model(ctx, params["draft_model"], params["draft_layers"], "draft_model", "draft_layers")
        source = "draft_model" if params["draft_model"] else f"draft_layers:{params['draft_layers']}"
        super().__init__(model, source, sampling, params["num_draft_tokens"])
        self.fuzzy, self.clock = fuzzy_view(model, params["parallel_layers"])
        self.measured = self.parallel = 0.0

    def propose(self, context: list[int], max_depth: int) -> Draft:
        began, clock = time.perf_counter(), LayerClock(self.clock.sequential, self.clock.parallel)
        draft = super().propose(context, max_depth)
        if not draft.tokens:
            return draft
        measured = time.perf_counter() - began
        # the layers of a group would run side by side: only the slowest of each counts
        parallel = measured - (self.clock.sequential - clock.sequential) + (self.clock.parallel - clock.parallel)
        self.measured += measured
        self.parallel += parallel
        k = len(draft.tokens)
        mode = f"{k - 1} fuzzy forwards; {parallel * 1e3:.1f} ms with parallel layers ({measured * 1e3:.1f} ms measured)"
        return replace(draft, mode=mode)

    def _forward(self, feed: list[int], first: bool) -> ForwardResult:
        if first:  # exact; the next sync crops the fuzzy positions, which the cache does not count as its tokens
            return super()._forward(feed, first)
        return self.fuzzy.forward(torch.tensor([feed]), self.cache.cache)

    def summary(self) -> Iterator[DecoderMetric]:
        if not self.measured:
            return
        yield DecoderMetric("draft_seconds_measured", self.measured, "drafting time, layers run one after another")
        yield DecoderMetric("draft_seconds_parallel", self.parallel,
                            "drafting time had each layer group's layers run at once (the slowest counts)")
        yield DecoderMetric("parallel_draft_speedup", self.measured / self.parallel,
                            "measured / parallel drafting time")


def easyspec(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    drafter = LayerParallelDrafter(ctx, sampling)
    ctx.on_finish(drafter.summary)
    return speculative_rounds(ctx, drafter, sampling)


SPEC = register(
    DecoderSpec(
        name="easyspec",
        family="speculative",
        summary="EasySpec: the draft model's layers run in parallel groups on a shared input (fuzzy drafts), the "
        "accepted tokens re-run exactly; records the draft time parallel layers would take.",
        params=(
            *DRAFTER_PARAMS,
            Param("num_draft_tokens", "int", 4, "Tokens per draft (k); all but the first come from fuzzy forwards.",
                  1, 64, limit="draft_tokens"),
            Param("parallel_layers", "int", 2, "Consecutive draft layers run at once on a shared input (1 = exact "
                  "drafts; EasySpec runs one group per device).", 1, 64),
            *SAMPLING_PARAMS,
        ),
        run=easyspec,
        lossless=True,
    )
)
