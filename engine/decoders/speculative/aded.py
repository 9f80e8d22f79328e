"""ADED (Liu et al., AAAI 2025, arXiv 2407.12021): a tri-gram table searched by MCTS drafts a token tree.

A table ``T[(a, b)] -> {c: weight}`` starts from a bundled corpus (tri-gram counts normalised per key, the top 12
continuations kept; tokenised with the run's tokenizer on first use and cached per model). The paper uses
UltraChat; offline we bundle ``assets/corpus/assistant_answers.txt``, about 22 KB of self-written, assistant-style
English answers (lists, code, explanations), so most of the drafting power comes from adaptation to the context. Each round it adapts to
the text so far: every tri-gram among the context's last 16 tokens gains 0.04 (capped at 3.0), in a copy private
to the run. Monte Carlo tree search from the key ``(x_{t-1}, x_t)`` then looks for likely continuations: selection
by PUCT ``Q/N + (c1 + ln((N_parent + c2 + 1) / c2)) * P * sqrt(N_parent) / (1 + N)`` with ``P`` the table weight,
expansion of every continuation of a leaf, a rollout sampled in proportion to the weights up to 4 tokens, reward
``1 + sum of weights`` along the path. The most visited root-to-node sequences, each extended by its most likely
next token, form a trie of at most ``budget`` nodes, verified in one tree-attention forward (speculative.md §4).

Drafts are deterministic given the context (the search has its own seeded random stream), so verification uses
the deterministic-draft rule (§0.2): greedy output equals greedy decoding, sampled output follows the processed
target. Lossless.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.ngram import CORPUS, corpus_documents
from engine.params import Param
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds

TOP_CONTINUATIONS = 12  # continuations kept per key after normalising the corpus counts
ADAPT_WINDOW, ADAPT_STEP, ADAPT_CAP = 16, 0.04, 3.0
C1, C2 = 32.0, 8.0
ROLLOUT_LENGTH = 4  # tokens of a search sequence, tree part and rollout together

Key = tuple[int, int]
Table = dict[Key, dict[int, float]]

_TABLES: dict[tuple[str, int], Table] = {}  # corpus tables per (model name, vocabulary size)


def trigram_table(documents: list[list[int]], top: int = TOP_CONTINUATIONS) -> Table:
    """Tri-gram counts over each token list, normalised per key to probabilities, the ``top`` largest kept."""
    counts: dict[Key, Counter[int]] = {}
    for ids in documents:
        for a, b, c in zip(ids, ids[1:], ids[2:]):
            counts.setdefault((a, b), Counter())[c] += 1
    table: Table = {}
    for key, counter in counts.items():
        total = sum(counter.values())
        table[key] = {c: n / total for c, n in counter.most_common(top)}
    return table


def corpus_table(model_name: str, vocab_size: int, tokenizer) -> Table:
    """The bundled corpus's table in this model's tokens, built once per model (paragraphs are documents)."""
    key = (model_name, vocab_size)
    if key not in _TABLES:
        _TABLES[key] = trigram_table(corpus_documents(model_name, vocab_size, tokenizer))
    return _TABLES[key]


def adapt(table: Table, context: list[int], private: set[Key]) -> None:
    """Raise the weight of every tri-gram in the last ``ADAPT_WINDOW`` tokens, copying shared rows before writing."""
    window = context[-ADAPT_WINDOW:]
    for a, b, c in zip(window, window[1:], window[2:]):
        if (a, b) not in private:
            table[(a, b)] = dict(table.get((a, b), {}))
            private.add((a, b))
        row = table[(a, b)]
        row[c] = min(row.get(c, 0.0) + ADAPT_STEP, ADAPT_CAP)


@dataclass
class SearchNode:
    token: int
    key: Key  # the last two tokens: where the table continues from
    prior: float  # the table weight that led here (PUCT's P)
    visits: int = 0
    score: float = 0.0
    children: list["SearchNode"] | None = None  # None: not expanded yet


def puct(parent: SearchNode, child: SearchNode) -> float:
    if child.visits == 0:
        return math.inf
    explore = (C1 + math.log((parent.visits + C2 + 1) / C2)) * child.prior * math.sqrt(parent.visits) / (1 + child.visits)
    return child.score / child.visits + explore


def search(table: Table, key: Key, iterations: int, rng: random.Random) -> SearchNode:
    """MCTS over continuations of ``key``; returns the root, whose subtree carries the visit counts."""
    root = SearchNode(token=key[1], key=key, prior=1.0)
    for _ in range(iterations):
        path = [root]
        while path[-1].children:  # selection
            parent = path[-1]
            path.append(max(parent.children, key=lambda child: puct(parent, child)))
        leaf = path[-1]
        if leaf.children is None and len(path) <= ROLLOUT_LENGTH:  # expansion (the root is at depth 0)
            leaf.children = [SearchNode(c, (leaf.key[1], c), w) for c, w in _ranked(table.get(leaf.key, {}))]
            if leaf.children:
                path.append(leaf.children[0])  # unvisited children come first by PUCT; take the likeliest
        reward = 1.0 + sum(node.prior for node in path[1:]) + rollout(table, path[-1].key, ROLLOUT_LENGTH - (len(path) - 1), rng)
        for node in path:  # backpropagation
            node.visits += 1
            node.score += reward
    return root


def rollout(table: Table, key: Key, length: int, rng: random.Random) -> float:
    """Sum of the weights along ``length`` tokens sampled in proportion to the table's weights."""
    total = 0.0
    for _ in range(length):
        row = table.get(key)
        if not row:
            break
        token = rng.choices(list(row), weights=list(row.values()))[0]
        total += row[token]
        key = (key[1], token)
    return total


