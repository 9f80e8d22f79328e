"""The per-step views shared by the Run and Library tabs: built once, filled from any trace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.events import BeamStep, DiffusionStep, DraftRound
from engine.trace import Trace
from ui import figures
from ui.figures.rounds import ROUND_TABLE_HEADERS, ROUND_TABLE_TYPES, round_probs_figure, round_table, rounds_stream_html

COLOR_CHOICES = ["probability", "entropy", "rank"]
STEP_TABLE_TYPES = ["number", "html", "number", "number", "str", "str"]  # token text arrives escaped


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
        structure = gr.Plot(label="Beam tree / draft tree / diffusion lattice")
        attention = gr.Plot(label="Attention at this step")
    candidates = gr.Dataframe(
        headers=figures.STEP_TABLE_HEADERS,
        datatype=STEP_TABLE_TYPES,
        label="Top candidates at this step",
        interactive=False,
        wrap=True,
    )
    return Views(tokens, position, distribution, timeline, structure, attention, candidates)


def step_count(trace: Trace) -> int:
    """Steps the slider ranges over: output tokens, else beam steps, draft rounds or diffusion steps."""
    tokens = len(figures.token_steps(trace))
    if tokens:
        return tokens
    return sum(isinstance(e, (BeamStep, DraftRound, DiffusionStep)) for e in trace.events)


def view_values(trace: Trace | None, position: int | None, color_by: str) -> list[Any]:
    """Values for :meth:`Views.outputs`; ``position`` None follows the newest step (live runs)."""
    if trace is None:
        return ["<p><i>No run selected.</i></p>", gr.Slider(0, 1, value=0), None, None, None, None, None]
    has_tokens = bool(figures.token_steps(trace))
    last = max(step_count(trace) - 1, 0)
    position = last if position is None else min(int(position), last)
    if not has_tokens and figures.draft_rounds(trace):
        return _round_values(trace, position, last)
    return [
        _text_html(trace, position, color_by, has_tokens),
        gr.Slider(0, max(last, 1), value=position, step=1),
        figures.distribution_figure(trace, position) if has_tokens else None,
        figures.entropy_figure(trace, selected_step=position),
        _structure_figure(trace, position),
        figures.attention_figure(trace, position) if position in figures.attention_steps(trace) else None,
        _table(figures.step_table(trace, position) if has_tokens else [], figures.STEP_TABLE_HEADERS, STEP_TABLE_TYPES),
    ]


def _table(rows: list[list], headers: list[str], types: list[str]) -> gr.Dataframe:
    """The candidates panel holds either a step's candidates or a round's nodes: headers travel with the rows."""
    return gr.Dataframe(value=rows, headers=headers, datatype=types)


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


def _text_html(trace: Trace, position: int, color_by: str, has_tokens: bool) -> str:
    """Token stream; for a diffusion run, the canvas at the selected step."""
    steps = figures.diffusion_steps(trace)
    if steps and not has_tokens:
        return figures.canvas_html(trace, steps[min(position, len(steps) - 1)].step)
    return figures.token_stream_html(trace, color_by=color_by, selected_step=position if has_tokens else None)


def _structure_figure(trace: Trace, position: int) -> Any:
    """The decoder family's own structure at this step: beam tree, draft tree, or diffusion lattice."""
    kinds = {type(e) for e in trace.events}
    if BeamStep in kinds:
        return figures.beam_tree_figure(trace, up_to_step=position)
    if DiffusionStep in kinds:
        return figures.lattice_figure(trace, selected_step=position)
    return None
