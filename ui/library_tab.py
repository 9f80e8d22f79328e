"""The Library tab: stored runs as a tree of branches, filters, open and replay (Play at a chosen speed, Pause at
once), export, import, delete with confirmation, and the step tools on the opened run."""

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from engine.params import ParamError
from engine.trace import Trace
from storage.user_errors import USER_ERRORS, user_message
from ui import figures
from ui.figures.common import escape_text
from ui.context import AppContext, status_html, user_errors
from ui.form import decoder_choices
from ui.run_tab import RunTab
from ui.step_tools import build_step_tools, step_outputs, wire_step_tools
from ui.views import COLOR_CHOICES, HEAVY_OUTPUTS, Views, build_views, light_values, selected_step_values, step_count, view_values

RUN_TABLE_LIMIT = 200
# Every listing of the table (the page's load, the tab, each filter) queues here, one at a time in order: a filter
# typed while a slower listing runs is the last to land, so the table shows what the filters say.
LISTING = "list-runs"
RUN_ID_CHARS = 12  # the table shows an id prefix (the store resolves prefixes); the whole id is in the run box
REPLAY_FULL_INTERVAL = 1.0  # seconds between redraws of every figure while Play walks a run


@dataclass
class LibraryTab:
    runs_table: gr.Dataframe
    run_id: gr.Textbox
    replay: gr.State
    views: Views
    status: gr.HTML
    compare_parent: gr.Button
    relist: Callable[[Callable], Any]  # lists the runs on an event (the page's first load, too)


