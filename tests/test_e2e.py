"""The app as a user and an outside program meet it: a real browser (Debian's Chromium driven by
Playwright) and gradio_client, against ``app.py`` started on a free local port with a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.browser import chromium, field, open_page, open_section, open_tab, pick, settled, shot, start_app, type_into, wait_text
from tests.hostile import EVIL_HOST, PROMPT, REASON, hostile_copy, write_gz
from ui.samples import SAMPLES_DIR

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = next(iter(sorted((ROOT / "assets" / "samples").glob("*.json.gz"))), None)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    yield from start_app(tmp_path_factory.mktemp("app-home"))


@pytest.fixture(scope="module")
def app_url(app):
    return app.url


def test_gradio_client_records_and_lists(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    summary = client.predict("tiny-random-llama", "greedy", "Hello there", {}, 0, 6, False, api_name="/record")
    assert summary["status"] == "finished" and summary["metrics"]["new_tokens"] == len(summary["output_token_ids"]) > 0
    runs = client.predict(50, api_name="/list_runs")
    assert summary["run_id"] in [r["run_id"] for r in runs]
    with pytest.raises(Exception, match="unknown decoder"):
        client.predict("tiny-random-llama", "nucleus", "x", {}, 0, 4, False, api_name="/record")


def test_simultaneous_recordings_lose_nothing(app_url):
    """Two outside clients record at once into the app's one SQLite database."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    def record(seed: int) -> dict:
        return Client(app_url, verbose=False).predict("tiny-random-llama", "sample", "Go", {}, seed, 30, False, api_name="/record")

    with ThreadPoolExecutor(max_workers=2) as pool:
        summaries = list(pool.map(record, [1, 2]))
    stored = {r["run_id"]: r for r in Client(app_url, verbose=False).predict(200, api_name="/list_runs")}
    for summary in summaries:
        tokens = len(summary["output_token_ids"])
        assert summary["status"] == "finished" and tokens > 0
        assert stored[summary["run_id"]]["num_events"] == tokens + 2  # run started, each token, run finished


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


@pytest.fixture(scope="module")
def page(app_url, browser):
    page = open_page(browser, app_url)
    yield page
    page.close()


def test_browser_run_step_library_import_compare(page):
    pick(page, "decoder", "greedy", option="· greedy —")
    wait_text(page, "model-status", "is loaded")
    page.click("#step-button")
    wait_text(page, "run-status", "1 model calls")
    page.click("#step-button")
    wait_text(page, "run-status", "2 model calls")
    assert page.locator("#live-tokens [data-step]").count() == 2
    settled(page, "live-primary", "live-timeline")  # the figures drawn, not caught drawing, in the screenshot
    page.wait_for_selector("#live-primary .main-svg")
    page.wait_for_selector("#live-timeline .main-svg")
    shot(page, "01-two-steps")
    page.click("#run-button")
    wait_text(page, "run-status", "finished")
    shot(page, "02-finished")

    open_tab(page, "Library")
    page.click("#refresh-runs")
    page.wait_for_timeout(1000)
    page.locator("#runs-table").get_by_text("tiny-random-llama", exact=True).first.click()  # a row of our runs
    page.wait_for_function("document.querySelector('#run-id textarea, #run-id input').value.length > 8")
    page.click("#open-run")
    page.wait_for_selector("#replay-tokens [data-step]")
    page.locator("#replay-tokens [data-step='3']").click()  # clicking a token selects its step
    page.wait_for_selector("#replay-tokens [data-selected][data-step='3']")
    # a click on the entropy chart (plotly's own click event, with the point's customdata) does too, once the
    # app's listener is on the freshly drawn chart
    page.wait_for_function("document.querySelector('#replay-timeline .js-plotly-plot')?.dataset.deHooked === '1'")
    page.evaluate("document.querySelector('#replay-timeline .js-plotly-plot').emit('plotly_click', {points: [{customdata: 1}]})")
    page.wait_for_selector("#replay-tokens [data-selected][data-step='1']")
    shot(page, "03-replay")

    if SAMPLE is not None:
        open_section(page, "export-import")
        page.locator("#import-file input[type=file]").set_input_files(str(SAMPLE))
        wait_text(page, "library-status", "Imported as run")
        shot(page, "04-imported")

    open_tab(page, "Compare")
    page.locator("#compare-ids input").click()  # its choices come from the library table
    page.locator("[role=option]").nth(0).click()
    page.locator("[role=option]").nth(1).click()
    page.keyboard.press("Escape")  # close the option list so it does not cover the button
    page.click("#compare-button")
    page.wait_for_selector("#compare-aligned [data-step]", timeout=30000)
    shot(page, "05-compare")

    page.goto(page.url.split("?")[0] + "?__theme=dark")  # the same replay in the dark theme
    open_tab(page, "Library")
    type_into(page, "filter-text", "capital of France", enter=True)  # the beam sample's prompt
    wait_text(page, "runs-table", "beam")
    page.locator("#runs-table").get_by_text("beam", exact=True).first.click()
    page.wait_for_function("document.querySelector('#run-id textarea, #run-id input').value.length > 8")
    page.click("#open-run")
    wait_text(page, "library-status", "finished")
    page.wait_for_timeout(1500)
    shot(page, "06-dark-beam-replay")
    assert page.outside_requests == [], "the app must work offline: nothing fetched from elsewhere"


