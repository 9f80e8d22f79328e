"""The Compare tab: two or more runs picked by label, aligned token by token with the first divergence outlined,
per-step differences and a cost table; a branch opens beside its parent, aligned at the branch point."""

import dataclasses
from typing import Any

import gradio as gr

from engine.decoders import param_defaults
from engine.events import TokenStep
from engine.params import ParamError
from engine.trace import Trace
from ui import figures
from ui.context import AppContext, user_errors
from ui.figures.common import token_label
from ui.library_tab import RUN_TABLE_LIMIT, LibraryTab


def build_compare_tab(app: AppContext, library: LibraryTab) -> None:
    with gr.Tab("Compare", id="compare"):
        compare_ids = gr.Dropdown([], multiselect=True, interactive=True, filterable=True, elem_id="compare-ids",
                                  label="Runs to compare (same prompt, different decoders or settings): type to search")
        compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
        note = gr.HTML(elem_id="compare-note")
        aligned = gr.HTML(elem_id="compare-aligned")
        divergence = gr.Plot(show_label=False, elem_id="compare-divergence")
        sharpness = gr.Plot(show_label=False, elem_id="compare-sharpness")
        costs = gr.Dataframe(label="Speed and cost", interactive=False, elem_id="compare-costs")

    def labelled_runs(session: str) -> list[tuple[str, str]]:
        return [(figures.run_label(r), r.run_id) for r in app.list_runs(session, limit=RUN_TABLE_LIMIT)]

    def choices(request: gr.Request) -> Any:
        return gr.Dropdown(choices=labelled_runs(request.session_hash))

    @user_errors
    def compare(ids: list[str], request: gr.Request) -> list[Any]:
        if not ids or len(ids) < 2:
            raise ParamError("pick at least two runs")
        traces = [app.load(request.session_hash, i) for i in ids]
        return ["", *_compared(traces)]

    @user_errors
    def compare_with_parent(run_id: str, request: gr.Request) -> list[Any]:
        branch = app.load(request.session_hash, run_id)
        parent_info = branch.info.parent
        if not parent_info:
            raise ParamError("this run is not a branch: open a branch run (the Library lists them under their parent)")
        parent = app.load(request.session_hash, parent_info["run_id"])
        parent_view, step, taken = aligned_at_branch(parent, branch)
        note = (f"Branch point: at output position {step} the parent took “{token_label(parent.vocab, taken)}” and the "
                f"branch took “{token_label(branch.vocab, int(parent_info['token_id']))}”; both are aligned from the "
                "next token on.")
        picker = gr.Dropdown(choices=labelled_runs(request.session_hash), value=[parent.run_id, branch.run_id])
        return [picker, note, *_compared([parent_view, branch]), gr.Tabs(selected="compare")]

    library.runs_table.change(choices, None, compare_ids)
    compare_button.click(compare, compare_ids, [note, aligned, divergence, sharpness, costs])
    library.compare_parent.click(compare_with_parent, library.run_id,
                                 [compare_ids, note, aligned, divergence, sharpness, costs, app.tabs])


def _compared(traces: list[Trace]) -> list[Any]:
    defaults = param_defaults()
    rows = figures.cost_table(traces, defaults)
    table = gr.Dataframe(value=[list(r.values()) for r in rows], headers=list(rows[0])) if rows else None
    return [figures.aligned_tokens_html(traces, defaults=defaults), figures.divergence_figure(traces, defaults),
            figures.sharpness_figure(traces, defaults), table]


def aligned_at_branch(parent: Trace, branch: Trace) -> tuple[Trace, int, int]:
    """The parent from the token after the branch point on, its positions shifted so that they line up with the
    branch's own output; also the branch position and the token the parent took there."""
    step = int(branch.info.parent["step"])
    if step >= len(parent.output_token_ids):
        raise ParamError(f"the parent has no output token at the branch position {step}")
    events = [dataclasses.replace(e, position=e.position - step - 1) for e in parent.events
              if isinstance(e, TokenStep) and e.committed and e.position > step]
    view = dataclasses.replace(parent, events=events, output_token_ids=parent.output_token_ids[step + 1:],
                               output_text=parent.text_of(parent.output_token_ids[step + 1:]))
    return view, step, parent.output_token_ids[step]