def build_library_tab(app: AppContext, run_tab: RunTab) -> LibraryTab:
    with gr.Tab("Library", id="library") as tab:
        replay = gr.State(None)  # the opened trace
        with gr.Row():
            filter_model = gr.Textbox(label="Model", scale=1, interactive=True, elem_id="filter-model")
            filter_decoder = gr.Dropdown([("(any decoder)", "")] + decoder_choices(), value="", label="Decoder",
                                         scale=2, interactive=True, filterable=True, elem_id="filter-decoder")
            filter_text = gr.Textbox(label="Search prompt/output", scale=2, interactive=True, elem_id="filter-text")
            filter_since = gr.Textbox(label="From date (YYYY-MM-DD)", scale=1, interactive=True, elem_id="filter-since")
            filter_until = gr.Textbox(label="Before date (YYYY-MM-DD)", scale=1, interactive=True, elem_id="filter-until")
            mine_only = gr.Checkbox(label="Only this session's runs", value=False, interactive=True, elem_id="filter-mine")
            refresh = gr.Button("Refresh", elem_id="refresh-runs")
        runs_table = gr.Dataframe(headers=figures.RUN_TREE_HEADERS, interactive=False, elem_id="runs-table", wrap=True,
                                  label="Runs, newest first; branches under their parent (click a row to pick it)")
        with gr.Row():
            run_id_box = gr.Textbox(label="Run id (click a row, or type a prefix and press Enter)", scale=3,
                                    interactive=True, elem_id="run-id")
            open_button = gr.Button("Open", variant="primary", elem_id="open-run")
            delete_button = gr.Button("Delete", variant="stop", elem_id="delete-run")
            export_button = gr.Button("Export JSON", elem_id="export-run")
            compare_parent = gr.Button("Compare with its parent", elem_id="compare-parent")
        with gr.Row(visible=False, elem_id="delete-confirm") as confirm_row:
            confirm_text = gr.HTML()
            confirm_button = gr.Button("Yes, delete it", variant="stop", elem_id="delete-confirm-button")
            cancel_button = gr.Button("Cancel", elem_id="delete-cancel-button")
        with gr.Accordion("Export or import a trace", open=False, elem_id="export-import") as export_import:
            with gr.Row():
                export_file = gr.File(label="Exported trace", interactive=False, elem_id="export-file", height=120)
                import_file = gr.File(label="Import a JSON trace (.json or .json.gz)", file_types=[".json", ".gz"],
                                      interactive=True, elem_id="import-file", height=120)
        library_status = gr.HTML(elem_id="library-status")
        with gr.Row():
            play_button = gr.Button("Play", elem_id="replay-play")
            pause_button = gr.Button("Pause", elem_id="replay-pause")
            speed = gr.Slider(0.5, 30, value=4, step=0.5, label="Replay speed (steps per second)", interactive=True,
                              elem_id="replay-speed")
            color_by = gr.Radio(COLOR_CHOICES, value="probability", label="Colour tokens by",
                                interactive=True, elem_id="replay-color")
        views = build_views("replay")
        tools = build_step_tools("replay")
    filters = [filter_model, filter_decoder, filter_text, filter_since, filter_until, mine_only]

    def list_runs(model: str, decoder: str, text: str, since: str | None, until: str | None, mine: bool,
                  request: gr.Request) -> list[list[Any]]:
        session = request.session_hash
        rows = app.list_runs(session, model=(model or "").strip() or None, decoder=decoder or None, text=text or None,
                             since=(since or "").strip() or None, until=(until or "").strip() or None,
                             limit=RUN_TABLE_LIMIT)
        if mine:
            owned = app.access.owned(session)
            rows = [r for r in rows if r.run_id in owned]
        return [[row[0][:RUN_ID_CHARS], row[1][:16].replace("T", " "), *row[2:]] for row in figures.run_tree_rows(rows)]

    def pick_row(evt: gr.SelectData, table: Any, request: gr.Request) -> str:
        row = evt.index[0]
        prefix = str(table.iloc[row, 0]) if hasattr(table, "iloc") else str(table[row][0])
        return app.access.resolve(app.store, request.session_hash, prefix)

    @user_errors
    def open_run(run_id: str, color: str, request: gr.Request) -> list[Any]:
        app.pause_replay(request.session_hash)  # a Play still walking the run opened before stops
        trace = app.load(request.session_hash, run_id)
        return [trace, *view_values(trace, 0, color), status_html(trace)]

    def open_imported(run_id: str, color: str, request: gr.Request) -> list[Any]:
        *values, status = open_run(run_id, color, request)
        return [*values, f"Imported as run <code>{escape_text(run_id[:12])}</code>. {status}"]

    def show_step(trace: Trace | None, position: float, color: str) -> list[Any]:
        return selected_step_values(trace, position, color)

    @user_errors
    def play(trace: Trace | None, position: float, color: str, steps_per_second: float,
             request: gr.Request) -> Iterator[list[Any]]:
        """Walk the opened run from the slider's step (from the start once at the end): the text view at every
        step, the figures every REPLAY_FULL_INTERVAL; Pause ends the walk at once, drawing the step it reached."""
        if trace is None:
            raise ParamError("open a run first")
        last = max(step_count(trace) - 1, 0)
        pos = int(position or 0) if int(position or 0) < last else 0
        delay = 1.0 / max(float(steps_per_second or 1), 0.1)
        paused = app.start_replay(request.session_hash)
        next_full = 0.0
        while pos < last and not paused.wait(delay):
            pos += 1
            if delay >= REPLAY_FULL_INTERVAL / 2 or time.monotonic() >= next_full or pos == last:
                next_full = time.monotonic() + REPLAY_FULL_INTERVAL
                yield view_values(trace, pos, color)
            else:
                yield [*light_values(trace, pos, color), *[gr.skip()] * HEAVY_OUTPUTS]
        if paused.is_set():
            yield view_values(trace, pos, color)

    def pause(request: gr.Request) -> None:
        app.pause_replay(request.session_hash)

    @user_errors
    def ask_delete(run_id: str, request: gr.Request) -> list[Any]:
        run = app.store.summary(app.access.resolve(app.store, request.session_hash, run_id, change=True))
        text = (f"Delete run <code>{escape_text(run.run_id[:12])}</code> ("
                f"{escape_text(run.decoder)} on {escape_text(run.model)}, “{escape_text(run.prompt[:60])}”)? "
                "This cannot be undone.")
        return [gr.Row(visible=True), text]

    @user_errors
    def delete_run(run_id: str, request: gr.Request) -> list[Any]:
        deleted = app.store.delete(app.access.resolve(app.store, request.session_hash, run_id, change=True))
        return [gr.Row(visible=False), "Deleted." if deleted else escape_text(f"No run {run_id!r}.")]

    @user_errors
    def export_run(run_id: str, request: gr.Request) -> str:
        full = app.access.resolve(app.store, request.session_hash, run_id, change=True)
        path = Path(tempfile.mkdtemp(prefix="decoding-explorer-")) / f"trace-{full[:12]}.json.gz"
        return str(app.store.export_file(full, path))

    def import_run(file: Any, request: gr.Request) -> list[Any]:
        """Import, then clear the filters so the new run is listed, and put its id in the box."""
        if file is None:
            return [gr.skip()] * 8
        try:
            run_id = app.import_file(request.session_hash, file if isinstance(file, str) else file.name)
        except USER_ERRORS as exc:
            raise gr.Error(f"Import refused: {escape_text(user_message(exc))}") from None
        return [run_id, f"Imported as run <code>{escape_text(run_id[:12])}</code>.", "", "", "", "", "", False]

    def relist(event: Callable) -> Any:
        """List the runs as the filters say on ``event`` (a trigger, or a ``.then``/``.success`` of one)."""
        return event(list_runs, filters, runs_table, concurrency_id=LISTING)

    for trigger in (tab.select, refresh.click, filter_decoder.input, mine_only.input, filter_text.submit, filter_model.submit,
                    filter_since.submit, filter_until.submit):
        relist(trigger)
    runs_table.select(pick_row, runs_table, run_id_box)
    opened_outputs = [replay, *views.outputs(), library_status]
    at_step = wire_step_tools(app, tools, views.position, lambda _, trace: trace, replay, [*run_tab.outputs(), app.tabs],
                              run_tab.start_branch)
    for trigger in (open_button.click, run_id_box.submit):
        trigger(open_run, [run_id_box, color_by], opened_outputs).success(
            at_step, [replay, views.position], step_outputs(tools))
    for event in (views.position.release, views.position.input, color_by.input):
        event(show_step, [replay, views.position, color_by], views.outputs(), concurrency_limit=None)
    play_button.click(play, [replay, views.position, color_by, speed], views.outputs())
    pause_button.click(pause, None, None, queue=False)
    delete_button.click(ask_delete, run_id_box, [confirm_row, confirm_text])
    relist(confirm_button.click(delete_run, run_id_box, [confirm_row, library_status]).then)
    cancel_button.click(lambda: gr.Row(visible=False), None, confirm_row)
    export_button.click(export_run, run_id_box, export_file).success(lambda: gr.Accordion(open=True), None, export_import)
    relist(import_file.upload(import_run, import_file, [run_id_box, library_status, *filters]).success).success(
        open_imported, [run_id_box, color_by], opened_outputs).success(
        at_step, [replay, views.position], step_outputs(tools))
    return LibraryTab(runs_table, run_id_box, replay, views, library_status, compare_parent, relist)


