"""One diffusion step up close, for the slider that walks a diffusion run: the step's token lattice (top proposals
per position), its table, the tokens committed at every step, and the run's summary line.

"Index" here is the slider's position: the index into :func:`diffusion_steps`. Going into a step, a position is
either masked (it has proposals, and the step may commit one of them) or committed earlier (its token is shown
grey). A revising decoder (Mask-Predict) may send committed tokens back to MASK: ``remasked_positions``, possibly
including a position it committed at the same step, whose prediction the canvas then no longer holds.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative

from engine.events import Candidate, DiffusionStep
from engine.trace import Trace
from ui.figures.common import (
    FIGURE_WIDTH, cell_text_trace, chars_that_fit, empty_figure, escape_token, plot_size, scale_colour, style_figure,
    token_label,
)
from ui.figures.lattice import (
    MASK_TEXT, REMASK_COLOUR, block_boundaries, canvas_before, canvas_html, diffusion_steps, finite_confidence,
    position_dtick,
)
from ui.figures.tokens import fmt_p

TOP_RANKS = 5  # proposal ranks the step lattice shows per position
TABLE_PROPOSALS = 3
CELL_CHARS = 6  # cell labels are cut to at most this many characters (fewer in narrow cells); the hover has the whole token
CELL_FONT = 12  # px
MIN_CELL_CHARS = 2  # a cell too narrow for this many characters, or too short for a line, shows no text
VISIBLE_POSITIONS = 24  # a wider canvas opens zoomed on the active block (pan to see the rest)
PROB_SCALE = "Viridis"  # sequential, perceptually uniform, readable in colour-blind vision and on dark pages
EARLIER_FILL = (110, 110, 110)  # opaque: the same grey under light and dark pages, white text on it
OUTLINE_COLOUR = "crimson"
BLOCK_FILL = "rgba(255,140,0,0.12)"
BLOCK_COLOURS = qualitative.Plotly
DIFFUSION_TABLE_HEADERS = ["position", "this step", "token", "confidence", "top 1", "top 2", "top 3"]
DIFFUSION_TABLE_TYPES = ["number", "str", "html", "str", "html", "html", "html"]  # token text arrives escaped
_NOTE = "opacity:0.7;font-size:0.85em;margin-bottom:4px"


def cache_label(step: DiffusionStep) -> str:
    """What the step's forward reused, escaped (an imported trace may hold any text)."""
    return escape_token(step.cache) + " cache" if step.cache else "full forward"


def committed_token(step: DiffusionStep, position: int) -> int | None:
    """The token ``step`` committed at ``position``: None where it remasked the position at once."""
    token = step.canvas[position] if position < len(step.canvas) else step.mask_id
    return None if token == step.mask_id else token


def _quoted(trace: Trace, token_id: int) -> str:
    return f"“{token_label(trace.vocab, token_id)}”"


def _cell_label(trace: Trace, token_id: int, chars: int = CELL_CHARS) -> str:
    """A cell's text: the token cut to ``chars`` characters (before escaping), see :func:`token_label`."""
    return token_label(trace.vocab, token_id, chars)


def _proposals(step: DiffusionStep, position: int) -> list[Candidate]:
    return step.proposals[position] if position < len(step.proposals) else []


def _rank(proposals: list[Candidate], token_id: int) -> int | None:
    """1-based rank of a token among the recorded proposals, or None when it is not among them."""
    return next((i + 1 for i, c in enumerate(proposals) if c.token_id == token_id), None)


# ---------------------------------------------------------------- the step's token lattice


