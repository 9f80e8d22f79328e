"""Tree attention: verify a whole draft tree in ONE target forward, then keep only the accepted path's KV.

The forward runs the committed tokens the cache has not seen followed by every tree node (in id order, parents
first). Each node gets the logical position ``len(context) + depth - 1`` (children of the root sit right after
the context) and a 4D additive float mask lets it see the committed context and its own ancestors only
(speculative.md §14). A custom 4D mask bypasses transformers' own mask logic, sliding windows included, so the
window is applied here: models with several layer types (Gemma 3) get one mask per type, as a dict.

The same forward can carry extra nodes that are not verified (lookahead decoding's 2-D Jacobi window): they get
explicit positions and an explicit visibility pattern over the tree nodes and each other, after all tree nodes.
Extra nodes may be input embeddings rather than tokens: :class:`Riders` (PPD's trained prompt tokens) ride after
given tree nodes, seeing their path, so their outputs come from the verify forward itself.

After verification, :func:`keep_path` moves the accepted nodes' cache slots (scattered over the flattened tree)
right after the context and crops everything else, in every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from engine.speculative.cache import PrefixCache, crop_cache


def node_depths(parents: list[int]) -> list[int]:
    """Depth of every node (a child of the root has depth 1); parents must come before their children."""
    depths: list[int] = []
    for node, parent in enumerate(parents):
        if not -1 <= parent < node:
            raise ValueError(f"node {node} has parent {parent}: parents must come before their children")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def path_probs(parents: list[int], probs: list[float]) -> list[float]:
    """Each node's path probability: the product of the draft probabilities from the root down to it."""
    paths: list[float] = []
    for parent, prob in zip(parents, probs):
        paths.append(prob * (paths[parent] if parent >= 0 else 1.0))
    return paths


@dataclass(frozen=True)
class ExtraNodes:
    """Nodes run after a tree's nodes in the same forward, not verified (lookahead's 2-D window).

    ``positions`` are their logical positions; ``visible[i]`` ([m, n + m] bool) says which of the n tree nodes,
    then which of the m extra nodes (itself included, if it should), extra node i attends to. Every extra node
    sees the whole committed context.
    """

    tokens: list[int]
    positions: list[int]
    visible: Tensor
    embeddings: Tensor | None = None  # [m, H]: run instead of the tokens' embeddings (the tokens are placeholders)


@dataclass(frozen=True)
class Riders:
    """Input embeddings that ride along a tree's verify forward, never verified and never kept in the cache.

    Chain c, ``embeddings[c]`` ([k, H]), follows ``anchors[c]`` (a tree node id; -1: the root, the last committed
    token): its rider j (0-based) sits at the anchor's position + j + 1 and sees the committed context, the anchor's
    path and the riders of its own chain up to itself. Several chains may share an anchor (PPD's ensemble).
    """

    anchors: list[int]
    embeddings: Tensor  # [chains, k, H]

    def nodes(self, context_length: int, parents: list[int]) -> ExtraNodes:
        """The riders as extra nodes after the tree ``parents`` that follows ``context_length`` committed tokens."""
        chains, k = self.embeddings.shape[:2]
        n, depths, paths = len(parents), node_depths(parents), _ancestor_or_self(parents)
        visible = torch.zeros(chains * k, n + chains * k, dtype=torch.bool)
        positions: list[int] = []
        for c, anchor in enumerate(self.anchors):
            rows = slice(c * k, (c + 1) * k)
            if anchor >= 0:
                visible[rows, :n] = paths[anchor]
            visible[rows, n + c * k: n + (c + 1) * k] = torch.ones(k, k, dtype=torch.bool).tril()
            start = context_length + (depths[anchor] if anchor >= 0 else 0)  # the anchor's position + 1
            positions += range(start, start + k)
        return ExtraNodes([-1] * (chains * k), positions, visible, self.embeddings.flatten(0, 1))


def tree_forward(
    target: PrefixCache, context: list[int], parents: list[int], tokens: list[int], extra: ExtraNodes | None = None
) -> Tensor:
    """Logits [n+1(+m), V] of one forward over the unseen context, the ``n`` tree nodes and the ``m`` extra nodes.

    Row 0 is the distribution after ``context``, row ``u + 1`` the one after node ``u`` (``verify_tree``'s layout);
    rows ``n + 1 + i`` belong to extra node i. Afterwards the cache holds ``context`` followed by the n nodes and
    the m extra nodes; call :func:`keep_path` (with ``tokens + extra.tokens``) before the next forward.
    """
    if len(parents) != len(tokens):
        raise ValueError(f"{len(tokens)} tree tokens need {len(tokens)} parents")
    n = len(tokens)
    m = len(extra.tokens) if extra else 0
    if extra and (len(extra.positions) != m or tuple(extra.visible.shape) != (m, n + m)):
        raise ValueError(f"{m} extra nodes need {m} positions and a [{m}, {n + m}] visibility matrix")
    unseen = target.sync(context)
    past = len(context) - len(unseen)
    depths = node_depths(parents)
    positions = torch.tensor(
        list(range(past, len(context))) + [len(context) + d - 1 for d in depths] + (extra.positions if extra else [])
    )
    visible = torch.zeros(n + m, n + m, dtype=torch.bool)
    visible[:n, :n] = _ancestor_or_self(parents)
    if extra:
        visible[n:] = extra.visible
    mask = _tree_masks(target, len(context), visible, positions)
    ids = torch.tensor([unseen + tokens + (extra.tokens if extra else [])], dtype=torch.long)
    out = target.model.forward(
        ids,
        target.cache,
        position_ids=positions[None].to(target.model.device),
        attention_mask=mask,
        inputs=_embedded(target, ids[:, : len(ids[0]) - m], extra.embeddings) if extra else None,
        hidden=target.record_hidden,
        keep=n + m + 1,
    )
    target.tokens = list(context)  # the n node slots after them are not a sequence: keep_path resolves them
    target.ahead = None
    target.last_hidden = out.hidden[0] if out.hidden is not None else None
    return out.logits[0, -(n + m + 1) :]


