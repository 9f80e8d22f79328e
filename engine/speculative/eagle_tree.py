"""EAGLE-2's dynamic draft tree, shared by the drafters that grow it from a trained feature head (EAGLE, FSPAD,
Falcon): the head runs over the newly committed positions (its own one-layer KV cache keeps the older ones), its last
output gives the root's ``branching`` best children; then for ``depth - 1`` levels the ``branching`` nodes of highest
cumulative draft log-probability are expanded in ONE batched head forward with tree attention, each getting its
``branching`` best children; finally the ``tree_size`` nodes of highest cumulative score over the whole tree are kept
(a child never outscores its parent, so they form a subtree). The drafts are deterministic (the top tokens, not
samples), so the shared verifier's deterministic rule keeps sampling lossless too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from engine.context import DecodeContext
from engine.events import Event
from engine.params import Param
from engine.speculative.cache import PrefixCache, crop_cache
from engine.speculative.feature_head import FeatureHead
from engine.speculative.rounds import (
    Draft,
    Drafter,
    Outcome,
    Sampling,
    speculative_rounds,
)

# The tree's shape, as every tree-growing head decoder describes it.
TREE_SIZE, DEPTH, BRANCHING = (
    Param("tree_size", "int", 24, "Draft tree nodes per round (the best by cumulative draft log-probability).",
          1, 256, limit="draft_tokens"),
    Param("depth", "int", 6, "Deepest draft node (tokens beyond the committed context).", 1, 32),
    Param("branching", "int", 4, "Children drafted per expanded node, and nodes expanded per level.", 1, 32),
)


@dataclass(frozen=True)
class _Node:
    token: int
    parent: int  # index in the candidate pool, -1 for a child of the root
    prob: float  # the draft's (processed) probability of the token at its parent
    score: float  # cumulative draft log-probability from the root: EAGLE-2's ranking


class EagleDrafter(Drafter):
    """Grows EAGLE-2 trees with ``head``; reads the target's features from ``target`` (the verifier's cache)."""

    partial_verify = True  # it keeps the features of verified nodes only

    def __init__(self, head: FeatureHead, target: PrefixCache, sampling: Sampling, tree_size: int, depth: int,
                 branching: int) -> None:
        self.head, self.target, self.sampling = head, target, sampling
        self.source = head.kind  # "eagle", or the kind of a head built on EAGLE's ("fspad")
        self.tree_size, self.depth, self.branching = tree_size, depth, branching
        target.record_hidden = head.target_features
        self.features: Tensor | None = None  # the target's feature at every committed position but the last
        self.cache = DynamicCache()  # the head's KV, one entry per committed head position
        self.cached = 0

    def propose(self, context: list[int], max_depth: int) -> Draft:
        depth = min(self.depth, max_depth)
        if self.features is None or depth < 1:  # the first round's forward is the prompt's: nothing to draft from
            return Draft([], [])
        if len(self.features) != len(context) - 1:
            raise ValueError("the EAGLE drafter's features do not match the context")
        with torch.inference_mode():
            root = self._run_committed(context)
            pool, calls = self._grow(root, depth)
        crop_cache(self.cache, self.cached)
        return self._best_tree(pool, self._kept(pool, depth), calls)

    def _kept(self, pool: list[_Node], depth: int) -> list[int]:
        """The best-scored nodes of ``pool``, parents first: ``tree_size`` of them for a full-depth tree, and as many
        per level for one the draft length cut (a tree cut to 2 of 6 levels keeps a third of the nodes, the
        per-level sizes the cost-aware length learned from full trees, not all of its top two levels)."""
        size = max(1, round(self.tree_size * depth / self.depth))
        return sorted(sorted(range(len(pool)), key=lambda n: -pool[n].score)[:size])  # stable: parents first

    @staticmethod
    def _best_tree(pool: list[_Node], kept: list[int], calls: int, **extra: object) -> Draft:
        new_id = {node: i for i, node in enumerate(kept)}
        return Draft(
            tokens=[pool[n].token for n in kept],
            probs=[pool[n].prob for n in kept],
            parents=[new_id[pool[n].parent] if pool[n].parent >= 0 else -1 for n in kept],
            calls=calls,
            scores=[round(pool[n].score, 4) for n in kept],
            **extra,
        )

    def observe(self, outcome: Outcome) -> None:
        """Keep the target's features of the tokens it just ran and kept: the unseen ones, then the accepted path."""
        hidden = self.target.last_hidden
        unseen = len(hidden) - len(outcome.draft.tokens)
        path = torch.tensor(outcome.verdict.accepted_path, dtype=torch.long) + unseen
        kept = torch.cat([hidden[:unseen], hidden[path.to(hidden.device)]])
        self.features = kept if self.features is None else torch.cat([self.features, kept])

    def _run_committed(self, context: list[int]) -> Tensor:
        """Run the head over the committed positions it has not seen; its feature predicted for the last token."""
        start, end = self.cached, len(context) - 1  # head position t reads token t + 1 and feature t
        tokens = torch.tensor([context[start + 1: end + 1]], device=self.features.device)
        visible = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        out = self.head(tokens, self.features[None, start:end], torch.arange(start, end)[None].to(tokens.device),
                        self._mask(visible), self.cache)
        self.cached = end
        return out[0, -1]

    def _grow(self, root: Tensor, depth: int) -> tuple[list[_Node], int]:
        """EAGLE-2's expansion: every candidate drafted within ``depth`` levels, and the head forwards it took."""
        pool: list[_Node] = []
        slots: dict[int, int] = {}  # node -> its position among the tree entries of the head's cache
        outputs = {-1: root}  # node -> the head's feature predicted after it
        children = self._children(pool, [-1], root[None])
        level = 1
        while level < depth and children:
            frontier = sorted(children, key=lambda n: -pool[n].score)[: self.branching]
            for node in frontier:
                slots[node] = len(slots)
            visible = torch.zeros(len(frontier), self.cached + len(slots), dtype=torch.bool)
            visible[:, : self.cached] = True
            for row, node in enumerate(frontier):
                while node >= 0:  # the node and its ancestors, all expanded at earlier levels
                    visible[row, self.cached + slots[node]] = True
                    node = pool[node].parent
            tokens = torch.tensor([[pool[n].token for n in frontier]], device=root.device)
            positions = torch.full((1, len(frontier)), self.cached + level - 1, device=root.device)
            inputs = torch.stack([self.head.next_feature(outputs[pool[n].parent]) for n in frontier])[None]
            out = self.head(tokens, inputs, positions, self._mask(visible), self.cache)[0]
            outputs.update(zip(frontier, out))
            children = self._children(pool, frontier, out)
            level += 1
        return pool, level

    def _children(self, pool: list[_Node], parents: list[int], features: Tensor) -> list[int]:
        """Add the ``branching`` best next tokens of each parent to ``pool``; their pool indices."""
        logprobs = self.sampling.process(self.head.logits(features)).logprobs
        top = logprobs.topk(min(self.branching, logprobs.shape[-1]), dim=-1)
        added: list[int] = []
        for parent, values, indices in zip(parents, top.values.tolist(), self.head.target_ids(top.indices).tolist()):
            base = 0.0 if parent < 0 else pool[parent].score
            for logprob, token in zip(values, indices):
                if logprob > -math.inf:  # top-k / top-p left fewer tokens than the branching
                    added.append(len(pool))
                    pool.append(_Node(token, parent, math.exp(logprob), base + logprob))
        return added

    def _mask(self, visible: Tensor) -> Tensor:
        dtype = self.head.fc.weight.dtype
        mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
        return mask[None, None].to(self.head.fc.weight.device)


def tree_rounds(ctx: DecodeContext, head: FeatureHead) -> Iterator[Event]:
    """EAGLE-2 rounds drafted by ``head`` (EAGLE's, or a head built on it) with the decoder's tree parameters."""
    sampling = Sampling.of(ctx)
    target = PrefixCache(ctx.model)
    drafter = EagleDrafter(head, target, sampling, ctx.params["tree_size"], ctx.params["depth"], ctx.params["branching"])
    return speculative_rounds(ctx, drafter, sampling, target)
