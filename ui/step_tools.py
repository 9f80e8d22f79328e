"""Tools at the selected step of a run, shared by the Run and Library panels: branch from a token, explore the token
tree below the step, and re-process the step's distribution with other sampling settings."""

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import gradio as gr

from engine.explore import expand_token_tree
from engine.models import LoadedModel
from engine.params import ParamError
from engine.processing import OFF_VALUES
from engine.reprocess import recorded_settings, reprocess_step
from engine.shared_params import PIPELINE_PARAMS
from engine.run import BranchPoint, RunSettings, branch_point
from engine.trace import Trace
from ui import figures
from ui.context import AppContext, user_errors
from ui.figures.common import escape_text, token_label, visible_text
from ui.figures.tokens import fmt_p, step_at
from ui.form import decoder_choices

SAME_DECODER = "(the run's own decoder)"
# (setting, label, maximum, step): the stages a person moves to see a distribution change. Every slider starts at
# 0, so a value typed digit by digit ("0" on the way to "0.5") is not refused mid-word; a value below the stage's
# own minimum (its Param) leaves the view as it was until the value is complete.
REPROCESS_SLIDERS = (
    ("temperature", "temperature (from 0.01)", 3.0, 0.05),
    ("top_k", "top-k (0 = off)", 200, 1),
    ("top_p", "top-p (1 = off)", 1.0, 0.01),
    ("min_p", "min-p (0 = off)", 1.0, 0.01),
    ("typical_p", "typical-p (1 = off)", 1.0, 0.01),
    ("top_h", "top-H (0 = off)", 1.0, 0.01),
)
_MINIMUM = {p.name: p.min or 0.0 for p in PIPELINE_PARAMS}
TraceSource = Callable[[gr.Request, Any], Trace | None]


@dataclass
class StepTools:
    alternatives: gr.Dropdown
    typed_token: gr.Textbox
    branch_decoder: gr.Dropdown
    branch_button: gr.Button
    tree_depth: gr.Slider
    tree_children: gr.Slider
    tree_min_prob: gr.Slider
    tree_button: gr.Button
    tree: gr.Plot
    tree_node: gr.Number
    continue_button: gr.Button
    tree_state: gr.State
    sliders: list[gr.Slider]
    reset_button: gr.Button
    reprocess: gr.Plot
    note: gr.HTML


def build_step_tools(name: str) -> StepTools:
    with gr.Group(elem_id=f"{name}-step-tools"):  # accordions, not tabs: Gradio mislabels tabs nested in tabs
        note = gr.HTML(elem_id=f"{name}-tools-note")
        with gr.Accordion("Branch from this token", open=True, elem_id=f"{name}-branch"):
            with gr.Row():
                alternatives = gr.Dropdown([], label="Take instead (alternatives recorded at this step)",
                                           interactive=True, elem_id=f"{name}-branch-token")
                typed = gr.Textbox(label="…or type a token", interactive=True, elem_id=f"{name}-branch-typed")
                branch_decoder = gr.Dropdown([(SAME_DECODER, "")] + decoder_choices(), value="", filterable=True,
                                             label="Continue with", interactive=True,
                                             elem_id=f"{name}-branch-decoder")
            branch_button = gr.Button("Branch and run", variant="primary", elem_id=f"{name}-branch-button")
        with gr.Accordion("Token tree", open=False, elem_id=f"{name}-token-tree"):
            with gr.Row():
                depth = gr.Slider(1, 6, value=3, step=1, label="depth", interactive=True,
                                  elem_id=f"{name}-tree-depth")
                children = gr.Slider(1, 10, value=3, step=1, label="children per node", interactive=True,
                                     elem_id=f"{name}-tree-children")
                min_prob = gr.Slider(0, 0.5, value=0.05, step=0.01, label="probability cut", interactive=True,
                                     elem_id=f"{name}-tree-min-prob")
            tree_button = gr.Button("Expand the tree from this step", elem_id=f"{name}-tree-button")
            tree = gr.Plot(show_label=False, elem_id=f"{name}-tree")
            with gr.Row():
                tree_node = gr.Number(label="Node (click one in the tree)", precision=0, interactive=True,
                                      elem_id=f"{name}-tree-node")
                continue_button = gr.Button("Continue this node as a run", elem_id=f"{name}-tree-continue")
            tree_state = gr.State(None)
        with gr.Accordion("Re-process this step", open=False, elem_id=f"{name}-reprocess-tab"):
            with gr.Row():
                sliders = [gr.Slider(0, hi, value=OFF_VALUES[key], step=step, label=label, interactive=True,
                                     elem_id=f"{name}-reprocess-{key}")
                           for key, label, hi, step in REPROCESS_SLIDERS]
            reset = gr.Button("Reset to the run's own settings", elem_id=f"{name}-reprocess-reset")
            reprocess = gr.Plot(show_label=False, elem_id=f"{name}-reprocess")
    return StepTools(alternatives, typed, branch_decoder, branch_button, depth, children, min_prob, tree_button,
                     tree, tree_node, continue_button, tree_state, sliders, reset, reprocess, note)


