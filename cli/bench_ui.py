"""``bench ui``: the app in Chromium as a person uses it, timed from both ends in one run.

- first load: server start → listening, and → page interactive (the Run button there, the prompt box editable);
- streaming lag: for every token, when the page showed it minus when the engine recorded it (p50, p95);
- Pause: tokens the engine recorded after the click (goal: at most 1);
- replay: steps per second Play reaches at the chosen speed, and steps moved after Pause (goal: 0).

The app runs in this process (so the recorder can be timed); Chromium is Debian's, driven by Playwright.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1400, "height": 900}
# Counts the token spans of the live stream whenever the page changes: (ms since epoch, tokens shown).
WATCH_TOKENS_JS = """
() => { window.__seen = []; const count = () => document.querySelectorAll('#live-tokens [data-step]').length;
  new MutationObserver(() => { const n = count(); const seen = window.__seen;
    if (!seen.length || seen[seen.length - 1][1] !== n) seen.push([Date.now(), n]); })
  .observe(document.body, {subtree: true, childList: true, characterData: true}); }
"""


@dataclass
class RecordClock:
    """Wall-clock time at which the engine recorded each output token (patched into the recorder)."""

    times: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self) -> None:
        from engine.events import TokenStep
        from engine.recorder import Recorder

        original = Recorder.record

        def record(recorder: Recorder, event: Any) -> None:
            original(recorder, event)
            if isinstance(event, TokenStep) and event.committed:
                with self.lock:
                    self.times.append(time.time())

        Recorder.record = record  # type: ignore[method-assign]

    def reset(self) -> None:
        with self.lock:
            self.times.clear()


def launch_chromium(playwright: Any) -> Any:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("bench ui needs Debian's chromium (apt-get install chromium)")
    return playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_bench(model: str, tokens: int = 40, pause_after: int = 10, replay_speed: float = 10.0) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    from ui.app import build, launch_options

    clock = RecordClock()
    clock.install()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        started = time.monotonic()
        demo = build(model, f"sqlite:///{Path(home) / 'bench.db'}")
        demo.queue(default_concurrency_limit=2).launch(server_port=port, prevent_thread_lock=True, quiet=True,
                                                       **launch_options())
        results["server_listening_s"] = time.monotonic() - started
        url = f"http://127.0.0.1:{port}/"
        try:
            with sync_playwright() as p:
                browser = launch_chromium(p)
                results.update(_first_load(browser, "tiny-random-llama"))
                page = browser.new_page(viewport=VIEWPORT)
                opened = time.monotonic()
                page.goto(url)
                page.wait_for_selector("#run-button")
                page.wait_for_function("!document.querySelector('#prompt textarea').disabled")
                results["page_interactive_s"] = time.monotonic() - opened
                results["interactive_after_start_s"] = time.monotonic() - started
                _wait_for_model(page)
                results.update(_streaming_lag(page, clock, tokens))
                results.update(_pause_latency(page, clock, pause_after))
                results.update(_replay(page, replay_speed))
                browser.close()
        finally:
            demo.close()
    _print(model, tokens, results)
    return results


def _first_load(browser: Any, model: str) -> dict[str, float]:
    """``python app.py`` started as a person starts it: when its port answers (the starting page), when the app
    answers, and when a page opened at the first answer becomes interactive (the starting page reloads itself)."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as home:
        port = free_port()
        url = f"http://127.0.0.1:{port}/"
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--port", str(port), "--db",
                                 f"sqlite:///{Path(home) / 'first.db'}"], cwd=root, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "DECODING_EXPLORER_HOME": home})
        try:
            answered, page = port_answers(url, started), browser.new_page(viewport=VIEWPORT)
            page.goto(url)
            app_up = port_answers(url, started, app=True)
            page.wait_for_selector("#run-button", timeout=120_000)
            page.wait_for_function("!document.querySelector('#prompt textarea').disabled")
            interactive = time.monotonic() - started
            page.close()
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    return {"process_port_answers_s": answered, "process_app_answers_s": app_up,
            "process_page_interactive_s": interactive}


