"""The distribution at one output position: raw vs processed top-k bars, and where each stage cut."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import plotly.graph_objects as go

from engine.events import TokenStep
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
TICK_CHARS = 14  # a candidate's tick label is cut to this many characters; the hover has it whole
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
    ticks = [token_label(trace.vocab, c.token_id, TICK_CHARS) for c in candidates]
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
    ticks = [f"<b>{label}</b>" if i == chosen else label for i, label in enumerate(ticks)]
    fig.update_xaxes(tickvals=x, ticktext=ticks, tickangle=-45, range=[-0.6, len(x) - 0.4])
    fig.update_yaxes(title_text="probability", rangemode="tozero")
    fig.update_layout(barmode="group", bargap=0.25)
    if chosen is not None:
        top = max(candidates[chosen].raw_prob, candidates[chosen].prob)
        fig.add_shape(
            type="rect", x0=chosen - 0.45, x1=chosen + 0.45, y0=0, y1=top,
            line={"color": CHOSEN_COLOR, "width": 2.5}, name="chosen",
        )
    cuts = [Cut(stage.name, stage.kept, stage.mass, stage.threshold, survivor_flags(stage.survivors, len(step.candidates)))
            for stage in step.stages]
    return finish_with_cuts(fig, _title(trace, step), cuts, len(x))


@dataclass(frozen=True)
class Cut:
    """One processing stage's cut, as drawn: its name, tokens kept (over the whole vocabulary, or the candidates
    it saw), their mass, its threshold, and which of the listed candidates survived it (cumulatively)."""

    name: str
    kept: int
    mass: float
    threshold: float | None
    survivors: Sequence[bool]


def survivor_flags(mask: int, count: int) -> list[bool]:
    """A StageReport's survivor bitmask as one flag per candidate."""
    return [bool(mask >> i & 1) for i in range(max(count, mask.bit_length()))]


def finish_with_cuts(fig: go.Figure, title: str, cuts: Sequence[Cut], bars: int) -> go.Figure:
    """Draw every stage's cut over candidate bars (see :func:`add_cut`), then style the figure with room above the
    plot for the stacked stage labels. Shared by the recorded distribution and its re-processed version."""
    for i, cut in enumerate(cuts):
        add_cut(fig, cut, rows_above=i + 1, bars=bars)
    style_figure(fig, title, height=400 + _LABEL_PX * len(cuts), role="primary")
    # the stage labels stack between the title and the plot
    return fig.update_layout(margin_t=fig.layout.margin.t + _LABEL_PX * len(cuts))


def add_cut(fig: go.Figure, cut: Cut, rows_above: int, bars: int) -> None:
    """A dashed line after the last candidate the stage kept (clamped to the drawn bars), and its label in
    a row of its own above the plot, joined to the line's top. Stages only ever shrink the kept set, so later
    stages cut further left: stacking them higher keeps each joining line clear of the labels below it."""
    kept_bits = max((i + 1 for i, kept in enumerate(cut.survivors) if kept), default=0)
    label = f"{escape_token(cut.name)}: kept {cut.kept:,} ({cut.mass:.1%} of mass)"
    if cut.threshold is not None:
        label += f", threshold {cut.threshold:.3g}"
    if not all(cut.survivors[:kept_bits]):
        label += ", not a prefix"  # e.g. typical sampling or a repetition penalty reorder the candidates
    line_x = min(kept_bits - 1, bars - 1) + 0.5
    fig.add_shape(
        type="line", x0=line_x, x1=line_x, xref="x", y0=0, y1=1, yref="paper",
        line={"dash": "dash", "width": 1.5, "color": CUT_COLOR}, name=f"cut:{cut.name}",
    )
    fig.add_annotation(
        x=line_x, xref="x", y=1, yref="paper", text=label, font={"size": 11},
        xanchor="right" if line_x > bars / 2 else "left", yanchor="bottom",
        showarrow=True, arrowhead=0, arrowwidth=1, arrowcolor=CUT_COLOR, ax=0, ay=-_LABEL_PX * rows_above + 4,
    )


def _title(trace: Trace, step: TokenStep) -> str:
    token = token_label(trace.vocab, step.token_id)
    title = (
        f"Next-token candidates at position {step.position}: raw (model) vs processed (sampled from)<br>"
        f"chosen “{token}” (rank {step.rank}) · entropy {step.entropy_raw:.3f} → {step.entropy:.3f} nats (raw → processed)"
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
