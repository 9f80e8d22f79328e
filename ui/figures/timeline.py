"""Entropy and chosen-token probability over a run, one point per output position."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.trace import Trace
from ui.figures.common import (CHOSEN_COLOR, PROCESSED_COLOR, RAW_COLOR, empty_figure, scatter_class, style_figure,
                               token_label)
from ui.figures.tokens import no_steps_reason, token_steps


def entropy_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """Two rows over output position: entropy (raw, processed; nats) and chosen-token probability.

    Every point's ``customdata`` is its output position, so a click maps straight to a step; the selected
    step gets a vertical line. Long runs switch to WebGL traces.
    """
    steps = token_steps(trace)
    if not steps:
        return empty_figure(no_steps_reason(trace))
    positions = np.array([s.position for s in steps])
    labels = [f"#{s.position} “{token_label(trace.vocab, s.token_id)}”" for s in steps]
    series = (
        (1, "entropy raw", [s.entropy_raw for s in steps], RAW_COLOR, "solid", "%{y:.3f} nats"),
        (1, "entropy processed", [s.entropy for s in steps], PROCESSED_COLOR, "dot", "%{y:.3f} nats"),
        (2, "p(chosen) raw", np.exp([s.raw_logprob for s in steps]), RAW_COLOR, "solid", "%{y:.4f}"),
        (2, "p(chosen) processed", np.exp([s.logprob for s in steps]), PROCESSED_COLOR, "dot", "%{y:.4f}"),
    )
    scatter = scatter_class(len(steps))
    mode = "lines" if scatter is go.Scattergl else "lines+markers"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.07, row_heights=[0.55, 0.45])
    for row, name, values, color, dash, value_format in series:
        fig.add_trace(
            scatter(
                x=positions, y=values, customdata=positions, text=labels, name=name, mode=mode,
                line={"color": color, "width": 1.5, "dash": dash},
                marker={"size": 4}, hovertemplate=f"%{{text}}<br>{name}: {value_format}<extra></extra>",
            ),
            row=row, col=1,
        )
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="p(chosen)", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="output position", row=2, col=1)
    if selected_step is not None:
        fig.add_shape(
            type="line", x0=selected_step, x1=selected_step, xref="x", y0=0, y1=1, yref="paper",
            line={"color": "rgba(128, 128, 128, 0.9)", "width": 2}, name="selected",
        )
    title = (f"Entropy and chosen-token probability over {len(steps)} tokens"
             "<br>raw (model) solid, processed (sampled from) dotted · click a point to select its step")
    return style_figure(fig, title, height=420)


SPARK_WIDTH, SPARK_HEIGHT, SPARK_STEPS = 600, 56, 200


def entropy_sparkline_html(trace: Trace) -> str:
    """A light live chart for a streaming run: raw entropy (scaled to the run's maximum) and raw chosen-token
    probability over the last SPARK_STEPS tokens, as inline SVG. The full timeline is a Plotly figure drawn when
    the run pauses or ends; redrawing that at every step would keep the browser behind the engine."""
    steps = token_steps(trace)[-SPARK_STEPS:]
    if len(steps) < 2:
        return ""
    top = max(max(s.entropy_raw for s in steps), 1e-9)
    x_of = lambda i: f"{i * SPARK_WIDTH / (len(steps) - 1):.1f}"  # noqa: E731
    y_of = lambda v: f"{SPARK_HEIGHT - 2 - v * (SPARK_HEIGHT - 4):.1f}"  # noqa: E731
    entropy = " ".join(f"{x_of(i)},{y_of(s.entropy_raw / top)}" for i, s in enumerate(steps))
    chosen = " ".join(f"{x_of(i)},{y_of(float(np.exp(s.raw_logprob)))}" for i, s in enumerate(steps))
    return (
        f'<div class="de-sparkline" style="opacity:0.85;font-size:0.85em;margin-top:6px">'
        f'<svg viewBox="0 0 {SPARK_WIDTH} {SPARK_HEIGHT}" preserveAspectRatio="none" '
        f'style="width:100%;max-width:{SPARK_WIDTH}px;height:{SPARK_HEIGHT}px;display:block">'
        f'<polyline points="{entropy}" fill="none" stroke="{RAW_COLOR}" stroke-width="1.5"/>'
        f'<polyline points="{chosen}" fill="none" stroke="{CHOSEN_COLOR}" stroke-width="1.5"/></svg>'
        f'<span style="color:{RAW_COLOR}">entropy (max {top:.2f} nats)</span> · '
        f'<span style="color:{CHOSEN_COLOR}">p(chosen)</span> over the last {len(steps)} tokens, raw · '
        "the figures follow when the run pauses or ends</div>"
    )
