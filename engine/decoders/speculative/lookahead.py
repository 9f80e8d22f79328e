"""Lookahead decoding (Fu et al., ICML 2024; hao-ai-lab/LookaheadDecoding; speculative.md §5b).

ONE target forward per step carries two branches after the last committed token (position P):

* the lookahead branch, a 2-D Jacobi window of N-1 levels x W columns: level l, column j sits at position
  P + 1 + j + l and sees the committed context, level 0's columns 0..j (level 0 is a causal chain) and column j of
  levels 1..l. The target's argmax at the top level of column j continues the column, so column j yields the
  n-gram (level_0[j]; level_1[j], ..., level_{N-2}[j], new[j]), filed in the n-gram pool under its first token
  (at most G n-grams per key, least recently produced dropped). The window then shifts: level 0 is dropped and the
  new tokens become the top level. Level 0 starts as tokens copied at random from the prompt; the first N-2 steps
  only grow the window (warm-up, no n-grams yet).
* the verification branch: the pool's n-grams for the last committed token, merged into a trie (common prefixes
  share nodes) and verified with tree attention as deterministic drafts.

Lossless: greedy output equals greedy decoding; under sampling the deterministic-draft rule (accept with
probability p(c), remove rejected tokens from p) keeps the output distributed as the processed target.

Cost-aware (``draft_length`` adaptive, the default): the window and the candidates ride along every forward, up to
W x (N-1) + G x (N-1) extra tokens, which on a CPU cost about 3x a one-token step. A step is run as a lookahead
step or as a plain one-token step (window and pool paused), whichever committed more tokens per second lately
(:class:`engine.speculative.draft_length.PayoffSwitch`); the paused window is probed again on a time budget.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, DraftNode, DraftRound, Event
from engine.params import Param
from engine.speculative.cache import PrefixCache
from engine.speculative.draft_length import PayoffSwitch
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Sampling, draft_round, plain_round
from engine.speculative.tree import ExtraNodes, keep_path, tree_forward
from engine.speculative.verify import verify_tree


class NgramPool:
    """n-grams by their first token (the key): the continuations, least recent first, at most ``size`` per key."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.by_key: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, continuation: tuple[int, ...]) -> None:
        entries = self.by_key.setdefault(key, [])
        if continuation in entries:
            entries.remove(continuation)
        entries.append(continuation)
        del entries[: -self.size]

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        """The continuations of ``key``, most recent first."""
        return self.by_key.get(key, [])[::-1]

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_key.values())


class LookaheadWindow:
    """The 2-D Jacobi window: ``levels[l][j]`` is level l, column j."""

    def __init__(self, first_level: list[int], ngram: int) -> None:
        self.levels = [first_level]
        self.ngram = ngram

    @property
    def width(self) -> int:
        return len(self.levels[0])

    def tokens(self) -> list[int]:
        return [token for level in self.levels for token in level]

    def branch(self, context_length: int, tree_size: int) -> ExtraNodes:
        """The window as extra nodes after a ``tree_size``-node tree, in level-major order."""
        width, depth = self.width, len(self.levels)
        positions = [context_length + j + l for l in range(depth) for j in range(width)]
        visible = torch.zeros(depth * width, tree_size + depth * width, dtype=torch.bool)
        for l in range(depth):
            for j in range(width):
                row = visible[l * width + j, tree_size:]
                row[: j + 1] = True  # level 0, columns 0..j
                row[torch.arange(1, l + 1) * width + j] = True  # column j of levels 1..l
        return ExtraNodes(self.tokens(), positions, visible)

    def describe(self) -> str:
        warming_up = len(self.levels) < self.ngram - 1
        return f"window {len(self.levels)}x{self.width}{' (warm-up)' if warming_up else ''}"

    def advance(self, new: list[int], pool: NgramPool) -> None:
        """File each column's n-gram once the window is full, then shift (or, warming up, grow) the window."""
        if len(self.levels) == self.ngram - 1:
            for j, key in enumerate(self.levels[0]):
                pool.add(key, tuple(level[j] for level in self.levels[1:]) + (new[j],))
            self.levels.pop(0)
        self.levels.append(new)

    def nodes(self, first_id: int) -> list[DraftNode]:
        """The window for the round record: a column hangs under its level-0 prefix, like its attention."""
        width = self.width
        return [
            DraftNode(
                id=first_id + l * width + j,
                parent=(first_id + (l - 1) * width + j) if l else (first_id + j - 1 if j else -1),
                token_id=token,
                depth=1 + j + l,
                draft_prob=1.0,
                source="lookahead",
            )
            for l, level in enumerate(self.levels)
            for j, token in enumerate(level)
        ]


