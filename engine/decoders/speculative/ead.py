"""Entropy Adaptive Decoding (Simonds 2025, arXiv 2502.06833): a small and a large model take turns, by entropy.

Each token comes from the active model. The rolling mean entropy ``H̄ = mean(H(p_i))`` over the last ``window``
distributions (each the raw distribution of whichever model was active there; an empty window counts 0) decides
who produces the next token: the large model while ``H̄ > tau``, the small one while ``H̄ <= tau``. On a switch the
newly active model first prefills the tokens the other produced meanwhile (its PrefixCache catches up). Lossy by
design: the output is neither model's own output. ``tau < 0`` always uses the large model, ``tau`` above ln(V)
always the small one.

The small model is the target's first ``small_layers`` layers (weights shared) or ``small_model``, which must share
the target's tokenizer. With greedy decoding the run also measures how far the output strays from the large model
alone: the large model continues the prompt greedily for as many tokens, after generation, outside the timing.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import token_event
from engine.events import DecoderMetric, Event
from engine.params import Param
from engine.processing import process
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import same_tokenizer_model
from engine.speculative.rounds import SAMPLING_PARAMS, Sampling


def choose_model(entropies: deque[float], tau: float) -> str:
    """'large' when the rolling mean entropy exceeds ``tau`` (an empty window counts 0), else 'small'."""
    mean = sum(entropies) / len(entropies) if entropies else 0.0
    return "large" if mean > tau else "small"


def ead(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    caches = {"small": PrefixCache(same_tokenizer_model(ctx, ctx.params["small_model"], ctx.params["small_layers"], "small_model", "small_layers")), "large": PrefixCache(ctx.model)}
    tau = ctx.params["tau"]
    entropies: deque[float] = deque(maxlen=ctx.params["window"])
    context = list(ctx.prompt_ids)
    sources: list[str] = []
    ctx.on_finish(lambda: _metrics(ctx, sources, context[len(ctx.prompt_ids) :], caches["large"], sampling))
    for position in range(ctx.max_new_tokens):
        start = time.perf_counter()
        active = choose_model(entropies, tau)
        cache = caches[active]
        out = cache.forward(cache.sync(context))  # after a switch: the catch-up prefill, then the next token
        processed = process(out.logits[:, -1, :], sampling.stages)
        token = sampling.choose(processed.logprobs[0])
        event = token_event(
            processed, token, step=position, position=position, top_k=ctx.record_top_k,
            seconds=time.perf_counter() - start, source=active,
        )
        entropies.append(event.entropy_raw)
        context.append(token)
        sources.append(active)
        yield event


def _metrics(
    ctx: DecodeContext, sources: list[str], output: list[int], large: PrefixCache, sampling: Sampling
) -> Iterator[DecoderMetric]:
    if not sources:
        return
    switches = sum(a != b for a, b in zip(sources, sources[1:]))
    yield DecoderMetric("large_model_share", sources.count("large") / len(sources), "share of tokens from the large model")
    yield DecoderMetric("switches", switches, "changes of the active model")
    if not (sampling.greedy and ctx.params["compare_with_large"]):
        return
    alone = _greedy_continuation(large, list(ctx.prompt_ids), len(output))
    same = [a == b for a, b in zip(output, alone)]
    first = same.index(False) if False in same else -1
    yield DecoderMetric("first_divergence", first, "first output position where the large model alone differs (-1: none)")
    yield DecoderMetric("token_agreement", sum(same) / len(same), "share of positions equal to the large model's greedy output")


def _greedy_continuation(cache: PrefixCache, context: list[int], length: int) -> list[int]:
    """``length`` tokens the cached model alone picks greedily after ``context``."""
    feed = cache.sync(context)
    for _ in range(length):
        token = int(cache.forward(feed).logits[0, -1].argmax())
        context.append(token)
        feed = [token]
    return context[-length:]


SPEC = register(
    DecoderSpec(
        name="ead",
        family="speculative",
        summary="Entropy adaptive decoding: a small model writes while the rolling entropy stays low, the large one "
        "takes over when it rises (lossy).",
        params=(
            Param("small_model", "str", "", "Small model with the target's tokenizer (empty = the target's first "
                  "small_layers layers).", loads_files=True),
            Param("small_layers", "int", 2, "Without small_model: the target's first N layers plus its head.", 1, 1000),
            Param("window", "int", 4, "Distributions averaged in the rolling entropy (w).", 1, 1000),
            Param("tau", "float", 2.0, "Entropy threshold in nats: large model while the rolling mean exceeds it (< 0: always large).", -1.0, 100.0),
            Param("compare_with_large", "bool", True, "Greedy only: afterwards, run the large model alone to measure divergence."),
            *SAMPLING_PARAMS,
        ),
        run=ead,
        lossless=False,
    )
)