def _embedded(target: PrefixCache, ids: Tensor, extra: Tensor | None) -> dict[str, Tensor] | None:
    """``inputs_embeds`` of ``ids`` followed by the ``extra`` embeddings (None when there are none)."""
    if extra is None:
        return None
    with torch.inference_mode():
        embedded = target.model.model.get_input_embeddings()(ids.to(target.model.device))
        return {"inputs_embeds": torch.cat([embedded, extra[None].to(embedded)], dim=1)}


def keep_path(target: PrefixCache, tokens: list[int], path: list[int]) -> list[int]:
    """Keep the KV of the tree nodes on ``path`` (node ids, root to leaf) after the context; drop the other nodes.

    ``tokens`` are the tree's tokens as passed to :func:`tree_forward`. Returns the cache slots the kept nodes
    had in the flattened tree (their positions in the forward's storage order).
    """
    start = len(target.tokens)
    if target.cache.get_seq_length() != start + len(tokens):
        raise ValueError("keep_path needs the cache exactly as tree_forward left it")
    slots = [start + node for node in path]
    compact_cache(target.cache, start, slots)
    target.tokens.extend(tokens[node] for node in path)
    return slots


@torch.inference_mode()  # the cache's tensors were made in inference mode: only there can they change in place
def compact_cache(cache: DynamicCache, start: int, slots: list[int]) -> None:
    """Move the KV at positions ``slots`` (all >= ``start``, ascending) to ``start, start + 1, ...`` and crop the rest.

    Positions count every token the cache has seen; a sliding-window layer holds only the last ones, so each
    layer's storage index is the position minus what it has already dropped.
    """
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        dropped = layer.get_seq_length() - layer.keys.shape[-2]
        index = torch.tensor(slots, dtype=torch.long, device=layer.keys.device) - dropped
        target = slice(start - dropped, start - dropped + len(slots))
        layer.keys[:, :, target] = layer.keys[:, :, index]
        layer.values[:, :, target] = layer.values[:, :, index]
    crop_cache(cache, start + len(slots))


def _ancestor_or_self(parents: list[int]) -> Tensor:
    ancestor_or_self = torch.eye(len(parents), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            ancestor_or_self[node] |= ancestor_or_self[parent]
    return ancestor_or_self


def _tree_masks(target: PrefixCache, context_length: int, node_visible: Tensor, positions: Tensor) -> Tensor | dict[str, Tensor]:
    """The additive masks [1, 1, queries, keys] for the forward: one tensor, or one per layer type.

    ``node_visible`` [n, n] says which nodes each node sees; ``positions`` are the queries' logical positions.
    """
    n = len(node_visible)
    queries = len(positions)
    total = context_length + n
    # visible[q, k] over every position the cache will hold, keys in storage order: context first, then the nodes
    key_positions = torch.cat([torch.arange(context_length), positions[queries - n :]])
    visible = torch.zeros(queries, total, dtype=torch.bool)
    visible[:, :context_length] = torch.arange(context_length)[None, :] <= positions[:, None]
    visible[queries - n :, context_length:] = node_visible
    dtype = target.model.model.dtype
    config = target.model.model.config
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    masks: dict[str, Tensor] = {}
    for layer_type in dict.fromkeys(layer_types):
        layer = target.cache.layers[layer_types.index(layer_type)]
        kv_length, kv_offset = layer.get_mask_sizes(queries)
        if kv_offset + kv_length != total:
            raise ValueError(f"the cache's {layer_type} layers hold an unexpected number of positions")
        allowed = visible
        if getattr(layer, "is_sliding", False):
            allowed = visible & (positions[:, None] - key_positions[None, :] < layer.sliding_window)
        mask = torch.zeros(queries, kv_length, dtype=dtype).masked_fill_(~allowed[:, kv_offset:], torch.finfo(dtype).min)
        masks[layer_type] = mask[None, None].to(target.model.device)
    return masks if getattr(config, "layer_types", None) else masks["full_attention"]
