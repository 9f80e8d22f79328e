"""GIFT's views: the saliency over the context with the gaze shift behind it, and the amplification per step."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.event_arrays import attention_array
from engine.events import AttentionMap, Steering
from engine.trace import Trace
from ui.figures.common import PROCESSED_COLOR, RAW_COLOR, empty_figure, style_figure, token_label


def saliency_map(trace: Trace) -> AttentionMap | None:
    return next((e for e in trace.events if isinstance(e, AttentionMap) and e.name == "saliency"), None)


def steering_steps(trace: Trace) -> list[Steering]:
    return [e for e in trace.events if isinstance(e, Steering)]


def saliency_figure(trace: Trace) -> go.Figure:
    """Top: the saliency ŝ of every context token (the factor exp(α ŝ) in the hover). Below: the gaze shift
    (mean positive change of attention to each context token) while each content word of the query is read."""
    event = saliency_map(trace)
    if event is None:
        return empty_figure("This run has no saliency map (record one with the gift decoder).")
    maps = attention_array(event)[0]  # [1 + query tokens, prompt length]
    context = [k for k in range(maps.shape[1]) if maps[1:, k].any() or maps[0, k] > 0]
    if not context:
        return empty_figure("The saliency map is flat: no attention shift towards the context was measured.")
    first, last = context[0], context[-1] + 1
    ids = trace.prompt_token_ids
    keys = [f"{k}: {token_label(trace.vocab, ids[k], 12)}" for k in range(first, last)]
    queries = [f"{q}: {token_label(trace.vocab, ids[q], 12)}" for q in event.query_positions[1:]]
    alpha = trace.info.params.get("alpha", 0.0)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        row_heights=[0.25, 0.75], subplot_titles=("saliency ŝ", "gaze shift Δ per query word"))
    fig.add_trace(go.Heatmap(
        z=[maps[0, first:last]], x=keys, y=["ŝ"], colorscale="Inferno", zmin=0, zmax=1, showscale=False,
        customdata=[[float(alpha)] * (last - first)],
        hovertemplate="%{x}<br>ŝ %{z:.3f}<br>factor exp(α ŝ), α = %{customdata}<extra></extra>",
    ), row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=maps[1:, first:last], x=keys, y=queries, colorscale="Viridis", zmin=0,
        colorbar={"title": {"text": "Δ"}}, hovertemplate="query %{y}<br>context %{x}<br>Δ %{z:.4f}<extra></extra>",
    ), row=2, col=1)
    fig.update_xaxes(tickangle=-60, row=2, col=1)
    fig.update_yaxes(autorange="reversed", row=2, col=1)
    layers = ", ".join(map(str, event.layers))
    return style_figure(fig, f"GIFT saliency over the context (measured in layer {layers}), α = {alpha}",
                        height=200 + 22 * len(queries), role="primary")


def steering_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """Per step: the attention mass on the context before and after the edit (mean over heads and enhanced
    layers; the query factor r in the hover), and the KL from the plain model's distribution; steps where plain greedy would
    have taken another token are marked."""
    steps = steering_steps(trace)
    if not steps:
        return empty_figure("This run recorded no attention steering.")
    x = [s.step for s in steps]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    fig.add_trace(go.Scatter(x=x, y=[mean(s.context_mass_before) for s in steps], name="context mass before",
                             line={"color": RAW_COLOR}), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=[mean(s.context_mass_after) for s in steps], name="context mass after",
                             customdata=[mean(s.ratios) for s in steps], line={"color": PROCESSED_COLOR},
                             hovertemplate="step %{x}<br>context mass %{y:.3f}<br>query factor r %{customdata:.3f}"
                                           "<extra></extra>"), row=1, col=1)
    output = trace.output_token_ids
    differs = [s for s in steps if s.step < len(output) and s.plain_token_id >= 0 and s.plain_token_id != output[s.step]]
    fig.add_trace(go.Bar(x=x, y=[s.kl_from_plain for s in steps], name="KL(plain ‖ steered)",
                         marker={"color": "rgba(128, 128, 128, 0.6)"}), row=2, col=1)
    if differs:
        fig.add_trace(go.Scatter(
            x=[s.step for s in differs], y=[s.kl_from_plain for s in differs], mode="markers", name="token differs",
            marker={"symbol": "x", "size": 10, "color": PROCESSED_COLOR},
            text=[f"steered “{token_label(trace.vocab, output[s.step])}” · plain “{token_label(trace.vocab, s.plain_token_id)}”"
                  for s in differs],
            hovertemplate="step %{x}<br>%{text}<extra></extra>",
        ), row=2, col=1)
    if selected_step is not None:
        fig.add_vline(x=selected_step, line={"color": "rgba(128, 128, 128, 0.9)", "width": 2})
    fig.update_yaxes(title_text="context mass", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    title = f"GIFT amplification over {len(steps)} steps: attention mass on the context, and KL from plain greedy"
    return style_figure(fig, title, height=420)
