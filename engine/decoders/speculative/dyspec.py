"""DySpec (Xiong et al. 2024): a draft tree grown greedily where the draft is most confident, verified in one forward.

Candidates wait in a max-heap keyed by their estimated chance of being reached: the product of draft
probabilities along their path. The best candidate joins the tree, then its first child and its next sibling
become candidates, until ``tree_size`` nodes are in. Greedy drafts take children in the draft's rank order, so
the tree holds the ``tree_size`` paths of highest draft probability. Sampled drafts draw each sibling i.i.d. from
the draft's processed distribution (the SpecInfer rule's premise); a further sibling only pays off if the earlier
ones are rejected, so its key is scaled by the mass they leave. The target verifies the tree with tree attention
and keeps the accepted path's KV. Lossless: greedy output equals greedy decoding, sampled output follows the target.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import DRAFTER_PARAMS, DraftModelDrafter, draft_model_drafter
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds
from engine.speculative.skip import SharedSkipCache


@dataclass
class DraftTree:
    """The grown tree; ``draft_logprobs`` row ``u + 1`` is the distribution node ``u``'s children came from."""

    parents: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    draft_rows: dict[int, Tensor] = field(default_factory=dict)
    draft_calls: int = 0

    def path_tokens(self, node: int) -> list[int]:
        path: list[int] = []
        while node >= 0:
            path.append(self.tokens[node])
            node = self.parents[node]
        return path[::-1]

    def draft_logprobs(self) -> Tensor | None:
        if not self.draft_rows:
            return None
        filler = torch.full_like(self.draft_rows[-1], float("-inf"))  # leaves have no children: their rows go unread
        return torch.stack([self.draft_rows.get(node, filler) for node in range(-1, len(self.tokens))])


@dataclass(order=True)
class _Candidate:
    """A node that may join the tree: the ``rank``-th child of ``parent`` (heapq is a min-heap, hence -key).

    ``token`` None stands for the first child of a node the draft has not run on yet, keyed by the node's own
    reach (an upper bound for any child): the draft runs only when it comes first, so leaves cost no draft call.
    """

    neg_key: float
    order: int  # ties go to the older candidate, keeping the tree deterministic
    parent: int = field(compare=False)
    rank: int = field(compare=False)
    token: int | None = field(compare=False)
    prob: float = field(compare=False)
    sibling_mass_left: float = field(compare=False)  # sampling: 1 - q of the siblings drawn before this one


class TreeGrower(Drafter):
    partial_verify = True  # its cache follows the committed context, whatever was verified

    def __init__(self, drafter: DraftModelDrafter, sampling: Sampling, tree_size: int, max_depth: int, source: str) -> None:
        self.cache: PrefixCache | SharedSkipCache = drafter.cache
        self.sampling = sampling
        self.tree_size = tree_size
        self.max_depth = max_depth
        self.source = source
        self._order = itertools.count()

    def propose(self, context: list[int], max_depth: int) -> Draft:
        if isinstance(self.cache, SharedSkipCache) and not self.cache.ready(context):
            max_depth = 0  # the prompt's round: the target holds nothing to draft in yet
        tree = self.grow(context, self.tree_size, min(self.max_depth, max_depth))
        return Draft(tree.tokens, tree.probs, tree.draft_logprobs(), tree.parents, tree.draft_calls)

    def grow(self, context: list[int], tree_size: int, max_depth: int) -> DraftTree:
        tree = DraftTree()
        if max_depth < 1:
            return tree
        reach = {-1: 1.0}  # the product of draft probabilities from the root to a node
        heap = [self._undrafted_child(-1, reach)]
        while heap and len(tree.tokens) < tree_size:
            best = heapq.heappop(heap)
            if best.token is None:
                self._push_child(heap, tree, context, reach, best.parent, rank=0, mass_left=1.0)
                continue
            node = len(tree.tokens)
            depth = 1 if best.parent < 0 else tree.depths[best.parent] + 1
            tree.parents.append(best.parent)
            tree.tokens.append(best.token)
            tree.depths.append(depth)
            tree.probs.append(float(best.prob))
            reach[node] = reach[best.parent] * best.prob
            self._push_child(heap, tree, context, reach, best.parent, best.rank + 1, best.sibling_mass_left * (1 - best.prob))
            if depth < max_depth:
                heapq.heappush(heap, self._undrafted_child(node, reach))
        return tree

    def _undrafted_child(self, parent: int, reach: dict[int, float]) -> _Candidate:
        return _Candidate(-reach[parent], next(self._order), parent, 0, None, 0.0, 1.0)

    def _push_child(
        self,
        heap: list[_Candidate],
        tree: DraftTree,
        context: list[int],
        reach: dict[int, float],
        parent: int,
        rank: int,
        mass_left: float,
    ) -> None:
        """Offer ``parent``'s ``rank``-th child: the next token by draft rank (greedy) or a fresh draw (sampling)."""
        if parent not in tree.draft_rows:
            out = self.cache.forward(self.cache.sync(context + tree.path_tokens(parent)))
            # Back to the committed context at once: a sliding-window layer (Gemma 3) can roll back only what its
            # last forward added, so the next branch must not start from this one.
            self.cache.sync(context)
            tree.draft_rows[parent] = self.sampling.process(out.logits[0, -1]).logprobs
            tree.draft_calls += 1
        row = tree.draft_rows[parent]
        if self.sampling.generator is None:
            if rank >= row.shape[-1]:
                return
            token = int(row.topk(rank + 1).indices[rank])
            prob = float(row[token].exp())
            key = reach[parent] * prob
        else:
            token = self.sampling.choose(row)
            prob = float(row[token].exp())
            key = reach[parent] * prob * mass_left
        if prob > 0:
            heapq.heappush(heap, _Candidate(-key, next(self._order), parent, rank, token, prob, mass_left))


def dyspec(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    target = PrefixCache(ctx.model)
    drafter = draft_model_drafter(ctx, sampling, target=target)
    source = ctx.params["draft_model"] or f"dyspec:{drafter.source}"
    grower = TreeGrower(drafter, sampling, ctx.params["tree_size"], ctx.params["max_depth"], source)
    return speculative_rounds(ctx, grower, sampling, target=target)


SPEC = register(
    DecoderSpec(
        name="dyspec",
        family="speculative",
        summary="DySpec: a draft tree grown where the draft is most confident, verified in one tree-attention forward.",
        params=(
            *DRAFTER_PARAMS,
            Param("tree_size", "int", 16, "Draft tree nodes per round.", 1, 256, limit="draft_tokens"),
            Param("max_depth", "int", 6, "Deepest draft node (tokens beyond the committed context).", 1, 64),
            *SAMPLING_PARAMS,
        ),
        run=dyspec,
        lossless=True,
    )
)
