"""The generated text as coloured token spans, and the candidate table of one step.

"Step" in these views means the output position (the index into :func:`token_steps`): for autoregressive
decoders it equals the decoder step; teacher forcing scores every position in one step.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

from engine.events import BeamStep, DiffusionStep, DraftRound, StageReport, TokenStep, r7
from engine.trace import Trace
from ui.figures.common import (
    ENTROPY_SCALE_NATS,
    RANK_BUCKETS,
    confidence_color,
    entropy_color,
    rank_color,
    rgba,
    token_label,
    window_bounds,
    window_note,
)

ColorBy = Literal["probability", "entropy", "rank"]
STEP_TABLE_HEADERS = ["rank", "token", "raw p", "processed p", "stages", "chosen"]
TOOLTIP_ALTERNATIVES = 5

_COLORS: dict[str, Callable[[TokenStep], str]] = {
    "probability": lambda s: confidence_color(math.exp(s.raw_logprob)),
    "entropy": lambda s: entropy_color(s.entropy_raw),
    "rank": lambda s: rank_color(s.rank),
}
_CONTAINER = "white-space:pre-wrap;word-break:break-word;line-height:1.9;font-family:ui-monospace,monospace;color:inherit"
_SPAN = "border-radius:3px;padding:1px 0;color:inherit;box-shadow:inset -1px 0 rgba(128,128,128,0.35)"  # a hairline between tokens
_NOTE = "opacity:0.7;font-size:0.85em;font-family:inherit"
_MARKS = (
    '<span style="text-decoration:underline dotted">forced</span> · '
    '<span style="outline:1px solid currentColor">selected</span> · <span style="opacity:0.5">prompt</span>'
)


def token_steps(trace: Trace) -> list[TokenStep]:
    """The committed token steps, in output order."""
    return [e for e in trace.events if isinstance(e, TokenStep) and e.committed]


def step_at(trace: Trace, position: int) -> TokenStep | None:
    """The committed token step at an output position, or None."""
    steps = token_steps(trace)
    if 0 <= position < len(steps) and steps[position].position == position:
        return steps[position]  # the usual case: one step per position, in order
    return next((s for s in steps if s.position == position), None)


_OTHER_VIEWS = {
    BeamStep: "Beam search keeps several hypotheses per step, not one token distribution: see the beam view.",
    DraftRound: "Speculative decoding commits tokens in verified rounds: see the draft-tree view.",
    DiffusionStep: "Diffusion decoding fills positions in parallel: see the lattice view.",
}


def no_steps_reason(trace: Trace) -> str:
    """Why a trace has no token steps to show: another decoder family, or nothing recorded yet."""
    for event in trace.events:
        if type(event) in _OTHER_VIEWS:
            return _OTHER_VIEWS[type(event)]
    return "No tokens recorded yet."


def fmt_p(p: float) -> str:
    """A probability for people: three decimals, scientific below 0.001 so the tail never reads as 0.000."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# ---------------------------------------------------------------- the token stream


def token_stream_html(
    trace: Trace,
    color_by: ColorBy = "probability",
    selected_step: int | None = None,
    window: tuple[int, int] | None = None,
) -> str:
    """The output as token spans coloured by raw chosen-token probability, raw entropy or rank bucket.

    Each span has ``data-step`` (its output position) and a tooltip; the selected step is outlined, forced
    tokens are underlined, prompt tokens (shown when the window starts at the beginning) are faded.
    Only the tokens in ``window`` (default: the last WINDOW) are rendered.
    """
    if color_by not in _COLORS:
        raise ValueError(f"color_by must be one of {', '.join(_COLORS)}, got {color_by!r}")
    steps = token_steps(trace)
    start, stop = window_bounds(len(steps), window)
    color = _COLORS[color_by]
    body = [_prompt_spans(trace)] if start == 0 else []
    body += [_token_span(trace, s, color(s), s.position == selected_step) for s in steps[start:stop]]
    note = window_note(start, stop, len(steps))
    header = _legend(color_by) + (f' · <span style="{_NOTE}">{note}</span>' if note else "")
    empty = "" if steps else f'<span style="{_NOTE}">{no_steps_reason(trace)}</span>'
    return (
        f'<div class="de-token-stream" style="color:inherit">'
        f'<div style="{_NOTE};margin-bottom:4px">{header}</div>'
        f'<div style="{_CONTAINER}">{"".join(body)}{empty}</div></div>'
    )


