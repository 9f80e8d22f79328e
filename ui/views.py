"""The per-step views shared by the Run and Library tabs: built once, filled from any trace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.events import BeamStep, DiffusionStep, DraftRound
from engine.trace import Trace
from ui import figures
from ui.figures.diffusion import (
    DIFFUSION_TABLE_HEADERS, DIFFUSION_TABLE_TYPES, committed_per_step_figure, diffusion_canvas_html,
    diffusion_step_table, step_lattice_figure, step_summary,
)
from ui.figures.methods import method_figures, method_step_count
from ui.figures.rounds import ROUND_TABLE_HEADERS, ROUND_TABLE_TYPES, round_probs_figure, round_table, rounds_stream_html

COLOR_CHOICES = ["probability", "entropy", "rank"]
STEP_TABLE_TYPES = ["number", "html", "number", "number", "str", "str"]  # token text arrives escaped
CANDIDATES_LABEL = "Top candidates at this step"


@dataclass
class Views:
    """The components of one views panel, in the order :func:`view_values` fills them."""

    tokens: gr.HTML
    position: gr.Slider
    distribution: gr.Plot
    timeline: gr.Plot
    structure: gr.Plot
    attention: gr.Plot
    candidates: gr.Dataframe

    def outputs(self) -> list[Any]:
        return [self.tokens, self.position, self.distribution, self.timeline, self.structure, self.attention, self.candidates]


def build_views(name: str) -> Views:
    tokens = gr.HTML(label="Tokens", elem_id=f"{name}-tokens")
    position = gr.Slider(
        0, 1, value=0, step=1, elem_id=f"{name}-position",
        label="Step (output position, or beam step / round / diffusion step) — or click a token or a chart point",
    )
    with gr.Row():
        distribution = gr.Plot(label="Candidates at this step: raw vs processed, with each stage's cut")
        timeline = gr.Plot(label="Entropy and chosen-token probability", elem_id=f"{name}-timeline")
    with gr.Row():
        structure = gr.Plot(label="Beam tree / draft tree / diffusion lattice / the method's own view")
        attention = gr.Plot(label="Attention at this step, or the method's per-step view")
    candidates = gr.Dataframe(
        headers=figures.STEP_TABLE_HEADERS,
        datatype=STEP_TABLE_TYPES,
        label=CANDIDATES_LABEL,
        interactive=False,
        wrap=True,
    )
    return Views(tokens, position, distribution, timeline, structure, attention, candidates)


def step_count(trace: Trace) -> int:
    """Steps the slider ranges over: output tokens, else beam steps, draft rounds or diffusion steps."""
    tokens = len(figures.token_steps(trace))
    if tokens:
        return tokens
    return sum(isinstance(e, (BeamStep, DraftRound, DiffusionStep)) for e in trace.events) + method_step_count(trace)


def view_values(trace: Trace | None, position: int | None, color_by: str) -> list[Any]:
    """Values for :meth:`Views.outputs`; ``position`` None follows the newest step (live runs)."""
    if trace is None:
        return ["<p><i>No run selected.</i></p>", gr.Slider(0, 1, value=0), None, None, None, None, None]
    has_tokens = bool(figures.token_steps(trace))
    last = max(step_count(trace) - 1, 0)
    position = last if position is None else min(int(position), last)
    if not has_tokens and figures.draft_rounds(trace):
        return _round_values(trace, position, last)
    if not has_tokens and figures.diffusion_steps(trace):
        return _diffusion_values(trace, position, last)
    main, side = method_figures(trace, position)
    attention = figures.attention_figure(trace, position) if position in figures.attention_steps(trace) else None
    return [
        _text_html(trace, position, color_by, has_tokens),
        gr.Slider(0, max(last, 1), value=position, step=1),
        figures.distribution_figure(trace, position) if has_tokens else None,
        figures.entropy_figure(trace, selected_step=position) if has_tokens or side is None else side,
        main if main is not None else _structure_figure(trace, position),
        attention if attention is not None else side if has_tokens else None,
        _table(figures.step_table(trace, position) if has_tokens else [], figures.STEP_TABLE_HEADERS, STEP_TABLE_TYPES),
    ]


def _table(rows: list[list], headers: list[str], types: list[str], label: str = CANDIDATES_LABEL) -> gr.Dataframe:
    """The candidates panel holds a step's candidates, a round's nodes or a diffusion step's positions: headers
    and label travel with the rows (an update keeps a label it does not set)."""
    return gr.Dataframe(value=rows, headers=headers, datatype=types, label=label)


def _round_values(trace: Trace, position: int, last: int) -> list[Any]:
    """A speculative run's views: the slider walks its rounds."""
    rounds = figures.draft_rounds(trace)
    return [
        rounds_stream_html(trace, selected_round=position),
        gr.Slider(0, max(last, 1), value=position, step=1),
        round_probs_figure(trace, position),
        figures.acceptance_figure(trace, selected_round=position),
        figures.draft_tree_figure(trace, rounds[position]),
        None,
        _table(round_table(trace, position), ROUND_TABLE_HEADERS, ROUND_TABLE_TYPES),
    ]


def _diffusion_values(trace: Trace, position: int, last: int) -> list[Any]:
    """A diffusion run's views: the slider walks its denoising steps."""
    steps = figures.diffusion_steps(trace)
    return [
        diffusion_canvas_html(trace, position),
        gr.Slider(0, max(last, 1), value=position, step=1),
        step_lattice_figure(trace, position),
        committed_per_step_figure(trace, selected=position),
        figures.lattice_figure(trace, selected_step=steps[position].step),
        figures.attention_figure(trace, position) if position in figures.attention_steps(trace) else None,
        _table(diffusion_step_table(trace, position), DIFFUSION_TABLE_HEADERS, DIFFUSION_TABLE_TYPES,
               label=f"Positions in play at {step_summary(steps[position], len(steps))}"),
    ]


def _text_html(trace: Trace, position: int, color_by: str, has_tokens: bool) -> str:
    """The token stream, with the selected step outlined when the run has token steps."""
    return figures.token_stream_html(trace, color_by=color_by, selected_step=position if has_tokens else None)


def _structure_figure(trace: Trace, position: int) -> Any:
    """The beam tree up to this step for beam search (rounds and diffusion steps have their own views)."""
    if any(isinstance(e, BeamStep) for e in trace.events):
        return figures.beam_tree_figure(trace, up_to_step=position)
    return None
