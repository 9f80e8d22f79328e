"""KV-cache compression runs (decoder ``kv_compress``): which cache positions each step lost, and what it cost.

``eviction_map_figure`` draws decode step against cache position, coloured by the share of (layer, KV head) slots
hiding the position (eviction policies) or the share of its elements approximated (pruning / quantising policies).
``cache_kl_figure`` draws KL(p_full || p_compressed) per step with the steps where the two top-1 tokens differ.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from engine.events import CacheStep
from engine.trace import Trace
from ui.figures.common import PROCESSED_COLOR, RAW_COLOR, TEXT_COLOR, WINDOW, empty_figure, escape_token, style_figure
from ui.figures.common import tick_labels, token_label, window_note

TICK_CHARS = 12  # a cache position's token in a tick label is cut to this many characters; the hover has it whole

MAX_HOVER_CELLS = 40_000  # per-cell hover text above this would dominate the figure's size
NO_CACHE = "This run has no KV-cache steps: record it with the <b>kv_compress</b> decoder."


def cache_steps(trace: Trace) -> list[CacheStep]:
    return [e for e in trace.events if isinstance(e, CacheStep)]


def evicted_shares(event: CacheStep) -> np.ndarray:
    """The step's per-position evicted share as float32."""
    return np.frombuffer(event.evicted, dtype=np.float16).astype(np.float32)


def eviction_map_figure(trace: Trace, step: int | None = None) -> go.Figure:
    """Heatmap: x = decode step (the last WINDOW), y = cache position, colour = evicted share; ``step`` is outlined."""
    steps = cache_steps(trace)
    if not steps:
        return empty_figure(NO_CACHE)
    first = max(0, len(steps) - WINDOW)
    shown = steps[first:]
    rows = [evicted_shares(e) for e in shown]
    positions = max(len(r) for r in rows)
    z = np.full((positions, len(rows)), np.nan, dtype=np.float32)  # a position not cached yet has no cell
    for column, row in enumerate(rows):
        z[: len(row), column] = row
    sequence = trace.prompt_token_ids + trace.output_token_ids
    labels = [f"{p}: {token_label(trace.vocab, sequence[p])}" if p < len(sequence) else str(p) for p in range(positions)]
    ticks = [f"{p}: {token_label(trace.vocab, sequence[p], TICK_CHARS)}" if p < len(sequence) else str(p)
             for p in range(positions)]
    x = [e.step for e in shown]
    policy = escape_token(shown[-1].policy)
    heatmap = go.Heatmap(
        z=z, x=x, y=list(range(positions)), zmin=0, zmax=1, colorscale="Reds",
        colorbar={"title": {"text": "evicted"}},
    )
    if positions * len(rows) <= MAX_HOVER_CELLS:
        heatmap.text = [[label] * len(rows) for label in labels]
        heatmap.hovertemplate = "step %{x}<br>position %{text}<br>evicted %{z:.3f}<extra></extra>"
    else:
        heatmap.hovertemplate = "step %{x}, position %{y}<br>evicted %{z:.3f}<extra></extra>"
    fig = go.Figure(heatmap)
    if step is not None and x[0] <= step <= x[-1]:
        fig.add_vrect(x0=step - 0.5, x1=step + 0.5, line={"color": TEXT_COLOR, "width": 2}, fillcolor="rgba(0,0,0,0)")
    note = window_note(first, len(steps), len(steps), noun="steps")
    title = (f"Evicted cache positions per decode step · {policy}<br>colour: share of (layer, head) slots that lost"
             " the position" + (f" · {note}" if note else ""))
    style_figure(fig, title, height=140 + 14 * positions, role="primary")
    span = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    fig.update_xaxes(title_text="decode step")
    fig.update_yaxes(title_text="cache position", autorange="reversed", **tick_labels(ticks, span_px=span))
    return fig


def cache_kl_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """KL(p_full || p_compressed) per step (nats), kept fraction on a second axis, top-1 disagreements marked."""
    steps = cache_steps(trace)
    if not steps:
        return empty_figure(NO_CACHE)
    x = [e.step for e in steps]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=x, y=[e.kl for e in steps], mode="lines+markers", name="KL(full ‖ compressed)",
                             line={"color": PROCESSED_COLOR}, hovertemplate="step %{x}<br>KL %{y:.4g} nats<extra></extra>"))
    differ = [e for e in steps if not e.top1_agree]
    fig.add_trace(go.Scatter(x=[e.step for e in differ], y=[e.kl for e in differ], mode="markers",
                             name="top-1 differs", marker={"symbol": "x", "size": 10, "color": "rgb(170, 80, 220)"},
                             hovertemplate="step %{x}: top-1 tokens differ<extra></extra>"))
    fig.add_trace(go.Scatter(x=x, y=[e.kept_fraction for e in steps], mode="lines", name="kept fraction",
                             yaxis="y2", line={"color": RAW_COLOR, "dash": "dot"},
                             hovertemplate="step %{x}<br>kept %{y:.3f}<extra></extra>"))
    if selected_step is not None:
        fig.add_vline(x=selected_step, line={"color": TEXT_COLOR, "dash": "dash"})
    agreement = sum(e.top1_agree for e in steps) / len(steps)
    fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "range": [0, 1.05], "title": {"text": "kept"},
                              "showgrid": False})
    fig.update_xaxes(title_text="decode step")
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", selector={"overlaying": None})  # not the right axis
    title = (f"Compressed vs full cache: KL per step · {escape_token(steps[-1].policy)} · "
             f"top-1 agreement {agreement:.0%}")
    return style_figure(fig, title, height=340)
