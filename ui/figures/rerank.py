"""Rerank decisions: the scored candidates of one decision, and where a run paused or overrode its plain rule.

Token-level methods (AdaDec, momentum) emit a Rerank per decided position; their candidates are next tokens (with
a look-ahead for AdaDec). Sample-level methods (self-certainty best-of-N) emit one Rerank for the run whose
candidates are whole samples with a per-token score each.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import Rerank, ScoredCandidate
from engine.trace import Trace
from ui.figures.common import (
    CHOSEN_COLOR, PROCESSED_COLOR, RAW_COLOR, TEXT_COLOR, clip_text, empty_figure, escape_token, scatter_class,
    style_figure, token_label,
)
from ui.figures.tokens import token_steps

SAMPLE_METHODS = {"self_certainty"}  # candidates are whole samples, not next tokens
MAX_HOVER_CELLS = 40_000  # per-cell token hover text above this would dominate the figure's size
MAX_HOVER_CHARS = 400  # a sample's text in a hover box is cut here
TICK_CHARS = 16  # a candidate's tick label is cut to this many characters; the hover has it whole
PLAIN_LABELS = {"greedy", "kept", ""}  # decisions that took the plain rule's token: no timeline marker
NO_RERANK = "No rerank decisions were recorded for this run (decoders such as adadec, momentum or self_certainty record them)."


def rerank_events(trace: Trace) -> list[Rerank]:
    return [e for e in trace.events if isinstance(e, Rerank)]


def rerank_at(trace: Trace, position: int) -> Rerank | None:
    """The Rerank at an output position, else the nearest one (the earlier of two equally near)."""
    events = rerank_events(trace)
    return min(events, key=lambda e: (abs(e.position - position), e.position), default=None)


def rerank_figure(trace: Trace, position: int) -> go.Figure:
    """The candidates of the Rerank at (or nearest) ``position``: token bars, or for sample methods the samples'
    scores above a per-token strip."""
    event = rerank_at(trace, position)
    if event is None:
        return empty_figure(NO_RERANK)
    if event.method in SAMPLE_METHODS:
        return _samples_figure(trace, event)
    return _tokens_figure(trace, event)


def rerank_timeline_figure(trace: Trace, selected_position: int | None = None) -> go.Figure:
    """Per output position the raw entropy (or the Rerank's own signal), a marker at every decision that is not the
    plain rule (AdaDec's paused steps, momentum's overridden ones), and the threshold when the method has one."""
    events = rerank_events(trace)
    if not events:
        return empty_figure(NO_RERANK)
    if events[0].method in SAMPLE_METHODS:
        return _sample_curves_figure(trace, events[0])
    steps = token_steps(trace)
    if steps:
        line = {s.position: s.entropy_raw for s in steps}
        tokens = {s.position: s.token_id for s in steps}
        y_title = "entropy (nats)"
    else:
        line = {e.position: e.value for e in events if e.value is not None}
        tokens = {e.position: e.candidates[e.chosen].token_id for e in events if e.candidates}
        y_title = "signal"
    fig = go.Figure()
    if line:
        xs = sorted(line)
        fig.add_trace(scatter_class(len(xs))(
            x=xs, y=[line[x] for x in xs], customdata=xs, name=y_title.split(" ")[0], mode="lines",
            text=[token_label(trace.vocab, tokens[x]) if x in tokens else "" for x in xs],
            line={"color": RAW_COLOR, "width": 1.5}, hovertemplate="#%{x} “%{text}”: %{y:.3f}<extra></extra>",
        ))
    for label in sorted({e.label for e in events} - PLAIN_LABELS):
        _add_markers(fig, trace, [e for e in events if e.label == label], line, label)
    thresholds = sorted({e.threshold for e in events if e.threshold is not None})
    if len(thresholds) == 1:
        fig.add_hline(y=thresholds[0], line={"color": PROCESSED_COLOR, "dash": "dash", "width": 1.5},
                      annotation_text=f"threshold {thresholds[0]:.3f}", annotation_position="top left")
    elif thresholds:
        marked = [e for e in events if e.threshold is not None]
        fig.add_trace(go.Scatter(x=[e.position for e in marked], y=[e.threshold for e in marked], name="threshold",
                                 mode="markers", marker={"color": PROCESSED_COLOR, "symbol": "line-ew-open"}))
    if selected_position is not None:
        fig.add_vline(x=selected_position, line={"color": "rgba(128, 128, 128, 0.9)", "width": 2})
    fig.update_xaxes(title_text="output position")
    fig.update_yaxes(title_text=y_title, rangemode="tozero")
    method = escape_token(events[0].method)
    counts = ", ".join(f"{sum(e.label == label for e in events)} {escape_token(label)}"
                       for label in sorted({e.label for e in events}))
    return style_figure(fig, f"{method} decisions over the output: {len(events)} ({counts})", height=360)


# ---------------------------------------------------------------- token candidates


def _tokens_figure(trace: Trace, event: Rerank) -> go.Figure:
    labels = [f"{i}. “{token_label(trace.vocab, c.token_id, TICK_CHARS)}”" for i, c in enumerate(event.candidates)]
    scores = [_finite(c.score) for c in event.candidates]
    colors = [CHOSEN_COLOR if i == event.chosen else RAW_COLOR for i in range(len(event.candidates))]
    outline = [3 if i == event.baseline else 0 for i in range(len(event.candidates))]
    hover = [_candidate_hover(trace, event, i) for i in range(len(event.candidates))]
    marks = [_marks(event, i) for i in range(len(event.candidates))]
    fig = go.Figure(go.Bar(
        x=scores, y=labels, orientation="h", text=marks, textposition="auto", hovertext=hover,
        hovertemplate="%{hovertext}<extra></extra>",
        marker={"color": colors, "line": {"color": TEXT_COLOR, "width": outline}},
    ))
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(title_text="score")
    title = f"{escape_token(event.method)}: candidates rescored at position {event.position}<br>green: chosen"
    title += " · outlined: the plain rule's pick"
    if event.label:
        title += f" · {escape_token(event.label)}"
    if event.value is not None and event.threshold is not None:
        title += f" · signal {event.value:.3f} vs threshold {event.threshold:.3f}"
    if event.model_calls:
        title += f" · {event.model_calls} extra model calls"
    return style_figure(fig, title, height=150 + 32 * len(event.candidates), role="primary")


def _marks(event: Rerank, i: int) -> str:
    tags = [tag for tag, on in (("chosen", i == event.chosen), ("baseline", i == event.baseline)) if on]
    score = event.candidates[i].score
    return " · ".join(tags + ([] if math.isfinite(score) else [f"score {_fmt(score)}"]))


def _candidate_hover(trace: Trace, event: Rerank, i: int) -> str:
    c = event.candidates[i]
    lines = [f"“{token_label(trace.vocab, c.token_id)}” (id {c.token_id})", f"score {_fmt(c.score)}"]
    lines += _parts(event, c)
    if c.tokens:
        lines.append(f"continuation: “{_text(trace, c.tokens)}”")
        if c.token_scores:
            lines.append("per token: " + ", ".join(_fmt(s) for s in c.token_scores))
    if c.label:
        lines.append(escape_token(c.label))
    return "<br>".join(lines)


# ---------------------------------------------------------------- whole samples


def _samples_figure(trace: Trace, event: Rerank) -> go.Figure:
    n = len(event.candidates)
    names = [f"sample {i}" for i in range(n)]
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.12, row_heights=[0.4, 0.6],
                        subplot_titles=("score per sample", "per-token score"))
    fig.add_trace(go.Bar(
        x=names, y=[_finite(c.score) for c in event.candidates], text=[_marks(event, i) for i in range(n)],
        textposition="auto", hovertext=[_sample_hover(trace, event, i) for i in range(n)],
        hovertemplate="%{hovertext}<extra></extra>", showlegend=False,
        marker={"color": [CHOSEN_COLOR if i == event.chosen else RAW_COLOR for i in range(n)],
                "line": {"color": TEXT_COLOR, "width": [3 if i == event.baseline else 0 for i in range(n)]}},
    ), row=1, col=1)
    width = max((len(c.token_scores) for c in event.candidates), default=0)
    z = [[_finite(s) for s in c.token_scores] + [None] * (width - len(c.token_scores)) for c in event.candidates]
    heatmap = go.Heatmap(z=z, x=list(range(width)), y=names, colorscale="Viridis", colorbar={"len": 0.55, "y": 0.3},
                         hovertemplate="%{y}, token %{x}<br>score %{z:.4f}<extra></extra>")
    if n * width <= MAX_HOVER_CELLS:
        heatmap.text = [[token_label(trace.vocab, t) for t in c.tokens] + [""] * (width - len(c.tokens))
                        for c in event.candidates]
        heatmap.hovertemplate = "%{y}, token %{x} “%{text}”<br>score %{z:.4f}<extra></extra>"
    fig.add_trace(heatmap, row=2, col=1)
    fig.update_yaxes(autorange="reversed", type="category", row=2, col=1)
    fig.update_xaxes(title_text="token index", row=2, col=1)
    title = f"{escape_token(event.method)}: best of {n} samples, sample {event.chosen} chosen"
    if event.label:
        title += f" · {escape_token(event.label)}"
    return style_figure(fig, title, height=280 + 22 * n, role="primary")


def _sample_curves_figure(trace: Trace, event: Rerank) -> go.Figure:
    """Each sample's per-token score over its token index; the chosen sample drawn bold."""
    fig = go.Figure()
    for i, c in enumerate(event.candidates):
        chosen = i == event.chosen
        fig.add_trace(scatter_class(len(c.token_scores))(
            x=list(range(len(c.token_scores))), y=[_finite(s) for s in c.token_scores], name=f"sample {i}",
            mode="lines", text=[token_label(trace.vocab, t) for t in c.tokens][: len(c.token_scores)],
            line={"color": CHOSEN_COLOR if chosen else RAW_COLOR, "width": 2.5 if chosen else 1},
            opacity=1.0 if chosen else 0.5,
            hovertemplate=f"sample {i}, token %{{x}} “%{{text}}”<br>score %{{y:.4f}}<extra></extra>",
        ))
    fig.update_xaxes(title_text="token index")
    fig.update_yaxes(title_text="per-token score")
    return style_figure(fig, f"{escape_token(event.method)}: per-token score of each sample (chosen bold)", height=360)


def _sample_hover(trace: Trace, event: Rerank, i: int) -> str:
    c = event.candidates[i]
    text = _text(trace, c.tokens, MAX_HOVER_CHARS)
    return "<br>".join([f"sample {i}: score {_fmt(c.score)}", *_parts(event, c), f"“{text}”"]
                       + ([escape_token(c.label)] if c.label else []))


# ---------------------------------------------------------------- shared bits


def _add_markers(fig: go.Figure, trace: Trace, events: list[Rerank], line: dict[int, float], label: str) -> None:
    """One marker per decision: filled where the pick changed from the baseline, open where it stayed."""
    changed = [e.chosen != e.baseline for e in events]
    fig.add_trace(go.Scatter(
        x=[e.position for e in events], y=[line.get(e.position, e.value) for e in events],
        customdata=[e.position for e in events], name=escape_token(label), mode="markers",
        marker={"size": 9, "symbol": ["diamond" if c else "circle-open" for c in changed]},
        hovertext=[_decision_hover(trace, e) for e in events], hovertemplate="%{hovertext}<extra></extra>",
    ))


def _decision_hover(trace: Trace, event: Rerank) -> str:
    chosen = event.candidates[event.chosen].token_id if event.candidates else -1
    baseline = event.candidates[event.baseline].token_id if event.candidates else -1
    lines = [f"#{event.position} {escape_token(event.label)}", f"chose “{token_label(trace.vocab, chosen)}”"]
    if chosen != baseline:
        lines.append(f"instead of “{token_label(trace.vocab, baseline)}”")
    if event.value is not None:
        lines.append(f"signal {event.value:.3f}" + (f" vs {event.threshold:.3f}" if event.threshold is not None else ""))
    return "<br>".join(lines)


def _parts(event: Rerank, c: ScoredCandidate) -> list[str]:
    names = event.part_names + [f"part {i}" for i in range(len(event.part_names), len(c.parts))]
    return [f"{escape_token(name)}: {_fmt(value)}" for name, value in zip(names, c.parts)]


def _text(trace: Trace, tokens: list[int], limit: int | None = None) -> str:
    text = trace.text_of(tokens)
    return clip_text(text, limit)


def _finite(x: float) -> float | None:
    """Plotly cannot draw an infinite bar: leave it out (its label says why)."""
    return x if math.isfinite(x) else None


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "−∞" if x < 0 else "∞"
    return f"{x:.4g}"
