"""AdaDec (He et al. 2025, arXiv 2506.08980; SYSUSELab/AdaDec, mode AdaFixL): greedy decoding that pauses to look
ahead where the model is unsure.

At each step the entropy H (nats) of the raw next-token distribution is compared with a threshold tau learned per
model (:mod:`engine.adadec_threshold`). Below tau the greedy token is taken. Otherwise the decoder pauses: each of
the top-B tokens c_j is extended by a greedy look-ahead of up to L tokens (stopping after an EOS), scored
``(log p(c_j) + sum of look-ahead log-probs) / (len_j + 1)``, and the best is taken. Look-aheads share the run's KV
cache, rolled back to the context after each. The reference also ends a look-ahead at the end of a code block
(four blank lines or an unindented line); here only EOS ends it early.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch

from engine.adadec_threshold import resolve_threshold
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, TokenHook, autoregressive
from engine.events import DecoderMetric, Event, Rerank, ScoredCandidate
from engine.params import Param
from engine.processing import entropy
from engine.speculative.cache import PrefixCache

PART_NAMES = ["log p", "look-ahead log p", "length"]


class AdaDec(TokenHook):
    """Greedy; where the raw entropy reaches tau, a look-ahead on the loop's own cache (rolled back next step)."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.tau = resolve_threshold(ctx.model.name, ctx.params["threshold"])
        self.beam, self.length = ctx.params["lookahead_beam_size"], ctx.params["lookahead_length"]
        self.eos = ctx.eos_token_ids
        self.rerank: Rerank | None = None
        self.pauses = 0

    def choose(self, step: Step) -> int:
        logprobs = step.processed.raw_logprobs[0]
        h = float(entropy(logprobs))
        self.rerank = None
        if h < self.tau:
            return int(logprobs.argmax())
        self.rerank = Rerank(step=step.position, position=step.position, threshold=self.tau, value=h,
                             **pause(step.cache, step.context, logprobs, beam=self.beam, length=self.length, eos=self.eos))
        self.pauses += 1
        return self.rerank.candidates[self.rerank.chosen].token_id

    def report(self, step: Step, token: int) -> Iterator[Event]:
        if self.rerank is not None:
            yield self.rerank

    def summary(self) -> Iterator[DecoderMetric]:
        yield DecoderMetric("paused_steps", self.pauses, "steps whose entropy reached the threshold (look-ahead run)")
        yield DecoderMetric("threshold", self.tau, "entropy threshold tau in nats")


def adadec(ctx: DecodeContext) -> Iterator[Event]:
    hook = AdaDec(ctx)
    ctx.on_finish(hook.summary)
    return autoregressive(ctx, hook)


def pause(
    cache: PrefixCache, context: list[int], logprobs: torch.Tensor, *, beam: int, length: int, eos: set[int]
) -> dict[str, Any]:
    """Look ahead from each of the ``beam`` most likely tokens and rerank them by mean log-prob: the Rerank's
    fields other than its step, position, threshold and value."""
    start = time.perf_counter()
    top = torch.topk(logprobs, k=min(beam, logprobs.shape[-1]))
    candidates, scores, calls = [], [], 0
    for logp, first in zip(top.values.tolist(), top.indices.tolist()):
        tokens, token_logprobs = look_ahead(cache, context, first, length, eos)
        calls += len(tokens)
        ahead = sum(token_logprobs)
        scores.append((logp + ahead) / (len(tokens) + 1))
        candidates.append(ScoredCandidate(
            token_id=first, score=scores[-1], parts=[logp, ahead, float(len(tokens))], tokens=tokens,
            token_scores=list(token_logprobs),
        ))
    chosen = max(range(len(scores)), key=scores.__getitem__)  # first of equals: the more likely token
    return {"method": "adadec", "part_names": list(PART_NAMES), "candidates": candidates, "chosen": chosen,
            "baseline": 0, "label": "paused", "model_calls": calls, "seconds": time.perf_counter() - start}


def look_ahead(
    cache: PrefixCache, context: list[int], first: int, length: int, eos: set[int]
) -> tuple[list[int], list[float]]:
    """Up to ``length`` greedy tokens (and their log-probs) after ``context + [first]``; none after an EOS."""
    tokens: list[int] = []
    token_logprobs: list[float] = []
    if first in eos:
        return tokens, token_logprobs
    feed = cache.sync(context + [first])  # the cache holds the context: only `first` runs
    while len(tokens) < length:
        logp = torch.log_softmax(cache.forward(feed, keep=1).logits[0, -1], dim=-1)
        token = int(logp.argmax())
        tokens.append(token)
        token_logprobs.append(float(logp[token]))
        if token in eos:
            break
        feed = [token]
    return tokens, token_logprobs


SPEC = register(
    DecoderSpec(
        name="adadec",
        family="token",
        summary="AdaDec: greedy, but where the entropy reaches a learned threshold, look a few tokens ahead from the "
        "top candidates and take the one with the best mean log-prob.",
        params=(
            Param("threshold", "float", 0.0, "Entropy threshold tau in nats: pause where H >= tau (0 = the threshold "
                  "learned for this model by `python -m engine.offline.adadec_fit`).", 0.0, 1000.0),
            Param("lookahead_beam_size", "int", 3, "Candidates looked ahead from at a paused step (B).", 1, 100, limit="beams"),
            Param("lookahead_length", "int", 5, "Greedy look-ahead tokens per candidate (L; fewer after an EOS).", 1, 100),
        ),
        run=adadec,
    )
)
