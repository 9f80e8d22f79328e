"""The app as a person meets it: ``app.py`` started on a free local port, and Debian's Chromium driven by Playwright
(never a downloaded browser). Helpers act as a person does: click, type, pick from the list, press Enter."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.bench_ui import CHROMIUM_ARGS, VIEWPORT, field, free_port, pick, port_answers, type_into  # noqa: F401 (re-exported)
from tests.workers import cores_per_worker

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
APP_LOGS: dict[str, Path] = {}  # an app's url -> its server log, quoted when a page shows an error


@dataclass
class App:
    url: str
    db_url: str


def start_app(home: Path, *args: str, model: str = "tiny-random-llama"):
    """Start ``app.py`` with an empty data home; yields an :class:`App` once it answers, stops it afterwards."""
    port = free_port()
    db_url = f"sqlite:///{home / 'app.db'}"
    env = {**{k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"},  # app.py turns it off itself
           "DECODING_EXPLORER_HOME": str(home),
           "OMP_NUM_THREADS": str(cores_per_worker())}
    log = open(home / "app.log", "w")
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--db", db_url, "--port", str(port), *args],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    APP_LOGS[url] = home / "app.log"
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        port_answers(url, started, alive=alive)  # the starting page at once, then the app
        port_answers(url, started, app=True, alive=alive)
    except RuntimeError as exc:
        proc.terminate()
        pytest.fail(f"{exc}: {(home / 'app.log').read_text()[-3000:]}")
    try:
        yield App(url, db_url)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def chromium():
    """Debian's Chromium under Playwright (skips where either is missing); yields the browser."""
    executable = shutil.which("chromium")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (./run test installs it)")
    if executable is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; ./run test installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url: str, dark: bool = False):
    """A fresh 1400x900 page at ``url``, recording in ``outside_requests`` any request that leaves the app."""
    page = browser.new_page(viewport=VIEWPORT, color_scheme="dark" if dark else "light")
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:")) else outside.append(r.url))
    page.goto(url + ("?__theme=dark" if dark else ""))
    page.wait_for_selector("#header")
    page.outside_requests = outside
    return page


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_text(page, elem_id: str, text: str, timeout: float = 60_000) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(
            "([id, text]) => (document.querySelector('#' + id)?.innerText || '').includes(text)", arg=[elem_id, text],
            timeout=timeout)
    except PlaywrightTimeout:  # say what the page showed instead, so a failure under load can be told from a bug
        element = page.locator(f"#{elem_id}").first
        shown = element.inner_text(timeout=5_000) if element.count() else None
        raise AssertionError(f"#{elem_id} never showed {text!r} in {timeout / 1000:.0f} s; it shows {shown!r}\n"
                             f"{page_state(page)}") from None


# What a person would see of where the page stands: the status lines, the toasts, the components still waiting for
# an update (Gradio shows their status tracker: slow, or lost).
PAGE_STATE_JS = """() => ({
    status: Object.fromEntries(['run-status', 'library-status', 'model-status'].map(id =>
        [id, (document.getElementById(id)?.innerText || '').trim().slice(0, 300)])),
    toasts: [...document.querySelectorAll('[data-testid=toast-body]')].map(t => t.innerText),
    updating: [...document.querySelectorAll('[data-testid=status-tracker]:not(.hide)')]
        .map(t => t.closest('[id]')?.id).filter(Boolean),
})"""


def page_state(page) -> str:
    """The page's status lines, toasts and pending components, and its app's last traceback: why a wait ran out."""
    try:
        state = page.evaluate(PAGE_STATE_JS)
    except Exception as exc:  # a closed or crashed page: say so rather than hide the test's own failure
        return f"page {page.url}: unreadable ({exc})"
    return f"page {page.url}: {state!r}{_last_traceback(page.url)}"


def _last_traceback(page_url: str) -> str:
    """The app's last traceback, where the page belongs to an app started here: what "Error" on a page was."""
    log = next((path for url, path in APP_LOGS.items() if page_url.startswith(url)), None)
    text = log.read_text(errors="replace") if log is not None and log.exists() else ""
    start = text.rfind("Traceback (most recent call last)")
    return "" if start < 0 else f"; the app's last traceback:\n{text[start:][-3000:]}"


def open_tab(page, name: str) -> None:
    """Click the tab a person sees (Gradio keeps hidden copies of tab buttons for its overflow menu)."""
    page.locator("button[role=tab]:visible", has_text=name).first.click()


def open_section(page, elem_id: str) -> None:
    """Open a collapsed accordion by clicking its label, as a person does."""
    label = page.locator(f"#{elem_id} .label-wrap").first
    if "open" not in (label.get_attribute("class") or ""):
        label.click()


def drag_to_end(page, elem_id: str) -> None:
    """Drag a slider's handle to its right end with the mouse, as a person does."""
    handle = page.locator(f"#{elem_id} input[type=range]")
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 2, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, y, steps=5)
    page.mouse.move(box["x"] + box["width"] + 20, y, steps=5)
    page.mouse.up()


def settled(page, *elem_ids: str, timeout: float = 60_000) -> None:
    """Wait until the named components have no pending update (Gradio hides their status tracker when idle)."""
    page.wait_for_function(
        "(ids) => ids.every(id => [...document.querySelectorAll(`#${id} [data-testid=status-tracker]`)]"
        ".every(t => t.classList.contains('hide')))", arg=list(elem_ids), timeout=timeout)
