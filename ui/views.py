"""The per-step views shared by the Run and Library tabs: built once, filled from any trace.

Each run kind gets one large primary view at full width (the candidates of a token step, the beam tree, the draft
tree of a round, the diffusion lattice, or the method's own view) with its secondary views below it. Every figure
carries its own title, so Gradio's label chips are hidden; the table's label says what the table holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.events import BeamStep, DiffusionStep, DraftRound
from engine.trace import Trace
from ui import figures
from ui.figures.common import escape_text, token_label
from ui.figures.diffusion import (
    DIFFUSION_TABLE_HEADERS, DIFFUSION_TABLE_TYPES, committed_per_step_figure, diffusion_canvas_html,
    diffusion_step_table, step_lattice_figure, step_summary,
)
from ui.figures.ffn import ffn_events, ffn_sparsity_figure
from ui.figures.methods import method_figures, method_step_count
from ui.figures.passages import has_passage_attention, passages_figure
from ui.figures.rounds import ROUND_TABLE_HEADERS, ROUND_TABLE_TYPES, round_probs_figure, round_table, rounds_stream_html

COLOR_CHOICES = ["probability", "entropy", "rank"]
STEP_TABLE_TYPES = ["number", "html", "number", "number", "str", "str"]  # token text arrives escaped
CANDIDATES_LABEL = "Top candidates at this step"
SLIDER_LABEL = "Step: output position (beam step, round or diffusion step for those runs); type a number and press Enter, drag, or click a token or chart point"


@dataclass
class Views:
    """The components of one views panel, in the order :func:`view_values` fills them."""

    stream: gr.HTML
    position: gr.Slider
    primary: gr.Plot
    secondary: gr.Plot
    detail: gr.Plot
    extra: gr.Plot
    table: gr.Dataframe
    ffn: gr.Plot  # FFN activation sparsity, for runs that captured it

    def outputs(self) -> list[Any]:
        return [self.stream, self.position, self.primary, self.secondary, self.detail, self.extra, self.table, self.ffn]


HEAVY_OUTPUTS = 6  # the outputs after the stream and the slider: skipped by a light update


def build_views(name: str) -> Views:
    stream = gr.HTML(elem_id=f"{name}-tokens")
    position = gr.Slider(0, 1, value=0, step=1, elem_id=f"{name}-position", label=SLIDER_LABEL, interactive=True)
    primary = gr.Plot(show_label=False, elem_id=f"{name}-primary", visible=False)
    with gr.Row(equal_height=False):
        secondary = gr.Plot(show_label=False, elem_id=f"{name}-timeline", visible=False)
        detail = gr.Plot(show_label=False, elem_id=f"{name}-detail", visible=False)
    extra = gr.Plot(show_label=False, elem_id=f"{name}-extra", visible=False)
    ffn = gr.Plot(show_label=False, elem_id=f"{name}-ffn", visible=False)
    table = gr.Dataframe(headers=figures.STEP_TABLE_HEADERS, datatype=_markup_safe(STEP_TABLE_TYPES),
                         label=CANDIDATES_LABEL, interactive=False, wrap=True, elem_id=f"{name}-table")
    return Views(stream, position, primary, secondary, detail, extra, table, ffn)


def step_count(trace: Trace) -> int:
    """Steps the slider ranges over: output tokens, else beam steps, draft rounds or diffusion steps."""
    tokens = len(figures.token_steps(trace))
    if tokens:
        return tokens
    return sum(isinstance(e, (BeamStep, DraftRound, DiffusionStep)) for e in trace.events) + method_step_count(trace)


def view_values(trace: Trace | None, position: int | None, color_by: str) -> list[Any]:
    """Values for :meth:`Views.outputs`; ``position`` None follows the newest step (live runs)."""
    if trace is None:
        return ["<p><i>No run selected.</i></p>", gr.Slider(0, 1, value=0), _shown(None), _shown(None), _shown(None),
                _shown(None),
                _table([], figures.STEP_TABLE_HEADERS, STEP_TABLE_TYPES), _shown(None)]
    position, last = _clamp(trace, position)
    slider = gr.Slider(0, max(last, 1), value=position, step=1)
    ffn = ffn_sparsity_figure(trace, selected=position) if ffn_events(trace) else None
    return [*_kind_values(trace, position, slider, color_by), _shown(ffn)]


def _kind_values(trace: Trace, position: int, slider: Any, color_by: str) -> list[Any]:
    """The run kind's views: the first seven of :meth:`Views.outputs`."""
    if not figures.token_steps(trace):
        if figures.draft_rounds(trace):
            return _round_values(trace, position, slider)
        if figures.diffusion_steps(trace):
            return _diffusion_values(trace, position, slider)
        if any(isinstance(e, BeamStep) for e in trace.events):
            return _beam_values(trace, position, slider, color_by)
    return _token_values(trace, position, slider, color_by)


