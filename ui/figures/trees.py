"""Tree figures: the beam search tree and the draft trees of speculative decoding, plus acceptance stats.

Pure functions of a trace (live or replayed): they read events and ``trace.vocab`` only. Token text is
untrusted, so every label and hover line that shows it goes through :func:`clip_text` / :func:`token_label`.

Trees grow left to right (x = depth). Labels sit above their nodes and are placed so that none overlap at the
figure's size (:func:`place_labels`): a label that would collide is left off, the hover still has it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import networkx as nx
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import BeamNode, BeamStep, DraftNode, DraftRound, Output, TokenStep
from engine.recorder import depth_outcomes
from engine.trace import Trace
from ui.figures.common import (
    FIGURE_WIDTH, MARGIN, PRIMARY_HEIGHTS, clip_text, empty_figure, escape_token, scatter_class,
    style_figure, text_px, token_label,
)
from ui.figures.tokens import fmt_p

ROOT = -1  # parent id of the first generated nodes, in beam and draft trees alike
BONUS = "bonus"  # graph key of a round's bonus/correction node (draft node ids are ints)
LABEL_CHARS = 16  # draft tree labels are cut to this many characters; the hover shows the whole token
BEAM_LABEL_CHARS = 10  # beam tree labels: shorter, so more steps fit across the page
CONTEXT_CHARS = 80  # prompt/context text shown in the root's hover
NODE_FONT = 11  # px, node labels
ROW_PX = 30  # px per layout row: a label line above a marker, with a gap
LEAF_ROW_PX = 22  # px per row where every row is a leaf, labelled beside its marker (draft and token trees)
COLUMN_GAP_PX = 14  # px between the labels of neighbouring columns
MIN_COLUMN_PX = 44
MAX_TREE_HEIGHT = 1200  # px; a taller tree keeps its height and leaves off the labels that would collide
PRUNED_ROW = 0.4  # rows a pruned beam takes in the layout: an unlabelled stub

BEAM_COLOURS = {"live": "#1f77b4", "finished": "#2ca02c", "pruned": "#9e9e9e"}
DRAFT_COLOURS = {
    "accepted": "#2ca02c",
    "rejected": "#d62728",
    "not verified": "#9e9e9e",
    "bonus": "#9467bd",
    "correction": "#ff7f0e",
}
ROOT_COLOUR = "#777777"
PATH_COLOUR = "#ff7f0e"
EDGE_COLOUR = "rgba(128,128,128,0.5)"
FAINT_EDGE_COLOUR = "rgba(128,128,128,0.28)"


def _quoted(trace: Trace, token_id: int) -> str:
    return f"“{token_label(trace.vocab, token_id)}”"


def _tail(text: str) -> str:
    return clip_text(text, CONTEXT_CHARS, keep="end")


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _prob(p: float | None) -> str:
    return "—" if p is None else fmt_p(p)


# ---------------------------------------------------------------- layout and drawing shared by the trees


def tidy_positions(graph: nx.DiGraph, root: Hashable, size: dict[Hashable, float] | None = None,
                   packed: bool = False) -> dict[Hashable, tuple[float, float]]:
    """Positions of the nodes reachable from ``root`` (first reached, for a malformed graph): x = depth; each
    layer keeps its parents' order (so edges never cross), children are centred on their parent in
    successor order, then pushed apart and the layer re-centred on where they wanted to be. Neighbours in a
    layer end up at least (size[a] + size[b]) / 2 apart (``size`` defaults to 1 for every node).

    ``packed`` stacks every layer tightly, centred on the root's row: a band as tall as the widest layer, for
    trees whose layers hold about the same number of nodes (beam search), which would otherwise drift."""
    size = size or {}
    pos: dict[Hashable, tuple[float, float]] = {root: (0.0, 0.0)}
    layer, depth = [root], 0
    while layer:
        depth += 1
        nodes, wanted = [], []
        for parent in layer:
            kids = [kid for kid in graph.successors(parent) if kid not in pos]  # a malformed cycle ends here
            sizes = [size.get(kid, 1.0) for kid in kids]
            span = sum((a + b) / 2 for a, b in zip(sizes, sizes[1:]))
            offset = span / 2
            for i, kid in enumerate(kids):
                if i:
                    offset -= (sizes[i - 1] + sizes[i]) / 2
                nodes.append(kid)
                wanted.append(pos[parent][1] + offset)
        ys: list[float] = []
        for i, want in enumerate(wanted):
            gap = (size.get(nodes[i - 1], 1.0) + size.get(nodes[i], 1.0)) / 2 if i else 0.0
            ys.append((ys[-1] - gap if ys else 0.0) if packed else want if not ys else min(want, ys[-1] - gap))
        if packed and ys:
            shift = -(ys[0] + ys[-1]) / 2
        else:
            shift = (sum(wanted) - sum(ys)) / len(ys) if ys else 0.0
        pos.update({node: (float(depth), y + shift) for node, y in zip(nodes, ys)})
        layer = nodes
    return pos


def leaf_positions(graph: nx.DiGraph, root: Hashable) -> dict[Hashable, tuple[float, float]]:
    """Positions of the nodes reachable from ``root`` (first reached, for a malformed graph): x = depth; every leaf
    gets a row of its own, top to bottom in successor order, and every inner node sits midway between its first
    and last child, so edges never cross and no subtree overlaps another. Iterative: deep chains are fine."""
    depth = {root: 0}
    order, kids = [], {}
    stack = [root]
    while stack:  # pre-order, children in successor order
        node = stack.pop()
        order.append(node)
        kids[node] = [k for k in graph.successors(node) if k not in depth]
        for k in kids[node]:
            depth[k] = depth[node] + 1
        stack.extend(reversed(kids[node]))
    y: dict[Hashable, float] = {}
    row = 0
    for node in order:
        if not kids[node]:
            y[node] = -float(row)
            row += 1
    for node in reversed(order):
        if kids[node]:
            y[node] = (y[kids[node][0]] + y[kids[node][-1]]) / 2
    return {node: (float(depth[node]), y[node]) for node in order}


@dataclass
class PixelMap:
    """Data coordinates to pixels (origin top left of the plotting area) for a figure drawn at a known size."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    width: float
    height: float

    def __call__(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return (x - x0) / (x1 - x0) * self.width, (y1 - y) / (y1 - y0) * self.height


def label_box(pixels: PixelMap, x: float, y: float, label: str, font: float, marker: float,
              position: str = "top center") -> tuple[float, float, float, float]:
    """The pixel box (left, top, right, bottom) of a label drawn "top center" above a marker at (x, y), or
    "middle right" beside it."""
    px, py = pixels(x, y)
    width = text_px(label, font)
    if position == "middle right":
        left = px + marker / 2 + 1
        return left, py - font * 0.65, left + width, py + font * 0.65
    bottom = py - marker / 2 - 1
    return px - width / 2, bottom - font * 1.3, px + width / 2, bottom


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], pad: float = 1.0) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def place_labels(boxes: list[tuple[float, float, float, float] | None],
                 obstacles: Iterable[tuple[float, float, float, float]] = ()) -> list[bool]:
    """Greedy placement: keep each box (in the given order, most important first) that overlaps no kept box and
    no obstacle (the nodes' markers); ``None`` (no label) is never kept. A coarse grid keeps it fast."""
    cell = 64.0
    grid: dict[tuple[int, int], list[tuple[float, ...]]] = defaultdict(list)

    def cells(box: tuple[float, ...]) -> Iterable[tuple[int, int]]:
        for gx in range(math.floor(box[0] / cell), math.floor(box[2] / cell) + 1):
            for gy in range(math.floor(box[1] / cell), math.floor(box[3] / cell) + 1):
                yield gx, gy

    for box in obstacles:
        for key in cells(box):
            grid[key].append(box)
    kept = []
    for box in boxes:
        ok = box is not None and not any(_overlaps(box, other) for key in cells(box) for other in grid[key])
        kept.append(ok)
        if ok:
            for key in cells(box):
                grid[key].append(box)
    return kept