# Each change of the Run button's disabled state, or of the page under the parameter form, with whether the picked
# decoder's form is on the page then.
WATCH_RUN_BUTTON_JS = """([name]) => {
    window.runButtonLog = [];
    const run = document.getElementById('run-button');
    const note = () => window.runButtonLog.push([run.disabled, !!document.getElementById('params-of-' + name)]);
    new MutationObserver(note).observe(run, {attributes: true, attributeFilter: ['disabled']});
    new MutationObserver(note).observe(document.body, {childList: true, subtree: true});
}"""


def test_a_decoder_change_holds_run_and_step_until_its_form_is_on_the_page(app_url, browser):
    """Run and Step are wired to the form's render: a click before the new form arrives would send the old one."""
    page = open_page(browser, app_url)
    wait_text(page, "model-status", "is loaded")
    page.evaluate(WATCH_RUN_BUTTON_JS, ["beam"])
    pick(page, "decoder", "beam", option="· beam —")
    page.wait_for_selector("#params-of-beam")
    page.wait_for_function("!document.getElementById('run-button').disabled"
                           " && !document.getElementById('step-button').disabled")
    log = page.evaluate("window.runButtonLog")
    held = log[next(i for i, (disabled, _) in enumerate(log) if disabled):]  # from the change on
    assert held[0] == [True, False], log[:5]  # held before the form came
    assert all(disabled for disabled, form in held if not form), held  # and until it came
    assert held[-1] == [False, True], held[-5:]
    page.click("#step-button")
    wait_text(page, "run-status", "1 model calls")
    assert page.outside_requests == []
    page.close()


HOSTILE_KINDS = ["top-p-sampling", "beam-search", "dyspec-tree", "diffusion-llada", "gift-saliency", "superposed-drafts"]
# Elements a hostile string would create if any view rendered it as HTML or Markdown.
INJECTED = """(host) => [...document.querySelectorAll('img, iframe, script, style, a, [onerror], [onload]')].filter(e =>
    e.matches('[onerror], [onload], iframe')
    || ((e.getAttribute('src') || '') + (e.getAttribute('href') || '')).match(new RegExp(host + '|^javascript:'))
    || (e.matches('script, style') && e.textContent.includes(host))).map(e => e.outerHTML.slice(0, 200))"""


