"""User journeys in a real browser: every control used as a person uses it (typing, picking from lists, dragging,
clicking), then what was stored and what is shown are checked. Screenshots of every run kind land in
tests/artifacts/ in light and dark themes."""

from __future__ import annotations

import math
import re

import pytest

from engine.decoders import all_decoders
from engine.params import Param
from storage import TraceStore
from tests.browser import (
    chromium,
    drag_to_end,
    field,
    open_page,
    open_section,
    open_tab,
    pick,
    settled,
    shot,
    start_app,
    type_into,
    wait_text,
)
from tests.helpers import (
    random_eagle_head,
    random_falcon_head,
    random_fspad_head,
    random_medusa_head,
    random_ppd_head,
)
from ui.figures.tokens import step_at

# The model each family runs on in these journeys: tiny random models for the mechanics, the shipped waiting-line
# models where a decoder needs a masked-diffusion model (or a diffusion drafter with the same tokenizer).
DIFFUSION_MODEL, DRAFTER_TARGET = "waitline-mdlm", "waitline-ar"
MEDUSA_HEAD = random_medusa_head()
# Values typed where "another valid value" is not derivable from the schema alone (a regex, a layer list...).
TYPED = {
    ("awrs", "constraint"): "(yes|no|maybe)",
    ("forced", "continuation"): "a b c",
    ("gift", "saliency_layers"): "0",
    ("gift", "enhance_layers"): "1",
    ("gift", "context_marker"): "Context:",
    ("gift", "query_marker"): "Question:",
    ("exact_extract", "passage_marker"): "Context:",
    ("exact_extract", "question_marker"): "Question:",
    ("layer_skip", "skip_layers"): "1",
    ("rsd", "branching"): "2,2,1",
    ("assisted_cross_tokenizer", "draft_model"): "tiny-random-gpt2",
    ("speculative", "draft_model"): "",
    ("easyspec", "draft_model"): "",
    ("eagle", "drafter"): str(random_eagle_head()),  # untrained heads for the tiny model, typed as a folder path
    ("fspad", "drafter"): str(random_fspad_head()),
    ("falcon", "drafter"): str(random_falcon_head()),
    ("ppd", "drafter"): str(random_ppd_head()),
    ("medusa", "drafter"): str(MEDUSA_HEAD),
    ("medusa_typical", "drafter"): str(MEDUSA_HEAD),
    ("kv_compress", "kernel"): 7,  # SnapKV's pooling kernel is odd
    ("superposed", "n_token_sample"): 16,  # at least n_drafts
}
# The tiny model has two layers: a draft made of its first layers has at most two.
LAYER_COUNTS = {"draft_layers": 1, "small_layers": 1}
# Values kept at their default: a draft source switched off, files the test does not have, or a shape the other
# parameters must match. The rest of each decoder's parameters are all changed.
KEPT = {("awrs", "constraint_type"), ("learn2pd", "filter"), ("diffuspec", "drafter")}
PROMPTS = {"gift": "Context: the fox lives in the mill. Question: where?",
           "exact_extract": "Context: the fox lives in the mill. Question: where?"}


def _model_for(decoder) -> str:
    if decoder.family == "diffusion":
        return DIFFUSION_MODEL
    if decoder.name == "diffuspec":
        return DRAFTER_TARGET
    return "tiny-random-llama"


def _new_value(decoder: str, param: Param):
    """A valid value other than the default, as a person would pick it."""
    if (decoder, param.name) in TYPED:
        return TYPED[decoder, param.name]
    if param.name in LAYER_COUNTS and param.default != LAYER_COUNTS[param.name]:
        return LAYER_COUNTS[param.name]
    if param.type == "bool":
        return not param.default
    if param.type == "choice":
        return next(c for c in param.choices if c != param.default)
    if param.type == "str":
        return param.default
    low = param.min if param.min is not None else -math.inf
    high = param.max if param.max is not None else math.inf
    if param.type == "int":
        return param.default + 1 if param.default + 1 <= high else param.default - 1
    step = 0.05 if high - low >= 0.1 else (high - low) / 4
    value = round(param.default + step, 2)
    return value if value <= high and value != param.default else round(param.default - step, 2)