@dataclass
class _Group:
    """One legend entry of nodes: layout keys with their labels and hover texts (escaped), and a look."""

    name: str
    colour: str
    size: float = 12
    opacity: float = 1.0
    symbol: str = "circle"
    nodes: list[Hashable] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    hovers: list[str] = field(default_factory=list)
    priority: list[float] = field(default_factory=list)

    def add(self, node: Hashable, label: str, hover: str, priority: float = 0.0) -> None:
        self.nodes.append(node)
        self.labels.append(label)
        self.hovers.append(hover)
        self.priority.append(priority)


def _edge_trace(pos: dict, edges: Iterable[tuple], name: str, colour: str, width: float) -> go.Scatter:
    xs: list[float | None] = []
    ys: list[float | None] = []
    for a, b in edges:
        xs += [pos[a][0], pos[b][0], None]
        ys += [pos[a][1], pos[b][1], None]
    return go.Scatter(x=xs, y=ys, mode="lines", name=name, line={"color": colour, "width": width}, hoverinfo="skip",
                      showlegend=width >= 3)  # the highlighted path has a legend entry, plain edges none


def _node_trace(pos: dict, group: _Group, beside: frozenset = frozenset()) -> go.Scatter:
    return go.Scatter(
        x=[pos[n][0] for n in group.nodes],
        y=[pos[n][1] for n in group.nodes],
        mode="markers+text",
        name=group.name,
        text=group.labels,
        textposition=["middle right" if n in beside else "top center" for n in group.nodes] if beside else "top center",
        textfont={"size": NODE_FONT},
        hovertext=group.hovers,
        hoverinfo="text",
        customdata=list(group.nodes),  # node ids (-1 = the root), for clicks
        marker={"color": group.colour, "size": group.size, "symbol": group.symbol,
                "line": {"width": 1, "color": "rgba(255,255,255,0.7)"}},
        opacity=group.opacity,
    )


