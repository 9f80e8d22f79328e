"""Unstructured and N:M pruning of one weight matrix: magnitude (LLM-KICK's baseline) and Wanda.

Groups, the set of weights whose scores are compared with each other:

- magnitude with a sparsity: the whole matrix (layer-wise magnitude pruning, as LLM-KICK and SparseGPT's baseline);
- wanda with a sparsity: each output row (Wanda's per-output comparison group);
- an ``N:M`` pattern (either method): every ``M`` consecutive input weights of a row keep their ``N`` highest scores.

Each group prunes exactly ``floor(sparsity * group size)`` weights (ties broken by position), so a requested
sparsity is met exactly per group, and an N:M pattern holds in every group.
"""

from __future__ import annotations

import math

import torch

from engine.params import ParamError

METHODS = ("magnitude", "wanda")


def parse_pattern(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4): keep N of every M consecutive input weights."""
    kept, _, size = text.strip().partition(":")
    if not (kept.isdigit() and size.isdigit()) or not 0 < int(kept) < int(size):
        raise ParamError(f"pattern {text!r} must read N:M with 0 < N < M, such as 2:4 (keep 2 of every 4 weights)")
    return int(kept), int(size)


def prune_weight(
    weight: torch.Tensor,
    sparsity: float | None = None,
    pattern: tuple[int, int] | None = None,
    method: str = "magnitude",
    input_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """A copy of ``weight`` ([out, in], as ``nn.Linear`` holds it) with the lowest-scoring weights set to zero.

    Score: ``|W|`` (magnitude) or ``|W| * ||X_j||_2`` (wanda, ``input_norm`` the per-input-channel activation norm).
    Exactly one of ``sparsity`` (the fraction pruned) and ``pattern`` ((N, M): keep N of every M) applies.
    """
    if weight.dim() != 2:
        raise ParamError(f"prune_weight takes a [out, in] matrix, got shape {tuple(weight.shape)}")
    if method not in METHODS:
        raise ParamError(f"pruning method {method!r} is not one of {', '.join(METHODS)}")
    if (sparsity is None) == (pattern is None):
        raise ParamError("give exactly one of a sparsity (0 <= s < 1) and an N:M pattern")
    score = weight.detach().abs().float()
    if method == "wanda":
        if input_norm is None or input_norm.shape != (weight.shape[1],):
            raise ParamError(f"wanda needs the input norm of each of the {weight.shape[1]} input channels")
        score = score * input_norm.float().to(score.device)[None, :]
    if pattern is not None:
        kept, size = pattern
        if not 0 < kept < size or weight.shape[1] % size:
            raise ParamError(f"an N:M pattern needs 0 < N < M and M dividing the {weight.shape[1]} input weights; "
                             f"got {kept}:{size}")
        groups, pruned = score.reshape(-1, size), size - kept
    else:
        if not 0 <= sparsity < 1:
            raise ParamError(f"sparsity {sparsity} is outside [0, 1)")
        groups = score.reshape(1, -1) if method == "magnitude" else score
        pruned = math.floor(sparsity * groups.shape[1])
    keep = torch.ones_like(groups, dtype=torch.bool)
    if pruned:
        keep.scatter_(1, torch.topk(groups, pruned, dim=1, largest=False, sorted=False).indices, False)
    return torch.where(keep.reshape(weight.shape), weight, torch.zeros((), dtype=weight.dtype))
