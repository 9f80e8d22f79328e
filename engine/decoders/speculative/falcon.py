"""Falcon (Gao et al., AAAI 2025, arXiv 2412.12639): a semi-autoregressive head drafts k tokens per forward; its
decoding tree grows by several block forwards, each adding a block of k levels under the tree's best nodes.

The head (:mod:`engine.speculative.falcon_head`) reads the target's features like EAGLE's and predicts the
feature k places ahead. Each round: the head runs over the committed positions it has not seen and re-runs the
last k (their last-layer outputs must see the whole committed tail, which grew), and those k outputs give the
draft distributions of depths 1..k. Level by level, the ``branching`` nodes of highest cumulative draft
log-probability each get their ``branching`` best tokens as children; inside a block every node of a level draws
from the same distribution (the SAR forward predicted the level before knowing the token above it), which is
Falcon's custom tree: shared candidate lists for the later tokens of a block. At the start of each further block,
the ``branching`` best nodes of the last level each have their block (their last k path nodes, with the predicted
features they were drawn from) run in ONE batched head forward under tree attention (each group sees the committed
context, its ancestors' earlier groups and its own block), whose k outputs per group give the next k levels. After
``blocks`` block forwards (fewer when the token budget or the cost-aware draft length caps the depth), the
``tree_size`` best nodes by cumulative score are kept (a child never outscores its parent: a subtree), each
recording the block forward that drafted it (``DraftNode.block``, 1 = the forward over the committed context).

The drafts are deterministic (top tokens, not samples), so the shared verifier's deterministic rule makes sampling
lossless too; greedy output equals greedy decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.registry import ASSET_MODELS_DIR
from engine.params import Param
from engine.speculative.cache import PrefixCache, crop_cache
from engine.speculative.eagle_tree import BRANCHING, TREE_SIZE, EagleDrafter
from engine.speculative.falcon_head import FalconHead
from engine.speculative.feature_head import shipped_or_named_head
from engine.speculative.rounds import (
    SAMPLING_PARAMS,
    Draft,
    Sampling,
    speculative_rounds,
)

# The heads shipped in assets/, by the target model they were trained for.
SHIPPED_HEADS = {"smollm2-135m-instruct": ASSET_MODELS_DIR / "falcon-smollm2"}


@dataclass(frozen=True)
class _Group:
    """One block's worth of head outputs: ``outputs[i]`` [H] is the feature level i of the block is drawn from;
    ``slots`` are the head-cache tree entries its forward's queries saw (its ancestors' groups', then its own)."""

    outputs: Tensor
    slots: list[int]


