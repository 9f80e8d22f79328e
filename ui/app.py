"""The Gradio app: run a decoder live (run, step, pause, stop), replay and manage saved traces, compare runs.

No ``from __future__ import annotations`` here: Gradio finds ``gr.Request`` parameters by their real annotation.

The UI only wires engine, storage and the pure figure functions in ``ui.figures`` together.
"""


import html
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from engine.attention import AttentionCapture
from engine.decoders import all_decoders, get_decoder
from engine.events import TraceFormatError
from engine.models import BUILTIN_NAMES, LoadedModel, ModelError, load_model
from engine.params import Param, ParamError
from engine.run import Run, RunSettings
from storage import RunExists, RunNotFound, TraceStore
from ui import figures
from ui.samples import import_samples
from ui.session import LiveRun
from ui.views import COLOR_CHOICES, build_views, step_count, view_values

DEFAULT_MODEL = "smollm2-135m-instruct"
# Clicking a token (its data-step) or a point of the entropy chart (its customdata) moves that panel's
# step slider, which then redraws every view through the slider's own event.
CLICK_TO_SELECT_JS = """
() => {
  const select = (panel, step) => {
    const input = document.querySelector(`#${panel}-position input[type=number]`);
    if (!input || step === undefined || step === null) return;
    input.value = String(step);
    for (const kind of ["input", "change"]) input.dispatchEvent(new Event(kind, {bubbles: true}));
    const range = document.querySelector(`#${panel}-position input[type=range]`);
    if (range) { range.value = String(step); range.dispatchEvent(new Event("input", {bubbles: true}));
                 range.dispatchEvent(new Event("pointerup", {bubbles: true})); range.dispatchEvent(new Event("change", {bubbles: true})); }
  };
  document.addEventListener("click", (event) => {
    const span = event.target.closest("[data-step]");
    const panel = span && span.closest("[id$='-tokens']");
    if (panel) select(panel.id.replace(/-tokens$/, ""), span.dataset.step);
  });
  setInterval(() => {
    for (const name of ["live", "replay"]) {
      const plot = document.querySelector(`#${name}-timeline .js-plotly-plot`);
      if (plot && plot.on && !plot.dataset.deHooked) {
        plot.dataset.deHooked = "1";
        plot.on("plotly_click", (data) => select(name, data.points[0].customdata));
      }
    }
  }, 500);
}
"""
# System fonts only: the default theme's web font would be fetched from the internet.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
STREAM_INTERVAL = 0.1  # seconds between UI updates while a run streams (every step is still recorded)
USER_ERRORS = (ParamError, ModelError, TraceFormatError, RunNotFound, RunExists, ValueError)


class ModelPool:
    """Models loaded once per process and shared by all sessions (inference does not mutate them)."""

    def __init__(self) -> None:
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> LoadedModel:
        with self._lock:
            if name not in self._models:
                self._models[name] = load_model(name.strip())
            return self._models[name]


LIVE: dict[str, LiveRun] = {}  # session hash -> that session's live run


def _param_component(param: Param) -> gr.components.Component:
    if param.type == "bool":
        return gr.Checkbox(value=param.default, label=param.name, info=param.help)
    if param.type == "choice":
        return gr.Dropdown(choices=list(param.choices or ()), value=param.default, label=param.name, info=param.help)
    if param.type in ("int", "float") and param.min is not None and param.max is not None and param.max - param.min <= 100:
        step = 1 if param.type == "int" else 0.01
        return gr.Slider(param.min, param.max, value=param.default, step=step, label=param.name, info=param.help)
    if param.type in ("int", "float"):
        return gr.Number(value=param.default, label=param.name, info=param.help, precision=0 if param.type == "int" else None)
    return gr.Textbox(value=param.default, label=param.name, info=param.help)


def _status(trace) -> str:
    m = trace.metrics
    reason = html.escape(trace.reason)  # may quote user input (a parameter value, an exception message)
    speculative = (
        f" · {m['mean_accepted_tokens']} tokens per target call · acceptance {m.get('acceptance_rate', 0):.0%}"
        if "mean_accepted_tokens" in m
        else ""
    )
    calls = (figures.diffusion_summary(trace) if figures.diffusion_steps(trace)
             else f"{m.get('model_calls', 0)} model calls{speculative}")
    return (
        f"**{trace.status}** {('— ' + reason) if reason else ''} · {m.get('new_tokens', 0)} tokens · "
        f"{calls} · {m.get('tokens_per_second', 0)} tok/s · "
        f"run `{trace.run_id[:12]}`"
    )


