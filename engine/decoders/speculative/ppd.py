"""Parallel prompt decoding (Chen et al. 2024, arXiv 2405.18628): trained prompt tokens ride along the verify forward.

The drafter's only weights are m prompt-token embeddings (:mod:`engine.speculative.ppd_prompts`); the target is
frozen. Attached after a node, prompt token i's output guesses the token i + 1 places after it: the target's own
output there gives the next token, so should that node end the accepted path, its prompt tokens' guesses are the
next round's drafts at depths 1..m. The prompt tokens run in the SAME target forward that verifies the tree (as
:class:`~engine.speculative.tree.Riders`: after the node, seeing its path, dropped from the cache afterwards), so
drafting costs no model call at all: the first round's forward is the prompt's with the prompt tokens after it.

Each round's tree is PPD's dynamic sparse tree read from the guesses of the node that ended the last accepted
path: the ``tree_size`` paths of top-i choices (prompt token d's i-th best token at depth d) with the highest
product of the prompt tokens' probabilities. PPD builds its tree offline from measured top-i accuracies and a
hardware budget; here the live probabilities stand in for those accuracies (our reading: the same ranking, known
per round) and ``tree_size`` is the budget. PPD attaches prompt tokens to every candidate node (fewer to unlikely
ones); here the root and the ``prompt_nodes`` most probable nodes get all m (with ``ensemble`` chains each) and
the others none (a round after such a node drafts nothing, its forward attaches prompt tokens to the root again).

Cost-aware like every drafter behind the shared rounds: a round the controller gives no draft carries no prompt
tokens either (on a CPU the 1 + m-token forward costs ~1.5x a one-token step), and a probe that finds no guesses
carries them so the next round can draft.

The drafts are deterministic (the top tokens), so the shared verifier's deterministic rule is exact: greedy output
equals greedy decoding and sampling follows the processed target. Each node's source names the prompt token and
rank that proposed it (``ppd p2 #1``: prompt token 2's best guess).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.registry import ASSET_MODELS_DIR
from engine.params import Param
from engine.speculative.feature_head import shipped_or_named_head
from engine.speculative.ppd_prompts import PromptTokens
from engine.speculative.rounds import (
    NO_DRAFT,
    SAMPLING_PARAMS,
    Draft,
    Drafter,
    Outcome,
    Sampling,
    speculative_rounds,
)
from engine.speculative.tree import Riders, node_depths

# The prompt tokens shipped in assets/, by the target model they were trained for.
SHIPPED_HEADS = {"smollm2-135m-instruct": ASSET_MODELS_DIR / "ppd-smollm2"}


def sparse_tree(logprobs: Tensor, tree_size: int) -> tuple[list[int], list[int], list[int], list[float]]:
    """The ``tree_size`` most probable paths of top-i choices over ``logprobs`` [depth, V] (row d: the guess for
    depth d + 1), as (draft indices, parents, ranks, cumulative log-probabilities), parents first.

    Best-first: a path's next sibling and first child never outscore it, so popping the best open path each time
    yields the top paths in order, each after its parent.
    """
    top = logprobs.topk(min(tree_size, logprobs.shape[-1]), dim=-1)
    values, ids = top.values.tolist(), top.indices.tolist()
    tokens: list[int] = []
    parents: list[int] = []
    ranks: list[int] = []
    scores: list[float] = []
    open_paths = [(-values[0][0], 0, 0, -1)]  # (-score, depth index, rank, parent node)
    while open_paths and len(tokens) < tree_size:
        negative, depth, rank, parent = heapq.heappop(open_paths)
        if math.isinf(negative):  # top-k / top-p removed the rest
            break
        node, score = len(tokens), -negative
        tokens.append(ids[depth][rank])
        parents.append(parent)
        ranks.append(rank)
        scores.append(score)
        base = scores[parent] if parent >= 0 else 0.0
        if rank + 1 < len(values[depth]):
            heapq.heappush(open_paths, (-(base + values[depth][rank + 1]), depth, rank + 1, parent))
        if depth + 1 < len(values):
            heapq.heappush(open_paths, (-(score + values[depth + 1][0]), depth + 1, 0, node))
    return tokens, parents, ranks, scores


class PPDDrafter(Drafter):
    """Drafts the sparse tree from the prompt tokens' last guesses and attaches the prompt tokens for the next ones."""

    source = "ppd"

    def __init__(self, prompts: PromptTokens, sampling: Sampling, tree_size: int, prompt_nodes: int) -> None:
        self.prompts, self.sampling = prompts, sampling
        self.tree_size, self.prompt_nodes = tree_size, prompt_nodes
        self.guesses: Tensor | None = None  # processed log-probs [m, V'] of the prompt tokens at the last path's end

    def propose(self, context: list[int], max_depth: int) -> Draft:
        if max_depth == 0:  # no draft this round, and no prompt tokens riding along to guess the next one's
            self.guesses = None
            return NO_DRAFT
        tokens: list[int] = []
        parents: list[int] = []
        ranks: list[int] = []
        scores: list[float] = []
        if self.guesses is not None and max_depth > 0:
            depth = min(max_depth, len(self.guesses))  # a tree cut to fewer levels keeps as many nodes per level
            size = max(1, round(self.tree_size * depth / len(self.guesses)))
            indices, parents, ranks, scores = sparse_tree(self.guesses[:depth], size)
            tokens = self.prompts.target_ids(torch.tensor(indices, dtype=torch.long)).tolist()
        carriers = sorted(range(len(tokens)), key=lambda node: -scores[node])[: self.prompt_nodes]
        anchors = [anchor for anchor in [-1, *sorted(carriers)] for _ in range(self.prompts.ensemble)]
        embeddings = self.prompts.embeddings.detach().repeat(len(anchors) // self.prompts.ensemble, 1, 1)
        return Draft(
            tokens,
            [math.exp(score - (scores[p] if p >= 0 else 0.0)) for p, score in zip(parents, scores)],
            parents=parents,
            scores=scores,
            sources=[f"ppd p{depth} #{rank + 1}" for depth, rank in zip(node_depths(parents), ranks)],
            riders=Riders(anchors, embeddings),
        )

    def observe(self, outcome: Outcome) -> None:
        """Keep the guesses of the prompt tokens attached to the accepted path's end (the root when none was)."""
        path = outcome.verdict.accepted_path
        end = path[-1] if path else -1
        riders = outcome.draft.riders
        chains = [c for c, anchor in enumerate(riders.anchors) if anchor == end] if riders else []
        if not chains or outcome.rider_logits is None:
            self.guesses = None
            return
        logits = self.prompts.vocab_logits(outcome.rider_logits[chains].mean(0))  # ensemble: PPD's mean of logits
        self.guesses = self.sampling.process(logits).logprobs


def ppd(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    prompts = shipped_or_named_head(ctx.params["drafter"], ctx.model, SHIPPED_HEADS, PromptTokens)
    drafter = PPDDrafter(prompts, sampling, ctx.params["tree_size"], ctx.params["prompt_nodes"])
    return speculative_rounds(ctx, drafter, sampling)


SPEC = register(
    DecoderSpec(
        name="ppd",
        family="speculative",
        summary="Parallel prompt decoding: trained prompt tokens ride along the verify forward and guess the next "
        "tokens at once; a dynamic sparse tree of their top choices, verified exactly, with no draft model call.",
        params=(
            Param("drafter", "str", "", "Folder of trained PPD prompt tokens (engine.offline.train_drafter --head "
                  "ppd); empty = the prompt tokens shipped for the model.", loads_files=True),
            Param("tree_size", "int", 16, "Draft tree nodes per round (the most probable paths of the prompt "
                  "tokens' top choices).", 1, 256, limit="draft_tokens"),
            Param("prompt_nodes", "int", 16, "Tree nodes (the most probable) that carry the prompt tokens for the "
                  "next round, besides the root; each adds m inputs to the verify forward.", 0, 256),
            *SAMPLING_PARAMS,
        ),
        run=ppd,
        lossless=True,
    )
)