def set_param(page, param: Param, value) -> None:
    """Change one parameter through its widget, as a person: tick, choose, or type (sliders too: their box)."""
    elem = f"param-{param.name}"
    if param.type == "bool":
        box = page.locator(f"#{elem} input[type=checkbox]")
        if box.is_checked() != value:
            box.click()
    elif param.type == "choice":
        pick(page, elem, str(value))
    else:
        type_into(page, elem, f"{value:g}" if isinstance(value, float) else str(value))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from start_app(tmp_path_factory.mktemp("journeys"))


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def page(app, browser):
    """One page for the per-decoder journeys (each picks its own model and decoder)."""
    page = open_page(browser, app.url)
    yield page
    page.close()


@pytest.fixture
def person(app, browser):
    """A fresh page per journey: one journey's leftovers (an open tab, a paused run) never steer the next."""
    page = open_page(browser, app.url)
    page.wait_for_selector("#run-button")
    yield page
    page.close()


def newest_run(app):
    return TraceStore(app.db_url).list_runs(limit=1)[0]


def test_first_load_is_interactive_and_the_library_lists_without_error(app, page):
    page.wait_for_selector("#run-button")
    prompt = field(page, "prompt")
    assert prompt.is_editable(), "the prompt box must take typing"
    for elem in ("seed", "max-new-tokens"):
        assert field(page, elem).is_editable(), elem
    open_tab(page, "Library")
    page.wait_for_selector("#runs-table")
    page.wait_for_function("document.querySelectorAll('#runs-table .virtual-row').length > 3")  # the samples, listed
    assert "Error" not in page.locator("#runs-table").inner_text()
    type_into(page, "filter-text", "capital of France", enter=True)  # the beam sample's prompt
    wait_text(page, "runs-table", "beam")
    type_into(page, "filter-text", "", enter=True)
    open_tab(page, "Run")


REPLAY_VIEWS = ("replay-position", "replay-tokens", "replay-primary", "replay-timeline", "replay-detail", "replay-table")
DRAWN_VIEWS = "['replay-primary', 'replay-timeline'].map(id => document.getElementById(id)?.innerHTML ?? '').join()"
RUN_KINDS = ["top_p", "beam", "dyspec", "llada", "gift", "awrs", "superposed", "kv_compress"]  # one per kind of view


@pytest.mark.parametrize("dark", [False, True], ids=["light", "dark"])
def test_every_run_kind_replays_readably(app, browser, dark):
    """Open the shipped sample of every run kind in the Library and keep a full-page screenshot of it at its last
    step, in both themes."""
    page = open_page(browser, app.url, dark=dark)
    open_tab(page, "Library")
    run_id = ""
    for decoder in RUN_KINDS:
        pick(page, "filter-decoder", decoder, option=f"· {decoder} —")
        page.wait_for_function("([name]) => [...document.querySelectorAll('#runs-table .virtual-row')]"
                               ".every(row => row.innerText.split(/\\s+/).includes(name))", arg=[decoder])
        page.locator("#runs-table .virtual-row").last.click()  # the oldest: the shipped sample
        # the field still holds the previous kind's id until the click's answer arrives
        page.wait_for_function("([previous]) => { const value = document.querySelector('#run-id textarea, #run-id input')"
                               ".value; return value.length > 8 && value !== previous; }", arg=[run_id])
        run_id = field(page, "run-id").input_value()
        page.click("#open-run")
        wait_text(page, "library-status", run_id[:12])
        wait_text(page, "replay-tools-note", run_id[:12])  # the open's last event: the page has settled
        page.wait_for_function("document.querySelector('#replay-primary .js-plotly-plot .gtitle')")
        page.evaluate(f"window.firstStepViews = {DRAWN_VIEWS}")
        if decoder == RUN_KINDS[0]:
            drag_to_end(page, "replay-position")  # towards the last step, as a person drags
        else:  # or types the last step and presses Enter (one redraw instead of one per drag move)
            type_into(page, "replay-position", str(int(page.evaluate(
                "document.querySelector('#replay-position input[type=number]').max"))), enter=True)
        # The last step's views have arrived once the figures differ from the first step's (one event updates them
        # all); then no replay component may have an update pending and every figure must be drawn (a fixed pause
        # had let the screenshot catch them redrawing).
        page.wait_for_function(f"{DRAWN_VIEWS} !== window.firstStepViews")
        settled(page, *REPLAY_VIEWS)
        page.wait_for_function("([ids]) => ids.every(id => [...document.querySelectorAll(`#${id} .js-plotly-plot`)]"
                               ".every(plot => plot.querySelector('.main-svg')))", arg=[list(REPLAY_VIEWS)])
        page.wait_for_timeout(300)  # Plotly's transitions, then nothing pending
        settled(page, *REPLAY_VIEWS)
        if decoder == "dyspec":  # one redrawn view passes the wait above: under load the tree may still be drawing
            page.wait_for_function("/round (\\d+) of \\1\\b/.test(document.querySelector('#replay-primary .gtitle')"
                                   "?.textContent || '')")
        title = page.locator("#replay-primary .gtitle").first.text_content()
        assert title.strip(), decoder
        if decoder == "dyspec":  # the tree's title and the node table's label count rounds alike, from 1
            counted = re.search(r"round (\d+ of \d+)", title).group(1)
            assert f"Nodes of round {counted}:" in page.locator("#replay-table").inner_text()
        shot(page, f"kind-{decoder}-{'dark' if dark else 'light'}")
    assert page.outside_requests == []
    page.close()