def step_lattice_figure(trace: Trace, index: int) -> go.Figure:
    """Position x proposal rank at diffusion step ``index``: each masked position's top :data:`TOP_RANKS` proposals
    (text = token, colour = probability), the token committed at this step outlined (in an "other" row when it
    ranks lower), tokens committed earlier grey in the rank-1 row, remasked positions crossed, the active block
    shaded and block boundaries dotted."""
    steps = diffusion_steps(trace)
    if not 0 <= index < len(steps):
        return empty_figure("No diffusion steps yet")
    step, before = steps[index], canvas_before(steps, index)
    width, other = len(step.canvas), TOP_RANKS + 1
    masked = [p for p in range(width) if before[p] == step.mask_id]
    outlines = _outlines(step, masked)
    rows = other if any(rank > TOP_RANKS for _, rank in outlines) else TOP_RANKS
    z = [[None] * width for _ in range(rows)]
    text = [[""] * width for _ in range(rows)]
    hover = [[""] * width for _ in range(rows)]
    for p in masked:
        for rank, c in enumerate(_proposals(step, p)[:TOP_RANKS], start=1):
            z[rank - 1][p], text[rank - 1][p] = c.prob, _cell_label(trace, c.token_id)
            hover[rank - 1][p] = f"position {p} · rank {rank}<br>{_quoted(trace, c.token_id)} p {fmt_p(c.prob)}"
    for p, rank in outlines:
        token = committed_token(step, p)
        if rank == other:
            recorded = _rank(_proposals(step, p), token)
            z[rank - 1][p], text[rank - 1][p] = _prob_of(_proposals(step, p), token), _cell_label(trace, token)
            where = f"rank {recorded}" if recorded else "outside the recorded proposals"
            hover[rank - 1][p] = f"position {p} · {where}<br>{_quoted(trace, token)}"
        hover[rank - 1][p] += "<br>committed at this step"
    fig = go.Figure()
    fig.add_trace(_earlier_layer(trace, step, before, masked, rows))
    fig.add_trace(go.Heatmap(
        x=list(range(width)), y=list(range(1, rows + 1)), z=z, text=text, hovertext=hover, hoverinfo="text",
        hoverongaps=False, name="proposals", colorscale=PROB_SCALE, zmin=0.0, zmax=1.0, xgap=1, ygap=1,
        colorbar={"title": {"text": "p(token)", "side": "right"}, "tickvals": [0, 0.25, 0.5, 0.75, 1],
                  "ticktext": ["0", "0.25", "0.5", "0.75", "1"], "thickness": 14},
    ))
    if step.remasked_positions:
        fig.add_trace(_remask_marks(trace, before, step))
    for p, rank in outlines:
        fig.add_shape(type="rect", x0=p - 0.5, x1=p + 0.5, y0=rank - 0.5, y1=rank + 0.5, name="committed this step",
                      line={"color": OUTLINE_COLOUR, "width": 3})
    _draw_blocks(fig, steps, step, width)
    style_figure(fig, _lattice_title(step, len(steps)), height=120 + 44 * rows)
    x_range = _x_range(step, width)
    shown = round(x_range[1] - x_range[0])
    fig.update_xaxes(title="position", range=x_range, tick0=0, dtick=position_dtick(fig, shown, width - 1),
                     showgrid=False)
    fig.update_yaxes(title="rank", autorange="reversed", tickvals=list(range(1, rows + 1)), showgrid=False,
                     ticktext=[str(r) for r in range(1, TOP_RANKS + 1)] + (["other"] if rows == other else []))
    _add_cell_text(fig, trace, step, before, masked, z, shown, rows)
    return fig


def cell_chars(fig: go.Figure, shown: int, rows: int, width: int = FIGURE_WIDTH) -> int:
    """How many characters a cell's label may have: what fits across a cell of a ``shown``-column, ``rows``-row
    heatmap drawn ``width`` pixels wide (at most :data:`CELL_CHARS`), or 0 when a cell is too small for text."""
    w, h = plot_size(fig, width, colorbar=True)
    chars = min(CELL_CHARS, chars_that_fit(w / max(shown, 1) - 6, CELL_FONT))
    return chars if chars >= MIN_CELL_CHARS and h / max(rows, 1) >= CELL_FONT * 1.4 else 0


def _add_cell_text(fig: go.Figure, trace: Trace, step: DiffusionStep, before: list[int], masked: list[int],
                   z: list[list[float | None]], shown: int, rows: int) -> None:
    """Every cell's token as text in black or white, whichever contrasts more with the cell's colour; none when
    the cells are too small to hold a readable label (the hover has every token whole)."""
    chars = cell_chars(fig, shown, rows)
    if not chars:
        return
    open_positions = set(masked)
    cells: list[tuple[int, int, int, tuple[int, int, int]]] = []  # (position, row, token, cell fill)
    for p in range(len(step.canvas)):
        if p not in open_positions:  # committed earlier: its token on the grey cell of the rank-1 row
            cells.append((p, 1, before[p], EARLIER_FILL))
            continue
        ranked = {rank: c.token_id for rank, c in enumerate(_proposals(step, p)[:TOP_RANKS], start=1)}
        token = committed_token(step, p)
        if rows > TOP_RANKS and z[rows - 1][p] is not None and token is not None:
            ranked[rows] = token
        cells += [(p, rank, token_id, scale_colour(PROB_SCALE, z[rank - 1][p]))
                  for rank, token_id in ranked.items() if z[rank - 1][p] is not None]
    fig.add_trace(cell_text_trace([c[0] for c in cells], [c[1] for c in cells],
                                  [_cell_label(trace, c[2], chars) for c in cells], [c[3] for c in cells], CELL_FONT))


def _outlines(step: DiffusionStep, masked: list[int]) -> list[tuple[int, int]]:
    """(position, row) of each token committed at this step: its proposal rank, or the "other" row."""
    masked_set, cells = set(masked), []
    for p in step.committed_positions:
        token = committed_token(step, p)
        if p in masked_set and token is not None:
            rank = _rank(_proposals(step, p)[:TOP_RANKS], token)
            cells.append((p, rank or TOP_RANKS + 1))
    return cells