@dataclass
class _Frame:
    """Where a tree is drawn: axis ranges and the figure height, and the pixel map they give at FIGURE_WIDTH."""

    x_range: tuple[float, float]
    y_range: tuple[float, float]
    height: int
    pixels: PixelMap


def _frame(pos: dict, top_margin: int, width: int, min_height: int = PRIMARY_HEIGHTS[0], row_px: float = ROW_PX,
           right: float = 0.6) -> _Frame:
    """Axis ranges around the nodes (room for the labels above the top row, ``right`` columns after the last) and
    a height that gives every layout row ``row_px`` pixels, within [min_height, MAX_TREE_HEIGHT]."""
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    x_range = (min(xs) - 0.5, max(xs) + right)
    y_range = (min(ys) - 0.6, max(ys) + 1.0)
    bottom = MARGIN["b"] + 28  # the legend sits under the x axis
    wanted = (y_range[1] - y_range[0]) * row_px + top_margin + bottom
    height = int(min(max(wanted, min_height), MAX_TREE_HEIGHT))
    pixels = PixelMap(x_range, y_range, width - MARGIN["l"] - MARGIN["r"], height - top_margin - bottom)
    return _Frame(x_range, y_range, height, pixels)


def _place_group_labels(pos: dict, groups: list[_Group], pixels: PixelMap, beside: frozenset = frozenset()) -> None:
    """Blank every label that would overlap a more important one (higher priority first) or a node's marker.
    Labels of the nodes in ``beside`` are drawn "middle right" of their marker, the others above it."""
    entries = [(g, i) for g in groups for i in range(len(g.nodes))]
    obstacles = []
    for g, i in entries:
        px, py = pixels(*pos[g.nodes[i]])
        r = g.size / 2
        obstacles.append((px - r, py - r, px + r, py + r))
    order = sorted(range(len(entries)), key=lambda k: -entries[k][0].priority[entries[k][1]])
    boxes = []
    for k in order:
        g, i = entries[k]
        label = g.labels[i]
        where = "middle right" if g.nodes[i] in beside else "top center"
        boxes.append(label_box(pixels, *pos[g.nodes[i]], label, NODE_FONT, g.size, where) if label else None)
    for k, keep in zip(order, place_labels(boxes, obstacles)):
        g, i = entries[k]
        if not keep:
            g.labels[i] = ""


def _tree_figure(graph: nx.DiGraph, pos: dict, path: list, path_name: str, path_colour: str,
                 groups: list[_Group], extra_edges: list[go.Scatter] = (), beside: frozenset = frozenset()) -> go.Figure:
    """Edges, the highlighted path over them, then the node groups (whose nodes must all be in ``pos``)."""
    fig = go.Figure(_edge_trace(pos, [e for e in graph.edges if e[1] in pos], "edges", EDGE_COLOUR, 1))
    for trace in extra_edges:
        fig.add_trace(trace)
    if len(path) > 1:
        fig.add_trace(_edge_trace(pos, zip(path, path[1:]), path_name, path_colour, 5))
    for group in groups:
        fig.add_trace(_node_trace(pos, group, beside))
    return fig