class FalconDrafter(EagleDrafter):
    """Grows Falcon's trees with ``head`` (block forwards of ``head.block`` levels); reads the target's features
    from ``target`` (the verifier's cache) as EAGLE's drafter does."""

    def __init__(self, head: FalconHead, target: PrefixCache, sampling: Sampling, tree_size: int, blocks: int,
                 branching: int) -> None:
        super().__init__(head, target, sampling, tree_size, blocks * head.block, branching)  # type: ignore[arg-type]
        self.node_group: list[int] = []  # per pool node of the round: the group whose outputs drew it
        self.node_block: list[int] = []  # per pool node of the round: its block forward (1-based)

    def propose(self, context: list[int], max_depth: int) -> Draft:
        depth = min(self.depth, max_depth)
        if self.features is None or depth < 1 or len(self.features) < self.head.block:
            return Draft([], [])  # the prompt's round (no feature yet), or too short a context for one block
        if len(self.features) != len(context) - 1:
            raise ValueError("the Falcon drafter's features do not match the context")
        with torch.inference_mode():
            first = _Group(self._run_committed(context), [])
            pool, calls = self._grow_blocks(first, depth)
        crop_cache(self.cache, self.cached)
        kept = self._kept(pool, depth)
        return self._best_tree(pool, kept, calls, blocks=[self.node_block[n] for n in kept])

    def _run_committed(self, context: list[int]) -> Tensor:
        """Run the head over the committed positions it has not seen and the last k again; the k predicted features
        of depths 1..k [k, H]."""
        k, end = self.head.block, len(context) - 1  # head position t reads token t + 1 and feature t
        start = min(self.cached, end - k)
        crop_cache(self.cache, start)
        tokens = torch.tensor([context[start + 1: end + 1]], device=self.features.device)
        causal = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        out = self.head(tokens, self.features[None, start:end], torch.arange(start, end)[None].to(tokens.device),
                        self._mask(causal), self._mask(torch.ones_like(causal)), self.cache)
        self.cached = end
        return out[0, -k:]

    def _grow_blocks(self, first: _Group, depth: int) -> tuple[list, int]:
        """Every candidate drafted within ``depth`` levels (EAGLE's pool nodes), and the head forwards it took."""
        k = self.head.block
        pool: list = []
        self.node_group, self.node_block = [], []
        groups = [first]
        opened: dict[int, int] = {-1: 0}  # node at a block's last level (or the root) -> the group it opened
        frontier, calls = [-1], 1
        for level in range(1, depth + 1):
            place = (level - 1) % k  # the level's place in its block
            if place == 0 and level > 1:
                opened.update(self._run_blocks(pool, groups, frontier, level))
                calls += 1
            sources = [opened[p] if place == 0 else self.node_group[p] for p in frontier]
            features = torch.stack([groups[g].outputs[place] for g in sources])
            children = self._children(pool, frontier, features)
            by_parent = dict(zip(frontier, sources))
            self.node_group += [by_parent[pool[c].parent] for c in children]
            self.node_block += [(level - 1) // k + 1] * len(children)
            frontier = sorted(children, key=lambda n: -pool[n].score)[: self.branching]
            if not frontier:
                break
        return pool, calls

    def _run_blocks(self, pool: list, groups: list[_Group], leaves: list[int], level: int) -> dict[int, int]:
        """One head forward over the block ending at each of ``leaves`` (the nodes of level ``level - 1``); the new
        group each leaf opens."""
        k = self.head.block
        paths = []
        for leaf in leaves:
            path = [leaf]
            while len(path) < k:
                path.insert(0, pool[path[0]].parent)
            paths.append(path)
        tree_start = self.cache.get_seq_length()  # after the entries of this round's earlier block forwards
        causal = torch.zeros(len(leaves) * k, tree_start + len(leaves) * k, dtype=torch.bool)
        causal[:, : self.cached] = True
        whole = causal.clone()
        slots = []
        for g, leaf in enumerate(leaves):
            rows, own = slice(g * k, (g + 1) * k), list(range(tree_start + g * k, tree_start + (g + 1) * k))
            seen = groups[self.node_group[leaf]].slots  # the ancestors run by earlier block forwards
            causal[rows, seen] = whole[rows, seen] = True
            causal[rows, own] = torch.ones(k, k, dtype=torch.bool).tril()
            whole[rows, own] = True
            slots.append(seen + own)
        # node i of a path reads the feature it was drawn from: level i of its group's outputs
        inputs = torch.stack([groups[self.node_group[n]].outputs[i] for path in paths for i, n in enumerate(path)])
        tokens = torch.tensor([[pool[n].token for path in paths for n in path]], device=inputs.device)
        positions = torch.tensor([[self.cached + level - 1 - k + i for _ in leaves for i in range(k)]])
        out = self.head(tokens, inputs[None], positions.to(inputs.device), self._mask(causal), self._mask(whole),
                        self.cache)[0]
        groups.extend(_Group(out[g * k: (g + 1) * k], slots[g]) for g in range(len(leaves)))
        return {leaf: len(groups) - len(leaves) + g for g, leaf in enumerate(leaves)}


def falcon(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    target = PrefixCache(ctx.model)
    head = shipped_or_named_head(ctx.params["drafter"], ctx.model, SHIPPED_HEADS, FalconHead)
    drafter = FalconDrafter(head, target, sampling, ctx.params["tree_size"], ctx.params["blocks"],
                            ctx.params["branching"])
    return speculative_rounds(ctx, drafter, sampling, target)


SPEC = register(
    DecoderSpec(
        name="falcon",
        family="speculative",
        summary="Falcon: a trained semi-autoregressive head drafts k tokens per forward from the target's features; "
        "its tree grows by block forwards under the best nodes, verified in one tree-attention forward.",
        params=(
            Param("drafter", "str", "", "Folder of a trained Falcon head (engine.offline.train_drafter --head "
                  "falcon); empty = the head shipped for the model.", loads_files=True),
            TREE_SIZE,
            BRANCHING,
            Param("blocks", "int", 3, "Head forwards per round, each drafting a block of the head's k levels (its "
                  "block size, 2 by default).", 1, 16),
            *SAMPLING_PARAMS,
        ),
        run=falcon,
        lossless=True,
    )
)