def _prob_of(proposals: list[Candidate], token_id: int) -> float | None:
    return next((c.prob for c in proposals if c.token_id == token_id), None)


def _earlier_layer(trace: Trace, step: DiffusionStep, before: list[int], masked: list[int], rows: int) -> go.Heatmap:
    """Positions committed before this step: their token, opaque grey, in the rank-1 row."""
    width, open_positions = len(step.canvas), set(masked)
    earlier = [p not in open_positions for p in range(width)]
    z = [[1 if earlier[p] else None for p in range(width)]] + [[None] * width for _ in range(rows - 1)]
    text = [[_cell_label(trace, before[p]) if earlier[p] else "" for p in range(width)]]
    hover = [[f"position {p}: {_quoted(trace, before[p])}, committed earlier" if earlier[p] else "" for p in range(width)]]
    fill = f"rgb{EARLIER_FILL}"
    return go.Heatmap(
        x=list(range(width)), y=list(range(1, rows + 1)), z=z, text=text + [[""] * width] * (rows - 1),
        hovertext=hover + [[""] * width] * (rows - 1), hoverinfo="text", hoverongaps=False, name="committed earlier",
        showscale=False, zmin=0, zmax=1, colorscale=[[0, fill], [1, fill]], xgap=1, ygap=1,
    )


def _remask_marks(trace: Trace, before: list[int], step: DiffusionStep) -> go.Scatter:
    positions = [p for p in step.remasked_positions if p < len(step.canvas)]
    hovers = []
    for p in positions:
        sent = before[p] if before[p] != step.mask_id else None
        what = _quoted(trace, sent) if sent is not None else "its prediction at this step"
        hovers.append(f"position {p}: {what} sent back to {MASK_TEXT}")
    return go.Scatter(
        x=positions, y=[1] * len(positions), mode="markers", name="remasked", hovertext=hovers, hoverinfo="text",
        marker={"symbol": "x", "size": 14, "color": REMASK_COLOUR, "opacity": 0.8, "line": {"width": 1, "color": "white"}},
    )


def _draw_blocks(fig: go.Figure, steps: list[DiffusionStep], step: DiffusionStep, width: int) -> None:
    if len(step.block) == 2:
        fig.add_vrect(x0=step.block[0] - 0.5, x1=step.block[1] - 0.5, fillcolor=BLOCK_FILL, line_width=0,
                      layer="below", name="active block")
    for boundary in block_boundaries(steps, width):
        fig.add_vline(x=boundary - 0.5, line={"dash": "dot", "color": "gray"}, name="block boundary")