def _ranked(row: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(row.items(), key=lambda item: (-item[1], item[0]))


@dataclass
class Trie:
    """Draft nodes in insertion order (parents before children) with their tokens and MCTS visit counts."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    visits: list[float] = field(default_factory=list)
    index: dict[tuple[int, ...], int] = field(default_factory=dict)

    def insert(self, sequence: list[int], visits: list[int], budget: int) -> None:
        """Add ``sequence``'s missing prefix nodes while fewer than ``budget`` nodes exist."""
        for depth in range(len(sequence)):
            prefix = tuple(sequence[: depth + 1])
            if prefix in self.index:
                continue
            if len(self.tokens) >= budget:
                return
            self.index[prefix] = len(self.tokens)
            self.parents.append(self.index[prefix[:-1]] if depth else -1)
            self.tokens.append(sequence[depth])
            self.visits.append(float(visits[depth]))


def best_sequences(root: SearchNode, table: Table, count: int) -> list[tuple[list[int], list[int]]]:
    """The ``count`` most visited root-to-node sequences (tokens, visits), each extended by its likeliest next token."""
    found: list[tuple[int, list[SearchNode]]] = []
    stack: list[list[SearchNode]] = [[root]]
    while stack:
        path = stack.pop()
        stack.extend(path + [child] for child in path[-1].children or [] if child.visits)
        if len(path) > 1:
            found.append((path[-1].visits, path[1:]))
    found.sort(key=lambda item: -item[0])  # stable: ties keep discovery order, a node before its descendants
    sequences = []
    for _, path in found[:count]:
        tokens, visits = [n.token for n in path], [n.visits for n in path]
        row = table.get(path[-1].key)
        if row:
            nxt = _ranked(row)[0][0]
            child = next((c for c in path[-1].children or [] if c.token == nxt), None)
            tokens.append(nxt)
            visits.append(child.visits if child else 0)
        sequences.append((tokens, visits))
    return sequences


def draft_trie(table: Table, key: Key, iterations: int, budget: int, max_depth: int, rng: random.Random) -> Trie:
    trie = Trie()
    for tokens, visits in best_sequences(search(table, key, iterations, rng), table, budget):
        trie.insert(tokens[:max_depth], visits, budget)
    return trie


class AdedDrafter(Drafter):
    source = "aded"

    def __init__(self, table: Table, iterations: int, budget: int, seed: int = 0) -> None:
        self.table = dict(table)  # rows are copied on their first adaptation: the corpus table stays untouched
        self.private: set[Key] = set()
        self.iterations = iterations
        self.budget = budget
        self.rng = random.Random(seed)

    def propose(self, context: list[int], max_depth: int) -> Draft:
        adapt(self.table, context, self.private)
        if len(context) < 2 or max_depth < 1:
            return Draft([], [], parents=[])
        trie = draft_trie(self.table, (context[-2], context[-1]), self.iterations, self.budget, max_depth, self.rng)
        return Draft(trie.tokens, [1.0] * len(trie.tokens), parents=trie.parents, scores=trie.visits)


def aded(ctx: DecodeContext) -> Iterator[Event]:
    table = corpus_table(ctx.model.name, ctx.model.vocab_size, ctx.model.tokenizer)
    yield DecoderMetric("corpus_trigram_keys", len(table), f"tri-gram keys from {CORPUS.name} in this model's tokens")
    drafter = AdedDrafter(table, ctx.params["iterations"], ctx.params["budget"])
    yield from speculative_rounds(ctx, drafter, Sampling.of(ctx))


SPEC = register(
    DecoderSpec(
        name="aded",
        family="speculative",
        summary="ADED: an adaptive tri-gram table searched by MCTS drafts a token tree, verified in one forward.",
        params=(
            Param("iterations", "int", 150, "MCTS iterations per round.", 1, 5000),
            Param("budget", "int", 24, "Most draft tree nodes per round.", 1, 256, limit="draft_tokens"),
            *SAMPLING_PARAMS,
        ),
        run=aded,
        lossless=True,
    )
)
