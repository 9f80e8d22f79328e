"""Token Recycling (Luo et al., ACL 2025, arXiv 2408.08696): drafts recycled from the target's own top-k guesses.

An adjacency matrix ``A[|V|, k]`` remembers, for every token, the target's top-k next tokens the last time that
token was in a verified draft tree. Each round a static tree template (rank paths such as ``(0, 1, 2)``: the root's
best successor, its second best successor, that one's third best) is filled level by level from ``A`` with one
gather per level, and the target verifies the whole tree in one tree-attention forward. Afterwards every tree
token's row, accepted or not, and the root's (the last committed token) is overwritten with the top-k of the
target's logits at that node (speculative.md §3), with the top-k's probabilities, which become the drafted nodes'
probabilities (the cost-aware cut verifies the likeliest nodes first). The matrix outlives a run: runs on the same
model start from what earlier runs learnt (hot start) unless ``reset_matrix`` is set.

Two departures from the reference, neither changing what is verified: rows start as "unknown" rather than token
0, and nodes under an unknown row are left out instead of drafting token 0 (the reference's cold-start chain of
zeros); and no duplicate-sibling pruning is needed, since siblings come from one row, i.e. one top-k: distinct.

Drafts are deterministic, so verification uses the deterministic-draft rule (§0.2): greedy output equals greedy
decoding and sampled output follows the processed target. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from engine import hot_start
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.params import Param
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Outcome, Sampling, speculative_rounds

UNKNOWN = -1  # a row no verified tree has filled yet: its nodes are left out of the draft

# The paper's tree "2.2.2" (80 nodes, 6 levels of 8/21/25/15/8/3 nodes), written as rank paths, level by level.
# Transcribed from the tree adjacency the reference code ships (SAM-Decoding's samd/config/token_recycle.json
# reproduces Token Recycling's default tree); node i's token is A[token(parent)][path[-1]].
TEMPLATE_2_2_2: tuple[tuple[int, ...], ...] = (
    *((r,) for r in range(8)),
    *((0, r) for r in range(8)), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1),
    (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, r) for r in range(8)), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 4, 0),
    (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *((0, 0, 0, r) for r in range(5)), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0), (0, 0, 4, 0),
    (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0), (0, 0, 1, 0, 0),
    (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)


@dataclass(frozen=True)
class Adjacency:
    """Per token, the target's top-k next tokens (``UNKNOWN`` until a verified tree held the token) and their
    probabilities then: a drafted node's probability, which the cost-aware cut ranks nodes by."""

    tokens: Tensor  # int32 [|V|, k]
    probs: Tensor  # float32 [|V|, k]

    @classmethod
    def blank(cls, vocab_size: int, k: int) -> "Adjacency":
        return cls(torch.full((vocab_size, k), UNKNOWN, dtype=torch.int32), torch.zeros(vocab_size, k))

    def known_rows(self) -> int:
        return int((self.tokens[:, 0] != UNKNOWN).sum())

    def update(self, tokens: list[int], logits: Tensor) -> None:
        """``A[tokens[i]] = topk(logits[i])``; a token that appears twice keeps its last row (the reference's rule)."""
        last = {token: row for row, token in enumerate(tokens)}  # explicit last-write-wins: index_put_ leaves it open
        top = logits[torch.tensor(list(last.values()))].float().softmax(-1).topk(self.tokens.shape[1], dim=-1)
        rows = torch.tensor(list(last.keys()))
        self.tokens[rows] = top.indices.to(self.tokens.dtype)
        self.probs[rows] = top.values


def template(tree_size: int) -> list[tuple[int, ...]]:
    """The ``tree_size`` template nodes of lowest depth + rank sum (all 80: the paper's tree), level by level.

    Depth + rank sum grows strictly from a node to its children, so any such selection is a tree.
    """
    chosen = sorted(TEMPLATE_2_2_2, key=lambda path: (len(path) + sum(path), len(path), path))[:tree_size]
    return sorted(chosen, key=lambda path: (len(path), path))