def _x_range(step: DiffusionStep, width: int) -> list[float]:
    """The whole canvas when it is narrow; else :data:`VISIBLE_POSITIONS` around the active block (or all of it)."""
    if width <= VISIBLE_POSITIONS or len(step.block) != 2:
        return [-0.5, width - 0.5]
    start, end = step.block
    span = max(VISIBLE_POSITIONS, end - start)
    left = min(max(0, (start + end - span) // 2), max(0, width - span))
    return [left - 0.5, min(width, left + span) - 0.5]


def step_summary(step: DiffusionStep, count: int) -> str:
    """``step s of n · block [a, b) · committed k · remasked r · c model calls · cache``, escaped."""
    block = f" · block [{step.block[0]}, {step.block[1]})" if len(step.block) == 2 else ""
    remasked = f" · remasked {len(step.remasked_positions)}" if step.remasked_positions else ""
    calls = f"{step.model_calls} model call" + ("" if step.model_calls == 1 else "s")
    return (f"step {step.step} ({count} in all){block} · committed {len(step.committed_positions)}{remasked} · "
            f"{calls} · {cache_label(step)}")


def _lattice_title(step: DiffusionStep, count: int) -> str:
    return (f"This step's top-{TOP_RANKS} proposals per masked position (colour: probability; outlined: committed"
            f" now; grey: committed earlier)<br>{step_summary(step, count)}")


# ---------------------------------------------------------------- the step's table


def diffusion_step_table(trace: Trace, index: int) -> list[list]:
    """One row (see :data:`DIFFUSION_TABLE_HEADERS`) per position in play at diffusion step ``index``: masked
    positions of the active block, and any position committed or remasked at this step. Token text escaped."""
    steps = diffusion_steps(trace)
    if not 0 <= index < len(steps):
        return []
    step, before = steps[index], canvas_before(steps, index)
    start, end = step.block if len(step.block) == 2 else (0, len(step.canvas))
    committed, remasked = set(step.committed_positions), set(step.remasked_positions)
    in_play = {p for p in range(start, min(end, len(step.canvas))) if before[p] == step.mask_id}
    in_play |= {p for p in committed | remasked if p < len(step.canvas)}
    return [_table_row(trace, step, before, p, p in committed, p in remasked) for p in sorted(in_play)]


def _table_row(trace: Trace, step: DiffusionStep, before: list[int], position: int, committed: bool,
               remasked: bool) -> list:
    if remasked:
        outcome = "remasked"
        sent = before[position]
        token = MASK_TEXT if sent == step.mask_id else f"{_quoted(trace, sent)} → {MASK_TEXT}"
    elif committed:
        outcome, token = "yes", _quoted(trace, step.canvas[position])
    else:
        outcome, token = "no", MASK_TEXT
    confidence = finite_confidence(step, position)
    top = [f"{_quoted(trace, c.token_id)} {fmt_p(c.prob)}" for c in _proposals(step, position)[:TABLE_PROPOSALS]]
    return [position, outcome, token, "—" if confidence is None else f"{confidence:.4g}",
            *(top + ["—"] * (TABLE_PROPOSALS - len(top)))]


# ---------------------------------------------------------------- the run at a glance


def committed_per_step_figure(trace: Trace, selected: int | None = None) -> go.Figure:
    """Bars of tokens committed per step (the parallelism), one colour per block, remasked tokens as bars below
    zero; a marker over the ``selected`` step. Each bar's ``customdata`` is its slider index, so a click selects it."""
    steps = diffusion_steps(trace)
    if not steps:
        return empty_figure("No diffusion steps yet")
    fig = go.Figure()
    by_block: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(steps):
        by_block.setdefault(tuple(s.block), []).append(i)
    for colour_index, (block, indices) in enumerate(by_block.items()):
        name = f"block [{block[0]}, {block[1]})" if len(block) == 2 else "block"
        fig.add_trace(_bars(steps, indices, name, BLOCK_COLOURS[colour_index % len(BLOCK_COLOURS)], 1))
    if any(s.remasked_positions for s in steps):
        fig.add_trace(_bars(steps, list(range(len(steps))), "remasked", REMASK_COLOUR, -1))
    if selected is not None and 0 <= selected < len(steps):
        chosen = steps[selected]
        fig.add_trace(go.Scatter(
            x=[chosen.step], y=[len(chosen.committed_positions)], customdata=[selected], mode="markers",
            name="selected step", hoverinfo="skip",
            marker={"symbol": "triangle-down", "size": 14, "color": OUTLINE_COLOUR}, cliponaxis=False,
        ))
    commits = sum(len(s.committed_positions) for s in steps)
    remasks = sum(len(s.remasked_positions) for s in steps)
    calls = sum(s.model_calls for s in steps)
    fig.update_layout(barmode="relative", bargap=0.15)
    fig.update_xaxes(title="step")
    fig.update_yaxes(title="tokens committed", rangemode="tozero")
    counts = f"{commits} commits" + (f", {remasks} remasks" if remasks else "")
    return style_figure(fig, f"Tokens committed per step (the parallelism): {counts} in {len(steps)} steps, "
                             f"{calls} model calls", height=340)


def _bars(steps: list[DiffusionStep], indices: list[int], name: str, colour: str, sign: int) -> go.Bar:
    """Committed (sign 1) or remasked (sign -1) counts of the steps at ``indices``."""
    counts = [len(steps[i].committed_positions if sign > 0 else steps[i].remasked_positions) for i in indices]
    hovers = [f"step {steps[i].step} · {n} {'committed' if sign > 0 else 'remasked'} · {cache_label(steps[i])}"
              for i, n in zip(indices, counts)]
    return go.Bar(x=[steps[i].step for i in indices], y=[sign * n for n in counts], customdata=indices, name=name,
                  marker_color=colour, hovertext=hovers, hoverinfo="text")


def diffusion_summary(trace: Trace) -> str:
    """The run in one line: model calls, tokens per call, Kendall tau of the unmasking order, cache reuse."""
    steps, metrics = diffusion_steps(trace), trace.metrics
    parts = [f"{metrics.get('model_calls', sum(s.model_calls for s in steps)):g} model calls"]
    if "tokens_per_call" in metrics:
        parts.append(f"{metrics['tokens_per_call']:.3g} tokens per call")
    if "order_kendall_tau" in metrics:
        parts.append(f"order Kendall tau {metrics['order_kendall_tau']:.3f} (1 = left to right)")
    parts.append(f"cache reused at {sum(bool(s.cache) for s in steps)} of {len(steps)} steps")
    return " · ".join(parts)


def diffusion_canvas_html(trace: Trace, index: int) -> str:
    """The canvas after diffusion step ``index`` under the run's summary and the step's own line."""
    steps = diffusion_steps(trace)
    step = steps[index]
    header = f"{diffusion_summary(trace)}<br>{step_summary(step, len(steps))}"
    return f'<div class="de-diffusion"><div style="{_NOTE}">{header}</div>{canvas_html(trace, step.step)}</div>'
