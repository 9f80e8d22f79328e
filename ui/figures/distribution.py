"""The distribution at one output position: raw vs processed top-k bars, and where each stage cut."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from engine.events import StageReport, TokenStep
from engine.trace import Trace
from ui.figures.common import (
    CHOSEN_COLOR,
    PROCESSED_COLOR,
    RAW_COLOR,
    empty_figure,
    escape_token,
    style_figure,
    token_label,
)
from ui.figures.tokens import fmt_p, step_at

MAX_BARS = 50  # candidates drawn; the recorded top-k can hold up to 1000
CUT_COLOR = "rgba(128, 128, 128, 0.9)"
_LABEL_PX = 17  # height of one stage label; labels stack above the plot, one row per stage


def distribution_figure(trace: Trace, position: int, max_bars: int = MAX_BARS) -> go.Figure:
    """Grouped bars of the top candidates at ``position``: raw vs processed probability, the chosen token
    boxed (shape ``chosen``), and one dashed line per processing stage after the last candidate it kept
    (shapes ``cut:<stage>``)."""
    step = step_at(trace, position)
    if step is None:
        return empty_figure(f"No token distribution recorded at position {position}.")
    candidates = step.candidates[:max_bars]
    labels = [token_label(trace.vocab, c.token_id) for c in candidates]
    chosen = next((i for i, c in enumerate(candidates) if c.token_id == step.token_id), None)
    hover = [
        f"“{label}”<br>rank {i + 1}<br>raw p {fmt_p(c.raw_prob)}<br>processed p {fmt_p(c.prob)}"
        for i, (label, c) in enumerate(zip(labels, candidates))
    ]
    x = list(range(len(candidates)))
    fig = go.Figure()
    for name, values, color in (
        ("raw (model)", [c.raw_prob for c in candidates], RAW_COLOR),
        ("processed (sampled from)", [c.prob for c in candidates], PROCESSED_COLOR),
    ):
        fig.add_bar(x=x, y=values, name=name, marker_color=color, hovertext=hover, hoverinfo="text")
    # Ticks by index, not by text: two candidates can share a surface form and would merge on a category axis.
    ticks = [f"<b>{label}</b>" if i == chosen else label for i, label in enumerate(labels)]
    fig.update_xaxes(tickvals=x, ticktext=ticks, tickangle=-45, range=[-0.6, len(x) - 0.4])
    fig.update_yaxes(title_text="probability", rangemode="tozero")
    fig.update_layout(barmode="group", bargap=0.25)
    if chosen is not None:
        top = max(candidates[chosen].raw_prob, candidates[chosen].prob)
        fig.add_shape(
            type="rect", x0=chosen - 0.45, x1=chosen + 0.45, y0=0, y1=top,
            line={"color": CHOSEN_COLOR, "width": 2.5}, name="chosen",
        )
    stages = step.stages
    for i, stage in enumerate(stages):
        _add_cut(fig, stage, rows_above=i + 1, bars=len(x))
    title = _title(trace, step)
    style_figure(fig, title, height=380 + _LABEL_PX * len(stages))
    # the stage labels stack between the title and the plot
    return fig.update_layout(margin_t=42 + 18 * title.count("<br>") + _LABEL_PX * len(stages))


def _add_cut(fig: go.Figure, stage: StageReport, rows_above: int, bars: int) -> None:
    """A dashed line after the last candidate the stage kept (clamped to the drawn bars), and its label in
    a row of its own above the plot, joined to the line's top. Stages only ever shrink the kept set, so later
    stages cut further left: stacking them higher keeps each joining line clear of the labels below it."""
    kept_bits = stage.survivors.bit_length()
    label = f"{escape_token(stage.name)}: kept {stage.kept:,} ({stage.mass:.1%} of mass)"
    if stage.threshold is not None:
        label += f", threshold {stage.threshold:.3g}"
    if stage.survivors != (1 << kept_bits) - 1:
        label += ", not a prefix"  # e.g. typical sampling or a repetition penalty reorder the candidates
    line_x = min(kept_bits - 1, bars - 1) + 0.5
    fig.add_shape(
        type="line", x0=line_x, x1=line_x, xref="x", y0=0, y1=1, yref="paper",
        line={"dash": "dash", "width": 1.5, "color": CUT_COLOR}, name=f"cut:{stage.name}",
    )
    fig.add_annotation(
        x=line_x, xref="x", y=1, yref="paper", text=label, font={"size": 11},
        xanchor="right" if line_x > bars / 2 else "left", yanchor="bottom",
        showarrow=True, arrowhead=0, arrowwidth=1, arrowcolor=CUT_COLOR, ax=0, ay=-_LABEL_PX * rows_above + 4,
    )


def _title(trace: Trace, step: TokenStep) -> str:
    token = token_label(trace.vocab, step.token_id)
    title = (
        f"position {step.position} · chosen “{token}” (rank {step.rank}) · "
        f"entropy {step.entropy_raw:.3f} → {step.entropy:.3f} nats (raw → processed)"
    )
    notes = []
    if step.forced:
        notes.append("forced token")
    if not step.stages:
        notes.append("no processing stages: processed = raw")
    if all(c.token_id != step.token_id for c in step.candidates):
        raw_p = fmt_p(math.exp(step.raw_logprob))
        notes.append(f"chosen token is outside the recorded top-{len(step.candidates)} (raw p {raw_p})")
    return title + ("<br>" + " · ".join(notes) if notes else "")