def selected_step_values(trace: Trace | None, position: float | None, color_by: str) -> list[Any]:
    """:func:`view_values` for a step a person selected: the slider keeps what they set (an answer to an earlier
    selection, arriving late, must not take back a step typed since) unless it needs clamping into range."""
    asked = int(position or 0)
    values = view_values(trace, asked, color_by)
    if trace is not None and _clamp(trace, asked)[0] == asked:
        values[1] = gr.skip()
    return values


def light_values(trace: Trace | None, position: int | None, color_by: str, live: bool = False) -> list[Any]:
    """The first two of :meth:`Views.outputs`, the stream and the slider: cheap to send and draw at every step
    while the figures follow at a slower pace; a ``live`` run's stream carries a light chart of its entropy."""
    if trace is None:
        return ["<p><i>No run selected.</i></p>", gr.Slider(0, 1, value=0)]
    position, last = _clamp(trace, position)
    spark = figures.entropy_sparkline_html(trace) if live else ""
    return [_stream(trace, position, color_by) + spark, gr.Slider(0, max(last, 1), value=position, step=1)]


def _clamp(trace: Trace, position: int | None) -> tuple[int, int]:
    last = max(step_count(trace) - 1, 0)
    return (last if position is None else max(0, min(int(position), last))), last


def _stream(trace: Trace, position: int, color_by: str) -> str:
    """The run's text view at ``position``: token stream, rounds, canvas, or the beam's final text."""
    if figures.token_steps(trace):
        body = figures.token_stream_html(trace, color_by=color_by, selected_step=position)
    elif figures.draft_rounds(trace):
        body = rounds_stream_html(trace, selected_round=position)
    elif figures.diffusion_steps(trace):
        body = diffusion_canvas_html(trace, position)
    elif any(isinstance(e, BeamStep) for e in trace.events):
        body = _final_text_html(trace)
    else:
        body = figures.token_stream_html(trace, color_by=color_by, selected_step=None)
    return branch_note_html(trace) + body


def branch_note_html(trace: Trace) -> str:
    """For a branch run: which run and output position it branched from, and the token it took there."""
    parent = trace.info.parent
    if not parent:
        return ""
    token = token_label(trace.vocab, int(parent["token_id"]))  # escaped
    return (f'<div class="de-branch" style="opacity:0.8;font-size:0.9em;margin-bottom:4px">Branch of run '
            f'<code>{escape_text(str(parent["run_id"])[:12])}</code> at output position {int(parent["step"])}, '
            f"taking “{token}” there; the text below continues after it.</div>")


def _final_text_html(trace: Trace) -> str:
    text = escape_text(trace.output_text) if trace.output_text else "<i>no finished hypothesis yet</i>"
    return (f'<div style="white-space:pre-wrap;font-family:ui-monospace,monospace"><b>Final text</b> '
            f"({trace.status}): {text}</div>")


