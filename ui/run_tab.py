"""The Run tab: the form (model, prompt, decoder and its schema-built parameters), the live run's controls, its
views and step tools. A run streams: the text view keeps up with every step, the figures follow at Pause and end."""

import time
from dataclasses import dataclass
from typing import Any, Iterator

import gradio as gr

from engine.decoders import get_decoder
from engine.models import ModelError, prompt_format
from engine.models.registry import model_names
from ui.figures.common import escape_text
from ui.context import AppContext, status_html, user_errors
from ui.form import ATTENTION_CHOICES, RunForm, decoder_choices, decoder_description, param_component
from ui.session import LiveRun
from engine.run import BranchPoint
from engine.trace import Trace
from ui.step_tools import StepTools, branch_settings, build_step_tools, wire_step_tools
from ui.views import COLOR_CHOICES, HEAVY_OUTPUTS, Views, build_views, light_values, selected_step_values, view_values

DEFAULT_DECODER = "top_p"
DEFAULT_PROMPT = "Explain entropy in one sentence."
LIGHT_INTERVAL = 0.1  # seconds between text-view updates while a run streams (every step is still recorded)
# Run and Step are wired inside the parameter form's render: until the browser holds the new decoder's form, a click
# would send the last decoder's form, or a handler the server has just replaced (Gradio answers that with "Error").
# So the page's load and a decoder change disable both buttons until the form is on the page (10 s at most, should
# its render fail).
HOLD_BUTTONS_UNTIL_FORM_JS = """(name) => {
    const buttons = ['run-button', 'step-button'].map(id => document.getElementById(id)).filter(Boolean);
    buttons.forEach(button => { button.disabled = true; });
    clearInterval(window.heldForForm);  // a quicker second change: only the latest decoder's form counts
    const started = Date.now();
    window.heldForForm = setInterval(() => {
        if (document.getElementById('params-of-' + name) || Date.now() - started > 10000) {
            clearInterval(window.heldForForm);
            buttons.forEach(button => { button.disabled = false; });
        }
    }, 50);
}"""


@dataclass
class RunTab:
    views: Views
    status: gr.HTML
    color_by: gr.Radio
    tools: StepTools
    start_branch: Any = None  # (request, parent, branch point, decoder) -> stream into this tab; set once wired

    def outputs(self) -> list[Any]:
        return [*self.views.outputs(), self.status]


def stream(live: LiveRun, color: str) -> Iterator[list[Any]]:
    """Play ``live`` to its end or a Pause: the text view (with a light live chart) at most every LIGHT_INTERVAL,
    every view at the start and at the end. Redrawing Plotly figures while the run streams would keep the browser
    seconds behind the engine (measured: ``decoding-explorer bench ui``), so the figures follow at Pause and end.

    Gradio closes this generator when its client cancels or goes away: the run is then stopped, before its next
    model call."""
    last_light = time.monotonic()
    with live.abandoned_if_closed():
        yield [*view_values(live.trace, None, color), status_html(live.trace)]
        for _ in live.play():
            now = time.monotonic()
            if live.done:
                break  # the final update below says how it ended: no earlier message may claim it
            if now - last_light >= LIGHT_INTERVAL:
                last_light = now
                yield [*light_values(live.trace, None, color, live=True), *[gr.skip()] * HEAVY_OUTPUTS, status_html(live.trace)]
        yield [*view_values(live.trace, None, color), status_html(live.trace, live.paused)]


