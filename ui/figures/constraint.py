"""Constrained decoding (AWRS, token masking, SMC): the tokens tried at each step, the constraint checks spent, and
the particles' log-weights with their effective sample size and resampling events.

A particle is a slot: after resampling, slot i continues the sequence of its ancestor, so a slot's rows are one
lineage only between resamplings.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.event_arrays import effective_sample_size
from engine.events import ConstraintStep, Resampling
from engine.trace import Trace
from ui.figures.common import (
    CHOSEN_COLOR, FIGURE_WIDTH, FONT_SIZE, TEXT_COLOR, cell_text_trace, chars_that_fit, empty_figure, escape_token,
    plot_size, style_figure, token_label, window_bounds, window_note,
)

MAX_TRIES_SHOWN = 16  # tried tokens drawn per step; the rest of a long rejection run is summarised as one cell
MAX_PARTICLE_LINES = 16  # weight lines drawn; more particles are summarised by the ESS alone
CELL_CHARS = 10  # a tried token's cell label is cut to at most this many characters (fewer in narrow cells)
ROW_PX = 22  # px per step row: one line of cell text
REJECTED, ACCEPTED, WEIGHT_CHECK, OMITTED = 0, 1, 2, 3
_FILLS = {REJECTED: (200, 55, 55), ACCEPTED: (35, 140, 75), WEIGHT_CHECK: (120, 120, 120), OMITTED: None}  # opaque
_STATUS = {
    status: (name, f"rgb{_FILLS[status]}" if _FILLS[status] else "rgba(0, 0, 0, 0)")
    for status, name in ((REJECTED, "rejected"), (ACCEPTED, "accepted"), (WEIGHT_CHECK, "checked for the weight"),
                         (OMITTED, "more rejected"))
}
NO_CONSTRAINT = "No constraint steps in this run: record one with the <b>awrs</b> decoder."


def constraint_steps(trace: Trace, particle: int | None = None) -> list[ConstraintStep]:
    return [e for e in trace.events if isinstance(e, ConstraintStep) and (particle is None or e.particle == particle)]


def resamplings(trace: Trace) -> list[Resampling]:
    return [e for e in trace.events if isinstance(e, Resampling)]


def particle_count(trace: Trace) -> int:
    return max((e.particle for e in constraint_steps(trace)), default=-1) + 1


def step_tries(event: ConstraintStep) -> list[tuple[int | None, int]]:
    """(token or None, status) per drawn cell: rejected tokens in the order tried, the accepted one, then the
    token AWRS checked for its weight. A run longer than MAX_TRIES_SHOWN keeps its first rejections and one
    ``(None, OMITTED)`` cell standing for the rest (``checks`` counts them; the trace keeps the first 64)."""
    split = event.proposals.index(event.accepted) if event.accepted in event.proposals else len(event.proposals)
    rejected, after = event.proposals[:split], event.proposals[split:]
    cells = [(t, REJECTED) for t in rejected]
    omitted = event.checks - len(event.proposals) if event.method == "awrs" else 0
    tail = [(after[0], ACCEPTED)] if after else []
    tail += [(t, WEIGHT_CHECK) for t in after[1:]]
    room = MAX_TRIES_SHOWN - len(tail)
    if len(cells) > room or omitted > 0:
        keep = min(len(cells), room - 1)
        cells = cells[:keep] + [(None, OMITTED)]
    return cells + tail


def tries_figure(trace: Trace, particle: int = 0, window: tuple[int, int] | None = None) -> go.Figure:
    """One row per step of ``particle``: the tokens tried, rejected (red), accepted (green), the extra weight check
    (grey). Under masking the row shows the likely tokens the mask removed, then the sampled token."""
    events = constraint_steps(trace, particle)
    if not events:
        return empty_figure(NO_CONSTRAINT if not constraint_steps(trace) else f"No steps for particle {particle}.")
    start, stop = window_bounds(len(events), window)
    rows = [step_tries(e) for e in events[start:stop]]
    width = max(len(r) for r in rows)
    z, text, hover = [], [], []
    for event, row in zip(events[start:stop], rows):
        pad = width - len(row)
        z.append([status for _, status in row] + [None] * pad)
        text.append([_cell_text(trace, event, token, status) for token, status in row] + [""] * pad)
        hover.append([_cell_hover(trace, event, token, status) for token, status in row] + [""] * pad)
    colors = [_STATUS[s][1] for s in sorted(_STATUS)]
    # discrete: status i owns the band [(i - 0.5) / 3, (i + 0.5) / 3] of the 0..3 scale
    scale = [[min(1.0, max(0.0, (i + half) / 3)), c] for i, c in enumerate(colors) for half in (-0.5, 0.5)]
    names = [f"step {e.step}" for e in events[start:stop]]
    fig = go.Figure(go.Heatmap(
        z=z, text=text, customdata=hover, zmin=0, zmax=3, colorscale=scale, showscale=False,
        xgap=2, ygap=2, hovertemplate="%{customdata}<extra></extra>", y=names,
    ))
    fig.update_xaxes(title_text="tried in order →", showticklabels=False, showgrid=False)
    fig.update_yaxes(autorange="reversed", type="category", showgrid=False)
    note = window_note(start, stop, len(events), "steps")
    method = events[0].method
    title = (f"Tokens tried per step by particle {particle} ({escape_token(method)})<br><span style='color:rgb(200,55,55)'>"
             f"rejected</span> · <span style='color:{CHOSEN_COLOR}'>accepted</span>"
             + (" · grey: checked for the weight" if method == "awrs" else "") + (f" · {note}" if note else ""))
    style_figure(fig, title, height=150 + ROW_PX * len(rows), role="primary")
    w, h = plot_size(fig, FIGURE_WIDTH)
    chars = min(CELL_CHARS, chars_that_fit(w / width - 6, FONT_SIZE))
    if chars >= 2 and h / len(rows) >= FONT_SIZE * 1.4:  # else the cells are too small to hold text: hover them
        cells = [(x, y, tok, status) for y, (event, row) in enumerate(zip(events[start:stop], rows))
                 for x, (tok, status) in enumerate(row)]
        fig.add_trace(cell_text_trace([c[0] for c in cells], [names[c[1]] for c in cells],
                                      [_cell_text(trace, events[start + c[1]], c[2], c[3], chars) for c in cells],
                                      [_FILLS[c[3]] for c in cells]))
    return fig


def _cell_text(trace: Trace, event: ConstraintStep, token: int | None, status: int, chars: int | None = None) -> str:
    return f"+{_omitted(event)}" if token is None else token_label(trace.vocab, token, chars)


def _omitted(event: ConstraintStep) -> int:
    """Rejected tokens the row does not draw: past MAX_TRIES_SHOWN, and (AWRS) past what the trace keeps."""
    split = event.proposals.index(event.accepted) if event.accepted in event.proposals else len(event.proposals)
    untraced = event.checks - len(event.proposals) if event.method == "awrs" else 0
    return split + untraced - sum(1 for _, status in step_tries(event) if status == REJECTED)


def _cell_hover(trace: Trace, event: ConstraintStep, token: int | None, status: int) -> str:
    if token is None:
        return f"{_cell_text(trace, event, token, status)} more rejected tokens"
    return (f"step {event.step}, particle {event.particle}<br>token {token_label(trace.vocab, token)} (id {token})"
            f"<br>{_STATUS[status][0]}<br>checks this step: {event.checks}")


def checks_figure(trace: Trace) -> go.Figure:
    """Constraint checks per step, stacked by particle: AWRS checks a handful, masking the whole vocabulary."""
    events = constraint_steps(trace)
    if not events:
        return empty_figure(NO_CONSTRAINT)
    n = particle_count(trace)
    fig = go.Figure()
    for particle in range(n):
        mine = [e for e in events if e.particle == particle]
        fig.add_bar(
            x=[e.step for e in mine], y=[e.checks for e in mine], name=f"particle {particle}", showlegend=1 < n <= 8,
            hovertemplate=f"step %{{x}}, particle {particle}: %{{y}} checks<extra></extra>",
        )
    total = sum(e.checks for e in events)
    fig.update_layout(barmode="stack", bargap=0.15)
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="constraint checks", type="log" if events[0].method == "mask" else "linear")
    title = f"Constraint checks per step ({escape_token(events[0].method)}): {total} in all, {total / len(events):.1f} per token"
    return style_figure(fig, title, height=340)


def weight_history(trace: Trace) -> tuple[list[int], list[list[float]], list[float]]:
    """Per step: every particle's log-weight after the step (before any resampling at it) and their ESS.

    Particles that stopped keep their weight; after a resampling every particle restarts from the mean weight, as
    the decoder does. Returns (steps, log_weights[particle][i], ess[i]).
    """
    n = particle_count(trace)
    state = [0.0] * n
    steps: list[int] = []
    weights: list[list[float]] = [[] for _ in range(n)]
    ess: list[float] = []

    def close(step: int) -> None:
        steps.append(step)
        for i in range(n):
            weights[i].append(state[i])
        ess.append(effective_sample_size(state))

    open_step = None
    for event in trace.events:
        if isinstance(event, ConstraintStep):
            if open_step is not None and event.step != open_step:
                close(open_step)
            open_step = event.step
            state[event.particle] = event.log_weight
        elif isinstance(event, Resampling):
            if open_step is not None:
                close(open_step)
                open_step = None
            finite = [w for w in event.log_weights if w > -math.inf]
            state = [_logsumexp(finite) - math.log(n) if finite else -math.inf] * n
    if open_step is not None:
        close(open_step)
    return steps, weights, ess


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def weights_figure(trace: Trace) -> go.Figure:
    """The particles' log-weights per step (lines), their ESS (dashed, right axis), resampling steps marked."""
    steps, weights, ess = weight_history(trace)
    if not steps:
        return empty_figure(NO_CONSTRAINT)
    fig = go.Figure()
    for i, row in enumerate(weights[:MAX_PARTICLE_LINES]):
        fig.add_scatter(
            x=steps, y=[w if w > -math.inf else None for w in row], mode="lines+markers", name=f"particle {i}",
            showlegend=len(weights) <= 8, hovertemplate=f"step %{{x}}, particle {i}: log w %{{y:.3f}}<extra></extra>",
        )
    fig.add_scatter(
        x=steps, y=ess, mode="lines", name="ESS", yaxis="y2", line={"dash": "dash", "color": TEXT_COLOR},
        hovertemplate="step %{x}: ESS %{y:.2f}<extra></extra>",
    )
    events = resamplings(trace)
    for event in events:
        fig.add_vline(x=event.step, line={"dash": "dot", "color": CHOSEN_COLOR, "width": 1})
    fig.add_scatter(
        x=[e.step for e in events], y=[e.ess for e in events], mode="markers", name="resampled", yaxis="y2",
        marker={"symbol": "x", "size": 10, "color": CHOSEN_COLOR},
        hovertemplate="resampled after step %{x} (ESS %{y:.2f})<extra></extra>",
    )
    fig.update_layout(yaxis2={"title": {"text": "ESS"}, "overlaying": "y", "side": "right", "rangemode": "tozero",
                              "showgrid": False})
    fig.update_xaxes(title_text="step")
    fig.update_yaxes(title_text="log-weight", selector={"overlaying": None})  # not the ESS axis on the right
    title = (f"Particle log-weights and effective sample size (dashed, right axis): {len(weights)} particle(s),"
             f" {len(events)} resampling(s)")
    return style_figure(fig, title, height=360)