def ngram_trie(continuations: list[tuple[int, ...]], max_depth: int) -> tuple[list[int], list[int]]:
    """Parents and tokens of the trie of the continuations cut to ``max_depth`` (shared prefixes, one node each)."""
    parents: list[int] = []
    tokens: list[int] = []
    node_of: dict[tuple[int, ...], int] = {}
    for continuation in continuations:
        for depth in range(1, min(len(continuation), max_depth) + 1):
            prefix = continuation[:depth]
            if prefix not in node_of:
                node_of[prefix] = len(tokens)
                parents.append(node_of[prefix[:-1]] if depth > 1 else -1)
                tokens.append(prefix[-1])
    # verify_tree wants parents before children; insertion order guarantees it
    return parents, tokens


def lookahead(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    sampling = Sampling.of(ctx)
    target = PrefixCache(ctx.model)
    pool = NgramPool(params["pool_size"])
    if params["pool_from_prompt"]:
        _fill_from(pool, ctx.prompt_ids, params["ngram"])
    picks = torch.randint(len(ctx.prompt_ids), (params["window"],), generator=ctx.generator)
    window = LookaheadWindow([ctx.prompt_ids[i] for i in picks.tolist()], params["ngram"])
    context = list(ctx.prompt_ids)
    step = 0
    switch = PayoffSwitch() if params["draft_length"] == "adaptive" else None
    ctx.on_finish(lambda: [DecoderMetric("ngram_pool_size", len(pool), "n-grams in the pool after the last step")])
    while (generated := len(context) - len(ctx.prompt_ids)) < ctx.max_new_tokens:
        started = time.perf_counter()
        speculate = switch.speculate() if switch else True
        if speculate:
            event = _step(step, target, context, window, pool, sampling, ctx.max_new_tokens - generated - 1,
                          ctx.record_top_k)
        else:
            event = plain_round(step, target, context, sampling, ctx.record_top_k, "ngram_pool",
                                "plain step: the lookahead window paid less than plain steps lately")
        context += event.committed
        yield event
        if switch:  # the round lasts until the next starts: recording it counts too
            switch.observe(speculate, len(event.committed), time.perf_counter() - started)
        step += 1


def _step(
    step: int,
    target: PrefixCache,
    context: list[int],
    window: LookaheadWindow,
    pool: NgramPool,
    sampling: Sampling,
    max_depth: int,
    top_k: int,
) -> DraftRound:
    """One forward: verify the pool's candidates for the last token, advance the window; the round with both."""
    start = time.perf_counter()
    parents, tokens = ngram_trie(pool.candidates(context[-1]), max_depth)
    branch = window.branch(len(context), len(tokens))
    logits = tree_forward(target, context, parents, tokens, branch)
    target_logprobs = sampling.process(logits[: len(tokens) + 1]).logprobs
    verdict = verify_tree(parents, tokens, target_logprobs, None, sampling.generator, top_k)
    slots = keep_path(target, tokens + branch.tokens, verdict.accepted_path)
    mode = f"{window.describe()}, pool {len(pool)} n-grams, {len(tokens)} candidate nodes"
    window_nodes = window.nodes(len(tokens))
    window.advance(logits[-window.width :].argmax(-1).tolist(), pool)  # the top level's outputs
    event = draft_round(
        step,
        draft=Draft(tokens, [1.0] * len(tokens), parents=parents),
        source="ngram_pool",
        verdict=verdict,
        cache_slots_kept=slots,
        draft_seconds=0.0,
        seconds=time.perf_counter() - start,
        mode=mode,
    )
    return replace(event, nodes=event.nodes + window_nodes)


def _fill_from(pool: NgramPool, ids: list[int], ngram: int) -> None:
    for start in range(len(ids) - ngram + 1):
        pool.add(ids[start], tuple(ids[start + 1 : start + ngram]))


SPEC = register(
    DecoderSpec(
        name="lookahead",
        family="speculative",
        summary="Lookahead decoding: a 2-D Jacobi window fills an n-gram pool, verified in the same forward.",
        params=(
            Param("window", "int", 7, "W: columns of the Jacobi window (n-grams produced per step).", 1, 64, limit="draft_tokens"),
            Param("ngram", "int", 5, "N: n-gram size; the window has N-1 levels and candidates N-1 tokens.", 2, 16),
            Param("pool_size", "int", 7, "G: most n-grams kept per first token (least recently produced dropped).", 1, 256),
            Param("pool_from_prompt", "bool", False, "Seed the pool with the prompt's n-grams.", None, None),
            *SAMPLING_PARAMS,
        ),
        run=lookahead,
        lossless=True,
    )
)
