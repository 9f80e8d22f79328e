"""Momentum decoding (Lan et al. 2022, arXiv 2212.02175; gmftbyGMFTBY/MomentumDecoding ``ResistanceDecodingNGram``).

Text is a walk on a graph whose nodes are token ids and whose edges are observed transitions; degeneration is a
loop. Each step takes the top-k tokens by logit and scores each ``s(v) = p(v) - alpha * R(l(v))``: p is the full
softmax, l(v) the repetition length (0 if v is a new node, else the longest n-gram up to ``max_n`` that v would
repeat, at least 1) and R a resistance table. The highest score wins, so new nodes cost nothing and returning to
old ones is resisted more the longer the loop it would repeat. The graph is seeded with the prompt.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, TokenHook, autoregressive
from engine.events import DecoderMetric, Event, Rerank, ScoredCandidate, TokenStep
from engine.params import Param

PART_NAMES = ["p", "repetition length", "resistance"]

RESISTANCES: dict[str, Callable[[int], float]] = {
    "linear": lambda l: float(l),  # the paper's GPT2-XL setting
    "ngram_block": lambda l: 0.0 if l <= 3 else 5.0 if l == 4 else math.inf,  # the repo's current default
    "constant": lambda l: 0.0 if l == 0 else 2.0,
    "log": lambda l: math.log(1 + l, 6) / 0.2,
    "exp": lambda l: 1.5**l / 2,
}


class TokenGraph:
    """The walk so far (prompt + output): each node's positions, and the edge set for the graph's size."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.positions: dict[int, list[int]] = {}
        self.edges: set[tuple[int, int]] = set()
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        if self.tokens:
            self.edges.add((self.tokens[-1], token))
        self.positions.setdefault(token, []).append(len(self.tokens))
        self.tokens.append(token)

    def repetition_length(self, token: int, max_n: int) -> int:
        """0 for a new node; else the largest n <= max_n such that (last n-1 tokens + token) already occurred; else 1."""
        seen = self.positions.get(token)
        if not seen:
            return 0
        walk, best = self.tokens, 1
        for i in seen:  # an earlier occurrence of `token` that the n-gram would end at
            n = 1
            while n < max_n and i - n >= 0 and walk[i - n] == walk[-n]:
                n += 1
            best = max(best, n)
            if best == max_n:
                break
        return best


def label_of(top_length: int, chosen: int) -> str:
    """The paper's is_greedy annotation: top-1 is a new node / an old node still chosen / an old node overridden."""
    return "greedy" if top_length == 0 else "kept" if chosen == 0 else "overridden"


def momentum_rerank(
    logprobs: torch.Tensor, graph: TokenGraph, *, top_k: int, alpha: float, resistance: str, max_n: int, position: int
) -> Rerank:
    """Score the top-k tokens of one distribution ([V] log-probs) against the graph."""
    table = RESISTANCES[resistance]
    top = torch.topk(logprobs, k=min(top_k, logprobs.shape[-1]))
    candidates, scores, lengths = [], [], []
    for logp, token in zip(top.values.tolist(), top.indices.tolist()):
        p, length = math.exp(logp), graph.repetition_length(token, max_n)
        r = table(length)
        scores.append(p - alpha * r if alpha else p)  # alpha 0 is plain greedy, even against an infinite resistance
        lengths.append(length)
        candidates.append(ScoredCandidate(token_id=token, score=scores[-1], parts=[p, float(length), r]))
    chosen = max(range(len(scores)), key=scores.__getitem__)  # first of equals: the more likely token
    return Rerank(step=position, position=position, method="momentum", part_names=list(PART_NAMES),
                  candidates=candidates, chosen=chosen, baseline=0, label=label_of(lengths[0], chosen))


class Momentum(TokenHook):
    """Each step reranks the top-k raw tokens against the walk so far; the rerank goes out before its token."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.params = ctx.params
        self.graph = TokenGraph(list(ctx.prompt_ids))
        self.rerank: Rerank | None = None
        self.overridden = 0

    def choose(self, step: Step) -> int:
        params = self.params
        self.rerank = momentum_rerank(
            step.processed.raw_logprobs[0], self.graph, top_k=params["top_k"], alpha=params["alpha"],
            resistance=params["resistance"], max_n=params["max_n"], position=step.position,
        )
        return self.rerank.candidates[self.rerank.chosen].token_id

    def report(self, step: Step, token: int) -> Iterator[Event]:
        yield self.rerank

    def advance(self, event: TokenStep) -> None:
        self.overridden += self.rerank.label == "overridden"
        self.graph.add(event.token_id)


def momentum(ctx: DecodeContext) -> Iterator[Event]:
    hook = Momentum(ctx)
    ctx.on_finish(lambda: _metrics(hook.graph, hook.overridden))
    return autoregressive(ctx, hook)


def _metrics(graph: TokenGraph, overridden: int) -> Iterator[DecoderMetric]:
    yield DecoderMetric("graph_nodes", len(graph.positions), "distinct tokens in prompt and output (graph nodes)")
    yield DecoderMetric("graph_edges", len(graph.edges), "distinct transitions in prompt and output (graph edges)")
    yield DecoderMetric("overridden_steps", overridden, "steps where resistance overrode the greedy token")


SPEC = register(
    DecoderSpec(
        name="momentum",
        family="token",
        summary="Momentum decoding: greedy over the top-k, but tokens that would repeat an n-gram of the context "
        "meet a resistance that grows with the repeated length.",
        params=(
            Param("top_k", "int", 5, "Candidates scored per step (the k most probable tokens).", 1, 100_000),
            Param("alpha", "float", 0.2, "Weight of the resistance: score = p - alpha * R(l) (0 = greedy).", 0.0, 100.0),
            Param("resistance", "choice", "linear", "Resistance table R(l): linear R = l (the paper's GPT2-XL setting); "
                  "ngram_block 0 up to l = 3, 5 at 4, infinite from 5; constant 2 for any old node; "
                  "log log_6(1 + l) / 0.2; exp 1.5^l / 2.", choices=tuple(RESISTANCES)),
            Param("max_n", "int", 5, "Longest n-gram checked for the repetition length l.", 2, 64),
        ),
        run=momentum,
        accepts_images=True,  # the shared loop passes the prompt's extra inputs to its prefill
    )
)