def _token_values(trace: Trace, position: int, slider: Any, color_by: str) -> list[Any]:
    """Token-level runs: the step's candidates large, entropy over the run and attention below; a method's own
    view takes the primary place and the candidates move below."""
    has_tokens = bool(figures.token_steps(trace))
    main, side = method_figures(trace, position)
    candidates = figures.distribution_figure(trace, position) if has_tokens else None
    timeline = figures.entropy_figure(trace, selected_step=position) if has_tokens else None
    attention = figures.attention_figure(trace, position) if position in figures.attention_steps(trace) else None
    if main is None:  # a prompt of marked passages adds its cross-passage attention below, full width
        passages = passages_figure(trace, position) if has_passage_attention(trace) else None
        primary, secondary, detail, extra = candidates, timeline, attention, passages
    else:
        primary, secondary, detail, extra = main, side if not has_tokens else timeline, candidates, side if has_tokens else attention
    rows = figures.step_table(trace, position) if has_tokens else []
    return [_stream(trace, position, color_by), slider, _shown(primary), _shown(secondary), _shown(detail), _shown(extra),
            _table(rows, figures.STEP_TABLE_HEADERS, STEP_TABLE_TYPES)]


def _beam_values(trace: Trace, position: int, slider: Any, color_by: str) -> list[Any]:
    """Beam search: the tree up to the step, and the finished hypotheses ranked."""
    rows = figures.beam_hypotheses(trace)
    return [_stream(trace, position, color_by), slider, _shown(figures.beam_tree_figure(trace, up_to_step=position)),
            _shown(None), _shown(None), _shown(None),
            _table(rows, figures.BEAM_HYPOTHESES_HEADERS, figures.BEAM_HYPOTHESES_TYPES,
                   label="Finished hypotheses, best first (normalised score = cumulative / length^penalty)")]


def _round_values(trace: Trace, position: int, slider: Any) -> list[Any]:
    """A speculative run's views: the slider walks its rounds."""
    rounds = figures.draft_rounds(trace)
    return [
        branch_note_html(trace) + rounds_stream_html(trace, selected_round=position),
        slider,
        _shown(figures.draft_tree_figure(trace, rounds[position])),
        _shown(figures.acceptance_figure(trace, selected_round=position)),
        _shown(round_probs_figure(trace, position)),
        _shown(None),
        _table(round_table(trace, position), ROUND_TABLE_HEADERS, ROUND_TABLE_TYPES,
               label=f"Nodes of round {position + 1} of {len(rounds)}: draft q, target p, verification outcome"),
    ]


def _diffusion_values(trace: Trace, position: int, slider: Any) -> list[Any]:
    """A diffusion run's views: the slider walks its denoising steps."""
    steps = figures.diffusion_steps(trace)
    attention = figures.attention_figure(trace, position) if position in figures.attention_steps(trace) else None
    return [
        branch_note_html(trace) + diffusion_canvas_html(trace, position),
        slider,
        _shown(figures.lattice_figure(trace, selected_step=steps[position].step)),
        _shown(committed_per_step_figure(trace, selected=position)),
        _shown(attention),
        _shown(step_lattice_figure(trace, position)),  # full width: one cell per position of the active block
        _table(diffusion_step_table(trace, position), DIFFUSION_TABLE_HEADERS, DIFFUSION_TABLE_TYPES,
               label=f"Positions in play at {step_summary(steps[position], len(steps))}"),
    ]


def _shown(figure: Any) -> Any:
    """A secondary panel shows only when the run kind has a figure for it (no empty boxes)."""
    return gr.update(value=figure, visible=figure is not None)  # an update keeps the figure itself (a Plot would
    # hold its serialised form)


def _table(rows: list[list], headers: list[str], types: list[str], label: str = CANDIDATES_LABEL) -> gr.Dataframe:
    """The table holds a step's candidates, a round's nodes, a diffusion step's positions or the beam's hypotheses:
    headers and label travel with the rows (an update keeps a label it does not set).

    Every text cell leaves here escaped, in a column of datatype ``"html"``: while one run kind's table replaces
    another's, the page may for a moment draw the new rows under the old column types or the old rows under the new
    ones, so no column may hold text that a neighbouring kind's ``"html"`` column would turn into markup."""
    cells = [[escape_text(cell) if kind == "str" and isinstance(cell, str) else cell for cell, kind in zip(row, types)]
             for row in rows]
    return gr.Dataframe(value=cells, headers=headers, datatype=_markup_safe(types), label=label)


def _markup_safe(types: list[str]) -> list[str]:
    """The column types with plain text shown as (escaped) HTML: see :func:`_table`."""
    return ["html" if kind == "str" else kind for kind in types]