def adjacency_matrix(model_name: str, vocab_size: int, k: int, reset: bool) -> Adjacency:
    """The model's shared matrix (rows of ``UNKNOWN`` until filled); ``reset`` replaces it with a blank one."""
    matrices = hot_start.store("token_recycling")  # one matrix per (model name, vocabulary size, k)
    key = (model_name, vocab_size, k)
    if reset or key not in matrices:
        matrices[key] = Adjacency.blank(vocab_size, k)
    return matrices[key]


class RecyclingDrafter(Drafter):
    source = "token_recycling"
    partial_verify = True  # the matrix learns from the nodes the target ran, as the round's outcome lists them

    def __init__(self, matrix: Adjacency, paths: list[tuple[int, ...]]) -> None:
        self.matrix = matrix
        self.paths = paths
        index = {path: node for node, path in enumerate(paths)}
        self.template_parents = [index.get(path[:-1], -1) for path in paths]
        self._parents = torch.tensor(self.template_parents, dtype=torch.long)
        self._ranks = torch.tensor([path[-1] for path in paths], dtype=torch.long)
        self._depths = torch.tensor([len(path) for path in paths], dtype=torch.long)

    def propose(self, context: list[int], max_depth: int) -> Draft:
        tokens, probs = self.fill(context[-1], max_depth)
        kept = [node for node, token in enumerate(tokens) if token != UNKNOWN]  # a pruned node's subtree is pruned too
        new_id = {node: i for i, node in enumerate(kept)}
        parents = [new_id.get(self.template_parents[node], -1) for node in kept]
        ranks = [float(self.paths[node][-1]) for node in kept]
        return Draft([tokens[node] for node in kept], [probs[node] for node in kept], parents=parents, scores=ranks)

    def fill(self, root: int, max_depth: int) -> tuple[list[int], list[float]]:
        """Every template node's token (``UNKNOWN`` under an unknown row or below ``max_depth``) and its stored
        probability, one gather per level."""
        tokens = torch.full((len(self.paths),), UNKNOWN, dtype=torch.int32)
        probs = torch.zeros(len(self.paths))
        for depth in range(1, min(max_depth, max((len(path) for path in self.paths), default=0)) + 1):
            level = (self._depths == depth).nonzero().flatten()
            parent_tokens = torch.full_like(level, root) if depth == 1 else tokens[self._parents[level]].long()
            known = parent_tokens != UNKNOWN
            rows, ranks = parent_tokens[known], self._ranks[level[known]]
            tokens[level[known]] = self.matrix.tokens[rows, ranks]
            probs[level[known]] = self.matrix.probs[rows, ranks]
        return tokens.tolist(), probs.tolist()

    def observe(self, outcome: Outcome) -> None:
        self.matrix.update([outcome.context[-1], *outcome.draft.tokens], outcome.target_logits)


def token_recycling(ctx: DecodeContext) -> Iterator[Event]:
    k = ctx.params["k"]
    matrix = adjacency_matrix(ctx.model.name, ctx.model.vocab_size, k, ctx.params["reset_matrix"])
    # The template's ranks index the matrix's k columns: keep only the nodes whose ranks exist.
    paths = [path for path in template(ctx.params["tree_size"]) if max(path) < k]
    known = matrix.known_rows()
    yield DecoderMetric("matrix_rows_known_at_start", known, "adjacency rows learnt by earlier runs (hot start)")
    yield from speculative_rounds(ctx, RecyclingDrafter(matrix, paths), Sampling.of(ctx))


SPEC = register(
    DecoderSpec(
        name="token_recycling",
        family="speculative",
        summary="Token Recycling: a static draft tree filled from the target's remembered top-k successors.",
        params=(
            Param("k", "int", 8, "Successors remembered per token (columns of the adjacency matrix).", 1, 64),
            Param("tree_size", "int", 80, "Template nodes per round: 80 = the paper's tree; fewer = its top part.", 1, 80, limit="draft_tokens"),
            Param("reset_matrix", "bool", False, "Start from a blank matrix instead of what earlier runs learnt."),
            *SAMPLING_PARAMS,
        ),
        run=token_recycling,
        lossless=True,
    )
)
