"""Entropy and chosen-token probability over a run, one point per output position."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.trace import Trace
from ui.figures.common import PROCESSED_COLOR, RAW_COLOR, empty_figure, scatter_class, style_figure, token_label
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
