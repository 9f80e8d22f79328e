"""Attention maps recorded during a run, as heatmaps over the key tokens (prompt + generated so far)."""

from __future__ import annotations

import plotly.graph_objects as go

from engine.event_arrays import attention_array
from engine.events import AttentionMap
from engine.trace import Trace
from ui.figures.common import (
    COLORBAR_PX, FIGURE_WIDTH, MARGIN, WINDOW, empty_figure, escape_token, style_figure, tick_labels, token_label,
    window_note,
)

TICK_CHARS = 12  # a position's token in a tick label is cut to this many characters; the hover has it whole

MAX_HOVER_CELLS = 40_000  # per-cell token hover text above this would dominate the figure's size
NO_ATTENTION = (
    "No attention was recorded for this run.<br>"
    "Record a run with attention capture: <b>--attention last</b> (or mean / all) on the command line,<br>"
    "or the attention setting of the run form."
)


def attention_maps(trace: Trace) -> list[AttentionMap]:
    return [e for e in trace.events if isinstance(e, AttentionMap)]


def attention_steps(trace: Trace) -> list[int]:
    """The decoder steps that have an attention map, ascending."""
    return sorted({m.step for m in attention_maps(trace)})


def attention_layers(trace: Trace, step: int) -> list[str]:
    """Names of the layers kept in the step's map (``layer_index`` picks one of them), e.g. for a dropdown."""
    event = _map_at(trace, step)
    return [] if event is None else [layer_name(layer) for layer in event.layers]


def attention_figure(trace: Trace, step: int, layer_index: int = 0) -> go.Figure:
    """Heatmap of the attention map at decoder ``step``: rows = query positions, columns = key positions.

    Step 0 holds the prompt's full matrix (its last WINDOW rows are drawn); later steps one row per new token.
    """
    event = _map_at(trace, step)
    if event is None:
        steps = attention_steps(trace)
        if not steps:
            return empty_figure(NO_ATTENTION)
        hint = "<br>(the run's attention storage budget may have run out)" if step > steps[-1] else ""
        return empty_figure(f"No attention map at step {step}; recorded steps: {_ranges(steps)}.{hint}")
    if not 0 <= layer_index < len(event.layers):
        raise ValueError(f"layer_index {layer_index} is out of range: this map keeps {len(event.layers)} layer(s)")
    weights = attention_array(event)[layer_index]
    queries, keys = event.query_positions, weights.shape[1]
    first = max(0, len(queries) - WINDOW)
    weights, queries = weights[first:], queries[first:]
    sequence = trace.prompt_token_ids + trace.output_token_ids
    key_labels = [_position_label(trace, sequence, k) for k in range(keys)]
    query_labels = [_position_label(trace, sequence, q) for q in queries]
    key_ticks = [_position_label(trace, sequence, k, TICK_CHARS) for k in range(keys)]
    query_ticks = [_position_label(trace, sequence, q, TICK_CHARS) for q in queries]
    heatmap = go.Heatmap(
        z=weights, x=list(range(keys)), y=list(range(len(queries))), colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": "weight"}},
    )
    if len(queries) * keys <= MAX_HOVER_CELLS:
        heatmap.text = [[f"query {q}<br>key {k}" for k in key_labels] for q in query_labels]
        heatmap.hovertemplate = "%{text}<br>weight %{z:.4f}<extra></extra>"
    else:
        heatmap.hovertemplate = "query row %{y}, key %{x}<br>weight %{z:.4f}<extra></extra>"
    fig = go.Figure(heatmap)
    note = window_note(first, len(event.query_positions), len(event.query_positions), noun="query rows")
    title = (
        f"Attention ({escape_token(event.name)}) at step {event.step}: which earlier tokens each query attends to<br>"
        f"{layer_name(event.layers[layer_index])} · heads: {escape_token(event.head_reduction)}"
        + (f" · {note}" if note else "")
    )
    style_figure(fig, title, height=150 + 18 * len(queries))
    span_x = FIGURE_WIDTH - MARGIN["l"] - MARGIN["r"] - COLORBAR_PX - 120  # the query tick labels take the left
    span_y = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b - 60  # the rotated key labels, the bottom
    fig.update_xaxes(title_text="key position", **tick_labels(key_ticks, span_px=span_x), tickangle=-60)
    fig.update_yaxes(title_text="query position", autorange="reversed", **tick_labels(query_ticks, span_px=span_y))
    return fig


def _map_at(trace: Trace, step: int) -> AttentionMap | None:
    return next((m for m in attention_maps(trace) if m.step == step), None)


def layer_name(layer: int) -> str:
    return "mean of all layers" if layer == -1 else f"layer {layer}"


def _position_label(trace: Trace, sequence: list[int], position: int, limit: int | None = None) -> str:
    if position < len(sequence):
        return f"{position}: {token_label(trace.vocab, sequence[position], limit)}"
    return str(position)


def _ranges(steps: list[int]) -> str:
    """``0–5, 9, 12–14``: a compact list of the recorded steps."""
    runs: list[list[int]] = []
    for s in steps:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in runs)
