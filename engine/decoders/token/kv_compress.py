"""KV-cache compression seen from the decoder: a compressed cache beside the full one, in lock-step.

The compressed run chooses every token (greedily, or by sampling at a temperature); the same model with its own
untouched cache is teacher-forced on those tokens. Each step records KL(p_full || p_compressed), whether the two
top-1 tokens agree, and which cache positions the compressed forward could not see (or saw approximated). The
policies live in :mod:`engine.kv_compress`.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from engine.attention import AttentionHooks
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, Tally, TokenHook, autoregressive
from engine.events import CacheStep, DecoderMetric, Event
from engine.kv_compress import POLICIES, CacheShape, make_policy
from engine.params import Param
from engine.processing import build_pipeline, sample
from engine.speculative.cache import PrefixCache

PARAMS = (
    Param("policy", "choice", "h2o", "How the compressed cache is compressed: h2o (heavy hitters + recent), snapkv "
          "(prompt selection by the last rows' votes), streaming (sinks + recent), mustafar (per-token magnitude "
          "pruning of K and V), gear (quantisation + low-rank + outliers), ems ([reconstruction] evict, then merge).",
          choices=POLICIES),
    Param("budget", "int", 64, "h2o / snapkv / streaming / ems: cache positions kept per KV head (0 = no compression; "
          "snapkv and ems select among prompt positions only).", 0, 1_000_000),
    Param("heavy_ratio", "float", 0.5, "h2o: share of the budget for heavy hitters, the rest is the recent window "
          "(the paper's 10% heavy + 10% recent is 0.5).", 0.0, 1.0),
    Param("sinks", "int", 4, "streaming: attention-sink positions kept at the start.", 0, 1024),
    Param("window", "int", 32, "snapkv / ems: the last prompt rows that vote (and are always kept).", 1, 4096),
    Param("kernel", "int", 5, "snapkv: average-pooling kernel over the votes (odd).", 1, 63),
    Param("sparsity", "float", 0.5, "mustafar: share of each key / value vector zeroed (0 = off; paper 0.5-0.7).",
          0.0, 0.99),
    Param("residual", "int", 32, "mustafar: the most recent positions that stay dense.", 0, 100_000),
    Param("bits", "int", 4, "gear: quantisation bits.", 1, 16),
    Param("rank", "int", 2, "gear: rank of the low-rank error correction per head (0 = none).", 0, 64),
    Param("outliers", "float", 0.02, "gear: share of each token's entries kept exactly (half largest, half smallest).",
          0.0, 0.5),
    Param("group", "int", 64, "gear: quantisation group size within a head's vector (the head dim if it does not "
          "divide it).", 1, 4096),
    Param("buffer", "int", 64, "gear: decode positions kept exact until this many wait, then compressed together.",
          1, 100_000),
    Param("base", "choice", "greedy", "How the compressed run picks tokens.", choices=("greedy", "sample")),
    Param("temperature", "float", 1.0, "base=sample: divide logits by T before sampling.", 0.01, 10.0),
)


class CompressedCache(TokenHook):
    """The loop's cache is the compressed one (the policy's hooks hide or approximate its keys); a reference cache of
    the same model, teacher-forced on the chosen tokens, gives each step's full distribution."""

    def __init__(self, ctx: DecodeContext) -> None:
        params = ctx.params
        self.model = ctx.model
        self.policy = make_policy(params, CacheShape.of(ctx.model))
        self.sampling = params["base"] == "sample"
        self.stages = build_pipeline({"temperature": params["temperature"]}) if self.sampling else ()
        self.generator = ctx.generator
        self.reference = PrefixCache(ctx.model)
        self.tally = Tally("cache", "full", "compressed", "full cache")
        self.kept: list[float] = []

    def start(self, ctx: DecodeContext) -> Iterator[Event]:
        self.model.use_explorer_attention()  # both runs: the same attention arithmetic, hooks only on the compressed one
        return iter(())

    def steer(self, length: int) -> AttentionHooks | None:
        self.length = length
        return self.policy.hooks(length)

    def choose(self, step: Step) -> int:
        return int(sample(step.processed.logprobs[0], self.generator)) if self.sampling else super().choose(step)

    def report(self, step: Step, token: int) -> Iterator[Event]:
        began = time.perf_counter()
        policy = self.policy
        evicted = policy.evicted(self.length)
        policy.update(step.cache.cache, self.length)
        full = self.reference.forward(self.reference.sync(step.context), keep=1).logits[0, -1]
        kl, _, agree = self.tally.add(step.position, full, step.logits, token)
        self.kept.append(1.0 - float(evicted.mean()))
        yield CacheStep(
            step=step.position, policy=policy.name, kl=kl, top1_agree=agree, kept_fraction=self.kept[-1],
            evicted=evicted.astype(np.float16).tobytes(), error=policy.error, model_calls=1,  # the reference forward
            seconds=time.perf_counter() - began,
        )

    def metrics(self) -> list[DecoderMetric]:
        """The comparison's summary and the mean share of the cache kept exact."""
        if not self.kept:
            return []
        kept = DecoderMetric("cache_mean_kept_fraction", np.mean(self.kept), "mean share of the cache kept exact")
        return [*self.tally.metrics(), kept]


def kv_compress(ctx: DecodeContext) -> Iterator[Event]:
    hook = CompressedCache(ctx)
    ctx.on_finish(hook.metrics)
    return autoregressive(ctx, hook)


SPEC = register(
    DecoderSpec(
        name="kv_compress",
        family="token",
        summary="Decode with a compressed KV cache (H2O, SnapKV, StreamingLLM, Mustafar, GEAR, EMS) beside the full "
                "cache, recording the KL and top-1 agreement per step and the evicted positions.",
        params=PARAMS,
        run=kv_compress,
    )
)
