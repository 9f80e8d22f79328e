"""Diffusion LM figures: the position x step lattice of confidences, the unmasking order, the canvas.

A DiffusionStep's ``canvas`` is the generated part *after* the step's commits and remasks, so the canvas going
into step s is the one step s - 1 left (every position masked before the first step). ``block`` holds the
[start, end) positions of the block being denoised; every start and end seen becomes a boundary line.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.events import Candidate, DiffusionStep
from engine.trace import Trace
from ui.figures.common import (
    FIGURE_WIDTH, FONT_SIZE, empty_figure, fit_dtick, plot_size, style_figure, text_px, token_label,
)
from ui.figures.tokens import fmt_p

MASK_TEXT = "[MASK]"
TOP_PROPOSALS = 3
COMMITTED_FILL = "rgba(128,128,128,0.35)"
MARKER_COLOUR = "#ff7f0e"
REMASK_COLOUR = "crimson"


def diffusion_steps(trace: Trace) -> list[DiffusionStep]:
    return [e for e in trace.events if isinstance(e, DiffusionStep)]


def canvas_before(steps: list[DiffusionStep], index: int) -> list[int]:
    """The canvas going into ``steps[index]``: the previous step's canvas, all masks before the first."""
    step = steps[index]
    before = steps[index - 1].canvas if index > 0 else []
    return [before[p] if p < len(before) else step.mask_id for p in range(len(step.canvas))]


def commit_order(trace: Trace) -> dict[int, int]:
    """Position -> the step at which it was first committed (left the mask state): the unmasking order."""
    order: dict[int, int] = {}
    for step in diffusion_steps(trace):
        for position in step.committed_positions:
            if 0 <= position < len(step.canvas):
                order.setdefault(position, step.step)
    return order


def finite_confidence(step: DiffusionStep, position: int) -> float | None:
    """The finite confidence at a position, or None (not recorded, or -inf outside the active block)."""
    if position >= len(step.confidence) or not math.isfinite(step.confidence[position]):
        return None
    return step.confidence[position]


def _token_text(trace: Trace, step: DiffusionStep, position: int) -> str:
    token = step.canvas[position]
    return MASK_TEXT if token == step.mask_id else f"“{token_label(trace.vocab, token)}”"


def _proposals_text(trace: Trace, proposals: list[Candidate]) -> str:
    shown = proposals[:TOP_PROPOSALS]
    return " · ".join(f"“{token_label(trace.vocab, c.token_id)}” {fmt_p(c.prob)}" for c in shown)


def _cell_hover(trace: Trace, step: DiffusionStep, position: int, masked: bool) -> str:
    lines = [f"position {position} · step {step.step}", f"token: {_token_text(trace, step, position)}"]
    confidence = finite_confidence(step, position)
    if masked and confidence is not None:
        lines.append(f"confidence: {confidence:.3g}")
    if masked and position < len(step.proposals) and step.proposals[position]:
        lines.append("top: " + _proposals_text(trace, step.proposals[position]))
    return "<br>".join(lines)


def _row(trace: Trace, steps: list[DiffusionStep], index: int, width: int) -> list[tuple[float | None, int | None, str]]:
    """One step's cells as (confidence where the position was masked going into the step, 1 if committed
    earlier else 0, hover text); (None, None, "") past the canvas."""
    step, before = steps[index], canvas_before(steps, index)
    cells: list[tuple[float | None, int | None, str]] = []
    for position in range(width):
        if position >= len(step.canvas):
            cells.append((None, None, ""))
            continue
        masked = before[position] == step.mask_id
        confidence = finite_confidence(step, position) if masked else None
        cells.append((confidence, 0 if masked else 1, _cell_hover(trace, step, position, masked)))
    return cells


