"""The Gradio app: run a decoder live (run, step, pause, stop), replay and manage saved traces, compare runs.

No ``from __future__ import annotations`` in the UI modules: Gradio finds ``gr.Request`` parameters by their real
annotation.

The UI only wires engine, storage and the pure figure functions in ``ui.figures`` together: one builder per tab
(``ui.run_tab``, ``ui.library_tab``, ``ui.compare_tab``), the step tools shared by the Run and Library panels
(``ui.step_tools``), and :class:`ui.context.AppContext` holding what they share.
"""

from collections.abc import Sequence

import gradio as gr

from engine.limits import Limits
from engine.models import DEFAULT_MODEL

from storage import TraceStore
from ui.access import Access
from ui.compare_tab import build_compare_tab
from ui.context import AppContext, api_list_runs, api_record
from ui.library_tab import build_library_tab
from ui.pool import ModelPool
from ui.run_tab import build_run_tab
from ui.samples import WithSamples

# Clicking a token (its data-step) or a point of a chart whose points carry a step (customdata) moves that panel's
# step slider, which then redraws every view; a click on a node of the token tree picks that node; Enter in a step
# box commits the step typed there.
CLICK_TO_SELECT_JS = """
() => {
  const setNumber = (selector, value) => {
    const input = document.querySelector(`${selector} input[type=number]`);
    if (!input || value === undefined || value === null) return;
    input.value = String(value);
    for (const kind of ["input", "change"]) input.dispatchEvent(new Event(kind, {bubbles: true}));
    input.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
    const range = document.querySelector(`${selector} input[type=range]`);
    if (range) { range.value = String(value); range.dispatchEvent(new Event("input", {bubbles: true}));
                 range.dispatchEvent(new Event("pointerup", {bubbles: true})); range.dispatchEvent(new Event("change", {bubbles: true})); }
  };
  // Enter in a step box commits the typed step (the box's blur is the slider's release event)
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.matches("[id$='-position'] input[type=number]")) event.target.blur();
  }, true);
  document.addEventListener("click", (event) => {
    const span = event.target.closest("[data-step]");
    const panel = span && span.closest("[id$='-tokens']");
    if (panel) setNumber(`#${panel.id.replace(/-tokens$/, "")}-position`, span.dataset.step);
  });
  const hooks = {"-timeline": "-position", "-tree": "-tree-node"};
  setInterval(() => {
    for (const name of ["live", "replay"]) {
      for (const [plotSuffix, inputSuffix] of Object.entries(hooks)) {
        const plot = document.querySelector(`#${name}${plotSuffix} .js-plotly-plot`);
        if (plot && plot.on && !plot.dataset.deHooked) {
          plot.dataset.deHooked = "1";
          plot.on("plotly_click", (data) => setNumber(`#${name}${inputSuffix}`, data.points[0].customdata));
        }
      }
    }
  }, 300);
}
"""
# System fonts only: the default theme's web font would be fetched from the internet.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
#run-status, #library-status, #model-status { min-height: 1.5em; }
.de-branch code { font-size: 0.95em; }
"""


def launch_options() -> dict:
    """What Gradio 6 takes at launch() rather than in Blocks(): theme, page script and style."""
    return {"theme": THEME, "js": CLICK_TO_SELECT_JS, "css": CSS}


def build(model_name: str = DEFAULT_MODEL, db_url: str | None = None, replay_only: bool = False,
          public: bool = False, allow_models: Sequence[str] = (), limits: Limits | None = None) -> gr.Blocks:
    """The app. The default model starts loading in the background: the server listens at once and the Run tab
    shows the loading progress. ``public``: sessions see their own runs and the samples only, and models come from
    the built-ins, ``model_name`` and ``allow_models`` only (see ui.access). ``limits``: the caps per request
    (default: the mode's, as the environment sets them; see engine.limits)."""
    store = WithSamples(TraceStore(db_url))  # the samples from memory: a read-only database opens too
    pool = ModelPool()
    if not replay_only:
        pool.start(model_name)
    access = Access.for_mode(public, model_name, shared_runs=store.sample_ids, extra_models=allow_models)
    app = AppContext(store, pool, model_name, replay_only, access,
                     limits=Limits.from_env(public) if limits is None else limits)
    with gr.Blocks(title="Decoding Explorer") as demo:
        gr.api(api_record(app), api_name="record")  # for outside programs (gradio_client), registered first
        gr.api(api_list_runs(app), api_name="list_runs")
        gr.HTML(app.header_html(), elem_id="header")
        with gr.Tabs(selected="library" if replay_only else "run") as tabs:
            app.tabs = tabs
            run_tab = build_run_tab(app)
            library = build_library_tab(app, run_tab)
            build_compare_tab(app, library)
        library.relist(demo.load)
        demo.unload(app.forget_session)
    for fn in demo.fns.values():  # the API page documents the two endpoints meant for programs; the page's own
        if fn.api_name not in ("record", "list_runs") and fn.api_visibility == "public":  # stay callable
            fn.api_visibility = "undocumented"
    return demo
