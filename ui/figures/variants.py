"""A model variant beside its base (decoder ``variant_compare``): where and how far the variant leaves the base.

``variant_kl_figure`` draws KL(p_base || p_variant) per step with the steps where the two top-1 tokens differ and
the first divergence marked, and below it the ranks: the base's top-1 under the variant, the chosen token under the
base. ``variant_entropy_figure`` draws both models' entropies per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import VariantStep
from engine.trace import Trace
from ui.figures.common import (
    CHOSEN_COLOR,
    PROCESSED_COLOR,
    RAW_COLOR,
    TEXT_COLOR,
    clip_text,
    empty_figure,
    scatter_class,
    style_figure,
    token_label,
)

NO_VARIANT = "This run has no variant steps: record it with the <b>variant_compare</b> decoder."
DIFFER_COLOR = "rgb(170, 80, 220)"
NAME_CHARS = 48  # a model name in a title is cut (at its start: a folder's last parts tell it) to this many characters


def variant_steps(trace: Trace) -> list[VariantStep]:
    return [e for e in trace.events if isinstance(e, VariantStep)]


def divergence_step(trace: Trace, steps: list[VariantStep]) -> int | None:
    """The first step whose chosen token is not the base's top-1 (the base alone would have left the text there)."""
    output = trace.output_token_ids
    return next((s.step for s in steps if s.step < len(output) and output[s.step] != s.base_top), None)


def _names(trace: Trace, steps: list[VariantStep]) -> str:
    """``variant X vs base Y`` as escaped HTML (a folder's path cut to its end); an empty variant parameter ran the
    base against itself."""
    variant, base = steps[-1].variant, trace.info.model
    shown = "the base itself" if variant == base else clip_text(variant, NAME_CHARS, keep="end")
    return f"variant {shown} vs base {clip_text(base, NAME_CHARS, keep='end')}"


@dataclass
class _Steps:
    """A run's variant steps and what every series over them shares: x = the step, also each point's customdata
    (a click selects the step), and a hover label naming the chosen and both top-1 tokens (escaped)."""

    steps: list[VariantStep]
    x: list[int]
    labels: list[str]

    @classmethod
    def of(cls, trace: Trace) -> _Steps:
        steps = variant_steps(trace)
        output = trace.output_token_ids
        labels = []
        for s in steps:
            chosen = token_label(trace.vocab, output[s.step]) if s.step < len(output) else "…"
            base, variant = (token_label(trace.vocab, t) for t in (s.base_top, s.variant_top))
            labels.append(f"step {s.step}: chose “{chosen}”<br>base top-1 “{base}” · variant top-1 “{variant}”")
        return cls(steps, [s.step for s in steps], labels)

    def series(self, name: str, values: list[float], hover: str, only: list[int] | None = None, **style: Any) -> Any:
        """A scatter of ``values`` (one per step, or the steps at indices ``only``) with the shared x and hover."""
        keep = range(len(self.steps)) if only is None else only
        x = [self.x[i] for i in keep]
        return scatter_class(len(x))(x=x, y=[values[i] for i in keep], customdata=x, name=name,
                                     text=[self.labels[i] for i in keep],
                                     hovertemplate=f"%{{text}}<br>{hover}<extra></extra>", **style)


def variant_kl_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """Two rows over the decode steps: KL(p_base || p_variant) with top-1 disagreements marked, and the two ranks
    (log scale); the first divergence is a dashed line, the selected step a grey one."""
    run = _Steps.of(trace)
    steps = run.steps
    if not steps:
        return empty_figure(NO_VARIANT)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.6, 0.4])
    kls = [s.kl for s in steps]
    fig.add_trace(run.series("KL(base ‖ variant)", kls, "KL %{y:.4g} nats", mode="lines+markers",
                             line={"color": PROCESSED_COLOR}, marker={"size": 5}), row=1, col=1)
    differ = [i for i, s in enumerate(steps) if not s.top1_agree]
    fig.add_trace(run.series("top-1 tokens differ", kls, "top-1 tokens differ", only=differ, mode="markers",
                             marker={"symbol": "x", "size": 10, "color": DIFFER_COLOR}), row=1, col=1)
    ranks = (("rank of the base's top-1 under the variant", [s.base_top_rank for s in steps], RAW_COLOR, "solid"),
             ("rank of the chosen token under the base", [s.token_base_rank for s in steps], CHOSEN_COLOR, "dot"))
    for name, values, color, dash in ranks:
        fig.add_trace(run.series(name, values, f"{name}: %{{y}}", mode="lines+markers",
                                 line={"color": color, "dash": dash}, marker={"size": 4}), row=2, col=1)
    diverge = divergence_step(trace, steps)
    if diverge is not None:
        fig.add_shape(type="line", x0=diverge, x1=diverge, xref="x", y0=0, y1=1, yref="paper", name="first divergence",
                      line={"color": DIFFER_COLOR, "dash": "dash", "width": 1.5})
    if selected_step is not None:
        fig.add_shape(type="line", x0=selected_step, x1=selected_step, xref="x", y0=0, y1=1, yref="paper",
                      name="selected", line={"color": TEXT_COLOR, "width": 2})
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="rank (1 = top)", type="log", dtick=1, row=2, col=1)  # ticks at 1, 10, 100, ...
    fig.update_xaxes(title_text="decode step", row=2, col=1)
    agreement = sum(s.top1_agree for s in steps) / len(steps)
    where = f"first divergence at step {diverge} (dashed)" if diverge is not None else "no divergence"
    title = (f"{_names(trace, steps)}: KL per step · top-1 agreement {agreement:.0%} · mean KL "
             f"{sum(kls) / len(kls):.4g} nats<br>the variant picks the tokens, the base reads them teacher-forced · "
             f"{where}")
    return style_figure(fig, title, height=520, role="primary")


def variant_entropy_figure(trace: Trace, selected_step: int | None = None) -> go.Figure:
    """Both models' raw entropies per step (nats), on the same tokens."""
    run = _Steps.of(trace)
    if not run.steps:
        return empty_figure(NO_VARIANT)
    fig = go.Figure()
    for name, values, color, dash in (("base", [s.base_entropy for s in run.steps], RAW_COLOR, "solid"),
                                      ("variant", [s.variant_entropy for s in run.steps], PROCESSED_COLOR, "dot")):
        fig.add_trace(run.series(f"entropy {name}", values, f"entropy {name} %{{y:.3f}} nats", mode="lines+markers",
                                 line={"color": color, "dash": dash}, marker={"size": 4}))
    if selected_step is not None:
        fig.add_vline(x=selected_step, line={"color": TEXT_COLOR, "width": 2})
    fig.update_xaxes(title_text="decode step")
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero")
    return style_figure(fig, f"Entropy per step: {_names(trace, run.steps)}<br>raw distributions on the same "
                        "tokens")