def lattice_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """Heatmap of confidence per (step, position) for positions still masked going into the step; cells
    committed earlier are filled grey, each position's commit step is marked, block boundaries are vertical
    lines and ``selected_step`` a horizontal one. Steps run downwards.

    The grey layer spans every cell and carries the hover text once; the confidence layer above it skips
    hover (a masked cell with no finite confidence, outside the active block, still gets its hover).
    """
    steps = diffusion_steps(trace)
    if not steps:
        return empty_figure("No diffusion steps yet")
    width = max(len(s.canvas) for s in steps)
    positions, y = list(range(width)), [s.step for s in steps]
    rows = [_row(trace, steps, i, width) for i in range(len(steps))]
    confidence, committed, hover = ([[cell[i] for cell in row] for row in rows] for i in range(3))
    values = [v for row in confidence for v in row if v is not None]
    probabilities = bool(values) and 0.0 <= min(values) and max(values) <= 1.0
    fig = go.Figure()
    fig.add_trace(go.Heatmap(
        x=positions, y=y, z=committed, name="committed", hovertext=hover, hoverinfo="text", hoverongaps=False,
        showscale=False, zmin=0, zmax=1, colorscale=[[0, "rgba(0,0,0,0)"], [1, COMMITTED_FILL]],
    ))
    fig.add_trace(go.Heatmap(
        x=positions, y=y, z=confidence, name="confidence", hoverinfo="skip", colorscale="Viridis",
        colorbar={"title": "confidence"}, **({"zmin": 0.0, "zmax": 1.0} if probabilities else {}),
    ))
    fig.add_trace(_commit_markers(trace, steps))
    if any(s.remasked_positions for s in steps):
        fig.add_trace(_remask_markers(steps))
    for boundary in block_boundaries(steps, width):
        fig.add_vline(x=boundary - 0.5, line={"dash": "dot", "color": "gray"}, name="block boundary")
    if selected_step is not None:
        fig.add_hline(y=selected_step, line={"color": "crimson", "width": 2}, name="selected step")
    title = (f"Unmasking lattice: confidence of each masked position per step ({width} positions, {len(steps)} steps)"
             "<br>colour: confidence while masked · grey: committed earlier · ◆ the step that committed it"
             + (" · ✕ remasked" if any(s.remasked_positions for s in steps) else "") + " · dotted: block boundaries")
    style_figure(fig, title, role="primary")
    fig.update_xaxes(title="position", range=[-0.5, width - 0.5], tick0=0,
                     dtick=position_dtick(fig, width, width))
    fig.update_yaxes(title="step", autorange="reversed")
    return fig


def position_dtick(fig: go.Figure, shown: int, largest: int, width: int = FIGURE_WIDTH) -> int:
    """A tick interval for a position axis showing ``shown`` positions (numbered up to ``largest``), thinned so
    that no two tick labels come closer than their own width plus a gap at ``width`` pixels."""
    span, _ = plot_size(fig, width, colorbar=True)
    return fit_dtick(shown, span, text_px(str(largest), FONT_SIZE) + 16)


def _commit_markers(trace: Trace, steps: list[DiffusionStep]) -> go.Scatter:
    by_step = {s.step: s for s in steps}
    order = sorted(commit_order(trace).items())
    hovers = []
    for position, step in order:
        confidence = finite_confidence(by_step[step], position)
        hovers.append(
            f"position {position} committed at step {step}<br>token: {_token_text(trace, by_step[step], position)}"
            + ("" if confidence is None else f"<br>confidence: {confidence:.3g}")
        )
    return go.Scatter(
        x=[p for p, _ in order], y=[s for _, s in order], mode="markers", name="committed at",
        hovertext=hovers, hoverinfo="text",
        marker={"symbol": "diamond", "size": 9, "color": MARKER_COLOUR, "line": {"width": 1, "color": "white"}},
    )


def _remask_markers(steps: list[DiffusionStep]) -> go.Scatter:
    """Committed tokens a revising decoder (Mask-Predict) sent back to MASK, at the step that did it."""
    cells = [(p, s.step) for s in steps for p in s.remasked_positions]
    return go.Scatter(
        x=[p for p, _ in cells], y=[s for _, s in cells], mode="markers", name="remasked",
        hovertext=[f"position {p} remasked at step {s}" for p, s in cells], hoverinfo="text",
        marker={"symbol": "x", "size": 8, "color": REMASK_COLOUR, "line": {"width": 1, "color": "white"}},
    )


def block_boundaries(steps: list[DiffusionStep], width: int) -> list[int]:
    """Interior block edges (the canvas edges need no line)."""
    return sorted({edge for s in steps for edge in s.block if 0 < edge < width})


def canvas_html(trace: Trace, step: int) -> str:
    """The canvas after diffusion step ``step`` as token boxes: masks as grey "▒", tokens committed at this
    step highlighted, earlier ones plain. Semi-transparent fills read on light and dark themes."""
    found = next((s for s in diffusion_steps(trace) if s.step == step), None)
    if found is None:
        raise ValueError(f"the trace has no diffusion step {step}")
    boxes = [_canvas_box(trace, found, p) for p in range(len(found.canvas))]
    return f'<div class="de-canvas" style="{_CANVAS_STYLE}">{"".join(boxes)}</div>'


_CANVAS_STYLE = "display:flex;flex-wrap:wrap;gap:3px;font-family:monospace"
_BOX = "padding:1px 4px;border-radius:4px;white-space:pre;"
_BOX_STYLES = {
    "masked": _BOX + "background:rgba(128,128,128,0.3);opacity:0.7",
    "new": _BOX + "background:rgba(255,140,0,0.35);outline:1px solid rgba(255,140,0,0.9);font-weight:bold",
    "old": _BOX + "background:rgba(128,128,128,0.1)",
}


def _canvas_box(trace: Trace, step: DiffusionStep, position: int) -> str:
    if step.canvas[position] == step.mask_id:
        kind, text = "masked", "▒"
    else:
        kind = "new" if position in step.committed_positions else "old"
        text = token_label(trace.vocab, step.canvas[position])
    title = f"position {position}: {_token_text(trace, step, position)}"
    return f'<span class="de-{kind}" title="{title}" style="{_BOX_STYLES[kind]}">{text}</span>'