def build_run_tab(app: AppContext) -> RunTab:
    fmt = prompt_format(app.default_model)
    with gr.Tab("Run", id="run", visible=not app.replay_only):
        # the live panel's step tools read the session's live run, not a state; this one only fills their inputs
        # (a State must sit inside a Tab: one between two Tabs makes Gradio mislabel the tabs after it)
        live_trace = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                model_box = gr.Dropdown(sorted(app.access.allowed_models) if app.access.public else model_names(),
                                        value=app.default_model, allow_custom_value=not app.access.public,
                                        interactive=True, elem_id="model", label="Model" if app.access.public else
                                        "Model (built-in name, local folder or Hub id)")
                model_status = gr.HTML(elem_id="model-status")
                prompt = gr.Textbox(label="Prompt", value=fmt.example if fmt else DEFAULT_PROMPT, lines=3, interactive=True, elem_id="prompt")
                with gr.Row():  # two rows: in one, the slider's 1024 showed as "1" and the labels wrapped
                    chat = gr.Checkbox(value=fmt.chat if fmt else True, label="Chat formatting", interactive=True, elem_id="chat")
                    seed = gr.Number(value=0, label="Seed", precision=0, interactive=True, elem_id="seed")
                    max_tokens = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens", interactive=True, scale=2,
                                           elem_id="max-new-tokens")
                with gr.Row():
                    attention = gr.Dropdown(ATTENTION_CHOICES, value="none", label="Attention capture (layers)",
                                            interactive=True, elem_id="attention")
                    ffn = gr.Checkbox(value=False, label="FFN sparsity capture", interactive=True, elem_id="ffn-capture")
                with gr.Accordion("Image (vision-language models)", open=False):
                    image = gr.Image(type="filepath", label="Image (decoders greedy, sampling, gift)", height=160,
                                     interactive=True, elem_id="image")
            with gr.Column(scale=2):
                decoder = gr.Dropdown(decoder_choices(), value=DEFAULT_DECODER, interactive=True, filterable=True,
                                      label="Decoder (type to search names, families and summaries)", elem_id="decoder")
                description = gr.HTML(_description_html(DEFAULT_DECODER), elem_id="decoder-description")
                form_slot = gr.Column()
        with gr.Row():
            run_button = gr.Button("Run / Resume", variant="primary", elem_id="run-button")
            step_button = gr.Button("Step", elem_id="step-button")
            pause_button = gr.Button("Pause", elem_id="pause-button")
            stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
            color_by = gr.Radio(COLOR_CHOICES, value="probability", label="Colour tokens by", interactive=True,
                                elem_id="live-color")
        run_status = gr.HTML(elem_id="run-status")
        views = build_views("live")
        tools = build_step_tools("live")
        model_timer = gr.Timer(1.0, active=not app.replay_only)
    tab = RunTab(views, run_status, color_by, tools)
    form_inputs = {model_box, decoder, prompt, chat, seed, max_tokens, attention, ffn, image, color_by}

    def live_or_new(request: gr.Request, form: RunForm) -> LiveRun:
        live = app.live.get(request.session_hash)
        if live is not None and not live.done:
            return live  # resume the paused run
        fmt = prompt_format(form.model)
        if fmt is not None and (warning := fmt.mismatch(form.model.strip(), form.prompt, form.chat)):
            gr.Warning(escape_text(warning))
        run = app.new_run(request.session_hash, form.model, form.decoder, form.prompt, form.params, form.settings())
        return app.start_live(request.session_hash, run)

    # on the page's load and each decoder change, before the render's own listener (Gradio runs them in this order)
    gr.on(None, None, decoder, None, js=HOLD_BUTTONS_UNTIL_FORM_JS)
    with form_slot:
        @gr.render(inputs=decoder)
        def parameter_form(name: str) -> None:  # the decoder's parameter form, built from its schema
            spec = get_decoder(name)
            widgets = []
            with gr.Column(elem_id=f"params-of-{name}"):  # tells the page's form apart from the last decoder's
                for pair in range(0, len(spec.params), 2):  # two per row: long forms stay on screen
                    with gr.Row(equal_height=False):
                        widgets += [param_component(p) for p in spec.params[pair:pair + 2]]

            def read(values: dict) -> RunForm:
                return RunForm(model=values[model_box], decoder=name, prompt=values[prompt], chat=values[chat],
                               seed=values[seed] or 0, max_new_tokens=values[max_tokens],
                               attention=values[attention], ffn=values[ffn], image=values[image],
                               params={p.name: values[w] for p, w in zip(spec.params, widgets)})

            @user_errors
            def play(values: dict, request: gr.Request) -> Iterator[list[Any]]:
                with app.request_slot(request.session_hash):
                    live = live_or_new(request, read(values))
                    yield from stream(live, values[color_by])

            @user_errors
            def step_once(values: dict, request: gr.Request) -> list[Any]:
                with app.request_slot(request.session_hash):
                    live = live_or_new(request, read(values))
                    live.step()
                return [*view_values(live.trace, None, values[color_by]), status_html(live.trace, live.paused)]

            inputs = form_inputs | set(widgets)
            run_button.click(play, inputs, tab.outputs())
            step_button.click(step_once, inputs, tab.outputs())

    def pause(request: gr.Request) -> None:
        if (live := app.live.get(request.session_hash)) is not None:
            live.pause()

    def stop(color: str, request: gr.Request) -> list[Any]:
        live = app.live.get(request.session_hash)
        if live is None:
            return [*view_values(None, None, color), ""]
        live.stop()
        return [*view_values(live.trace, None, color), status_html(live.trace)]

    def show_step(position: float, color: str, request: gr.Request) -> list[Any]:
        live = app.live.get(request.session_hash)
        return selected_step_values(live.trace if live else None, position, color)

    def choose_model(name: str) -> list[Any]:
        """Start loading the picked model; give it the prompt format its card names (the status says so)."""
        if name and name.strip():
            try:
                app.start_model(name)
            except ModelError as exc:  # a public app's allow-list
                return [gr.skip(), gr.skip(), escape_text(str(exc)), gr.Timer(active=False)]
        fmt = prompt_format(name or "")
        chat_and_prompt = [gr.skip(), gr.skip()] if fmt is None else [gr.Checkbox(value=fmt.chat),
                                                                      gr.Textbox(value=fmt.example)]
        return [*chat_and_prompt, *poll_model(name)]

    def poll_model(name: str) -> list[Any]:
        loading = app.pool.status(name or "")
        return [_model_status(app, name), gr.Timer(active=loading is not None and not loading.done.is_set())]

    def start_branch(request: gr.Request, parent: Trace, point: BranchPoint, decoder_name: str) -> Iterator[list[Any]]:
        """Stream a branch of ``parent`` as this session's live run, on the Run tab."""
        params = parent.info.params if decoder_name == parent.info.decoder else {}
        with app.request_slot(request.session_hash):
            run = app.new_run(request.session_hash, parent.info.model, decoder_name, parent.info.prompt, params,
                              branch_settings(parent, point))
            live = app.start_live(request.session_hash, run)
            switch = gr.Tabs(selected="run")
            for values in stream(live, "probability"):
                yield [*values, switch]
                switch = gr.skip()

    tab.start_branch = start_branch
    wire_step_tools(app, tools, views.position, lambda request, _: _live_trace(app, request), live_trace,
                    [*tab.outputs(), app.tabs], start_branch)
    pause_button.click(pause, None, None, concurrency_limit=None, queue=False)
    stop_button.click(stop, [color_by], [*views.outputs(), run_status], concurrency_limit=None)
    for event in (views.position.release, views.position.input, color_by.input):
        event(show_step, [views.position, color_by], views.outputs(), concurrency_limit=None)
    decoder.change(_description_html, decoder, description, queue=False)
    model_box.change(choose_model, model_box, [chat, prompt, model_status, model_timer], queue=False)
    model_timer.tick(poll_model, model_box, [model_status, model_timer], queue=False)
    return tab


def _live_trace(app: AppContext, request: gr.Request) -> Trace | None:
    live = app.live.get(request.session_hash)
    return live.trace if live is not None else None


def _description_html(name: str) -> str:
    try:
        return f"<div style='opacity:0.85'>{escape_text(decoder_description(name))}</div>"
    except ValueError:
        return ""


def _model_status(app: AppContext, name: str) -> str:
    """The model's loading state, and the prompt format its card names."""
    fmt = prompt_format(name or "")
    note = f"<div style='opacity:0.85'>Prompt format: {escape_text(fmt.note)}</div>" if fmt else ""
    loading = app.pool.status(name or "")
    if loading is None:
        return note
    label = escape_text((name or "").strip())
    if not loading.done.is_set():
        return f"Loading <b>{label}</b>: {escape_text(loading.message)}{note}"
    if loading.error:
        return f"<b>{label}</b> could not be loaded: {escape_text(loading.error)}{note}"
    return f"<b>{label}</b> is loaded{note}"
