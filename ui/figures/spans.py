"""exact-extract: the NLL of every answer span as a start token x length heatmap, the argmin marked."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.event_arrays import ranking_values, span_nll
from engine.events import SpanScores
from engine.trace import Trace
from ui.figures.common import CHOSEN_COLOR, clip_text, empty_figure, style_figure, tick_labels, token_label

NO_SPANS = "This run scored no spans: record it with the <b>exact_extract</b> decoder."
MAX_QUOTE = 60  # characters of an answer quoted in the title


def span_scores(trace: Trace) -> SpanScores | None:
    return next((e for e in trace.events if isinstance(e, SpanScores)), None)


def _quote(text: str) -> str:
    return f"“{clip_text(text, MAX_QUOTE)}”"


def spans_figure(trace: Trace) -> go.Figure:
    """Rows = passage start tokens, columns = span length; colour = the value the argmin ran over (NLL, or NLL per
    token + terminator); blank where the span would run past the passage. The title compares with greedy."""
    event = span_scores(trace)
    if event is None:
        return empty_figure(NO_SPANS)
    values = ranking_values(span_nll(event), event.length_normalized)
    prompt = trace.prompt_token_ids
    rows = [f"{p}: {token_label(trace.vocab, prompt[p], 12)}" if p < len(prompt) else str(p) for p in event.starts]
    lengths = list(range(1, event.max_length + 1))
    z = [[float(v) if math.isfinite(v) else None for v in row] for row in values]
    hover = [
        [f"{_quote(trace.text_of(prompt[p : p + n]))}<br>{n} token(s) from position {p}" for n in lengths]
        for p in event.starts
    ]
    measure = "NLL / (tokens + 1)" if event.length_normalized else "NLL (nats)"
    fig = go.Figure(go.Heatmap(
        z=z, x=lengths, y=list(range(len(rows))), customdata=hover, colorscale="Viridis_r",
        hovertemplate="%{customdata}<br>" + measure + " %{z:.4g}<extra></extra>", colorbar={"title": {"text": measure}},
    ))
    best_row = event.starts.index(event.best_start) if event.best_start in event.starts else None
    if best_row is not None:
        fig.add_trace(go.Scatter(
            x=[event.best_length], y=[best_row], mode="markers", hoverinfo="skip", showlegend=False,
            marker={"symbol": "x", "size": 14, "color": CHOSEN_COLOR, "line": {"width": 2, "color": "white"}},
        ))
    best = trace.text_of(prompt[event.best_start : event.best_start + event.best_length])
    title = (f"Answer spans scored exactly: {measure} by start token and length (✕ the most probable)<br>"
             f"most probable span {_quote(best)} · greedy answer {_quote(trace.text_of(event.greedy_token_ids))}")
    style_figure(fig, title, height=140 + 18 * len(rows), role="primary")
    span = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    fig.update_xaxes(title_text="span length (tokens)", tickvals=lengths)
    fig.update_yaxes(title_text="start token", autorange="reversed", **tick_labels(rows, span_px=span))
    return fig
