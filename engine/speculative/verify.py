"""Verification of a draft tree against the target: the one implementation every speculative decoder uses.

A chain is the tree whose node i has parent i - 1. ``p`` and ``q`` are the PROCESSED target and draft
distributions (temperature, top-k, ... applied to both by :mod:`engine.processing`), as speculative sampling
requires for the output to follow the processed target (speculative.md §0.1-0.2):

* greedy: from the root, move to the child equal to the target's argmax; emit that argmax where none matches;
* sampling, children drawn i.i.d. from ``q`` (SpecInfer, with replacement): try the children in order, accepting
  ``c`` with probability ``min(1, p'(c)/q(c))``; after a rejection ``p' = norm(max(p' - q, 0))``; descend into an
  accepted child; if every child is rejected, the correction is drawn from the last ``p'``;
* sampling, children drawn WITHOUT replacement from ``q`` (RSD's recursive rejection sampling, Sequoia): the same,
  but after rejecting ``c`` the draft distribution loses it too: ``q' = norm(q with q(c) = 0)``, and the ratio and
  the residual use ``q'``;
* deterministic drafts (prompt lookup, n-grams) have no ``q``: it is the one-hot on the drafted token, so the same
  rule accepts with probability ``p'(c)`` and on rejection zeroes ``c`` in ``p'`` and renormalises; a duplicate
  sibling then has ``p'(c) = 0`` and is rejected without changing ``p'``.

After an accepted leaf, the bonus token is drawn from the target's distribution there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.events import Candidate
from engine.processing import sample


@dataclass(frozen=True)
class NodeCheck:
    """How the verifier judged one node: the target's p(token) at its parent, and (sampling) the draw and ratio."""

    target_prob: float
    accepted: bool
    draw: float | None = None
    ratio: float | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying a draft tree.

    ``checks`` holds the nodes the verifier looked at (others were never reached). ``next_token`` is the bonus
    token (the accepted path ends at a leaf) or the correction (``is_correction``: every child of the path's
    last node was rejected). ``residual_top`` lists the distribution a sampled correction was drawn from:
    ``raw_prob`` is the target's processed p(x), ``prob`` the residual's; empty for greedy and for bonus tokens.
    """

    accepted_path: list[int]
    checks: dict[int, NodeCheck]
    next_token: int
    is_correction: bool
    residual_top: list[Candidate] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return len(self.accepted_path)


def verify_tree(
    parents: list[int],
    tokens: list[int],
    target_logprobs: Tensor,
    draft_logprobs: Tensor | None,
    generator: torch.Generator | None,
    top_k: int = 20,
    without_replacement: bool = False,
) -> Verdict:
    """Verify draft nodes ``0..n-1`` (``parents[i]`` is -1 for a child of the root; parents come before children).

    Row ``u + 1`` of ``target_logprobs`` ([n+1, V]) is the target's distribution after node ``u`` (row 0: after the
    root, i.e. the committed context); row ``u + 1`` of ``draft_logprobs`` is the distribution node ``u``'s children
    were drawn from, or ``None`` for deterministic drafts. ``generator`` ``None`` means greedy verification;
    ``without_replacement`` says siblings were drawn without replacement.
    """
    if len(parents) != len(tokens) or target_logprobs.shape[0] != len(tokens) + 1:
        raise ValueError(f"{len(tokens)} nodes need {len(tokens)} parents and {len(tokens) + 1} target rows")
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        if not -1 <= parent < node:
            raise ValueError(f"node {node} has parent {parent}: parents must come before their children")
        children.setdefault(parent, []).append(node)
    path: list[int] = []
    checks: dict[int, NodeCheck] = {}
    at = -1
    while True:
        row = at + 1
        kids = children.get(at, [])
        if generator is None:
            best = int(target_logprobs[row].argmax())
            p_row = target_logprobs[row].exp()
            chosen = next((c for c in kids if tokens[c] == best), None)
            for c in kids:
                checks[c] = NodeCheck(float(p_row[tokens[c]]), c == chosen)
            if chosen is None:
                return Verdict(path, checks, best, bool(kids))
        else:
            q_row = None if draft_logprobs is None or not kids else draft_logprobs[row].double().exp()
            chosen, residual = _sample_children(kids, tokens, target_logprobs[row], q_row, without_replacement, generator, checks)
            if chosen is None:
                if not kids:
                    return Verdict(path, checks, int(sample(target_logprobs[row], generator)), False)
                p = target_logprobs[row].double().exp()
                correction = int(sample(residual.log(), generator))
                return Verdict(path, checks, correction, True, _top(residual, p, top_k))
        path.append(chosen)
        at = chosen


def verify_chain(
    draft_tokens: list[int],
    target_logprobs: Tensor,
    draft_logprobs: Tensor | None,
    generator: torch.Generator | None,
    top_k: int = 20,
) -> Verdict:
    """:func:`verify_tree` for a chain: row i of both distributions belongs to position i (draft row k unused)."""
    parents = list(range(-1, len(draft_tokens) - 1))
    return verify_tree(parents, draft_tokens, target_logprobs, draft_logprobs, generator, top_k)


def _sample_children(
    kids: list[int],
    tokens: list[int],
    target_row: Tensor,
    q_row: Tensor | None,
    without_replacement: bool,
    generator: torch.Generator,
    checks: dict[int, NodeCheck],
) -> tuple[int | None, Tensor]:
    """The first accepted child (or None) and the residual distribution left after the rejected ones."""
    p_original = target_row.double().exp()
    p = p_original
    for c in kids:
        token = tokens[c]
        q = _one_hot(token, p) if q_row is None else q_row
        ratio = float(p[token] / q[token]) if q[token] > 0 else float("inf")
        draw = float(torch.rand((), generator=generator, dtype=torch.float64))
        accepted = draw < ratio  # P(accept) = min(1, p'/q)
        checks[c] = NodeCheck(float(p_original[token]), accepted, draw, ratio)
        if accepted:
            return c, p
        residual = (p - q).clamp_(min=0)
        # p' == q up to rounding leaves no residual mass; p' itself is then the exact distribution
        p = residual / residual.sum() if residual.sum() > 0 else p
        if without_replacement and q_row is not None:
            q_row = q_row.clone()
            q_row[token] = 0
            q_row = q_row / q_row.sum() if q_row.sum() > 0 else q_row
    return None, p


def _one_hot(token: int, like: Tensor) -> Tensor:
    return torch.zeros_like(like).index_fill_(0, torch.tensor([token]), 1.0)


def _top(residual: Tensor, p: Tensor, k: int) -> list[Candidate]:
    probs, ids = residual.topk(min(k, residual.shape[-1]))
    return [Candidate(i, p[i], r) for i, r in zip(ids.tolist(), probs.tolist()) if r > 0]