def _style_tree(fig: go.Figure, title: str, x_title: str, frame: _Frame) -> go.Figure:
    style_figure(fig, title, height=frame.height, role="primary", clamp=False)
    depth = frame.x_range[1] - frame.x_range[0]
    fig.update_xaxes(title=x_title, dtick=1 if depth <= 40 else None, range=list(frame.x_range), zeroline=False,
                     showgrid=False)
    fig.update_yaxes(visible=False, range=list(frame.y_range))
    fig.update_layout(hovermode="closest", margin_b=MARGIN["b"] + 28)
    return fig


# ---------------------------------------------------------------- beam search


def beam_tree_figure(trace: Trace, up_to_step: int | None = None, max_nodes: int = 400,
                     width: int = FIGURE_WIDTH, first_step: int | None = None) -> go.Figure:
    """The beam search tree, left to right: every hypothesis extension (live, finished, and pruned ones as small
    grey unlabelled stubs) from the prompt root. Nodes are labelled with their token (cut to
    :data:`BEAM_LABEL_CHARS`; whole in the hover, with the cumulative and normalised scores).

    ``up_to_step`` shows the tree as it stood after that step (replay). The steps that fit across ``width``
    pixels are shown, the newest ones (or from ``first_step``); earlier steps fold into the root. Above
    ``max_nodes`` nodes the pruned ones furthest below their step's best score are hidden. Once the run has an
    output, the best sequence (the finished hypothesis with the highest normalised score) is drawn as a thick
    path (its prefix, when replaying earlier steps).
    """
    all_steps = [e for e in trace.events if isinstance(e, BeamStep)]
    steps = [s for s in all_steps if up_to_step is None or s.step <= up_to_step]
    by_id = {n.id: n for s in all_steps for n in s.nodes}
    step_of = {n.id: s.step for s in all_steps for n in s.nodes}
    paths = _BeamPaths(by_id)
    lp = trace.info.params.get("length_penalty", 1.0)
    labels = {n.id: token_label(trace.vocab, n.token_id, BEAM_LABEL_CHARS) for s in steps for n in s.nodes
              if n.status != "pruned"}
    start = _beam_window(steps, by_id, labels, width, first_step)
    shown_steps = steps[start:]
    nodes, hidden = _visible_beam_nodes(shown_steps, max_nodes)
    shown = {n.id for n in nodes}
    entering = sorted({n.parent for n in nodes if n.parent in by_id and n.parent not in shown},
                      key=lambda i: -by_id[i].score) if start else []
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    for node_id in entering:
        graph.add_node(node_id, node=by_id[node_id])
        graph.add_edge(ROOT, node_id)
    for node in sorted(nodes, key=lambda n: -n.score):  # siblings best first (successor order)
        graph.add_node(node.id, node=node)
        graph.add_edge(node.parent if node.parent in graph else ROOT, node.id)
    size = {n.id: PRUNED_ROW for n in nodes if n.status == "pruned"}
    pos = tidy_positions(graph, ROOT, size, packed=True)
    root_depth = paths.depth(entering[0]) - 1 if entering else 0
    pos = {k: (x + root_depth, y) for k, (x, y) in pos.items()}

    output = next((e for e in reversed(trace.events) if isinstance(e, Output)), None)
    best = best_hypothesis(trace) if output else None
    path = [ROOT, *[i for i in paths.ids(best.id) if i in pos]] if best else []
    if output and best is None:
        path = _best_path(graph, output.token_ids)
    on_path = set(path[1:])

    if entering:
        earlier = trace.prompt_token_ids + paths.tokens(by_id[entering[0]].parent)
        root = _Group("prompt", ROOT_COLOUR)
        root.add(ROOT, "…", f"prompt and the first {root_depth} generated tokens (earlier steps folded): "
                 + _tail(trace.text_of(earlier)), priority=1e9)
    else:
        root = _Group("prompt", ROOT_COLOUR)
        root.add(ROOT, "prompt", "prompt: " + _tail(trace.info.prompt), priority=1e9)
    groups = {
        "pruned": _Group("pruned", BEAM_COLOURS["pruned"], size=6, opacity=0.45),
        "live": _Group("live", BEAM_COLOURS["live"], size=11),
        "finished": _Group("finished", BEAM_COLOURS["finished"], size=13, symbol="square"),
    }
    for node in [by_id[i] for i in entering] + nodes:
        if node.id not in pos:
            continue
        label = ""
        if node.status != "pruned":
            label = labels.get(node.id) or token_label(trace.vocab, node.token_id, BEAM_LABEL_CHARS)
            label = f"<b>{label}</b>" if node.id in on_path else label
        priority = (1e6 if node.id in on_path else 0) + (1e3 if node.status == "finished" else 0) + node.score
        hover = _beam_hover(trace, node, step_of[node.id], paths, lp)
        groups[node.status].add(node.id, label, hover, priority)
    frame = _frame(pos, 56 + 20, width)
    ordered = [root, *groups.values()]
    _place_group_labels(pos, ordered, frame.pixels)
    kept_edges = _edge_trace(pos, [e for e in graph.edges if e[1] in pos and e[1] in by_id
                                   and by_id[e[1]].status != "pruned"], "beam edges", EDGE_COLOUR, 1.5)
    fig = _tree_figure(graph, pos, path, "best sequence", PATH_COLOUR, ordered, [kept_edges])
    fig.data[0].line.color = FAINT_EDGE_COLOUR

    status = f"step {steps[-1].step}" if steps else "no beam steps yet"
    title = f"Beam search tree ({status}, {len(nodes)} nodes)"
    notes = ["orange: the best sequence (highest normalised score)" if path else "no output yet",
             "grey stubs: pruned beams"]
    if start:
        notes.insert(0, f"showing steps {shown_steps[0].step}–{steps[-1].step} of {len(steps)} (earlier ones fold into the root)")
    if hidden:
        notes.append(f"{hidden} lowest-scoring pruned nodes hidden (max_nodes={max_nodes})")
    return _style_tree(fig, title + "<br>" + " · ".join(notes), "tokens generated (0 = prompt)", frame)