def test_hostile_traces_show_as_text_in_every_view(app_url, browser, tmp_path):
    """Import a hostile copy of one sample per run kind through the page, as a person picks a file, and look at
    its last step: no request leaves the app, no dialog opens, no element is injected, the text shows literally."""
    page = open_page(browser, app_url)
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    open_tab(page, "Library")
    open_section(page, "export-import")
    run_id = ""
    for stem in HOSTILE_KINDS:
        path = write_gz(hostile_copy(SAMPLES_DIR / f"{stem}.json.gz"), tmp_path / f"hostile-{stem}.json.gz")
        if page.locator("#import-file button[aria-label='Clear']").count():
            page.locator("#import-file button[aria-label='Clear']").click()  # the previous file, as a person clears it
        page.locator("#import-file input[type=file]").set_input_files(str(path))
        page.wait_for_function("([previous]) => { const value = document.querySelector('#run-id textarea, #run-id input')"
                               ".value; return value.length > 8 && value !== previous; }", arg=[run_id])
        run_id = field(page, "run-id").input_value()
        wait_text(page, "replay-tools-note", run_id[:12])  # the open's last event: the page has settled
        wait_text(page, "library-status", REASON)  # its status line quotes the reason, as text
        last = page.evaluate("document.querySelector('#replay-position input[type=number]').max")
        type_into(page, "replay-position", str(int(last)), enter=True)
        page.wait_for_timeout(300)
        settled(page, "replay-tokens", "replay-primary", "replay-timeline", "replay-detail", "replay-table")
        shot(page, f"hostile-{stem}")
        assert page.evaluate(INJECTED, EVIL_HOST) == [], stem
        type_into(page, "filter-text", "evil.example/prompt", enter=True)  # the imported run keeps its old date
        wait_text(page, "runs-table", PROMPT[:40])  # the prompt column shows the markup as typed
    assert dialogs == [] and page.outside_requests == [], (dialogs, page.outside_requests)
    page.close()


@pytest.fixture(scope="module")
def public_url(tmp_path_factory):
    for app in start_app(tmp_path_factory.mktemp("public-home"), "--public"):
        yield app.url


def test_public_mode_as_two_visitors_see_it(public_url, browser):
    """Two visitors of a public app: the model picker takes listed models only, and each visitor's Library lists
    the samples and their own runs, never the other's."""
    alice = open_page(browser, public_url)
    assert "sqlite" not in alice.locator("#header").inner_text()  # no server path on a public page
    type_into(alice, "model", "/etc/passwd")  # not a listed model: leaving the box, the picker keeps its model
    alice.wait_for_function("document.querySelector('#model input').value === 'tiny-random-llama'")
    assert "passwd" not in alice.locator("#model-status").inner_text()
    type_into(alice, "prompt", "Alice's own prompt")
    pick(alice, "decoder", "greedy", option="· greedy —")
    wait_text(alice, "model-status", "is loaded")
    alice.click("#run-button")
    wait_text(alice, "run-status", "finished")
    run_id = alice.locator("#run-status code").inner_text()
    open_tab(alice, "Library")
    type_into(alice, "filter-text", "Alice", enter=True)
    wait_text(alice, "runs-table", run_id)
    shot(alice, "public-alice")

    mallory = open_page(browser, public_url)
    open_tab(mallory, "Library")
    mallory.wait_for_function("document.querySelectorAll('#runs-table .virtual-row').length > 3")  # the samples
    type_into(mallory, "filter-text", "Alice", enter=True)
    settled(mallory, "runs-table")
    assert run_id not in mallory.locator("#runs-table").inner_text()
    type_into(mallory, "run-id", run_id, enter=True)  # typed by hand: "not found", as for a run that never was
    mallory.wait_for_selector("[data-testid=toast-body]")
    assert "no run with id" in mallory.locator("[data-testid=toast-body]").first.inner_text()
    mallory.wait_for_function("getComputedStyle(document.querySelector('[data-testid=toast-body]')).opacity === '1'")
    # (faded in: the screenshot shows the message)
    shot(mallory, "public-mallory")
    assert alice.outside_requests == [] and mallory.outside_requests == []
    alice.close()
    mallory.close()
