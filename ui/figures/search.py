"""EvoPress searches (``decoding-explorer evopress``): how the best profile's fitness fell over the generations, the
spread of the offspring at each selection stage, and the best per-layer sparsity profile as it evolved.

``fitness_figure`` draws the best fitness (KL to the base model on the whole calibration set) per generation over the
offspring scored at every stage; ``profile_figure`` draws the selected generation's best profile as bars over the
heatmap of the best profile at every generation.
"""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import SearchGeneration
from engine.trace import Trace
from ui.figures.common import (
    CHOSEN_COLOR,
    RAW_COLOR,
    TEXT_COLOR,
    empty_figure,
    escape_text,
    nice_step,
    style_figure,
)

NO_SEARCH = "This run has no search generations: record one with <b>decoding-explorer evopress</b>."
STAGE_COLORS = ("rgba(160, 160, 160, 0.55)", "rgba(99, 110, 250, 0.6)", "rgba(239, 85, 59, 0.7)",
                "rgba(171, 99, 250, 0.7)")


def search_generations(trace: Trace) -> list[SearchGeneration]:
    return [e for e in trace.events if isinstance(e, SearchGeneration)]


def _selected(generations: list[SearchGeneration], selected: int | None) -> SearchGeneration:
    index = len(generations) - 1 if selected is None else max(0, min(int(selected), len(generations) - 1))
    return generations[index]


def _subtitle(trace: Trace) -> str:
    params = trace.info.params
    method, target = escape_text(str(params.get("method", "?"))), escape_text(str(params.get("sparsity", "?")))
    return f"{escape_text(trace.info.model)}, {method} pruning, mean sparsity {target}"


def fitness_figure(trace: Trace, selected: int | None = None) -> go.Figure:
    """Best fitness per generation (line) over each stage's offspring (points: more tokens, later stages)."""
    generations = search_generations(trace)
    if not generations:
        return empty_figure(NO_SEARCH)
    buckets: dict[int, tuple[list[int], list[float], list[int]]] = {}  # stage (-1: the whole set) -> points
    for g in generations[1:]:
        for stage, (tokens, scores) in enumerate(zip(g.stage_tokens, g.stage_fitnesses)):
            xs, ys, counts = buckets.setdefault(-1 if stage == len(g.stage_tokens) - 1 else stage, ([], [], []))
            xs += [g.generation] * len(scores)
            ys += scores
            counts += [tokens] * len(scores)
    fig = go.Figure()
    for stage, (xs, ys, counts) in sorted(buckets.items(), key=lambda item: (item[0] < 0, item[0])):
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers", customdata=counts,
            name="survivors on the whole set" if stage < 0 else f"stage {stage + 1} offspring",
            marker={"size": 6, "color": STAGE_COLORS[-1] if stage < 0 else STAGE_COLORS[stage % 3]},
            hovertemplate="generation %{x}<br>KL %{y:.5f} nats/token<br>on %{customdata} tokens<extra></extra>",
        ))
    fig.add_trace(go.Scatter(
        x=[g.generation for g in generations], y=[g.best_fitness for g in generations], mode="lines+markers",
        name="best (whole calibration set)", line={"color": CHOSEN_COLOR, "width": 2.5},
        customdata=[g.mean_sparsity for g in generations],
        hovertemplate="generation %{x}<br>best KL %{y:.5f} nats/token<br>mean sparsity %{customdata:.3f}"
                      "<extra></extra>",
    ))
    chosen = _selected(generations, selected)
    fig.add_vline(x=chosen.generation, line={"color": TEXT_COLOR, "dash": "dot"})
    first, best = generations[0].best_fitness, generations[-1].best_fitness
    gain = f"{first / best:.2f}x lower than uniform" if best > 0 else "zero KL"
    fig.update_xaxes(title_text="generation", tick0=0, dtick=nice_step(len(generations) / 20))
    fig.update_yaxes(title_text="KL(base ‖ pruned), nats/token", type="log")
    title = (f"EvoPress search: best KL {best:.5f} after {len(generations) - 1} generations ({gain}, "
             f"uniform {first:.5f})<br>{_subtitle(trace)}; points: offspring at each selection stage")
    return style_figure(fig, title, role="primary")


def profile_figure(trace: Trace, selected: int | None = None) -> go.Figure:
    """Top: the selected generation's best sparsity per layer (the uniform level as a line). Below: the best
    profile at every generation (generation x layer, colour = sparsity)."""
    generations = search_generations(trace)
    if not generations:
        return empty_figure(NO_SEARCH)
    chosen = _selected(generations, selected)
    layers = list(range(len(chosen.profile)))
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.14, row_heights=[0.45, 0.55], shared_xaxes=True,
                        subplot_titles=(f"generation {chosen.generation}: sparsity per layer",
                                        "best profile per generation"))
    fig.add_trace(go.Bar(x=layers, y=chosen.profile, marker_color=RAW_COLOR, name="sparsity", showlegend=False,
                         hovertemplate="layer %{x}<br>sparsity %{y:.2f}<extra></extra>"), row=1, col=1)
    fig.add_hline(y=chosen.mean_sparsity, line={"color": CHOSEN_COLOR, "dash": "dash"}, row=1, col=1)
    fig.add_trace(go.Heatmap(
        z=[g.profile for g in generations], x=layers, y=[g.generation for g in generations], zmin=0,
        zmax=max(max(g.profile) for g in generations) or 1.0, colorscale="Reds",
        colorbar={"title": {"text": "sparsity"}, "len": 0.55, "y": 0, "yanchor": "bottom"},
        hovertemplate="generation %{y}<br>layer %{x}<br>sparsity %{z:.2f}<extra></extra>",
    ), row=2, col=1)
    fig.update_xaxes(tick0=0, dtick=nice_step(len(layers) / 32))
    fig.update_xaxes(title_text="decoder layer", row=2, col=1)
    fig.update_yaxes(tick0=0, dtick=nice_step(len(generations) / 10), row=2, col=1)
    fig.update_yaxes(title_text="sparsity", range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="generation", row=2, col=1)
    title = (f"Per-layer sparsity of the best profile (mean {chosen.mean_sparsity:.3f}, dashed)"
             f"<br>{_subtitle(trace)}")
    return style_figure(fig, title, height=520, role="secondary", clamp=False)