class _BeamPaths:
    """Token paths and depths of beam nodes, following parents (cycle-safe for malformed imported traces)."""

    def __init__(self, by_id: dict[int, BeamNode]):
        self.by_id = by_id
        self._ids: dict[int, list[int]] = {}

    def ids(self, node_id: int) -> list[int]:
        """Node ids from the first generated token to ``node_id`` (inclusive)."""
        if node_id in self._ids:
            return self._ids[node_id]
        chain, seen, at = [], set(), node_id
        while at in self.by_id and at not in seen and at not in self._ids:
            seen.add(at)
            chain.append(at)
            at = self.by_id[at].parent
        prefix = self._ids.get(at, []) if at not in seen else []
        result = prefix + chain[::-1]
        for i, node in enumerate(chain[::-1]):
            self._ids.setdefault(node, prefix + chain[::-1][: i + 1])
        return result

    def tokens(self, node_id: int) -> list[int]:
        return [self.by_id[i].token_id for i in self.ids(node_id)]

    def depth(self, node_id: int) -> int:
        return len(self.ids(node_id))


def _beam_window(steps: list[BeamStep], by_id: dict[int, BeamNode], labels: dict[int, str], width: int,
                 first_step: int | None) -> int:
    """Index of the first step shown: ``first_step``'s, else the earliest from which every column (the root, the
    beams entering the window, one per step) is wide enough for its widest label within ``width`` pixels."""
    if not steps:
        return 0
    if first_step is not None:
        return next((i for i, s in enumerate(steps) if s.step >= first_step), len(steps) - 1)
    plot = width - MARGIN["l"] - MARGIN["r"]
    widest = [max((text_px(labels[n.id], NODE_FONT) for n in s.nodes if n.id in labels), default=0.0) for s in steps]
    start = 0
    while start < len(steps) - 1:
        column = max(MIN_COLUMN_PX, max(widest[max(0, start - 1):]) + COLUMN_GAP_PX)
        columns = len(steps) - start + 1 + (1 if start else 0) + 0.1  # + the root, the entering beams, margins
        if columns * column <= plot:
            break
        start += 1
    return start


def best_hypothesis(trace: Trace) -> BeamNode | None:
    """The finished beam with the highest normalised score (the decoder's output), or None while none finished."""
    finished = [n for e in trace.events if isinstance(e, BeamStep) for n in e.nodes if n.status == "finished"]
    return max(finished, key=lambda n: _normalised(n), default=None)


def _normalised(node: BeamNode) -> float:
    return node.normalized_score if node.normalized_score is not None else -math.inf