def wire_step_tools(app: AppContext, tools: StepTools, position: gr.Slider, source: TraceSource, source_input: Any,
                    branch_outputs: list[Any], start_branch: Callable[..., Iterator[list[Any]]]) -> Callable:
    """Connect the tools to a panel: ``source(request, state)`` gives the panel's trace, ``start_branch`` streams a
    branch run into ``branch_outputs`` (the Run tab's views). Returns the handler that refreshes the tools for a
    newly selected step (inputs ``[source_input, position]``, outputs :func:`step_outputs`)."""
    settings_of = lambda values: {key: float(v) for (key, *_), v in zip(REPROCESS_SLIDERS, values)}  # noqa: E731

    def model_for(trace: Trace, load: bool) -> LoadedModel | None:
        """The trace's model: the live run's own, else the pool's (loaded on demand only when ``load``)."""
        live = next((lv for lv in app.live.values() if lv.trace is trace), None)
        if live is not None:
            return live.run.model
        if load:
            if app.replay_only:
                raise ParamError("this needs the run's model, and the app is in replay-only mode")
            return app.model(trace.info.model)
        loading = app.pool.status(trace.info.model)
        return loading.model if loading is not None else None

    def at_step(request: gr.Request, state: Any, pos: float) -> list[Any]:
        """New step selected: its alternatives, the run's own settings on the sliders, and the re-processed view."""
        trace = source(request, state)
        step = step_at(trace, int(pos or 0)) if trace is not None else None
        if step is None:
            note = (f"Run <code>{escape_text(trace.run_id[:12])}</code>: select a token step of a token-level run to "
                    "branch, explore or re-process it." if trace else "")
            return [gr.Dropdown(choices=[], value=None), *[gr.skip()] * len(tools.sliders), None, note]
        choices = [(f"“{visible_text(token_label(trace.vocab, c.token_id))}” raw p {fmt_p(c.raw_prob)}", c.token_id)
                   for c in step.candidates if c.token_id != step.token_id]
        own = recorded_settings(trace)
        result = reprocess_step(trace, step.position, own, model_for(trace, load=False))
        note = (f"Run <code>{escape_text(trace.run_id[:12])}</code>, output position {step.position}: the run took "
                f"“<b>{token_label(trace.vocab, step.token_id)}</b>”.")  # token_label escapes the token's text
        return [gr.Dropdown(choices=choices, value=choices[0][1] if choices else None),
                *[gr.Slider(value=own[key]) for key, *_ in REPROCESS_SLIDERS], figures.reprocess_figure(result), note]

    @user_errors
    def rerun_processing(request: gr.Request, state: Any, pos: float, *values: float) -> Any:
        trace = source(request, state)
        if trace is None or step_at(trace, int(pos or 0)) is None:
            return None
        settings = settings_of(values)
        if any(value < _MINIMUM[key] for key, value in settings.items()):
            return gr.skip()  # a value still being typed
        return figures.reprocess_figure(reprocess_step(trace, int(pos or 0), settings, model_for(trace, load=False)))

    @user_errors
    def reset_processing(request: gr.Request, state: Any, pos: float) -> list[Any]:
        trace = source(request, state)
        own = recorded_settings(trace) if trace is not None else OFF_VALUES
        figure = rerun_processing(request, state, pos, *[own[key] for key, *_ in REPROCESS_SLIDERS])
        return [*[gr.Slider(value=own[key]) for key, *_ in REPROCESS_SLIDERS], figure]

    @user_errors
    def expand(request: gr.Request, state: Any, pos: float, depth: float, children: float, cut: float) -> list[Any]:
        trace = _needed(source(request, state))
        prefix = [*trace.prompt_token_ids, *trace.output_token_ids[: int(pos or 0)]]
        tree = expand_token_tree(model_for(trace, load=True), prefix, int(depth), int(children), float(cut))
        return [figures.token_tree_figure(tree), tree]

    @user_errors
    def branch(request: gr.Request, state: Any, pos: float, token: Any, typed: str, decoder: str) -> Iterator[list[Any]]:
        trace = _needed(source(request, state))
        model = model_for(trace, load=True)
        token_id = _typed_token(model, typed) if typed and typed.strip() else token
        if token_id is None:
            raise ParamError("pick an alternative or type a token to branch with")
        point = branch_point(trace, int(pos or 0), int(token_id))
        yield from start_branch(request, trace, point, decoder or trace.info.decoder)

    @user_errors
    def continue_node(request: gr.Request, state: Any, tree: Any, node: float, decoder: str) -> Iterator[list[Any]]:
        trace = _needed(source(request, state))
        if tree is None:
            raise ParamError("expand a token tree first")
        if node is None or int(node) not in {n.id for n in tree.nodes}:
            raise ParamError(f"click a node of the tree (ids 0 to {len(tree.nodes) - 1})")
        path = tree.path_ids(int(node))
        position = len(tree.prefix_ids) - len(trace.prompt_token_ids)
        point = BranchPoint(trace.run_id, position, path[0], (*tree.prefix_ids, *path))
        yield from start_branch(request, trace, point, decoder or trace.info.decoder)

    # One listener per control, always_last: a value typed or dragged while the previous one is still being drawn
    # runs after it, so an older result never lands over a newer one.
    gr.on([position.release, position.input], at_step, [source_input, position], step_outputs(tools),
          concurrency_limit=None, trigger_mode="always_last")
    gr.on([event for slider in tools.sliders for event in (slider.release, slider.input)], rerun_processing,
          [source_input, position, *tools.sliders], tools.reprocess, concurrency_limit=None, trigger_mode="always_last")
    tools.reset_button.click(reset_processing, [source_input, position], [*tools.sliders, tools.reprocess])
    tools.tree_button.click(expand, [source_input, position, tools.tree_depth, tools.tree_children, tools.tree_min_prob],
                            [tools.tree, tools.tree_state])
    tools.branch_button.click(branch, [source_input, position, tools.alternatives, tools.typed_token,
                                       tools.branch_decoder], branch_outputs)
    tools.continue_button.click(continue_node, [source_input, tools.tree_state, tools.tree_node, tools.branch_decoder],
                                branch_outputs)
    return at_step


def step_outputs(tools: StepTools) -> list[Any]:
    return [tools.alternatives, *tools.sliders, tools.reprocess, tools.note]


def branch_settings(parent: Trace, point: BranchPoint) -> RunSettings:
    """A branch keeps its parent's budget and seed; its prompt ids come from the branch point."""
    return RunSettings(max_new_tokens=max(1, parent.info.max_new_tokens), seed=parent.info.seed, chat=parent.info.chat,
                       branch=point)


def _needed(trace: Trace | None) -> Trace:
    if trace is None:
        raise ParamError("run or open a run first")
    return trace


def _typed_token(model: LoadedModel, text: str) -> int:
    """The one token a person typed, in the run's model's vocabulary."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ParamError(f"{text!r} is {len(ids)} tokens for this model; type a single token or pick an alternative")
    return int(ids[0])
