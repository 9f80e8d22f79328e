"""The token-tree explorer (logitloom): from a prefix, expand the most probable continuations to a chosen depth."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from engine.models.handle import LoadedModel
from engine.params import ParamError
from engine.processing import build_pipeline, process


@dataclass(frozen=True)
class TreeNode:
    """One expanded token. ``parent`` is -1 for the children of the prefix; ``prob`` is p(token | path to the
    parent) under the model (after the optional processing stages), ``path_prob`` the product along the path."""

    id: int
    parent: int
    token_id: int
    text: str
    depth: int
    prob: float
    path_prob: float


@dataclass
class TokenTree:
    """The expanded tree below ``prefix_ids``; ``nodes`` in breadth-first order (parents before children)."""

    prefix_ids: list[int]
    prefix_text: str
    depth: int
    max_children: int
    min_prob: float
    nodes: list[TreeNode] = field(default_factory=list)
    model_calls: int = 0

    def path_ids(self, node_id: int) -> list[int]:
        """Token ids from the prefix to ``node_id`` (inclusive)."""
        by_id = {n.id: n for n in self.nodes}
        path = []
        while node_id != -1:
            node = by_id[node_id]
            path.append(node.token_id)
            node_id = node.parent
        return path[::-1]

    def leaves(self) -> list[TreeNode]:
        parents = {n.parent for n in self.nodes}
        return [n for n in self.nodes if n.id not in parents]


MAX_NODES = 2000


def expand_token_tree(
    model: LoadedModel,
    prefix_ids: Sequence[int],
    depth: int = 3,
    max_children: int = 3,
    min_prob: float = 0.05,
    params: Mapping[str, float] | None = None,
) -> TokenTree:
    """Expand, breadth first, the ``max_children`` most probable next tokens (each with prob >= ``min_prob``) of
    every path below ``prefix_ids``, ``depth`` tokens deep. One batched forward per level: all paths of a level
    have the same length. ``params`` (temperature, top_k, top_p, ...) processes each distribution first."""
    prefix = _checked_prefix(model, prefix_ids)
    _check_bounds(depth, max_children, min_prob)
    try:
        stages = build_pipeline(params or {})
    except ValueError as error:
        raise ParamError(str(error)) from None
    tree = TokenTree(prefix, model.decode(prefix, skip_special_tokens=False), depth, max_children, min_prob)
    frontier: list[tuple[TreeNode | None, list[int]]] = [(None, prefix)]  # (node, its context); None: the prefix
    for level in range(1, depth + 1):
        if not frontier:
            break
        contexts = torch.tensor([context for _, context in frontier])
        # Only the last position's logits: a level may hold a thousand paths.
        logits = model.forward(contexts, keep=1).logits[:, -1, :]
        probs = process(logits, stages, context_ids=contexts).logprobs.exp()
        tree.model_calls += 1
        frontier = [
            (child, context + [child.token_id])
            for row, (node, context) in enumerate(frontier)
            for child in _add_children(tree, model, node, probs[row], level)
        ]
    return tree


def _add_children(tree: TokenTree, model: LoadedModel, node: TreeNode | None, probs: torch.Tensor, level: int) -> list[TreeNode]:
    top, top_ids = probs.topk(min(tree.max_children, probs.shape[-1]))
    children = []
    for p, token_id in zip(top.tolist(), top_ids.tolist()):
        if p < tree.min_prob or p == 0:
            break  # sorted, so the rest miss the cut too; tokens the processing removed (p = 0) never count
        path_prob = p * (node.path_prob if node else 1.0)
        child = TreeNode(len(tree.nodes), node.id if node else -1, token_id, model.token_text(token_id), level, p, path_prob)
        tree.nodes.append(child)
        children.append(child)
    return children


def _checked_prefix(model: LoadedModel, prefix_ids: Sequence[int]) -> list[int]:
    prefix = [int(t) for t in prefix_ids]
    if not prefix:
        raise ParamError("the token tree needs a non-empty prefix")
    if not all(0 <= t < model.vocab_size for t in prefix):
        raise ParamError(f"prefix token ids must lie in {model.name}'s vocabulary (0 to {model.vocab_size - 1})")
    return prefix


def _check_bounds(depth: int, max_children: int, min_prob: float) -> None:
    if not 1 <= depth <= 6:
        raise ParamError(f"depth must be between 1 and 6, got {depth}")
    if not 1 <= max_children <= 10:
        raise ParamError(f"max_children must be between 1 and 10, got {max_children}")
    if not 0 <= min_prob < 1:
        raise ParamError(f"min_prob must be in [0, 1), got {min_prob}")
    # No node has more than 1/min_prob children at or above the cut, whatever the model says.
    branching = min(max_children, math.floor(1 / min_prob)) if min_prob > 0 else max_children
    worst = sum(branching**level for level in range(1, depth + 1))
    if worst > MAX_NODES:
        raise ParamError(f"depth {depth} with {branching} children per node may grow {worst} nodes (at most {MAX_NODES});"
                         " lower depth or max_children, or raise min_prob")