def port_answers(url: str, started: float, app: bool = False, alive: Callable[[], bool] = lambda: True) -> float:
    """Seconds since ``started`` at which ``url`` answers at all (``app`` False) or with the app itself; raises
    RuntimeError after 120 s or once ``alive()`` says the server process has ended."""
    while time.monotonic() - started < 120:
        if not alive():
            raise RuntimeError(f"the server for {url} exited")
        try:
            urllib.request.urlopen(url, timeout=2)
            return time.monotonic() - started
        except urllib.error.HTTPError:  # the starting page (503)
            if not app:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within 120 s")


def _wait_for_model(page: Any) -> None:
    page.wait_for_function("(document.querySelector('#model-status')?.innerText || '').includes('is loaded')",
                           timeout=300_000)


def field(page: Any, elem_id: str) -> Any:
    """The text field of a component (a textarea for multi-line boxes, an input otherwise)."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=checkbox]):not([type=range])").first


def type_into(page: Any, elem_id: str, text: str, enter: bool = False) -> None:
    """Click a field, select what it holds, type ``text`` key by key, then Enter or Tab, as a person does."""
    box = field(page, elem_id)
    box.click()
    box.press("Control+a")
    box.press_sequentially(text)
    box.press("Enter" if enter else "Tab")


def pick(page: Any, elem_id: str, search: str, option: str | None = None) -> None:
    """Open a dropdown, type to filter it, and click the option whose text contains ``option`` (or ``search``);
    then check the box shows it, and pick again if not, as a person does when the list moved under the click
    (the list re-filters while the typed letters arrive)."""
    wanted = option or search
    box = page.locator(f"#{elem_id} input").first
    for _ in range(3):
        box.click()
        box.press("Control+a")
        box.press_sequentially(search)
        page.wait_for_function(  # its list has re-filtered on every typed letter: options stop moving under the click
            "([id, s]) => [...document.querySelectorAll(`#${id} [role=option]`)]"
            ".every(o => o.textContent.toLowerCase().includes(s))", arg=[elem_id, search.lower()], timeout=5000)
        page.locator("[role=option]", has_text=wanted).first.click()
        page.keyboard.press("Escape")
        try:
            page.wait_for_function("([box, wanted]) => box.value.includes(wanted)", arg=[box.element_handle(), wanted],
                                   timeout=3000)
            return
        except Exception:  # playwright's TimeoutError: the click took another option
            continue
    raise AssertionError(f"could not pick {wanted!r} in #{elem_id}: it shows {box.input_value()!r}")


def _streaming_lag(page: Any, clock: RecordClock, tokens: int) -> dict[str, float]:
    """Run ``tokens`` greedy tokens; for each, page time minus record time."""
    pick(page, "decoder", "greedy", option="· greedy —")
    type_into(page, "max-new-tokens", str(tokens))
    page.evaluate(WATCH_TOKENS_JS)
    clock.reset()
    page.click("#run-button")
    page.wait_for_function(f"document.querySelectorAll('#live-tokens [data-step]').length >= {tokens} || "
                           "(document.querySelector('#run-status')?.innerText || '').includes('finished')",
                           timeout=300_000)
    page.wait_for_timeout(500)
    seen = page.evaluate("window.__seen")
    recorded = list(clock.times)
    lags = []
    for index, at in enumerate(recorded):
        shown = next((t / 1000 for t, n in seen if n >= index + 1), None)
        if shown is not None:
            lags.append(max(0.0, shown - at))
    return {"stream_tokens": len(recorded), "stream_tokens_shown": len(lags),
            "lag_p50_s": statistics.median(lags) if lags else float("nan"), "lag_p95_s": _percentile(lags, 0.95),
            "engine_tokens_per_s": (len(recorded) - 1) / (recorded[-1] - recorded[0]) if len(recorded) > 1 else 0.0}


def _pause_latency(page: Any, clock: RecordClock, pause_after: int) -> dict[str, float]:
    """Start a long run, press Pause once ``pause_after`` tokens are shown: tokens recorded after the click."""
    page.click("#stop-button")
    type_into(page, "max-new-tokens", "400")
    page.evaluate(WATCH_TOKENS_JS)
    clock.reset()
    page.click("#run-button")
    page.wait_for_function(f"document.querySelectorAll('#live-tokens [data-step]').length >= {pause_after}",
                           timeout=120_000)
    clicked = time.time()
    page.click("#pause-button")
    page.wait_for_function("(document.querySelector('#run-status')?.innerText || '').includes('paused')",
                           timeout=60_000)
    at_click = sum(t <= clicked for t in clock.times)
    after = len(clock.times) - at_click
    page.click("#stop-button")
    return {"pause_tokens_after_click": after}


def _replay(page: Any, speed: float) -> dict[str, float]:
    """Open the longest sample in the Library, Play at ``speed`` steps/s for 4 s, Pause: the rate, and any step
    taken after Pause."""
    page.get_by_role("tab", name="Library").click()
    pick(page, "filter-decoder", "top_p", option="· top_p —")
    page.wait_for_function("[...document.querySelectorAll('#runs-table .virtual-row')]"
                           ".every(row => row.innerText.split(/\\s+/).includes('top_p'))")
    page.locator("#runs-table .virtual-row").last.click()  # the oldest: the shipped 46-token sample
    page.wait_for_timeout(500)
    page.click("#open-run")
    page.wait_for_selector("#replay-tokens [data-step]")
    page.wait_for_timeout(1500)
    type_into(page, "replay-speed", f"{speed:g}")
    position = "Number(document.querySelector('#replay-position input[type=number]').value)"
    start = page.evaluate(position)
    page.click("#replay-play")
    began = time.monotonic()
    page.wait_for_timeout(4000)
    reached = page.evaluate(position)
    rate = (reached - start) / (time.monotonic() - began)
    page.click("#replay-pause")
    page.wait_for_timeout(300)
    paused_at = page.evaluate(position)
    page.wait_for_timeout(1500)
    return {"replay_speed_set": speed, "replay_steps_per_s": rate,
            "replay_steps_after_pause": page.evaluate(position) - paused_at}


def _print(model: str, tokens: int, r: dict[str, float]) -> None:
    print(f"bench ui: model {model}, greedy stream of {tokens} tokens, Chromium {VIEWPORT['width']}x{VIEWPORT['height']}")
    print(f"  python app.py: port answers        {r['process_port_answers_s']:.2f} s after the process starts "
          f"(a starting page); the app answers at {r['process_app_answers_s']:.2f} s (imports: gradio, torch, "
          f"transformers); page interactive at {r['process_page_interactive_s']:.2f} s")
    print(f"  in process: server listening      {r['server_listening_s']:.2f} s after build() starts (modules imported)")
    print(f"  page interactive after listening  {r['page_interactive_s']:.2f} s (goal <= 3 s)")
    print(f"  streaming lag (page - engine)     p50 {r['lag_p50_s']:.3f} s, p95 {r['lag_p95_s']:.3f} s (goal p95 <= 0.5 s)"
          f" over {r['stream_tokens_shown']:.0f}/{r['stream_tokens']:.0f} tokens, engine {r['engine_tokens_per_s']:.1f} tok/s")
    print(f"  Pause                             {r['pause_tokens_after_click']:.0f} tokens recorded after the click "
          "(goal <= 1)")
    print(f"  replay Play                       {r['replay_steps_per_s']:.2f} steps/s at speed {r['replay_speed_set']:g}; "
          f"{r['replay_steps_after_pause']:.0f} steps after Pause (goal 0)")