def _visible_beam_nodes(steps: list[BeamStep], max_nodes: int) -> tuple[list[BeamNode], int]:
    """All nodes, or above ``max_nodes`` every non-pruned node plus the best pruned ones; and how many were
    hidden. Pruned nodes rank by their gap to their own step's best score: cumulative scores fall with
    length, so ranking them raw would hide the most recent pruning first."""
    nodes = [n for s in steps for n in s.nodes]
    if len(nodes) <= max_nodes:
        return nodes, 0
    best = {s.step: max(n.score for n in s.nodes) for s in steps if s.nodes}
    gap = {n.id: n.score - best[s.step] for s in steps for n in s.nodes}
    pruned = sorted((n for n in nodes if n.status == "pruned"), key=lambda n: -gap[n.id])
    room = max(0, max_nodes - (len(nodes) - len(pruned)))
    keep = {n.id for n in pruned[:room]}
    visible = [n for n in nodes if n.status != "pruned" or n.id in keep]
    return visible, len(nodes) - len(visible)


def _best_path(graph: nx.DiGraph, tokens: list[int]) -> list[int]:
    """Node ids (root first) spelling ``tokens``; among equal spellings a finished hypothesis wins, then the
    better score. Stops at the deepest node present, so a tree cut by ``up_to_step`` shows the prefix."""
    frontier = [ROOT]
    for token in tokens:
        matches = [kid for parent in frontier for kid in graph.successors(parent)
                   if graph.nodes[kid]["node"].token_id == token]
        if not matches:
            break
        frontier = matches
    if frontier == [ROOT]:
        return []
    end = max(frontier, key=lambda n: graph.nodes[n]["node"].status == "finished")
    return nx.shortest_path(graph, ROOT, end)


def _beam_hover(trace: Trace, node: BeamNode, step: int, paths: _BeamPaths, length_penalty: float) -> str:
    length = paths.depth(node.id)
    lines = [
        f"token {_quoted(trace, node.token_id)}",
        "text: “" + _tail(trace.text_of(paths.tokens(node.id))) + "”",
        f"cumulative score (sum log p): {_num(node.score)}",
    ]
    if node.normalized_score is not None:
        lines.append(f"normalised score: {_num(node.normalized_score)}")
    elif length:
        lines.append(f"normalised score if it ended here: {_num(node.score / length ** length_penalty)}")
    lines += [f"log p(token): {_num(node.token_logprob)} · {length} tokens", f"{node.status} at step {step}"]
    return "<br>".join(lines)


# ---------------------------------------------------------------- finished hypotheses

BEAM_HYPOTHESES_HEADERS = ["rank", "normalised score", "cumulative score", "length", "text"]
BEAM_HYPOTHESES_TYPES = ["number", "number", "number", "number", "html"]  # the text arrives escaped


def beam_hypotheses(trace: Trace) -> list[list]:
    """The run's finished hypotheses, best first (see :data:`BEAM_HYPOTHESES_HEADERS`): rank, normalised score,
    cumulative score (sum log p), length in tokens and the whole generated text, escaped. Rank 1 is the output."""
    steps = [e for e in trace.events if isinstance(e, BeamStep)]
    paths = _BeamPaths({n.id: n for s in steps for n in s.nodes})
    finished = sorted((n for s in steps for n in s.nodes if n.status == "finished"), key=lambda n: -_normalised(n))
    return [
        [rank, n.normalized_score, n.score, paths.depth(n.id), escape_token(trace.text_of(paths.tokens(n.id)))]
        for rank, n in enumerate(finished, start=1)
    ]


def beam_final_text(trace: Trace) -> str:
    """The beam run's final text, escaped: its output, else the best finished hypothesis so far, else ""."""
    output = next((e for e in reversed(trace.events) if isinstance(e, Output)), None)
    if output is not None:
        return escape_token(trace.text_of(output.token_ids))
    rows = beam_hypotheses(trace)
    return rows[0][4] if rows else ""


# ---------------------------------------------------------------- speculative decoding


def draft_rounds(trace: Trace) -> list[int]:
    """Indices in ``trace.events`` of the DraftRound events, in order."""
    return [i for i, event in enumerate(trace.events) if isinstance(event, DraftRound)]


def draft_outcome(node: DraftNode, accepted_path: set[int]) -> str:
    """accepted (on the accepted path), rejected, or not verified (e.g. below a rejection)."""
    if node.accepted or node.id in accepted_path:
        return "accepted"
    return "not verified" if node.accepted is None else "rejected"


