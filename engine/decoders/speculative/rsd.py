"""Recursive Speculative Decoding (RSD; Jeon et al. 2024, arXiv 2402.14160): draft trees sampled without replacement.

A draft model grows a tree one depth per draft forward (tree attention over the tree so far, on the draft's own
rolled-back cache), in one of two shapes (speculative.md §7):

* ``gumbel`` (RSD-C, constant branching): every node at depth l gets ``b_l`` children drawn WITHOUT replacement
  from the draft's processed ``q`` by Gumbel-top-k: the ``b_l`` largest ``log q(x) + G_x``, ``G_x ~ Gumbel(0, 1)``.
* ``beam`` (RSD-S, stochastic beam search; Kool et al. 2019): W beams per depth. Every beam's continuations get a
  perturbed score ``log q(prefix) + Gumbel`` conditioned, by the "Gumbel with a maximum" construction, to peak at
  the beam's own perturbed score; the W best continuations over all beams form the next depth, so the W sequences
  are drawn without replacement from the draft's sequence distribution. The tree is the union of every depth's
  beams (at most W x depth nodes); a beam's surviving children are the first ones of its own Gumbel ordering.

Siblings are listed in decreasing Gumbel key, their sampling order, and recorded with the key as their score. The
target verifies the tree in one tree-attention forward with recursive rejection sampling, the without-replacement
rule of speculative.md §0.2 (after rejecting ``c``, ``q`` loses ``c`` too), so sampled output follows the processed
target exactly. Greedy decoding (temperature 0) drafts the deterministic top-k children (or plain beam search) and
verifies greedily: output equals greedy decoding. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param, ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import DRAFTER_PARAMS, draft_model_drafter
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds
from engine.speculative.tree import tree_forward

TREES = ("gumbel", "beam")
TREE_HELP = "gumbel: per-depth branching, Gumbel-top-k children (RSD-C); beam: stochastic beam search (RSD-S)."


@dataclass
class _Tree:
    """The tree grown so far; ``rows[u]`` is the processed draft distribution node ``u``'s children came from."""

    parents: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    rows: dict[int, Tensor] = field(default_factory=dict)

    def add(self, parent: int, token: int, score: float) -> int:
        self.parents.append(parent)
        self.tokens.append(token)
        self.probs.append(float(self.rows[parent][token].exp()))
        self.scores.append(score)
        return len(self.tokens) - 1

    def draft_logprobs(self) -> Tensor | None:
        if not self.tokens:
            return None
        filler = torch.full_like(self.rows[-1], float("-inf"))  # leaves have no children: their rows go unread
        return torch.stack([self.rows.get(node, filler) for node in range(-1, len(self.tokens))])


def gumbel(shape: torch.Size, generator: torch.Generator) -> Tensor:
    """Standard Gumbel noise, float64."""
    return -(-torch.rand(shape, generator=generator, dtype=torch.float64).log()).log()


