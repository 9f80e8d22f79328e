"""FFN activation sparsity (BlockFFN's measures) recorded per output token: layer x position heatmaps.

The top panel is token-level sparsity (TLS), the share of a layer's FFN neurons inactive for the token; the bottom
one chunk-level sparsity (CLS), the share inactive for every token of a fixed chunk, drawn across the chunk's
positions. How a neuron counts as inactive is in the run's settings (see engine/ffn.py).
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import FfnSparsity
from engine.trace import Trace
from ui.figures.common import (
    TEXT_COLOR,
    WINDOW,
    empty_figure,
    escape_text,
    style_figure,
    tick_labels,
    token_label,
    window_bounds,
    window_note,
)

COLORSCALE = "Viridis"
LAYER_PX = 11  # height of one layer's row in each panel
MAX_HOVER_CELLS = 40_000  # per-cell hover text above this would dominate the figure's size
NO_FFN = (
    "No FFN activation sparsity was recorded for this run.<br>"
    "Record a token-level run with FFN capture: <b>--ffn-sparsity</b> on the command line,<br>"
    "or the FFN sparsity box of the run form."
)


def ffn_events(trace: Trace) -> list[FfnSparsity]:
    """The run's FFN sparsity events, by output position."""
    return sorted((e for e in trace.events if isinstance(e, FfnSparsity)), key=lambda e: e.position)


def ffn_rule(trace: Trace) -> str:
    """The run's inactivity rule and chunk length in words (escaped), from its settings."""
    settings = trace.info.settings.get("ffn") or {}
    threshold, chunk = settings.get("threshold", "?"), settings.get("chunk", "?")
    rule = (f"|a| ≤ {threshold} × the token's largest |a| in its layer" if settings.get("relative", True)
            else f"|a| ≤ {threshold}")
    return escape_text(f"inactive: {rule} · chunks of {chunk} tokens")


def ffn_sparsity_figure(trace: Trace, selected: int | None = None, window: tuple[int, int] | None = None) -> go.Figure:
    """Two heatmaps over output position (x) and layer (y): token-level sparsity above, chunk-level below.

    Shows the positions of ``window`` (a half-open range of recorded tokens), by default the last WINDOW, moved to
    hold ``selected`` (an output position, outlined) when that falls outside them."""
    events = ffn_events(trace)
    if not events:
        return empty_figure(NO_FFN)
    index = next((i for i, e in enumerate(events) if e.position == selected), None)
    start, stop = window_bounds(len(events), window)
    if window is None and index is not None and not start <= index < stop:
        start, stop = window_bounds(len(events), (max(0, index - WINDOW // 2), max(0, index - WINDOW // 2) + WINDOW))
    shown = events[start:stop]
    layers = max(len(e.token_level) for e in events)
    x = [e.position for e in shown]
    tls = _matrix([e.token_level for e in shown], layers)
    cls = _chunk_matrix(shown, layers, x)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12,
                        subplot_titles=("token-level sparsity", "chunk-level sparsity (each chunk across its tokens)"))
    tokens = [_token(trace, p) for p in x]
    for row, z, what in ((1, tls, "token-level"), (2, cls, "chunk-level")):
        heatmap = go.Heatmap(z=z, x=x, y=list(range(layers)), zmin=0, zmax=1, colorscale=COLORSCALE,
                             showscale=row == 1, colorbar={"title": {"text": "inactive share"}})
        if layers * len(x) <= MAX_HOVER_CELLS:
            heatmap.text = [tokens] * layers
            heatmap.hovertemplate = f"position %{{x}} %{{text}}<br>layer %{{y}}<br>{what} %{{z:.3f}}<extra></extra>"
        else:
            heatmap.hovertemplate = f"position %{{x}}, layer %{{y}}<br>{what} %{{z:.3f}}<extra></extra>"
        fig.add_trace(heatmap, row=row, col=1)
    if selected is not None and x[0] <= selected <= x[-1]:
        for row in (1, 2):
            fig.add_vrect(x0=selected - 0.5, x1=selected + 0.5, line={"color": TEXT_COLOR, "width": 2},
                          fillcolor="rgba(0,0,0,0)", row=row, col=1)
    if np.isnan(cls).all():
        fig.add_annotation(text="no chunk completed in these tokens", xref="x2 domain", yref="y2 domain", x=0.5, y=0.5,
                           showarrow=False)
    note = window_note(start, stop, len(events), noun="tokens")
    title = (f"FFN activation sparsity per layer over {len(events)} tokens · mean token-level {np.nanmean(tls):.3f}"
             + (f", chunk-level {np.nanmean(cls):.3f}" if not np.isnan(cls).all() else "")
             + f"<br>{ffn_rule(trace)}" + (f" · {note}" if note else ""))
    style_figure(fig, title, height=200 + 2 * LAYER_PX * max(layers, 6), clamp=False)
    span = LAYER_PX * max(layers, 6)
    ticks = tick_labels([str(layer) for layer in range(layers)], span_px=span)
    for row in (1, 2):
        fig.update_yaxes(title_text="layer", autorange="reversed", row=row, col=1, **ticks)
    fig.update_xaxes(title_text="output position", row=2, col=1)
    return fig


def _matrix(columns: list[list[float]], layers: int) -> np.ndarray:
    """[layers, positions], NaN where a column has no value (a missing layer)."""
    z = np.full((layers, len(columns)), np.nan, dtype=np.float32)
    for i, column in enumerate(columns):
        z[: len(column), i] = column
    return z


def _chunk_matrix(shown: list[FfnSparsity], layers: int, x: list[int]) -> np.ndarray:
    """Chunk-level sparsity spread over the positions of each chunk: a chunk ends at an event that carries it and
    starts after the previous chunk's end (or at the first event of its run of consecutive positions)."""
    z = np.full((layers, len(shown)), np.nan, dtype=np.float32)
    begin = 0
    for i, event in enumerate(shown):
        if i and x[i] != x[i - 1] + 1:
            begin = i  # a gap: no chunk spans it
        if event.chunk_level is not None:
            column = np.asarray(event.chunk_level, dtype=np.float32)
            z[: len(column), begin:i + 1] = column[:, None]
            begin = i + 1
    return z


def _token(trace: Trace, position: int) -> str:
    output = trace.output_token_ids
    return f"“{token_label(trace.vocab, output[position])}”" if 0 <= position < len(output) else ""