def draft_tree_figure(trace: Trace, round_index: int) -> go.Figure:
    """The draft tree of the DraftRound at ``trace.events[round_index]`` (an index from :func:`draft_rounds`).

    Root = the last committed token; x = depth; siblings with the same token stay distinct nodes. The bonus
    (every draft on the path accepted) or correction (sampled at the rejection) token follows the path.
    """
    round_index = range(len(trace.events))[round_index]  # IndexError when out of range; -1 = the last event
    rnd = trace.events[round_index]
    if not isinstance(rnd, DraftRound):
        raise ValueError(f"event {round_index} is a {rnd.kind!r} event, not a draft round")
    path = set(rnd.accepted_path)
    ids = {node.id for node in rnd.nodes}
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    if rnd.bonus_token is not None:  # added first: it leads its siblings, continuing the accepted path
        graph.add_edge(rnd.accepted_path[-1] if rnd.accepted_path and rnd.accepted_path[-1] in ids else ROOT, BONUS)
    for node in sorted(rnd.nodes, key=lambda n: (n.id not in path, -n.draft_prob)):
        graph.add_node(node.id, node=node)
        graph.add_edge(node.parent if node.parent in ids else ROOT, node.id)
    pos = leaf_positions(graph, ROOT)

    context = _context_before(trace, round_index)
    root = _Group("context", ROOT_COLOUR)
    root.add(ROOT, token_label(trace.vocab, context[-1], LABEL_CHARS) if context else "context",
             "context: " + _tail(trace.text_of(context)), priority=1e9)
    groups = {
        "accepted": _Group("accepted", DRAFT_COLOURS["accepted"]),
        "rejected": _Group("rejected", DRAFT_COLOURS["rejected"]),
        "not verified": _Group("not verified", DRAFT_COLOURS["not verified"], opacity=0.6),
    }
    for node in rnd.nodes:
        if node.id in pos:
            outcome = draft_outcome(node, path)
            priority = {"accepted": 2e6, "rejected": 1e6}.get(outcome, 0) + node.draft_prob
            groups[outcome].add(node.id, token_label(trace.vocab, node.token_id, LABEL_CHARS),
                                _draft_hover(trace, node, outcome), priority)
    extra = [_bonus_group(trace, rnd)] if rnd.bonus_token is not None else []
    line = [node for node in [ROOT, *rnd.accepted_path] + ([BONUS] if extra else []) if node in pos]
    ordered = [root, *groups.values(), *extra]
    top = 56 + 24  # the title, then the round's numbers
    beside = frozenset(n for n in pos if n != ROOT and not any(k in pos for k in graph.successors(n)))  # leaves
    frame = _frame(pos, top, FIGURE_WIDTH, row_px=LEAF_ROW_PX, right=0.9)
    _place_group_labels(pos, ordered, frame.pixels, beside)
    fig = _tree_figure(graph, pos, line, "accepted path", DRAFT_COLOURS["accepted"], ordered, beside=beside)

    fig.add_annotation(text=_round_stats(trace, rnd), xref="paper", yref="paper", x=0, y=1.0, yshift=4,
                       xanchor="left", yanchor="bottom", showarrow=False, align="left", font={"size": 12})
    rounds = draft_rounds(trace)
    title = f"Draft tree, round {rounds.index(round_index) + 1} of {len(rounds)} (step {rnd.step})"
    _style_tree(fig, title, "depth (0 = last committed token)", frame)
    return fig.update_layout(margin_t=top)


def _bonus_group(trace: Trace, rnd: DraftRound) -> _Group:
    kind = "correction" if rnd.bonus_is_correction else "bonus"
    if rnd.bonus_is_correction:
        hover = [f"correction {_quoted(trace, rnd.bonus_token)}", "sampled at the rejection from max(0, p − q):"]
        hover += [f"{_quoted(trace, c.token_id)} {_prob(c.prob)}" for c in rnd.residual_top]
    else:
        hover = [f"bonus token {_quoted(trace, rnd.bonus_token)}", "sampled from the target after the accepted path"]
    group = _Group(kind, DRAFT_COLOURS[kind], size=16, symbol="star")
    group.add(BONUS, f"{token_label(trace.vocab, rnd.bonus_token, LABEL_CHARS)} ({kind})", "<br>".join(hover), 3e6)
    return group