def _token_span(trace: Trace, step: TokenStep, background: str, selected: bool) -> str:
    text = trace.vocab.get(step.token_id, f"<{step.token_id}>")
    style = f"{_SPAN};background:{background}"
    marker = ""
    if selected:
        style += ";outline:2px solid currentColor;outline-offset:1px"
        marker = ' data-selected="true"'

    if step.forced:
        style += ";text-decoration:underline dotted;text-underline-offset:3px"
    span = (
        f'<span class="de-token" data-step="{step.position}"{marker} title="{token_tooltip(trace, step)}" style="{style}">'
        f"{token_label(trace.vocab, step.token_id)}</span>"
    )
    return span + "<br>" * text.count("\n")  # the ↵ stays visible; the line break keeps the text's shape


def token_tooltip(trace: Trace, step: TokenStep) -> str:
    """A token's tooltip, escaped for a quoted ``title`` attribute (where ``&#10;`` breaks the line)."""
    alternatives = " · ".join(
        f"“{token_label(trace.vocab, c.token_id)}” {fmt_p(c.raw_prob)}"
        for c in step.candidates[:TOOLTIP_ALTERNATIVES]
    )
    lines = [
        f"#{step.position} “{token_label(trace.vocab, step.token_id)}”" + (" (forced)" if step.forced else ""),
        f"p {fmt_p(math.exp(step.raw_logprob))} raw · {fmt_p(math.exp(step.logprob))} processed · rank {step.rank}",
        f"entropy {step.entropy_raw:.3f} nats raw · {step.entropy:.3f} processed",
        f"top: {alternatives}",
    ]
    return "&#10;".join(lines)


def _prompt_spans(trace: Trace) -> str:
    """The prompt's tokens, faded, when their texts were stored (replay needs the vocabulary)."""
    ids = trace.prompt_token_ids
    if not ids or any(t not in trace.vocab for t in ids):
        return ""
    start, _ = window_bounds(len(ids))
    skipped = f'<span style="{_NOTE}">… {start} earlier prompt tokens </span>' if start else ""
    spans = "".join(
        f'<span class="de-prompt" title="prompt token {i}" style="{_SPAN};opacity:0.5">'
        f"{token_label(trace.vocab, t)}</span>" + "<br>" * trace.vocab[t].count("\n")
        for i, t in enumerate(ids[start:], start)
    )
    return skipped + spans


def _swatch(background: str, label: str) -> str:
    return f'<span style="border-radius:3px;padding:0 4px;background:{background}">{label}</span>'


def _legend(color_by: ColorBy) -> str:
    if color_by == "rank":
        swatches = [_swatch(rgba(rgb), label) for _, label, rgb in RANK_BUCKETS]
        title = "rank of the chosen token:"
    elif color_by == "entropy":
        cap = ENTROPY_SCALE_NATS
        swatches = [_swatch(entropy_color(h), f"{h:g}") for h in (0, cap / 4, cap / 2, 3 * cap / 4)]
        swatches.append(_swatch(entropy_color(cap), f"≥{cap:g} nats"))
        title = "raw entropy:"
    else:
        swatches = [_swatch(confidence_color(p), f"p={p:g}") for p in (0.05, 0.25, 0.5, 0.75, 0.95)]
        title = "raw probability of the chosen token:"
    return f"{title} {' '.join(swatches)} · {_MARKS}"


# ---------------------------------------------------------------- the candidate table


def stage_verdict(stages: list[StageReport], index: int) -> str:
    """Which stages candidate ``index`` survived: ``"kept"``, ``"cut by top_p"``, or ``"—"`` with no stages."""
    if not stages:
        return "—"
    cut = next((s.name for s in stages if not s.survivors >> index & 1), None)
    return "kept" if cut is None else f"cut by {cut}"


def step_table(trace: Trace, step: int) -> list[list]:
    """Rows (see :data:`STEP_TABLE_HEADERS`) of the recorded candidates at output position ``step``.

    The token column is HTML-escaped: show it in a Dataframe column of datatype ``"html"``. A chosen token
    outside the recorded top-k gets a last row of its own (its stage fate is unknown, so ``"?"``).
    """
    token_step = step_at(trace, step)
    if token_step is None:
        return []
    rows = [
        [
            i + 1,
            token_label(trace.vocab, c.token_id),
            c.raw_prob,
            c.prob,
            stage_verdict(token_step.stages, i),
            "✓" if c.token_id == token_step.token_id else "",
        ]
        for i, c in enumerate(token_step.candidates)
    ]
    if all(c.token_id != token_step.token_id for c in token_step.candidates):
        rows.append(
            [
                token_step.rank,
                token_label(trace.vocab, token_step.token_id),
                r7(math.exp(token_step.raw_logprob)),
                r7(math.exp(token_step.logprob)),
                "?",
                "✓",
            ]
        )
    return rows
