"""Speculative runs round by round: the output coloured by how each token was committed, and one round's nodes.

A draft-then-verify round commits its accepted drafts plus one token the target chose itself: the bonus (every
draft on the path accepted) or the correction (drawn at the rejection). The stream shows exactly that, one
outlined group per round, so a reader sees where drafts ran long and where they failed.
"""

from __future__ import annotations

import plotly.graph_objects as go

from engine.events import DraftRound
from engine.trace import Trace
from ui.figures.common import empty_figure, escape_token, style_figure, token_label, window_bounds, window_note
from ui.figures.tokens import fmt_p
from ui.figures.trees import DRAFT_COLOURS, draft_outcome, draft_rounds

ROUND_TABLE_HEADERS = ["node", "parent", "depth", "token", "drafted by", "draft q", "target p", "p/q", "draw r", "outcome"]
ROUND_TABLE_TYPES = ["number", "number", "number", "html", "str", "str", "str", "str", "str", "str"]
_ALPHA = "6b"  # hex alpha on the outcome colours: translucent, readable under light and dark text
_SPAN = "border-radius:3px;padding:1px 0;color:inherit"
_ROUND = "border-left:2px solid rgba(128,128,128,0.55);padding-left:2px;margin-left:1px"
_NOTE = "opacity:0.7;font-size:0.85em;font-family:inherit"
_CONTAINER = "white-space:pre-wrap;word-break:break-word;line-height:1.9;font-family:ui-monospace,monospace;color:inherit"


def round_events(trace: Trace) -> list[DraftRound]:
    return [trace.events[i] for i in draft_rounds(trace)]


def rounds_stream_html(trace: Trace, selected_round: int | None = None, window: tuple[int, int] | None = None) -> str:
    """The committed output, one group per round (``data-step`` = the round's index), each token coloured as an
    accepted draft, the bonus token or a correction. Tokens the runner cut off (EOS, the budget) are left out."""
    rounds = round_events(trace)
    start, stop = window_bounds(len(rounds), window)
    remaining = len(trace.output_token_ids) - sum(len(r.committed) for r in rounds[:start])
    groups = []
    for index in range(start, stop):
        rnd = rounds[index]
        tokens = rnd.committed[: max(remaining, 0)]
        remaining -= len(rnd.committed)
        if tokens:
            groups.append(_round_group(trace, index, rnd, tokens, index == selected_round))
    note = window_note(start, stop, len(rounds), "rounds")
    header = _legend() + (f' · <span style="{_NOTE}">{note}</span>' if note else "")
    empty = "" if rounds else f'<span style="{_NOTE}">No draft rounds yet.</span>'
    return (
        f'<div class="de-token-stream" style="color:inherit">'
        f'<div style="{_NOTE};margin-bottom:4px">{header}</div>'
        f'<div style="{_CONTAINER}">{"".join(groups)}{empty}</div></div>'
    )


def _round_group(trace: Trace, index: int, rnd: DraftRound, tokens: list[int], selected: bool) -> str:
    nodes = {n.id: n for n in rnd.nodes}
    style = _ROUND + (";outline:2px solid currentColor;outline-offset:1px" if selected else "")
    marker = ' data-selected="true"' if selected else ""
    spans = []
    for j, token in enumerate(tokens):
        if j < len(rnd.accepted_path):
            node = nodes[rnd.accepted_path[j]]
            kind = "accepted"
            detail = f"accepted draft, depth {node.depth}, by {node.source} · q {fmt_p(node.draft_prob)}"
            if node.target_prob is not None:
                detail += f" · p {fmt_p(node.target_prob)}"
        else:
            kind = "correction" if rnd.bonus_is_correction else "bonus"
            detail = "correction drawn at the rejection" if kind == "correction" else "bonus token after the accepted path"
        title = f"round {index + 1} · “{token_label(trace.vocab, token)}”&#10;{escape_token(detail)}"
        text = trace.vocab.get(token, "")
        spans.append(
            f'<span class="de-token" title="{title}" style="{_SPAN};background:{DRAFT_COLOURS[kind]}{_ALPHA}">'
            f"{token_label(trace.vocab, token)}</span>" + "<br>" * text.count("\n")
        )
    return f'<span class="de-round" data-step="{index}"{marker} style="{style}">{"".join(spans)}</span>'


def _legend() -> str:
    swatches = " ".join(
        f'<span style="border-radius:3px;padding:0 4px;background:{DRAFT_COLOURS[kind]}{_ALPHA}">{label}</span>'
        for kind, label in (("accepted", "accepted draft"), ("bonus", "bonus"), ("correction", "correction"))
    )
    return f"committed by round: {swatches} · a bar starts each round · click a round to inspect it"


def round_table(trace: Trace, round_number: int) -> list[list]:
    """One row per draft node of round ``round_number`` (see :data:`ROUND_TABLE_HEADERS`); token text escaped."""
    rounds = round_events(trace)
    if not 0 <= round_number < len(rounds):
        return []
    rnd = rounds[round_number]
    path = set(rnd.accepted_path)
    return [
        [
            n.id,
            n.parent,
            n.depth,
            token_label(trace.vocab, n.token_id),
            n.source,
            fmt_p(n.draft_prob),
            "—" if n.target_prob is None else fmt_p(n.target_prob),
            "—" if n.ratio is None else f"{n.ratio:.3g}",
            "—" if n.draw is None else f"{n.draw:.3f}",
            draft_outcome(n, path),
        ]
        for n in rnd.nodes
    ]


def round_probs_figure(trace: Trace, round_number: int) -> go.Figure:
    """Draft q against target p for each verified node of a round, and the residual a correction came from."""
    rounds = round_events(trace)
    if not 0 <= round_number < len(rounds):
        return empty_figure("No draft rounds yet")
    rnd = rounds[round_number]
    path = set(rnd.accepted_path)
    verified = [n for n in rnd.nodes if n.target_prob is not None]
    fig = go.Figure()
    labels = [f"{n.id}: “{token_label(trace.vocab, n.token_id, 12)}” (d{n.depth})" for n in verified]
    fig.add_trace(go.Bar(x=labels, y=[n.draft_prob for n in verified], name="draft q", marker_color="#8c8c8c"))
    fig.add_trace(go.Bar(
        x=labels, y=[n.target_prob for n in verified], name="target p",
        marker_color=[DRAFT_COLOURS[draft_outcome(n, path)] for n in verified],
    ))
    if rnd.residual_top:
        fig.add_trace(go.Bar(
            x=[f"residual “{token_label(trace.vocab, c.token_id, 12)}”" for c in rnd.residual_top[:8]],
            y=[c.prob for c in rnd.residual_top[:8]], name="residual max(0, p − q)", marker_color=DRAFT_COLOURS["correction"],
        ))
    if not verified and not rnd.residual_top:
        return empty_figure(f"Round {round_number + 1} drafted nothing: the target chose the next token alone")
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="probability", range=[0, 1.05])
    return style_figure(fig, f"Round {round_number + 1}: draft q and target p of the verified nodes (bar colour = outcome)",
                        height=380)
