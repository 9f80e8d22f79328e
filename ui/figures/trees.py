"""Tree figures: the beam search tree and the draft trees of speculative decoding, plus acceptance stats.

Pure functions of a trace (live or replayed): they read events and ``trace.vocab`` only. Token text is
untrusted, so every label and hover line that shows it goes through :func:`escape_token`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import networkx as nx
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import BeamNode, BeamStep, DraftNode, DraftRound, Output, TokenStep
from engine.recorder import depth_outcomes
from engine.trace import Trace
from ui.figures.common import empty_figure, escape_token, scatter_class, style_figure, token_label
from ui.figures.tokens import fmt_p

ROOT = -1  # parent id of the first generated nodes, in beam and draft trees alike
BONUS = "bonus"  # graph key of a round's bonus/correction node (draft node ids are ints)
LABEL_CHARS = 16  # node labels are cut to this many characters; the hover shows the whole token
LABELLED_NODES = 150  # above this many nodes labels only overlap: the hover has them
CONTEXT_CHARS = 80  # prompt/context text shown in the root's hover

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


def _label(trace: Trace, token_id: int) -> str:
    """A node label: the token, cut before escaping so no character reference is split."""
    text = trace.text_of([token_id])
    return escape_token(text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…")


def _quoted(trace: Trace, token_id: int) -> str:
    return f"“{token_label(trace.vocab, token_id)}”"


def _tail(text: str) -> str:
    return escape_token(text if len(text) <= CONTEXT_CHARS else "…" + text[-CONTEXT_CHARS:])


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _prob(p: float | None) -> str:
    return "—" if p is None else fmt_p(p)


# ---------------------------------------------------------------- layout and drawing shared by both trees


def tidy_positions(graph: nx.DiGraph, root: Hashable) -> dict[Hashable, tuple[float, float]]:
    """Positions of the nodes reachable from ``root`` (first reached, for a malformed graph): x = depth; each
    layer keeps its parents' order (so edges never cross), children are centred on their parent in
    successor order, then pushed apart to unit spacing and the layer re-centred on where they wanted to be."""
    pos: dict[Hashable, tuple[float, float]] = {root: (0.0, 0.0)}
    layer, depth = [root], 0
    while layer:
        depth += 1
        nodes, wanted = [], []
        for parent in layer:
            kids = [kid for kid in graph.successors(parent) if kid not in pos]  # a malformed cycle ends here
            for i, kid in enumerate(kids):
                nodes.append(kid)
                wanted.append(pos[parent][1] + (len(kids) - 1) / 2 - i)
        ys: list[float] = []
        for want in wanted:
            ys.append(want if not ys else min(want, ys[-1] - 1.0))
        shift = (sum(wanted) - sum(ys)) / len(ys) if ys else 0.0
        pos.update({node: (float(depth), y + shift) for node, y in zip(nodes, ys)})
        layer = nodes
    return pos


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

    def add(self, node: Hashable, label: str, hover: str) -> None:
        self.nodes.append(node)
        self.labels.append(label)
        self.hovers.append(hover)


def _edge_trace(pos: dict, edges: Iterable[tuple], name: str, colour: str, width: float) -> go.Scatter:
    xs: list[float | None] = []
    ys: list[float | None] = []
    for a, b in edges:
        xs += [pos[a][0], pos[b][0], None]
        ys += [pos[a][1], pos[b][1], None]
    return go.Scatter(x=xs, y=ys, mode="lines", name=name, line={"color": colour, "width": width}, hoverinfo="skip")


def _node_trace(pos: dict, group: _Group, labelled: bool) -> go.Scatter:
    return go.Scatter(
        x=[pos[n][0] for n in group.nodes],
        y=[pos[n][1] for n in group.nodes],
        mode="markers+text" if labelled else "markers",
        name=group.name,
        text=group.labels,
        textposition="top center",
        textfont={"size": 12 if group.opacity == 1 else 10},
        hovertext=group.hovers,
        hoverinfo="text",
        marker={"color": group.colour, "size": group.size, "symbol": group.symbol,
                "line": {"width": 1, "color": "rgba(255,255,255,0.7)"}},
        opacity=group.opacity,
    )


def _tree_figure(graph: nx.DiGraph, pos: dict, path: list, path_name: str, path_colour: str,
                 groups: list[_Group]) -> go.Figure:
    """Edges, the highlighted path over them, then the node groups (whose nodes must all be in ``pos``)."""
    fig = go.Figure(_edge_trace(pos, [e for e in graph.edges if e[1] in pos], "edges", EDGE_COLOUR, 1))
    if len(path) > 1:
        fig.add_trace(_edge_trace(pos, zip(path, path[1:]), path_name, path_colour, 4))
    for group in groups:
        fig.add_trace(_node_trace(pos, group, labelled=len(pos) <= LABELLED_NODES))
    return fig


def _style_tree(fig: go.Figure, title: str, x_title: str) -> go.Figure:
    depth = max((x for t in fig.data for x in t.x if x is not None), default=0)
    style_figure(fig, title)
    fig.update_xaxes(title=x_title, dtick=1 if depth <= 30 else None, range=[-0.5, depth + 0.9], zeroline=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(hovermode="closest")
    return fig


# ---------------------------------------------------------------- beam search


def beam_tree_figure(trace: Trace, up_to_step: int | None = None, max_nodes: int = 400) -> go.Figure:
    """The beam search tree: every hypothesis extension (live, pruned, finished) from the prompt root.

    ``up_to_step`` shows the tree as it stood after that step (replay). Above ``max_nodes`` nodes the pruned
    ones furthest below their step's best score are hidden (pruned nodes are leaves, so the tree stays whole).
    The trace's final output, once it has one, is drawn as a path (its prefix, when replaying earlier steps).
    """
    steps = [e for e in trace.events if isinstance(e, BeamStep) and (up_to_step is None or e.step <= up_to_step)]
    step_of = {node.id: step.step for step in steps for node in step.nodes}
    nodes, hidden = _visible_beam_nodes(steps, max_nodes)
    graph = nx.DiGraph()
    graph.add_node(ROOT)
    for node in sorted(nodes, key=lambda n: -n.score):  # siblings best first (successor order)
        graph.add_node(node.id, node=node)
        graph.add_edge(node.parent, node.id)
    pos = tidy_positions(graph, ROOT)
    output = next((e for e in reversed(trace.events) if isinstance(e, Output)), None)
    path = _best_path(graph, output.token_ids) if output else []

    root = _Group("prompt", ROOT_COLOUR)
    root.add(ROOT, "prompt", "prompt: " + _tail(trace.info.prompt))
    groups = {
        "pruned": _Group("pruned", BEAM_COLOURS["pruned"], size=8, opacity=0.45),
        "live": _Group("live", BEAM_COLOURS["live"]),
        "finished": _Group("finished", BEAM_COLOURS["finished"]),
    }
    for node in nodes:
        if node.id in pos:
            groups[node.status].add(node.id, _label(trace, node.token_id), _beam_hover(trace, node, step_of[node.id]))
    fig = _tree_figure(graph, pos, path, "best sequence", PATH_COLOUR, [root, *groups.values()])

    shown = f"step {steps[-1].step}" if steps else "no beam steps yet"
    title = f"Beam search tree ({shown}, {len(nodes)} nodes)"
    if hidden:
        title += f": {hidden} lowest-scoring pruned nodes hidden (max_nodes={max_nodes})"
    return _style_tree(fig, title, "tokens generated (0 = prompt)")


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


def _beam_hover(trace: Trace, node: BeamNode, step: int) -> str:
    lines = [
        f"token {_quoted(trace, node.token_id)}",
        f"log p(token): {_num(node.token_logprob)}",
        f"score (sum log p): {_num(node.score)}",
    ]
    if node.normalized_score is not None:
        lines.append(f"normalized score: {_num(node.normalized_score)}")
    lines.append(f"{node.status} at step {step}")
    return "<br>".join(lines)


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
    pos = tidy_positions(graph, ROOT)

    context = _context_before(trace, round_index)
    root = _Group("context", ROOT_COLOUR)
    root.add(ROOT, _label(trace, context[-1]) if context else "context", "context: " + _tail(trace.text_of(context)))
    groups = {
        "accepted": _Group("accepted", DRAFT_COLOURS["accepted"]),
        "rejected": _Group("rejected", DRAFT_COLOURS["rejected"]),
        "not verified": _Group("not verified", DRAFT_COLOURS["not verified"], opacity=0.6),
    }
    for node in rnd.nodes:
        if node.id in pos:
            outcome = draft_outcome(node, path)
            groups[outcome].add(node.id, _label(trace, node.token_id), _draft_hover(trace, node, outcome))
    extra = [_bonus_group(trace, rnd)] if rnd.bonus_token is not None else []
    line = [node for node in [ROOT, *rnd.accepted_path] + ([BONUS] if extra else []) if node in pos]
    fig = _tree_figure(graph, pos, line, "accepted path", DRAFT_COLOURS["accepted"], [root, *groups.values(), *extra])

    fig.add_annotation(text=_round_stats(trace, rnd), xref="paper", yref="paper", x=0, y=1.02,
                       xanchor="left", yanchor="bottom", showarrow=False, align="left", font={"size": 11})
    rounds = draft_rounds(trace)
    title = f"Draft tree, round {rounds.index(round_index) + 1} of {len(rounds)} (step {rnd.step})"
    return _style_tree(fig, title, "depth (0 = last committed token)")


def _bonus_group(trace: Trace, rnd: DraftRound) -> _Group:
    kind = "correction" if rnd.bonus_is_correction else "bonus"
    if rnd.bonus_is_correction:
        hover = [f"correction {_quoted(trace, rnd.bonus_token)}", "sampled at the rejection from max(0, p − q):"]
        hover += [f"{_quoted(trace, c.token_id)} {_prob(c.prob)}" for c in rnd.residual_top]
    else:
        hover = [f"bonus token {_quoted(trace, rnd.bonus_token)}", "sampled from the target after the accepted path"]
    group = _Group(kind, DRAFT_COLOURS[kind], size=16, symbol="star")
    group.add(BONUS, f"{_label(trace, rnd.bonus_token)} ({kind})", "<br>".join(hover))
    return group


def _draft_hover(trace: Trace, node: DraftNode, outcome: str) -> str:
    ratio = node.ratio
    if ratio is None and node.target_prob is not None and node.draft_prob > 0:
        ratio = node.target_prob / node.draft_prob
    return "<br>".join([
        f"token {_quoted(trace, node.token_id)}",
        f"depth {node.depth} · drafted by {escape_token(node.source)}",
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
    return style_figure(fig, f"Mean accepted tokens per target call: {mean:.2f} (bonus included, {len(rounds)} rounds)")
