"""Per-step entropy and top-1 probability of two or more runs side by side, over every output position: how sharp
each model's next-token distributions are (a hyperfitted model's collapse toward zero entropy beside its base)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import TokenStep
from engine.trace import Trace
from ui.figures.common import (
    empty_figure,
    escape_token,
    scatter_class,
    style_figure,
    token_label,
)
from ui.figures.compare import RUN_COLORS, ParamDefaults, run_labels
from ui.figures.tokens import no_steps_reason, token_steps


def top1_prob(step: TokenStep) -> float:
    """The raw distribution's largest probability (the first recorded candidate; the chosen token's without one)."""
    return step.candidates[0].raw_prob if step.candidates else math.exp(step.raw_logprob)


def sharpness_figure(traces: Sequence[Trace], defaults: ParamDefaults | None = None) -> go.Figure:
    """Two rows over output position, one line per run: the raw next-token entropy (nats) and the raw top-1
    probability; each legend entry names the run's means. Unlike the divergence figure, every run is drawn over
    its whole output, since each one's sharpness is read on its own text."""
    if len(traces) < 2:
        return empty_figure("Select two or more runs to compare their per-step entropy.")
    runs = [(trace, token_steps(trace)) for trace in traces]
    if not any(steps for _, steps in runs):
        return empty_figure(no_steps_reason(traces[0]))
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.55, 0.45])
    for i, ((trace, steps), label) in enumerate(zip(runs, run_labels(traces, defaults))):
        if not steps:
            continue
        label = escape_token(label)
        positions = [s.position for s in steps]
        entropies = [s.entropy_raw for s in steps]
        top1 = [top1_prob(s) for s in steps]
        tokens = [f"#{s.position} “{token_label(trace.vocab, s.token_id)}”" for s in steps]  # token_label escapes
        name = f"{label} · mean {sum(entropies) / len(entropies):.2f} nats, top-1 {sum(top1) / len(top1):.2f}"
        scatter = scatter_class(len(steps))
        for row, values, unit in ((1, entropies, "entropy %{y:.3f} nats"), (2, top1, "top-1 p %{y:.3f}")):
            fig.add_trace(
                scatter(
                    x=positions, y=values, customdata=positions, text=tokens, mode="lines", name=name, meta=label,
                    line={"color": RUN_COLORS[i % len(RUN_COLORS)], "width": 1.5}, legendgroup=label,
                    showlegend=row == 1, hovertemplate=f"%{{text}}<br>{unit}<br>%{{meta}}<extra></extra>",
                ),
                row=row, col=1,
            )
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="top-1 probability", range=[0, 1.02], row=2, col=1)
    fig.update_xaxes(title_text="output position", row=2, col=1)
    title = ("Per-step entropy and top-1 probability of each run (raw model distributions, every position)"
             "<br>a sharper model sits lower in entropy and higher in top-1 probability")
    return style_figure(fig, title, height=440)