def gumbel_with_maximum(locations: Tensor, maximum: Tensor, generator: torch.Generator) -> Tensor:
    """Gumbels with the given ``locations`` (last dim) conditioned on their maximum being ``maximum`` (per row).

    Kool et al. 2019, appendix B, in its numerically stable form; ``-inf`` locations stay ``-inf``.
    """
    g = locations + gumbel(locations.shape, generator)
    z = g.max(-1, keepdim=True).values
    v = maximum[..., None] - g + _log1mexp(g - z)
    return maximum[..., None] - v.clamp(min=0) - torch.log1p(torch.exp(-v.abs()))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class RecursiveDrafter(Drafter):
    """Grows an RSD-C (``gumbel``) or RSD-S (``beam``) tree with a draft model, one draft forward per depth."""

    partial_verify = True  # its cache follows the committed context, whatever was verified

    def __init__(
        self, cache: PrefixCache, sampling: Sampling, tree: str, branching: list[int], beam_width: int, source: str
    ) -> None:
        self.cache = cache
        self.sampling = sampling
        self.tree = tree
        self.branching = branching  # per depth; the beam tree's depth is len(branching), its width beam_width
        self.beam_width = beam_width
        self.source = source

    def propose(self, context: list[int], max_depth: int) -> Draft:
        tree = _Tree()
        frontier, values = [-1], torch.zeros(1, dtype=torch.float64)  # the beam tree's perturbed scores (root: 0)
        phis = torch.zeros(1, dtype=torch.float64)  # log q of each frontier node's path
        depth_limit = min(len(self.branching), max_depth)
        for depth in range(depth_limit):
            rows = self._expand(tree, context, frontier)
            if self.tree == "gumbel":
                frontier = self._gumbel_children(tree, frontier, rows, self.branching[depth])
            else:
                frontier, values, phis = self._beam_step(tree, frontier, rows, values, phis)
        logprobs = tree.draft_logprobs()
        # one draft forward per depth; the verifier must know siblings were drawn without replacement
        return Draft(tree.tokens, tree.probs, logprobs, tree.parents, depth_limit, without_replacement=True, scores=tree.scores)

    def _expand(self, tree: _Tree, context: list[int], frontier: list[int]) -> Tensor:
        """One draft forward over the tree so far: the processed distributions after each frontier node [F, V]."""
        logits = tree_forward(self.cache, context, tree.parents, tree.tokens)
        rows = self.sampling.process(logits[[node + 1 for node in frontier]]).logprobs
        for node, row in zip(frontier, rows):
            tree.rows[node] = row
        return rows

    def _gumbel_children(self, tree: _Tree, frontier: list[int], rows: Tensor, branching: int) -> list[int]:
        """RSD-C: each frontier node's ``branching`` children by Gumbel-top-k (greedy: top-k) over its ``log q``."""
        keys = rows.double()
        if not self.sampling.greedy:
            keys = keys + gumbel(keys.shape, self.sampling.generator)
        children: list[int] = []
        for node, row_keys in zip(frontier, keys):
            top = row_keys.topk(min(branching, int(row_keys.isfinite().sum())))
            children += [tree.add(node, token, key) for token, key in zip(top.indices.tolist(), top.values.tolist())]
        return children

    def _beam_step(
        self, tree: _Tree, frontier: list[int], rows: Tensor, values: Tensor, phis: Tensor
    ) -> tuple[list[int], Tensor, Tensor]:
        """RSD-S: the ``beam_width`` best continuations of all beams (greedy: plain beam search on ``log q``)."""
        locations = phis[:, None] + rows.double()  # log q of every continuation's path [F, V]
        if self.sampling.greedy:
            keys = locations
        else:
            keys = gumbel_with_maximum(locations, values, self.sampling.generator)
        flat = keys.flatten()
        top = flat.topk(min(self.beam_width, int(flat.isfinite().sum())))
        beams = [divmod(int(index), rows.shape[-1]) for index in top.indices]
        children = [tree.add(frontier[beam], token, float(key)) for (beam, token), key in zip(beams, top.values)]
        return children, top.values, torch.stack([locations[beam, token] for beam, token in beams])


def parse_branching(text: str) -> list[int]:
    """``"3,2,1"`` as per-depth branching factors; ParamError unless each is a whole number of at least 1."""
    try:
        factors = [int(part) for part in text.split(",")]
    except ValueError:
        factors = []
    if not factors or min(factors) < 1:
        raise ParamError(f"branching must list children per depth as whole numbers >= 1, such as '3,2,1', got {text!r}")
    return factors


def rsd(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    sampling = Sampling.of(ctx)
    drafter = draft_model_drafter(ctx, sampling)
    if params["tree"] == "gumbel":
        branching = parse_branching(params["branching"])
    else:
        branching = [params["beam_width"]] * params["beam_depth"]
    source = params["draft_model"] or f"rsd-{params['tree']}:{drafter.source}"
    recursive = RecursiveDrafter(drafter.cache, sampling, params["tree"], branching, params["beam_width"], source)
    return speculative_rounds(ctx, recursive, sampling)


SPEC = register(
    DecoderSpec(
        name="rsd",
        family="speculative",
        summary="Recursive speculative decoding: draft trees sampled without replacement (Gumbel-top-k or stochastic beams).",
        params=(
            *DRAFTER_PARAMS,
            Param("tree", "choice", "gumbel", TREE_HELP, choices=TREES),
            Param("branching", "str", "3,2,1", "gumbel tree: children per node at each depth, e.g. '3,2,1' (also sets the depth)."),
            Param("beam_width", "int", 4, "beam tree: beams kept per depth (W).", 1, 64, limit="beams"),
            Param("beam_depth", "int", 4, "beam tree: depth (D); the tree has at most W x D nodes.", 1, 32, limit="draft_tokens"),
            *SAMPLING_PARAMS,
        ),
        run=rsd,
        lossless=True,
    )
)
