"""KV-cache compression seen from the decoder: a compressed cache beside the full one, in lock-step.

The compressed run chooses every token (greedily, or by sampling at a temperature); the same model with its own
untouched cache is teacher-forced on those tokens. Each step records KL(p_full || p_compressed), whether the two
top-1 tokens agree, and which cache positions the compressed forward could not see (or saw approximated). The
policies live in :mod:`engine.kv_compress`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from engine.attention import attention_hooks
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import greedy_choice, token_event
from engine.events import CacheStep, DecoderMetric, Event
from engine.kv_compress import POLICIES, CacheShape, make_policy
from engine.params import Param
from engine.processing import build_pipeline, kl_divergence, process, sample

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


@dataclass
class Tally:
    """Running comparison with the full cache, for the run's metrics."""

    kls: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    kept: list[float] = field(default_factory=list)
    divergence: int = -1

    def metrics(self) -> list[DecoderMetric]:
        """The run's summary (none before the first step has been compared)."""
        if not self.kls:
            return []
        return [
            DecoderMetric("cache_mean_kl", np.mean(self.kls), "mean KL(p_full || p_compressed) per step, nats"),
            DecoderMetric("cache_top1_agreement", np.mean(self.agree), "share of steps where both top-1 tokens agree"),
            DecoderMetric("cache_first_divergence", self.divergence,
                          "first step where the full cache's top-1 differs from the chosen token (-1: none)"),
            DecoderMetric("cache_mean_kept_fraction", np.mean(self.kept), "mean share of the cache kept exact"),
        ]


def kv_compress(ctx: DecodeContext) -> Iterator[Event]:
    params, model = ctx.params, ctx.model
    policy = make_policy(params, CacheShape.of(model))
    sampling = params["base"] == "sample"
    stages = build_pipeline({"temperature": params["temperature"]}) if sampling else ()
    model.use_explorer_attention()  # both runs: the same attention arithmetic, hooks only on the compressed one
    compressed, reference = model.new_cache(), model.new_cache()
    context = new_ids = torch.tensor([ctx.prompt_ids], dtype=torch.long)
    capture, tally = ctx.attention, Tally()
    ctx.on_finish(tally.metrics)
    for position in range(ctx.max_new_tokens):
        start = time.perf_counter()
        length = context.shape[1]
        with attention_hooks(policy.hooks(length), capture.hooks() if capture is not None else None):
            out = model.forward(new_ids, compressed)
        full = model.forward(new_ids, reference)
        evicted = policy.evicted(length)
        policy.update(compressed, length)
        processed = process(out.logits[:, -1, :], stages, context_ids=context)
        token = sample(processed.logprobs, ctx.generator) if sampling else greedy_choice(processed)
        token_id = int(token[0])
        kl = kl_divergence(full.logits[0, -1], out.logits[0, -1])
        full_top = int(full.logits[0, -1].argmax())
        agree = full_top == int(processed.raw_logprobs[0].argmax())
        tally.kls.append(kl)
        tally.agree.append(agree)
        tally.kept.append(1.0 - float(evicted.mean()))
        if tally.divergence < 0 and full_top != token_id:
            tally.divergence = position
        yield CacheStep(
            step=position, policy=policy.name, kl=kl, top1_agree=agree, kept_fraction=tally.kept[-1],
            evicted=evicted.astype(np.float16).tobytes(), error=policy.error,
            seconds=time.perf_counter() - start,
        )
        if capture is not None:
            attention_map = capture.take(step=position, query_positions=list(range(length - new_ids.shape[1], length)))
            if attention_map is not None:
                yield attention_map
        # both forwards are counted on the CacheStep
        yield token_event(processed, token_id, step=position, position=position, top_k=ctx.record_top_k, model_calls=0)
        new_ids = token.view(1, 1)
        context = torch.cat([context, new_ids], dim=1)


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