def build(model_name: str = DEFAULT_MODEL, db_url: str | None = None, replay_only: bool = False) -> gr.Blocks:
    store = TraceStore(db_url)
    import_samples(store)
    pool = ModelPool()
    notice = ""
    if not replay_only:
        try:
            pool.get(model_name)  # at start-up, so the first Run streams at once
        except ModelError as exc:
            replay_only, notice = True, f"Replay-only mode: {exc}"

    def start(session: str, sessions_runs: list[str], model: str, decoder: str, prompt: str, chat: bool, seed: float,
              max_tokens: float, attention: str, image: str | None, params: dict[str, Any]) -> LiveRun:
        if not prompt.strip():
            raise ParamError("type a prompt first")
        capture = None if attention == "none" else AttentionCapture(layers=attention)
        settings = RunSettings(max_new_tokens=int(max_tokens), seed=int(seed), chat=chat, attention=capture,
                               image=image or None)
        live = LiveRun(Run(pool.get(model), decoder, prompt, params, settings, sinks=[store.sink()]))
        old = LIVE.pop(session, None)
        if old is not None and not old.done:
            old.stop()
        LIVE[session] = live
        sessions_runs.append(live.trace.run_id)
        return live

    with gr.Blocks(title="Decoding Explorer") as demo:
        # API for outside programs (gradio_client); registered first so they keep these names
        def api_record(model: str, decoder_name: str, prompt_text: str, params: dict, seed_value: int = 0,
                       max_new_tokens: int = 64, chat_on: bool = False) -> dict:
            """Record a run to the end and return the same summary as ``decoding-explorer record --json``."""
            try:
                settings = RunSettings(max_new_tokens=int(max_new_tokens), seed=int(seed_value), chat=bool(chat_on))
                run = Run(pool.get(model), decoder_name, prompt_text, params or {}, settings, sinks=[store.sink()])
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None
            return run.to_end().summary()

        def api_list_runs(limit: int = 50) -> list[dict]:
            """Stored runs, newest first."""
            return [r.__dict__ for r in store.list_runs(limit=int(limit))]

        gr.api(api_record, api_name="record")
        gr.api(api_list_runs, api_name="list_runs")

        my_runs = gr.State([])  # this session's run ids
        gr.Markdown(f"# Decoding Explorer\nTraces are saved to `{store.url}`. {notice}")
        color_by = gr.Radio(COLOR_CHOICES, value="probability", label="Colour tokens by")

        # ------------------------------------------------------------ Run
        with gr.Tab("Run", visible=not replay_only):
            with gr.Row():
                with gr.Column(scale=2):
                    model_box = gr.Dropdown(BUILTIN_NAMES, value=model_name, allow_custom_value=True, label="Model (built-in name, local folder or Hub id)")
                    prompt = gr.Textbox(label="Prompt", value="Explain entropy in one sentence.", lines=3)
                    with gr.Row():
                        chat = gr.Checkbox(value=True, label="Chat formatting")
                        seed = gr.Number(value=0, label="Seed", precision=0)
                        max_tokens = gr.Slider(1, 1024, value=64, step=1, label="Max new tokens")
                        attention = gr.Dropdown(["none", "last", "mean", "all"], value="none", label="Attention capture (layers)")
                    image = gr.Image(type="filepath", label="Image (vision-language models; decoders greedy, sampling, gift)",
                                     height=160)
                    decoder = gr.Dropdown([s.name for s in all_decoders()], value="top_p", label="Decoder", elem_id="decoder")
                    with gr.Row():
                        run_button = gr.Button("Run / Resume", variant="primary", elem_id="run-button")
                        step_button = gr.Button("Step", elem_id="step-button")
                        pause_button = gr.Button("Pause", elem_id="pause-button")
                        stop_button = gr.Button("Stop", variant="stop", elem_id="stop-button")
                    run_status = gr.Markdown(elem_id="run-status")

                    @gr.render(inputs=decoder)
                    def form(name: str) -> None:  # the decoder's parameter form, built from its schema
                        spec = get_decoder(name)
                        components = [_param_component(p) for p in spec.params]
                        inputs = [my_runs, model_box, decoder, prompt, chat, seed, max_tokens, attention, image, color_by,
                                  *components]
                        run_button.click(play, inputs, [*live_views.outputs(), run_status, my_runs])
                        step_button.click(step_once, inputs, [*live_views.outputs(), run_status, my_runs])

                with gr.Column(scale=3):
                    live_views = build_views("live")

        def _params(decoder_name: str, values: tuple[Any, ...]) -> dict[str, Any]:
            return dict(zip((p.name for p in get_decoder(decoder_name).params), values))

        def _live(request: gr.Request, runs: list[str], model: str, decoder_name: str, prompt_text: str, chat_on: bool,
                  seed_value: float, tokens: float, attn: str, image_path: str | None, values: tuple[Any, ...]) -> LiveRun:
            live = LIVE.get(request.session_hash)
            if live is None or live.done:  # otherwise resume the paused run
                live = start(request.session_hash, runs, model, decoder_name, prompt_text, chat_on, seed_value, tokens, attn,
                             image_path, _params(decoder_name, values))
            return live

        def play(request: gr.Request, runs, model, decoder_name, prompt_text, chat_on, seed_value, tokens, attn, image_path, color,
                 *values) -> Iterator[list[Any]]:
            try:
                live = _live(request, runs, model, decoder_name, prompt_text, chat_on, seed_value, tokens, attn, image_path, values)
                last = 0.0
                for _ in live.play():
                    if time.monotonic() - last >= STREAM_INTERVAL:
                        last = time.monotonic()
                        yield [*view_values(live.trace, None, color), _status(live.trace), runs]
                yield [*view_values(live.trace, None, color), _status(live.trace), runs]
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None

        def step_once(request: gr.Request, runs, model, decoder_name, prompt_text, chat_on, seed_value, tokens, attn, image_path,
                      color, *values) -> list[Any]:
            try:
                live = _live(request, runs, model, decoder_name, prompt_text, chat_on, seed_value, tokens, attn, image_path, values)
                live.step()
                return [*view_values(live.trace, None, color), _status(live.trace), runs]
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None

        def pause(request: gr.Request) -> None:
            if (live := LIVE.get(request.session_hash)) is not None:
                live.pause()

        def stop(color: str, request: gr.Request) -> list[Any]:
            live = LIVE.get(request.session_hash)
            if live is None:
                return [*view_values(None, None, color), ""]
            live.stop()
            return [*view_values(live.trace, None, color), _status(live.trace)]

        def show_live_step(position: int, color: str, request: gr.Request) -> list[Any]:
            live = LIVE.get(request.session_hash)
            return view_values(live.trace if live else None, position, color)

        pause_button.click(pause, None, None, concurrency_limit=None)
        stop_button.click(stop, [color_by], [*live_views.outputs(), run_status], concurrency_limit=None)
        live_views.position.release(show_live_step, [live_views.position, color_by], live_views.outputs(), concurrency_limit=None)

        # ------------------------------------------------------------ Library
        with gr.Tab("Library"):
            replay = gr.State(None)  # the opened trace
            with gr.Row():
                filter_model = gr.Textbox(label="Model", scale=1)
                filter_decoder = gr.Dropdown([""] + [s.name for s in all_decoders()], value="", label="Decoder", scale=1)
                filter_text = gr.Textbox(label="Search prompt/output", scale=2, elem_id="filter-text")
                filter_since = gr.Textbox(label="From date (YYYY-MM-DD)", scale=1)
                filter_until = gr.Textbox(label="Before date (YYYY-MM-DD)", scale=1)
                mine_only = gr.Checkbox(label="Only this session's runs", value=False)
                refresh = gr.Button("Refresh", elem_id="refresh-runs")
            runs_table = gr.Dataframe(
                headers=["run id", "created", "model", "decoder", "status", "tokens", "prompt"],
                interactive=False,
                elem_id="runs-table",
                wrap=True,
            )
            with gr.Row():
                run_id_box = gr.Textbox(label="Run id (click a row, or type a prefix)", scale=3, elem_id="run-id")
                open_button = gr.Button("Open", variant="primary", elem_id="open-run")
                delete_button = gr.Button("Delete", variant="stop")
                export_button = gr.Button("Export JSON")
            with gr.Row():
                export_file = gr.File(label="Exported trace", interactive=False)
                import_file = gr.File(label="Import a JSON trace (.json or .json.gz)", file_types=[".json", ".gz"], elem_id="import-file")
            library_status = gr.Markdown(elem_id="library-status")
            with gr.Row():
                play_button = gr.Button("▶ Play")
                pause_replay = gr.Button("⏸ Pause")
            ticker = gr.Timer(0.4, active=False)
            replay_views = build_views("replay")

        def list_runs(model: str, decoder_name: str, text: str, since: str, until: str, mine: bool, runs: list[str]) -> list[list[Any]]:
            rows = store.list_runs(
                model=model or None, decoder=decoder_name or None, text=text or None,
                since=since.strip() or None, until=until.strip() or None, limit=200,
            )
            if mine:
                rows = [r for r in rows if r.run_id in runs]
            return [[r.run_id, r.created_at, r.model, r.decoder, r.status, r.metrics.get("new_tokens", 0), r.prompt[:80]] for r in rows]

        def pick_row(evt: gr.SelectData, table: Any) -> str:
            row = evt.index[0]
            return str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])

        def open_run(run_id: str, color: str) -> list[Any]:
            try:
                trace = store.load(run_id.strip())
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None
            return [trace, *view_values(trace, 0, color), _status(trace)]

        def show_replay_step(trace, position: int, color: str) -> list[Any]:
            return view_values(trace, position, color)

        def tick(trace, position: int, color: str) -> list[Any]:
            if trace is None:
                return [*view_values(None, None, color), gr.Timer(active=False)]
            last = max(step_count(trace) - 1, 0)
            nxt = min(int(position) + 1, last)
            return [*view_values(trace, nxt, color), gr.Timer(active=nxt < last)]

        def delete_run(run_id: str) -> str:
            try:
                return "Deleted." if store.delete(run_id.strip()) else f"No run {run_id!r}."
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None

        def export_run(run_id: str) -> str:
            try:
                full = store.resolve(run_id.strip())
                path = Path(tempfile.mkdtemp(prefix="decoding-explorer-")) / f"trace-{full[:12]}.json.gz"
                return str(store.export_file(full, path))
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None

        def import_run(file: Any) -> tuple[str, str]:
            if file is None:
                return gr.update(), ""
            try:
                run_id = store.import_file(file if isinstance(file, str) else file.name, new_id=True)
            except USER_ERRORS as exc:
                raise gr.Error(f"Import refused: {exc}") from None
            return run_id, f"Imported as run `{run_id[:12]}`."

        filters = [filter_model, filter_decoder, filter_text, filter_since, filter_until, mine_only, my_runs]
        for trigger in (refresh.click, filter_decoder.change, mine_only.change, filter_text.submit, filter_model.submit,
                        filter_since.submit, filter_until.submit):
            trigger(list_runs, filters, runs_table)
        demo.load(list_runs, filters, runs_table)
        runs_table.select(pick_row, runs_table, run_id_box)
        open_button.click(open_run, [run_id_box, color_by], [replay, *replay_views.outputs(), library_status])
        run_id_box.submit(open_run, [run_id_box, color_by], [replay, *replay_views.outputs(), library_status])
        replay_views.position.change(show_replay_step, [replay, replay_views.position, color_by], replay_views.outputs())
        color_by.change(show_replay_step, [replay, replay_views.position, color_by], replay_views.outputs())
        play_button.click(lambda: gr.Timer(active=True), None, ticker)
        pause_replay.click(lambda: gr.Timer(active=False), None, ticker)
        ticker.tick(tick, [replay, replay_views.position, color_by], [*replay_views.outputs(), ticker])
        delete_button.click(delete_run, run_id_box, library_status).then(list_runs, filters, runs_table)
        export_button.click(export_run, run_id_box, export_file)
        import_file.upload(import_run, import_file, [run_id_box, library_status]).then(list_runs, filters, runs_table)

        # ------------------------------------------------------------ Compare
        with gr.Tab("Compare"):
            compare_ids = gr.Dropdown([], multiselect=True, allow_custom_value=True, label="Runs to compare (same prompt, different decoders or settings)", elem_id="compare-ids")
            compare_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            aligned = gr.HTML(elem_id="compare-aligned")
            divergence = gr.Plot(label="Per-step difference against the first run (up to the first divergence)")
            costs = gr.Dataframe(label="Speed and cost", interactive=False)

        def compare_choices(runs_rows: Any) -> Any:
            ids = [r.run_id for r in store.list_runs(limit=200)]
            return gr.Dropdown(choices=ids)

        def compare(ids: list[str]) -> list[Any]:
            if not ids or len(ids) < 2:
                raise gr.Error("pick at least two runs")
            try:
                traces = [store.load(i) for i in ids]
            except USER_ERRORS as exc:
                raise gr.Error(str(exc)) from None
            rows = figures.cost_table(traces)
            table = gr.Dataframe(value=[list(r.values()) for r in rows], headers=list(rows[0])) if rows else None
            return [figures.aligned_tokens_html(traces), figures.divergence_figure(traces), table]

        runs_table.change(compare_choices, runs_table, compare_ids)
        compare_button.click(compare, compare_ids, [aligned, divergence, costs])

        demo.unload(_forget)

    return demo


def _forget(request: gr.Request) -> None:
    live = LIVE.pop(request.session_hash, None)
    if live is not None and not live.done:
        live.stop()