def _draft_hover(trace: Trace, node: DraftNode, outcome: str) -> str:
    ratio = node.ratio
    if ratio is None and node.target_prob is not None and node.draft_prob > 0:
        ratio = node.target_prob / node.draft_prob
    return "<br>".join([
        f"token {_quoted(trace, node.token_id)}",
        f"depth {node.depth} · drafted by {escape_token(node.source)}"
        + ("" if node.block is None else f" · block {node.block}"),
        f"draft q: {_prob(node.draft_prob)} · target p: {_prob(node.target_prob)}",
        f"ratio p/q: {_num(ratio)} · draw r: {_num(node.draw)}",
        outcome,
    ])


def _context_before(trace: Trace, index: int) -> list[int]:
    """The prompt plus every token committed by the events before ``trace.events[index]``."""
    ids = list(trace.prompt_token_ids)
    for event in trace.events[:index]:
        if isinstance(event, DraftRound):
            ids += event.committed
        elif isinstance(event, TokenStep) and event.committed:
            ids.append(event.token_id)
    return ids


def _round_stats(trace: Trace, rnd: DraftRound) -> str:
    path = set(rnd.accepted_path)
    verified = sum(draft_outcome(n, path) != "not verified" for n in rnd.nodes)
    return (
        f"accepted {len(rnd.accepted_path)} of {len(rnd.nodes)} drafts ({verified} verified) · "
        f"committed {len(rnd.committed)}: “{escape_token(trace.text_of(rnd.committed))}” · "
        f"target calls {rnd.model_calls}, draft calls {rnd.draft_calls}"
        + ("" if rnd.draft_depth_limit is None else f" · draft depth limited to {rnd.draft_depth_limit} (cost-aware)")
    )


def acceptance_by_depth(trace: Trace) -> dict[int, tuple[int, int]]:
    """Per draft depth over the run: (rounds that advanced past it, rounds that tried it); see depth_outcomes."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for index in draft_rounds(trace):
        for depth, accepted in depth_outcomes(trace.events[index]):
            counts[depth][0] += accepted
            counts[depth][1] += 1
    return {depth: (a, v) for depth, (a, v) in sorted(counts.items())}


def acceptance_figure(trace: Trace, selected_round: int | None = None) -> go.Figure:
    """Acceptance rate by depth (bars) and tokens per round (lines). The title gives the mean accepted
    tokens per target call, bonus included, as Spec-Bench counts it (plain decoding scores 1.00)."""
    rounds = [trace.events[i] for i in draft_rounds(trace)]
    if not rounds:
        return empty_figure("No draft rounds yet")
    by_depth = acceptance_by_depth(trace)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Acceptance rate by depth", "Tokens per round"))
    fig.add_trace(go.Bar(
        x=list(by_depth), y=[a / v for a, v in by_depth.values()], text=[f"{a}/{v}" for a, v in by_depth.values()],
        name="acceptance rate", hovertemplate="depth %{x}: accepted in %{text} rounds that reached it<extra></extra>",
    ), row=1, col=1)
    x = list(range(1, len(rounds) + 1))
    committed = [len(r.committed) for r in rounds]
    scatter = scatter_class(len(rounds))
    # customdata = the round's index: a click selects that round, like a token click does
    fig.add_trace(scatter(x=x, y=committed, customdata=[i - 1 for i in x], mode="lines+markers",
                          name="committed (bonus included)"), row=1, col=2)
    fig.add_trace(scatter(x=x, y=[len(r.accepted_path) for r in rounds], customdata=[i - 1 for i in x], mode="lines",
                          line={"dash": "dash"}, name="accepted drafts"), row=1, col=2)
    if selected_round is not None:
        fig.add_vline(x=selected_round + 1, line_color="rgba(128, 128, 128, 0.9)", line_width=2, row=1, col=2)
    mean = sum(committed) / len(committed)
    fig.add_hline(y=mean, line_dash="dot", row=1, col=2, annotation_text=f"mean {mean:.2f}")
    fig.update_xaxes(title="depth", dtick=1, row=1, col=1)
    fig.update_yaxes(title="accepted / verified", range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(title="round", row=1, col=2)
    fig.update_yaxes(title="tokens", rangemode="tozero", row=1, col=2)
    title = (f"Speculative acceptance over {len(rounds)} rounds<br>mean accepted tokens per target call: {mean:.2f}"
             " (bonus included; plain decoding scores 1.00)")
    return style_figure(fig, title, height=380)