@pytest.mark.parametrize("decoder", sorted(all_decoders(), key=lambda d: d.name), ids=lambda d: d.name)
def test_every_parameter_typed_is_the_parameter_stored(app, page, decoder):
    """Pick the model and decoder, change every parameter through the page, type a prompt, run one step: the stored
    run holds exactly what was typed."""
    model = _model_for(decoder)
    pick(page, "model", model)
    pick(page, "decoder", decoder.name, option=f"· {decoder.name} —")
    expected = {}
    if decoder.params:  # this decoder's form, not the last one's (they share parameter names)
        page.wait_for_selector(f"#params-of-{decoder.name} #param-{decoder.params[-1].name}")
    for param in decoder.params:
        if (decoder.name, param.name) in KEPT:
            continue
        expected[param.name] = _new_value(decoder.name, param)
        set_param(page, param, expected[param.name])
    prompt = PROMPTS.get(decoder.name, f"Journey of {decoder.name}: say <b>hi</b>")
    type_into(page, "prompt", prompt)
    type_into(page, "max-new-tokens", "4")
    before = {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    page.click("#stop-button")  # no run of an earlier decoder is resumed: wait until Stop has ended it
    page.wait_for_function("!/(paused|running)/.test(document.querySelector('#run-status').innerText)")
    page.click("#step-button")
    run_id = _new_run(page, app, before)
    page.wait_for_function(  # the page reports this run (not the one Stop ended) after its one step
        "([id]) => { const text = document.querySelector('#run-status').innerText;"
        " return text.includes(id) && /(paused|finished|failed)/.test(text); }", arg=[run_id[:12]], timeout=120_000)
    trace = TraceStore(app.db_url).load(run_id)
    assert trace.info.model == model and trace.info.decoder == decoder.name
    assert trace.info.prompt == prompt
    assert trace.info.max_new_tokens == 4
    for name, value in expected.items():
        stored = trace.info.params[name]
        assert stored == pytest.approx(value) if isinstance(value, float) else stored == value, name
    assert trace.status != "failed", trace.reason


def _new_run(page, app, before: set[str], timeout_s: float = 120) -> str:
    """The id of the one run stored since ``before`` was taken (waits for it to appear)."""
    for _ in range(int(timeout_s * 5)):
        runs = [r.run_id for r in TraceStore(app.db_url).list_runs(limit=500) if r.run_id not in before]
        if runs:
            assert len(runs) == 1, runs
            return runs[0]
        page.wait_for_timeout(200)
    raise AssertionError(f"no new run within {timeout_s} s: {page.locator('#run-status').inner_text()}")


# ---------------------------------------------------------------- the interactions around a run


def _greedy_run(page, tokens: int = 8, prompt: str = "Tell me a story") -> None:
    pick(page, "model", "tiny-random-llama")
    pick(page, "decoder", "greedy", option="· greedy —")
    type_into(page, "prompt", prompt)
    type_into(page, "max-new-tokens", str(tokens))
    page.click("#stop-button")
    page.wait_for_function("!/(paused|running)/.test(document.querySelector('#run-status').innerText)")
    before = page.locator("#run-status").inner_text()  # names the last run: the new one's status differs
    page.click("#run-button")
    page.wait_for_function("([before]) => { const text = document.querySelector('#run-status').innerText;"
                           " return text !== before && text.includes('finished'); }", arg=[before], timeout=60_000)


def _plot_data(page, elem_id: str):
    return page.evaluate(f"document.querySelector('#{elem_id} .js-plotly-plot')?.data ?? null")


def test_a_model_folder_prompt_format_is_applied_said_and_checked(app, person):
    """The waitline models' folders declare ParallelBench's format: picking one fills in an example and the chat flag
    it was trained with; a prompt in another format runs, with a warning."""
    person.locator("#chat input[type=checkbox]").uncheck()
    pick(person, "model", "waitline-ar")
    wait_text(person, "model-status", "Prompt format")
    person.wait_for_function("document.querySelector('#chat input[type=checkbox]').checked")
    assert "waiting line" in field(person, "prompt").input_value()
    pick(person, "decoder", "greedy", option="· greedy —")
    type_into(person, "max-new-tokens", "3")
    before = {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    person.click("#run-button")  # the example as filled in: the trained form, its final line break kept, no warning
    run_id = _new_run(person, app, before)
    assert TraceStore(app.db_url).load(run_id).info.prompt.endswith("provide only the final list.\n")
    wait_text(person, "run-status", "finished")
    assert not any("format" in text for text in person.locator("[data-testid=toast-body]").all_inner_texts())
    type_into(person, "prompt", "Sort these: Bo, Al")
    before = {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    person.click("#run-button")
    person.wait_for_selector("[data-testid=toast-body]")
    assert "not in waitline-ar's format" in person.locator("[data-testid=toast-body]").first.inner_text()
    shot(person, "prompt-format-warning")
    run_id = _new_run(person, app, before)
    assert TraceStore(app.db_url).load(run_id).info.prompt == "Sort these: Bo, Al"  # warned, not refused
    pick(person, "model", "tiny-random-llama")


def test_typed_step_and_colour_redraw_the_run_tab(app, person):
    _greedy_run(person)
    type_into(person, "live-position", "2", enter=True)  # a person types a step and presses Enter
    person.wait_for_selector("#live-tokens [data-selected][data-step='2']")
    before = person.locator("#live-tokens [data-step='1']").get_attribute("style")
    person.locator("#live-color").get_by_text("entropy").click()
    person.wait_for_function(f"document.querySelector(\"#live-tokens [data-step='1']\").getAttribute('style') !== {before!r}")
    person.locator("#live-color").get_by_text("probability").click()


def test_ffn_capture_draws_its_heatmap_and_stores_its_events(app, person):
    """Tick the FFN capture and run ten tokens: the token- and chunk-level sparsity heatmaps show below the run, and
    the stored run holds one event per token, the first 8-token chunk's at position 7."""
    person.locator("#ffn-capture input[type=checkbox]").check()
    _greedy_run(person, tokens=10, prompt="Sparse thoughts")
    trace = TraceStore(app.db_url).load(newest_run(app).run_id)
    events = [e for e in trace.events if e.kind == "ffn_sparsity"]
    assert len(trace.output_token_ids) == 10 and [e.position for e in events] == list(range(10))
    assert [e.position for e in events if e.chunk_level is not None] == [7]
    person.wait_for_function("(document.querySelector('#live-ffn .js-plotly-plot')?.layout?.title?.text || '')"
                             ".includes('FFN activation sparsity')", timeout=30_000)
    heatmaps = [t for t in _plot_data(person, "live-ffn") if t["type"] == "heatmap"]
    assert len(heatmaps) == 2 and len(heatmaps[0]["x"]) == 10
    person.locator("#live-ffn").scroll_into_view_if_needed()
    shot(person, "ffn-sparsity")


def test_marked_passages_show_their_cross_passage_attention(app, person):
    """Type two passages and a question, capture every layer's attention, run four tokens: the stored run holds the
    passages found, and the cross-passage view shows its three panels below the attention map."""
    pick(person, "attention", "all")
    _greedy_run(person, tokens=4, prompt="Passage 1: The fox lives in the mill.\nPassage 2: Paris is in France.\n"
                                         "Question: where does the fox live?")
    trace = TraceStore(app.db_url).load(newest_run(app).run_id)
    passages = next(e for e in trace.events if e.kind == "passages")
    assert [trace.text_of(trace.prompt_token_ids[a:b]) for a, b in passages.passages] == [
        "Passage 1: The fox lives in the mill.\n", "Passage 2: Paris is in France.\n"]
    person.wait_for_function("(document.querySelector('#live-extra .js-plotly-plot')?.layout?.title?.text || '')"
                             ".includes('Cross-passage attention')", timeout=30_000)
    kinds = [t["type"] for t in _plot_data(person, "live-extra")]
    assert kinds.count("bar") == 5 and kinds.count("heatmap") == 3  # the parts; layer x step; one block per layer
    person.locator("#live-extra").scroll_into_view_if_needed()
    shot(person, "cross-passage-attention")


def test_pause_says_paused_and_stops_within_a_step(app, person):
    """A run long enough to pause (the tiny random model makes 600 tokens in under a second on an idle CI machine,
    before a person could press Pause): the shipped 6.7M-parameter waitline-ar, about 140 tokens a second here,
    never ends a story prompt before its 900 tokens."""
    pick(person, "model", "waitline-ar")
    wait_text(person, "model-status", "Prompt format")
    pick(person, "decoder", "greedy", option="· greedy —")
    type_into(person, "prompt", "Tell me a story")
    type_into(person, "max-new-tokens", "900")
    person.click("#stop-button")
    person.click("#run-button")
    person.wait_for_function("document.querySelectorAll('#live-tokens [data-step]').length >= 5", timeout=60_000)
    assert person.locator("#live-tokens .de-sparkline svg polyline").count() == 2  # the live chart streams too
    shot(person, "streaming")
    person.click("#pause-button")
    wait_text(person, "run-status", "paused")
    status = person.locator("#run-status").inner_text()
    run_id = newest_run(app).run_id
    person.wait_for_timeout(1000)
    stored = TraceStore(app.db_url).load(run_id)
    assert stored.status == "running"  # paused, not ended: Run resumes it
    assert f"· {len(stored.output_token_ids)} tokens ·" in status  # the person shows every token the engine made
    assert person.locator("#run-status").inner_text() == status  # and nothing moves while paused
    person.click("#stop-button")
    wait_text(person, "run-status", "cancelled")


def test_branch_from_a_token_then_compare_with_its_parent(app, person):
    _greedy_run(person, tokens=8, prompt="Once upon a time")
    parent = TraceStore(app.db_url).load(newest_run(app).run_id)
    person.locator("#live-tokens [data-step='3']").click()  # select the token at output position 3
    person.wait_for_selector("#live-tokens [data-selected][data-step='3']")
    wait_text(person, "live-tools-note", "output position 3")
    person.locator("#live-branch-token input").click()
    alternatives = [c.token_id for c in step_at(parent, 3).candidates if c.token_id != parent.output_token_ids[3]]
    person.locator("[role=option]").nth(1).click()  # the second alternative, as a person picks it
    person.click("#live-branch-button")
    person.wait_for_function("(document.querySelector('#run-status')?.innerText || '').includes('finished') && "
                           f"!document.querySelector('#run-status').innerText.includes({parent.run_id[:12]!r})")
    branch = TraceStore(app.db_url).load(newest_run(app).run_id)
    assert branch.info.parent == {"run_id": parent.run_id, "step": 3, "token_id": alternatives[1]}
    assert branch.prompt_token_ids == [*parent.prompt_token_ids, *parent.output_token_ids[:3], alternatives[1]]
    assert "Branch of run" in person.locator("#live-tokens").inner_text()
    shot(person, "branch-run")

    open_tab(person, "Library")
    person.click("#refresh-runs")
    wait_text(person, "runs-table", f"branch of {parent.run_id[:8]}")
    rows = person.locator("#runs-table .virtual-row")
    texts = [rows.nth(i).inner_text() for i in range(rows.count())]
    parent_row = next(i for i, t in enumerate(texts) if parent.run_id[:8] in t.split()[0])
    assert branch.run_id[:8] in texts[parent_row + 1]  # listed under its parent
    type_into(person, "run-id", branch.run_id, enter=True)
    wait_text(person, "library-status", "finished")
    person.click("#compare-parent")
    person.wait_for_selector("#compare-aligned [data-step]")
    wait_text(person, "compare-note", "Branch point: at output position 3")
    shot(person, "compare-branch")
    open_tab(person, "Run")


def test_token_tree_explorer_expands_and_continues_a_node(app, person):
    _greedy_run(person, tokens=6, prompt="The tree of")
    parent = newest_run(app)
    person.locator("#live-tokens [data-step='2']").click()
    person.wait_for_selector("#live-tokens [data-selected][data-step='2']")
    open_section(person, "live-token-tree")
    type_into(person, "live-tree-depth", "2")
    type_into(person, "live-tree-min-prob", "0")
    person.click("#live-tree-button")
    person.wait_for_function("document.querySelector('#live-tree .js-plotly-plot')?.data?.length > 0", timeout=60_000)
    shot(person, "token-tree")
    type_into(person, "live-tree-node", "4")  # or click one: the click sets this box
    before = {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    person.click("#live-tree-continue")
    run_id = _new_run(person, app, before)  # the branch's own run, not the parent's "finished" still on the page
    person.wait_for_function("([id]) => { const text = document.querySelector('#run-status').innerText;"
                             " return text.includes(id) && text.includes('finished'); }", arg=[run_id[:12]])
    branch = TraceStore(app.db_url).load(run_id)
    assert branch.info.parent["run_id"] == parent.run_id and branch.info.parent["step"] == 2


def test_reprocessing_a_step_matches_transformers_warpers(app, person):
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
    )

    from engine import load_model

    _greedy_run(person, tokens=6, prompt="Re-process me")
    trace = TraceStore(app.db_url).load(newest_run(app).run_id)
    person.locator("#live-tokens [data-step='4']").click()
    person.wait_for_selector("#live-tokens [data-selected][data-step='4']")
    open_section(person, "live-reprocess-tab")
    type_into(person, "live-reprocess-temperature", "0.5")
    type_into(person, "live-reprocess-top_k", "5")
    # both typed values drawn (the title escapes "_" as &#95;, so Markdown cannot take effect)
    person.wait_for_function("(document.querySelector('#live-reprocess .js-plotly-plot')?.layout?.title?.text || '')"
                             ".includes('temperature=0.5 · top&#95;k=5 ·')", timeout=30_000)
    settled(person, "live-reprocess")  # a later keystroke's redraw may still be running: shoot what stays
    shot(person, "reprocess")
    # typed digit by digit, "0.5" passes through "0": no error may pop up on the way
    assert person.locator("[data-testid=toast-body]").count() == 0
    data = _plot_data(person, "live-reprocess")
    processed = next(t for t in data if "processed" in t["name"].lower() and "raw" not in t["name"].lower())
    model = load_model("tiny-random-llama")  # the same seeded weights as the app's
    ids = torch.tensor([[*trace.prompt_token_ids, *trace.output_token_ids[:4]]])
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits[:, -1, :].float()
    warped = TopKLogitsWarper(5)(ids, TemperatureLogitsWarper(0.5)(ids, logits))
    expected = warped.softmax(-1)[0]
    raw_order = logits[0].argsort(descending=True)[: len(processed["y"])]
    assert processed["y"] == pytest.approx(expected[raw_order].tolist(), abs=1e-4)
    assert "exact" in person.evaluate("document.querySelector('#live-reprocess .js-plotly-plot').layout.title.text")


def test_library_delete_asks_first_and_compare_lists_labelled_runs(app, person):
    _greedy_run(person, tokens=3, prompt="Delete me")
    victim = newest_run(app)
    open_tab(person, "Library")
    type_into(person, "run-id", victim.run_id)
    person.click("#delete-run")
    person.wait_for_selector("#delete-confirm-button")
    assert victim.run_id in {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}  # not yet
    person.click("#delete-cancel-button")
    person.wait_for_timeout(300)
    assert victim.run_id in {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    person.click("#delete-run")
    person.click("#delete-confirm-button")
    wait_text(person, "library-status", "Deleted.")
    assert victim.run_id not in {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}

    open_tab(person, "Compare")
    person.locator("#compare-ids input").click()
    person.locator("#compare-ids input").press_sequentially("beam")
    option = person.locator("[role=option]").first.inner_text()
    assert "beam" in option and "·" in option  # a label people can read, not a bare id
    person.keyboard.press("Escape")
    open_tab(person, "Run")


def test_greedy_with_a_model_and_its_hyperfitted_variant_then_their_entropy_side_by_side(app, person, tmp_path):
    from engine.offline import hyperfit
    from ui.figures.tokens import token_steps

    variant = tmp_path / "hyperfit"  # the tiny model's last layer fitted hard enough to sharpen it
    hyperfit.main(["--model", "tiny-random-llama", "--layers", "1", "--passages", "8", "--length", "16", "--epochs",
                   "20", "--lr", "1e-2", "--warmup", "0", "--held-out-passages", "2", "--out", str(variant)])
    _greedy_run(person, tokens=12, prompt="The while statement")
    base = newest_run(app)
    type_into(person, "model", str(variant), enter=True)
    wait_text(person, "model-status", "hyperfit is loaded")  # the page has taken the typed folder
    before = {r.run_id for r in TraceStore(app.db_url).list_runs(limit=500)}
    person.click("#run-button")
    run_id = _new_run(person, app, before)
    person.wait_for_function("([id]) => { const text = document.querySelector('#run-status').innerText;"
                             " return text.includes(id) && text.includes('finished'); }", arg=[run_id[:12]])
    hyperfitted = newest_run(app)
    assert hyperfitted.model == "tiny-random-llama~hyperfit" and hyperfitted.run_id == run_id

    open_tab(person, "Library")  # the Library's list feeds the Compare picker
    wait_text(person, "runs-table", "hyperfit")
    open_tab(person, "Compare")
    for run in (base, hyperfitted):  # a multiselect: each pick becomes a chip, the box empties
        person.locator("#compare-ids input").click()
        person.locator("#compare-ids input").press_sequentially(run.run_id[:8])
        person.locator("[role=option]", has_text=run.run_id[:8]).first.click()
        person.keyboard.press("Escape")
        wait_text(person, "compare-ids", run.run_id[:8])
    person.click("#compare-button")
    person.wait_for_selector("#compare-sharpness .js-plotly-plot")
    data = _plot_data(person, "compare-sharpness")
    store = TraceStore(app.db_url)
    stored = [[s.entropy_raw for s in token_steps(store.load(run.run_id))] for run in (base, hyperfitted)]
    entropy = [trace["y"] for trace in data if trace.get("yaxis", "y") == "y"]
    assert entropy == [pytest.approx(values, abs=1e-4) for values in stored] and len(stored[0]) == 12
    assert "hyperfit" in " ".join(trace["name"] for trace in data)
    assert sum(stored[1]) < sum(stored[0])  # the entropy collapse, drawn beside the base
    person.locator("#compare-sharpness").scroll_into_view_if_needed()
    shot(person, "compare-hyperfit-entropy")
    open_tab(person, "Run")


def test_an_import_shows_even_under_an_active_filter(app, person):
    from tests.test_e2e import SAMPLE

    open_tab(person, "Library")
    type_into(person, "filter-text", "no run matches this", enter=True)
    open_section(person, "export-import")
    person.locator("#import-file input[type=file]").set_input_files(str(SAMPLE))
    wait_text(person, "library-status", "Imported as run")
    imported = person.locator("#run-id textarea, #run-id input").first.input_value()
    assert field(person, "filter-text").input_value() == ""  # the filter that would hide it is cleared
    wait_text(person, "library-status", f"· run {imported[:12]}")  # and the imported run is open
    assert imported in {r.run_id for r in TraceStore(app.db_url).list_runs(limit=1000)}
    open_tab(person, "Run")


def test_replay_only_lands_on_the_library(browser, tmp_path):
    for app in start_app(tmp_path, "--replay-only"):
        page = open_page(browser, app.url)
        page.wait_for_selector("#runs-table")
        assert "Replay-only mode" in page.locator("#header").inner_text()
        assert page.locator("button[role=tab]:visible", has_text="Run").count() == 0
        assert page.locator("#runs-table").is_visible()  # the Library is the open tab
        page.wait_for_function("document.querySelectorAll('#runs-table .virtual-row').length > 3")
        assert "Error" not in page.locator("#runs-table").inner_text()
        shot(page, "replay-only")
        page.close()



def test_a_filter_typed_while_the_first_listing_is_slow_is_what_the_table_shows(browser, tmp_path, monkeypatch):
    """The page's first listings (unfiltered) are slow here; a person types a filter and presses Enter before they
    return. The table must end showing the filter's rows, not a slow listing that landed after them (the table's
    listings share one queue: ui.library_tab.LISTING)."""
    import threading
    import time

    from tests.browser import free_port
    from ui.app import build
    from ui.samples import WithSamples

    listed, lock, calls = WithSamples.list_runs, threading.Lock(), {"running": 0, "filtered": 0}

    def slow_when_unfiltered(self, **kwargs):
        with lock:
            calls["running"] += 1
        if not kwargs.get("text"):
            time.sleep(2)
        rows = listed(self, **kwargs)
        with lock:
            calls["running"] -= 1
            calls["filtered"] += bool(kwargs.get("text"))
        return rows

    monkeypatch.setattr(WithSamples, "list_runs", slow_when_unfiltered)
    demo = build(db_url=f"sqlite:///{tmp_path / 'app.db'}", replay_only=True)
    demo.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = open_page(browser, demo.local_url)
        type_into(page, "filter-text", "capital of France", enter=True)  # the beam sample's prompt
        deadline = time.monotonic() + 60
        while not (calls["filtered"] and not calls["running"]) and time.monotonic() < deadline:
            page.wait_for_timeout(100)  # until the filter's listing and every one started before it have returned
        page.wait_for_timeout(1000)
        settled(page, "runs-table")
        shown = {row.inner_text().split()[0] for row in page.locator("#runs-table .virtual-row").all()}
        matching = {run.run_id[:12] for run in listed(WithSamples(TraceStore("sqlite://")), text="capital of France")}
        assert "beam" in page.locator("#runs-table").inner_text() and shown == matching, shown
        page.close()
    finally:
        demo.close()


def test_a_stored_bench_opens_as_its_accuracy_against_parallelism_curve(app, person):
    """``bench dllm`` stores itself as a run: a person finds it by its description in the Library and opens it; the
    curve (a panel per task, a line per decoder through its parallelism) and the goal check are drawn from the stored
    cells."""
    from cli.bench_dllm import dllm
    from tests.helpers import tiny_waitline_model

    models = {"waitline-mdlm": tiny_waitline_model(False, name="tiny-mdlm", diffusion_gen_length=8),
              "waitline-ar": tiny_waitline_model(True, name="tiny-ar")}
    report = dllm(per_task=1, tasks=["copy", "reverse", "sort", "shuffle"],
                  settings=["llada", "llada:steps=4", "llada:steps=2", "fast_dllm:threshold=0.5", "greedy",
                            "llada:block_length=1"],
                  models=models, log=lambda _: None, sinks=[TraceStore(app.db_url).sink()])
    open_tab(person, "Library")
    type_into(person, "filter-text", "bench dllm", enter=True)
    wait_text(person, "runs-table", "bench_dllm")
    person.locator("#runs-table .virtual-row").first.click()
    person.wait_for_function("document.querySelector('#run-id textarea, #run-id input').value.length > 8")
    assert field(person, "run-id").input_value() == report["run_id"]
    person.click("#open-run")
    wait_text(person, "library-status", report["run_id"][:12])
    person.wait_for_function("(document.querySelector('#replay-primary .js-plotly-plot')?.layout?.title?.text || '')"
                             ".includes('Accuracy against parallelism')", timeout=30_000)
    legend = person.evaluate("[...document.querySelectorAll('#replay-primary .legendtext')].map(e => e.textContent)")
    assert sorted(legend) == ["fast_dllm", "greedy", "llada", "llada:block_length=1"]  # as a person reads them
    assert sum(line["name"] == "llada" for line in _plot_data(person, "replay-primary")) == 4  # one per task panel
    person.wait_for_function("(document.querySelector('#replay-timeline .js-plotly-plot')?.layout?.title?.text || '')"
                             ".includes('Goal')")
    shot(person, "bench-dllm-curve")
    open_tab(person, "Run")
