"""Runs side by side (same prompt, different decoders or settings): aligned tokens, divergence, cost."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from engine.events import Candidate, TokenStep
from engine.trace import Trace
from ui.figures.common import (
    WINDOW,
    confidence_color,
    empty_figure,
    escape_token,
    scatter_class,
    shorten,
    style_figure,
    token_label,
    window_bounds,
    window_note,
)
from ui.figures.tokens import no_steps_reason, token_steps, token_tooltip

RUN_COLORS = plotly.colors.qualitative.Plotly
KL_FLOOR = 1e-6  # probability given to a token missing from one run's top-k list (or cut to 0 there)
_PARAMS_CHARS = 60
_CELL = "padding:1px 3px;border-radius:3px;white-space:pre;color:inherit"
_NOTE = "opacity:0.7;font-size:0.85em"
# Each decoder's parameter defaults by decoder name (engine.decoders.param_defaults()): given by the caller, so
# that the figures never load the decoders.
ParamDefaults = Mapping[str, Mapping[str, Any]]


def first_divergence(a: Trace, b: Trace) -> int | None:
    """The first output position where the two runs' tokens differ, or None.

    A finished run that is a strict prefix of the other diverges where it ends; a still-running one has not
    diverged yet (it may go on to produce the same tokens).
    """
    x, y = a.output_token_ids, b.output_token_ids
    for i, (s, t) in enumerate(zip(x, y)):
        if s != t:
            return i
    shorter = a if len(x) < len(y) else b
    if len(x) == len(y) or shorter.status == "running":
        return None
    return len(shorter.output_token_ids)


def _earliest_divergence(traces: Sequence[Trace]) -> int | None:
    # Where any run first leaves the first run; runs that agree with it agree with each other up to there.
    found = [d for t in traces[1:] if (d := first_divergence(traces[0], t)) is not None]
    return min(found, default=None)


# ---------------------------------------------------------------- labels


def _short(settings: dict[str, Any]) -> str:
    text = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())
    return shorten(text, _PARAMS_CHARS)


def short_params(traces: Sequence[Trace], defaults: ParamDefaults | None = None) -> list[str]:
    """Each run's settings worth reading: parameters off their decoder's default (given ``defaults``), and any
    parameter or seed on which runs that have it disagree."""
    settings = [{"seed": t.info.seed, **t.info.params} for t in traces]
    keys = {k for s in settings for k in s}
    differing = {k for k in keys if len({repr(s[k]) for s in settings if k in s}) > 1}
    shown = []
    for trace, s in zip(traces, settings):
        own = (defaults or {}).get(trace.info.decoder, {})  # none for a decoder this build does not know
        shown.append(_short({k: v for k, v in s.items() if k in differing or (k in own and v != own[k])}))
    return shown


def run_labels(traces: Sequence[Trace], defaults: ParamDefaults | None = None) -> list[str]:
    """Plain-text labels ``[model] decoder params · run-id prefix`` (escape them before HTML or plotly);
    the model is named only when the runs use different ones."""
    models = len({t.info.model for t in traces}) > 1
    return [
        " ".join(filter(None, [t.info.model if models else "", t.info.decoder, params, "·", t.run_id[:8]]))
        for t, params in zip(traces, short_params(traces, defaults))
    ]


# ---------------------------------------------------------------- aligned tokens


def aligned_tokens_html(
    traces: Sequence[Trace], window: tuple[int, int] | None = None, defaults: ParamDefaults | None = None
) -> str:
    """One row per run, token cells aligned by output position; shared columns before the first divergence
    are faded and the first differing column is outlined in every row. Cells are coloured by the raw
    probability of the run's token where it recorded one. The default window starts a little before the
    divergence (or at 0) and spans WINDOW positions."""
    if not traces:
        return f'<div style="{_NOTE}">No runs selected.</div>'
    total = max(len(t.output_token_ids) for t in traces)
    diverge = _earliest_divergence(traces)
    if window is None:  # a little context before the divergence, then as far as the window goes
        first = max(0, (diverge or 0) - WINDOW // 4)
        window = (first, first + WINDOW)
    start, stop = window_bounds(total, window)
    header = "".join(
        f'<th style="{_NOTE};font-weight:normal;text-align:left">{p if p % 5 == 0 or p == diverge else ""}</th>'
        for p in range(start, stop)
    )
    rows = [
        f'<tr><th style="text-align:left;padding-right:8px;white-space:nowrap">{escape_token(label)}</th>'
        + "".join(_cell(trace, steps, p, diverge) for p in range(start, stop))
        + "</tr>"
        for trace, label, steps in zip(traces, run_labels(traces, defaults), (_by_position(t) for t in traces))
    ]
    notes = [_divergence_note(diverge), window_note(start, stop, total, noun="positions")]
    if len({tuple(t.prompt_token_ids) for t in traces}) > 1:
        notes.append("the prompts differ: positions are not comparable")
    return (
        f'<div class="de-aligned" style="color:inherit"><div style="{_NOTE}">{" · ".join(filter(None, notes))}</div>'
        f'<div style="overflow-x:auto"><table style="border-collapse:separate;border-spacing:2px;'
        f'font-family:ui-monospace,monospace;color:inherit"><tr><th></th>{header}</tr>{"".join(rows)}</table></div></div>'
    )


def _by_position(trace: Trace) -> dict[int, TokenStep]:
    return {s.position: s for s in token_steps(trace)}


def _cell(trace: Trace, steps: dict[int, TokenStep], position: int, diverge: int | None) -> str:
    output = trace.output_token_ids
    if position >= len(output):
        return "<td></td>"
    token_id = output[position]
    step = steps.get(position)
    style = _CELL
    if step is not None and step.token_id == token_id:  # beam/diffusion outputs have no per-token record
        style += f";background:{confidence_color(math.exp(step.raw_logprob))}"
        title = f' title="{token_tooltip(trace, step)}"'
    else:
        title = ""
    if diverge is not None and position < diverge:
        style += ";opacity:0.55"
    elif position == diverge:
        style += ";outline:2px solid currentColor;font-weight:bold"
    return f'<td data-step="{position}"{title} style="{style}">{token_label(trace.vocab, token_id)}</td>'


def _divergence_note(diverge: int | None) -> str:
    if diverge is None:
        return "no divergence: the runs agree on every position they share"
    return f"first divergence at position {diverge} (outlined); faded positions are shared"


# ---------------------------------------------------------------- divergence over positions


def topk_kl(a: Sequence[Candidate], b: Sequence[Candidate], floor: float = KL_FLOOR) -> float:
    """KL(p_a || p_b) in nats over the union of two recorded top-k lists (processed probabilities).

    An approximation: each list only holds its top-k, so a token missing from one list (or cut to 0 there)
    gets ``floor``, and both are renormalised over the union. Identical lists give exactly 0.
    """
    pa = {c.token_id: c.prob for c in a}
    pb = {c.token_id: c.prob for c in b}
    ids = sorted(pa.keys() | pb.keys())
    p = np.maximum([pa.get(i, 0.0) for i in ids], floor)
    q = np.maximum([pb.get(i, 0.0) for i in ids], floor)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _prob_of(step: TokenStep, token_id: int) -> float:
    """Processed probability a step gave a token: exact for its own choice, else from its top-k (0 if absent)."""
    if step.token_id == token_id:
        return math.exp(step.logprob)
    return next((c.prob for c in step.candidates if c.token_id == token_id), 0.0)


def divergence_figure(traces: Sequence[Trace], defaults: ParamDefaults | None = None) -> go.Figure:
    """Per output position, each run against the first: |p_a(chosen) - p_b(same token)| and a top-k
    approximation of KL(p_a || p_b), both over the processed (sampled-from) distributions."""
    if len(traces) < 2:
        return empty_figure("Select two or more runs of the same prompt to compare.")
    base = _by_position(traces[0])
    if not base:
        return empty_figure(no_steps_reason(traces[0]))
    labels = [escape_token(label) for label in run_labels(traces, defaults)]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for i, (trace, label) in enumerate(zip(traces[1:], labels[1:])):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        other = _by_position(trace)
        diverge = first_divergence(traces[0], trace)
        # Up to and including the first divergence: the context there is still shared, so the two
        # distributions are comparable; after it each run conditions on different tokens.
        last = diverge if diverge is not None else max(base, default=0)
        positions = [p for p in range(last + 1) if p in base and p in other]
        delta = [abs(math.exp(base[p].logprob) - _prob_of(other[p], base[p].token_id)) for p in positions]
        kl = [topk_kl(base[p].candidates, other[p].candidates) for p in positions]
        scatter = scatter_class(len(positions))
        for row, name, values in ((1, "|Δp(chosen)|", delta), (2, "KL (top-k approx.)", kl)):
            fig.add_trace(
                scatter(
                    x=positions, y=values, customdata=positions, mode="lines+markers", marker={"size": 4},
                    line={"color": color}, name=label, legendgroup=label, showlegend=row == 1, meta=label,
                    hovertemplate=f"position %{{x}}<br>{name} %{{y:.4f}}<br>%{{meta}}<extra></extra>",
                ),
                row=row, col=1,
            )
        if diverge is not None:
            fig.add_shape(
                type="line", x0=diverge, x1=diverge, xref="x", y0=0, y1=1, yref="paper", name=f"diverges:{label}",
                line={"dash": "dash", "width": 1.5, "color": color},
            )
    fig.update_yaxes(title_text="|Δp(chosen)|", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="KL nats (top-k approx.)", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="output position", row=2, col=1)
    title = (
        f"Divergence of each run from {labels[0]}: processed distributions up to the first divergence (dashed)"
        f"<br>KL over the union of the recorded top-k lists, missing tokens floored at {KL_FLOOR:g}"
    )
    return style_figure(fig, title, height=480, role="primary")


# ---------------------------------------------------------------- cost


def cost_table(traces: Sequence[Trace], defaults: ParamDefaults | None = None) -> list[dict[str, Any]]:
    """One row per run for a Dataframe (plain text: show it in ``"str"`` columns, which never render HTML)."""
    rows = []
    for trace, params in zip(traces, short_params(traces, defaults)):
        m = trace.metrics
        rows.append(
            {
                "run": trace.run_id[:8],
                "model": trace.info.model,
                "decoder": trace.info.decoder,
                "params": params,
                "status": trace.status,
                "new tokens": int(m.get("new_tokens", len(trace.output_token_ids))),
                "model calls": int(m.get("model_calls", 0)),
                "tokens/call": m.get("tokens_per_call", 0.0),
                "decode s": m.get("decode_seconds", 0.0),
                "tokens/s": m.get("tokens_per_second", 0.0),
                "mean accepted": m.get("mean_accepted_tokens"),
            }
        )
    return rows
