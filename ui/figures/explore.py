"""The step tools' figures: the token-tree explorer (from a prefix, the most probable continuations to a depth) and
a recorded step re-processed with other sampling settings.

Both take the engine's plain results (:class:`engine.explore.TokenTree`, :class:`engine.reprocess.Reprocessed`);
token text in them is untrusted and goes through :func:`clip_text` before it reaches a label or a hover.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import networkx as nx
import plotly.graph_objects as go

from ui.figures.common import (
    CHOSEN_COLOR, FIGURE_WIDTH, PROCESSED_COLOR, RAW_COLOR, clip_text, empty_figure, escape_token, text_px,
)
from ui.figures.distribution import TICK_CHARS, Cut, finish_with_cuts
from ui.figures.tokens import fmt_p
from ui.figures.trees import (
    EDGE_COLOUR, LEAF_ROW_PX, NODE_FONT, ROOT, ROOT_COLOUR, _edge_trace, _frame, _Group, _place_group_labels, _style_tree,
    label_box, leaf_positions, place_labels,
)

if TYPE_CHECKING:  # annotations only: the engine modules that build these load torch, which figures never need
    from engine.explore import TokenTree, TreeNode
    from engine.reprocess import Reprocessed

TREE_LABEL_CHARS = 14  # a node's token label is cut to this many characters; the hover has the whole path
PREFIX_CHARS = 16  # the root's label: the end of the prefix
HOVER_CHARS = 400  # path text in a hover
EDGE_FONT = 10
EDGE_AT = 0.7  # where along an edge (parent 0 → child 1) its probability is written
# node colour, path probability: Viridis without its near-black end, so every node shows on dark pages too
PATH_SCALE = [[0.0, "#3b528b"], [0.33, "#21918c"], [0.67, "#5ec962"], [1.0, "#fde725"]]


# ---------------------------------------------------------------- the token tree


def token_tree_figure(tree: TokenTree) -> go.Figure:
    """The expanded token tree, left to right: the prefix as the root, each node labelled with its token (cut to
    :data:`TREE_LABEL_CHARS`) and coloured by its path probability, each edge labelled with p(token | parent).
    The hover has the path probability and the whole path text. Every node's ``customdata`` is its node id
    (the root's is -1), so a click can continue a run from it."""
    if not tree.nodes:
        return empty_figure("The tree has no nodes: no continuation reached the minimum probability.",
                            title=_tree_title(tree))
    by_id = {n.id: n for n in tree.nodes}
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    for node in sorted(tree.nodes, key=lambda n: (n.depth, -n.prob)):  # siblings most probable first
        graph.add_edge(node.parent if node.parent in by_id else ROOT, node.id)
    pos = leaf_positions(graph, ROOT)
    texts = _path_texts(tree, by_id)

    root = _Group("prefix", ROOT_COLOUR, size=14)
    root.add(ROOT, clip_text(tree.prefix_text, PREFIX_CHARS, keep="end"),
             "prefix: “" + clip_text(tree.prefix_text, HOVER_CHARS, keep="end") + "”", priority=1e9)
    nodes = _Group("continuations", "", size=13)
    shown = [n for n in tree.nodes if n.id in pos]
    for n in shown:
        nodes.add(n.id, clip_text(n.text, TREE_LABEL_CHARS), _node_hover(n, texts[n.id]), n.path_prob)
    top = 56 + 20 * 2
    leaves = {n.id for n in tree.leaves()}
    beside = frozenset(n.id for n in shown if n.id in leaves)  # a leaf's label goes to its right: no edge leaves it
    frame = _frame(pos, top, FIGURE_WIDTH, row_px=LEAF_ROW_PX, right=0.9)
    _place_group_labels(pos, [root, nodes], frame.pixels, beside)
    edge_labels = _edge_labels(pos, shown, [root, nodes], frame, beside)

    fig = go.Figure(_edge_trace(pos, [e for e in graph.edges if e[1] in pos], "edges", EDGE_COLOUR, 1.2))
    fig.add_trace(go.Scatter(
        x=edge_labels["x"], y=edge_labels["y"], text=edge_labels["text"], mode="text", name="p(token | parent)",
        hoverinfo="skip", showlegend=False, textfont={"size": EDGE_FONT}, customdata=edge_labels["node"],
    ))
    fig.add_trace(go.Scatter(
        x=[pos[ROOT][0]], y=[pos[ROOT][1]], mode="markers+text", name="prefix", text=root.labels,
        textposition="top center", textfont={"size": NODE_FONT}, hovertext=root.hovers, hoverinfo="text",
        customdata=[ROOT], marker={"color": ROOT_COLOUR, "size": 14, "symbol": "diamond"},
    ))
    fig.add_trace(go.Scatter(
        x=[pos[n.id][0] for n in shown], y=[pos[n.id][1] for n in shown], mode="markers+text", name="continuations",
        text=nodes.labels, textposition=["middle right" if n.id in beside else "top center" for n in shown],
        textfont={"size": NODE_FONT}, hovertext=nodes.hovers,
        hoverinfo="text", customdata=[n.id for n in shown],
        marker={"color": [n.path_prob for n in shown], "colorscale": PATH_SCALE, "cmin": 0.0,
                "cmax": max(n.path_prob for n in shown) or 1.0, "size": [15 if n.id in leaves else 11 for n in shown],
                "line": {"width": 1, "color": "rgba(255,255,255,0.7)"},
                "colorbar": {"title": {"text": "path probability", "side": "right"}, "thickness": 12, "len": 0.8}},
    ))
    _style_tree(fig, _tree_title(tree), "depth (0 = the prefix)", frame)
    fig.update_layout(showlegend=False)
    return fig.update_layout(margin_t=top)


def _tree_title(tree: TokenTree) -> str:
    tail = clip_text(tree.prefix_text, 40, keep="end")
    return (f"Token tree: the most probable continuations of “{tail}”<br>depth {tree.depth} · up to "
            f"{tree.max_children} children · p ≥ {tree.min_prob:g} · {len(tree.nodes)} nodes · {tree.model_calls} "
            "model calls<br>edge labels: p(token | parent) · colour: path probability · click a node to continue a run "
            "from it")


def _path_texts(tree: TokenTree, by_id: dict[int, TreeNode]) -> dict[int, str]:
    """Each node's whole path text (the tokens after the prefix), following parents (cycle-safe)."""
    texts: dict[int, str] = {}
    for node in tree.nodes:
        chain, seen, at = [], set(), node.id
        while at in by_id and at not in seen and at not in texts:
            seen.add(at)
            chain.append(at)
            at = by_id[at].parent
        text = texts.get(at, "")
        for i in reversed(chain):
            text += by_id[i].text
            texts[i] = text
    return texts


def _node_hover(node: TreeNode, path_text: str) -> str:
    return "<br>".join([
        f"token “{escape_token(node.text)}” (id {node.token_id}, node {node.id})",
        f"p(token | parent): {fmt_p(node.prob)}",
        f"path probability: {fmt_p(node.path_prob)} · depth {node.depth}",
        "path: “" + clip_text(path_text, HOVER_CHARS) + "”",
    ])


def _edge_labels(pos: dict, nodes: list[TreeNode], groups: list[_Group], frame, beside: frozenset) -> dict[str, list]:
    """p(token | parent) written along each edge; one that would overlap a node label, a marker or another edge
    label is left off (the hover has it)."""
    obstacles = []
    for group in groups:
        for node, label in zip(group.nodes, group.labels):
            px, py = frame.pixels(*pos[node])
            r = group.size / 2
            obstacles.append((px - r, py - r, px + r, py + r))
            if label:
                where = "middle right" if node in beside else "top center"
                obstacles.append(label_box(frame.pixels, *pos[node], label, NODE_FONT, group.size, where))
    points, boxes = [], []
    for n in sorted(nodes, key=lambda n: -n.path_prob):
        parent = n.parent if n.parent in pos else ROOT
        (x0, y0), (x1, y1) = pos[parent], pos[n.id]
        x, y = x0 + EDGE_AT * (x1 - x0), y0 + EDGE_AT * (y1 - y0)
        text = f"{n.prob:.2f}"
        px, py = frame.pixels(x, y)
        half = text_px(text, EDGE_FONT) / 2
        points.append((x, y, text, n.id))
        boxes.append((px - half, py - EDGE_FONT * 0.65, px + half, py + EDGE_FONT * 0.65))
    kept = place_labels(boxes, obstacles)
    chosen = [p for p, keep in zip(points, kept) if keep]
    return {"x": [p[0] for p in chosen], "y": [p[1] for p in chosen], "text": [p[2] for p in chosen],
            "node": [p[3] for p in chosen]}


# ---------------------------------------------------------------- re-processing a recorded step


def reprocess_figure(result: Reprocessed | None) -> go.Figure:
    """Raw vs re-processed probability of the shown candidates, the recorded choice boxed, one dashed line per
    stage's cut under the new settings (drawn as the recorded distribution's cuts are). The title states the
    settings, whether the result is exact (the full vocabulary) or approximate (from the recorded top-N
    candidates, with the mass they cover), and the entropy raw → processed."""
    if result is None:
        return empty_figure("Nothing to re-process: select a token step of a token-level run.")
    labels = [escape_token(text) for text in result.texts]
    ticks = [clip_text(text, TICK_CHARS) for text in result.texts]
    chosen = next((i for i, t in enumerate(result.token_ids) if t == result.chosen_token_id), None)
    hover = [f"“{label}”<br>rank {i + 1}<br>raw p {fmt_p(raw)}<br>re-processed p {fmt_p(p)}"
             for i, (label, raw, p) in enumerate(zip(labels, result.raw_probs, result.probs))]
    x = list(range(len(result.token_ids)))
    fig = go.Figure()
    for name, values, colour in (("raw (model)", result.raw_probs, RAW_COLOR),
                                 ("re-processed", result.probs, PROCESSED_COLOR)):
        fig.add_bar(x=x, y=list(values), name=name, marker_color=colour, hovertext=hover, hoverinfo="text")
    fig.update_xaxes(tickvals=x, ticktext=[f"<b>{t}</b>" if i == chosen else t for i, t in enumerate(ticks)],
                     tickangle=-45, range=[-0.6, len(x) - 0.4])
    fig.update_yaxes(title_text="probability", rangemode="tozero")
    fig.update_layout(barmode="group", bargap=0.25)
    if chosen is not None:
        top = max(result.raw_probs[chosen], result.probs[chosen])
        fig.add_shape(type="rect", x0=chosen - 0.45, x1=chosen + 0.45, y0=0, y1=top, name="chosen",
                      line={"color": CHOSEN_COLOR, "width": 2.5})
    cuts = [Cut(s.name, s.kept, s.mass, s.threshold, s.survivors) for s in result.stages]
    return finish_with_cuts(fig, reprocess_title(result), cuts, len(x))


def reprocess_title(result: Reprocessed) -> str:
    settings = " · ".join(f"{escape_token(str(k))}={v:g}" if isinstance(v, (int, float)) else
                          f"{escape_token(str(k))}={escape_token(str(v))}" for k, v in result.settings.items())
    basis = ("exact (full vocabulary)" if result.exact else
             f"approximate: from the recorded top-{len(result.token_ids)} candidates "
             f"(covering {result.covered_mass:.1%} of the mass)")
    return (f"Position {result.position} re-processed with {settings or 'no processing'}<br>{basis} · "
            f"entropy {result.entropy_raw:.3f} → {result.entropy:.3f} nats (raw → processed)")
