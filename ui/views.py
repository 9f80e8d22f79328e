"""The per-step views shared by the Run and Library tabs: built once, filled from any trace."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from engine.events import BeamStep, DiffusionStep, DraftRound
from engine.trace import Trace
from ui import figures

COLOR_CHOICES = ["probability", "entropy", "rank"]


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
    position = gr.Slider(0, 0, value=0, step=1, label="Step (output position)")
    with gr.Row():
        distribution = gr.Plot(label="Candidates at this step: raw vs processed, with each stage's cut")
        timeline = gr.Plot(label="Entropy and chosen-token probability")
    with gr.Row():
        structure = gr.Plot(label="Beam tree / draft tree / diffusion lattice")
        attention = gr.Plot(label="Attention at this step")
    candidates = gr.Dataframe(label="Top candidates at this step", interactive=False, wrap=True)
    return Views(tokens, position, distribution, timeline, structure, attention, candidates)


def view_values(trace: Trace | None, position: int | None, color_by: str) -> list[Any]:
    """Values for :meth:`Views.outputs`; ``position`` None follows the newest step (live runs)."""
    if trace is None:
        return ["<p><i>No run selected.</i></p>", gr.Slider(0, 0, value=0), None, None, None, None, None]
    steps = figures.token_steps(trace)
    last = max(len(steps) - 1, 0)
    position = last if position is None else min(int(position), last)
    return [
        figures.token_stream_html(trace, color_by=color_by, selected_step=position),
        gr.Slider(0, last, value=position, step=1),
        figures.distribution_figure(trace, position) if steps else None,
        figures.entropy_figure(trace, selected_step=position),
        _structure_figure(trace, position),
        figures.attention_figure(trace, position) if figures.attention_steps(trace) else None,
        figures.step_table(trace, position) if steps else None,
    ]


def _structure_figure(trace: Trace, position: int) -> Any:
    """The decoder family's own structure: beam tree, last draft tree, or diffusion lattice."""
    kinds = {type(e) for e in trace.events}
    if BeamStep in kinds:
        return figures.beam_tree_figure(trace)
    if DraftRound in kinds:
        rounds = figures.draft_rounds(trace)
        return figures.draft_tree_figure(trace, len(rounds) - 1)
    if DiffusionStep in kinds:
        return figures.lattice_figure(trace)
    return None
