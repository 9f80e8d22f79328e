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

from collections import deque
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, TokenHook, autoregressive
from engine.events import DecoderMetric, Event, TokenStep
from engine.params import Param
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import same_tokenizer_model
from engine.speculative.rounds import SAMPLING_PARAMS, Sampling


def choose_model(entropies: deque[float], tau: float) -> str:
    """'large' when the rolling mean entropy exceeds ``tau`` (an empty window counts 0), else 'small'."""
    mean = sum(entropies) / len(entropies) if entropies else 0.0
    return "large" if mean > tau else "small"


class EntropySwitch(TokenHook):
    """Each step runs on the active model's cache; after a switch its sync is the catch-up prefill."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.sampling = Sampling.of(ctx)
        self.stages = self.sampling.stages
        small = same_tokenizer_model(ctx, ctx.params["small_model"], ctx.params["small_layers"], "small_model", "small_layers")
        self.caches = {"small": PrefixCache(small), "large": PrefixCache(ctx.model)}
        self.tau = ctx.params["tau"]
        self.entropies: deque[float] = deque(maxlen=ctx.params["window"])
        self.sources: list[str] = []
        self.output: list[int] = []
        self.active = "large"

    def cache(self, own: PrefixCache) -> PrefixCache:
        self.active = choose_model(self.entropies, self.tau)
        return self.caches[self.active]

    def choose(self, step: Step) -> int:
        return self.sampling.choose(step.processed.logprobs[0])

    def fields(self) -> dict[str, str]:
        return {"source": self.active}

    def advance(self, event: TokenStep) -> None:
        self.entropies.append(event.entropy_raw)
        self.sources.append(self.active)
        self.output.append(event.token_id)


def ead(ctx: DecodeContext) -> Iterator[Event]:
    hook = EntropySwitch(ctx)
    ctx.on_finish(lambda: _metrics(ctx, hook.sources, hook.output, hook.caches["large"], hook.sampling.greedy))
    return autoregressive(ctx, hook)


def _metrics(
    ctx: DecodeContext, sources: list[str], output: list[int], large: PrefixCache, greedy: bool
) -> Iterator[DecoderMetric]:
    if not sources:
        return
    switches = sum(a != b for a, b in zip(sources, sources[1:]))
    yield DecoderMetric("large_model_share", sources.count("large") / len(sources), "share of tokens from the large model")
    yield DecoderMetric("switches", switches, "changes of the active model")
    if not (greedy and ctx.params["compare_with_large"]):
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
        token = int(cache.forward(feed, keep=1).logits[0, -1].argmax())
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
