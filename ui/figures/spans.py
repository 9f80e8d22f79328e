"""exact-extract: the NLL of every answer span as a start token x length heatmap, the argmin marked."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.decoders.token.exact_extract import ranking_values, span_nll
from engine.events import SpanScores
from engine.trace import Trace
from ui.figures.common import CHOSEN_COLOR, empty_figure, escape_token, style_figure, token_label

NO_SPANS = "This run scored no spans: record it with the <b>exact_extract</b> decoder."
MAX_QUOTE = 60  # characters of an answer quoted in the title


def span_scores(trace: Trace) -> SpanScores | None:
    return next((e for e in trace.events if isinstance(e, SpanScores)), None)


def _quote(text: str) -> str:
    text = text if len(text) <= MAX_QUOTE else text[: MAX_QUOTE - 1] + "…"
    return f"“{escape_token(text)}”"


def spans_figure(trace: Trace) -> go.Figure:
    """Rows = passage start tokens, columns = span length; colour = the value the argmin ran over (NLL, or NLL per
    token + terminator); blank where the span would run past the passage. The title compares with greedy."""
    event = span_scores(trace)
    if event is None:
        return empty_figure(NO_SPANS)
    values = ranking_values(span_nll(event), event.length_normalized)
    prompt = trace.prompt_token_ids
    rows = [f"{p}: {token_label(trace.vocab, prompt[p])}" if p < len(prompt) else str(p) for p in event.starts]
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
    every = max(1, -(-len(rows) // 60))
    fig.update_xaxes(title_text="span length (tokens)", tickvals=lengths)
    fig.update_yaxes(title_text="start token", autorange="reversed", tickvals=list(range(0, len(rows), every)),
                     ticktext=rows[::every])
    best = trace.text_of(prompt[event.best_start : event.best_start + event.best_length])
    title = f"Most probable span {_quote(best)} · greedy answer {_quote(trace.text_of(event.greedy_token_ids))}"
    return style_figure(fig, title, height=max(260, min(900, 120 + 18 * len(rows))))
