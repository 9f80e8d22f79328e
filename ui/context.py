"""What the tabs share: the store, the model pool, each session's live run, and the one place that turns user
errors into messages."""

import functools
import inspect
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from engine.limits import Limits, env_name, flag_name
from engine.params import ParamError
from engine.decoders import get_decoder
from engine.run import Run, RunSettings
from engine.trace import Trace
from engine.models import LoadedModel
from storage import RunSummary, TraceStore
from storage.user_errors import USER_ERRORS, user_message
from ui import figures
from ui.access import Access
from ui.figures.common import escape_text
from ui.pool import ModelPool
from ui.session import LiveRun


# A call of the API yields at least this often while it runs: Gradio closes a cancelled call's generator at a yield,
# so a cancel reaches the engine this late at most, plus the model call under way (a yield costs about 1 ms).
CANCEL_POLL = 0.05


def user_errors(handler: Callable) -> Callable:
    """Wrap an event handler (plain or generator) so a user error shows as a message, not a traceback. The same
    errors as the command line's (storage.user_errors)."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from handler(*args, **kwargs)
            except USER_ERRORS as exc:
                raise gr.Error(escape_text(user_message(exc))) from None
        return streaming

    @functools.wraps(handler)
    def plain(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except USER_ERRORS as exc:
            raise gr.Error(escape_text(user_message(exc))) from None
    return plain


@dataclass
class AppContext:
    store: TraceStore
    pool: ModelPool
    default_model: str
    replay_only: bool
    access: Access = field(default_factory=Access)
    limits: Limits = field(default_factory=Limits.local)  # the operator's caps per request (engine.limits)
    tabs: Any = None  # the gr.Tabs, set while building
    live: dict[str, LiveRun] = field(default_factory=dict)  # session hash -> that session's live run
    replays: dict[str, threading.Event] = field(default_factory=dict)  # session hash -> its Play's pause flag
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _running: dict[str, int] = field(default_factory=dict)  # session hash -> its requests running the engine
    _runs: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # every run made here that is still referenced

    def __post_init__(self) -> None:
        self.pool.in_use = self.models_in_use  # the pool never drops a model that a run still needs

    def models_in_use(self) -> list[LoadedModel]:
        """The models of the runs not ended yet (a paused live run's too)."""
        return [run.model for run in list(self._runs) if run.trace.status == "running"]

    @contextmanager
    def request_slot(self, session: str) -> Iterator[None]:
        """Count a request that runs the engine for ``session``; refused past the operator's limit per session."""
        cap = self.limits.session_runs
        with self._lock:
            running = self._running.get(session, 0)
            if cap is not None and running >= cap:
                raise ParamError(f"this browser session already has {running} run(s) going, this server's limit "
                                 f"(the operator raises it with {flag_name('session_runs')} or "
                                 f"${env_name('session_runs')}); wait for it to end, or Pause or Stop it")
            self._running[session] = running + 1
        try:
            yield
        finally:
            with self._lock:
                if self._running[session] > 1:
                    self._running[session] -= 1
                else:
                    del self._running[session]

    def header_html(self) -> str:
        mode = ("<br><b>Replay-only mode</b>: no model is loaded; open stored and sample runs in the Library."
                if self.replay_only else "")
        verb = "read from" if self.store.read_only else "saved to"
        where = ("Your runs are listed for this browser session only; the samples for everyone." if self.access.public
                 else f"Traces are {verb} <code>{escape_text(self.store.url)}</code>.")  # no server path in public
        if self.store.read_only:
            where += ("<br><b>Read-only database</b>: stored and sample runs can be opened and exported; nothing can "
                      "be recorded, imported or deleted.")
        return f"<h1 style='margin:0'>Decoding Explorer</h1><div style='opacity:0.75'>{where}{mode}</div>"

    def start_live(self, session: str, run: Run) -> LiveRun:
        """Make ``run`` this session's live run (stopping the one it replaces), recorded to the store."""
        live = LiveRun(run)
        with self._lock:
            old = self.live.pop(session, None)
            self.live[session] = live
        if old is not None and not old.done:
            old.stop()
        return live

    def start_replay(self, session: str) -> threading.Event:
        """A new pause flag for this session's Play (a Play already walking is paused)."""
        self.pause_replay(session)
        paused = self.replays[session] = threading.Event()
        return paused

    def pause_replay(self, session: str) -> None:
        if (paused := self.replays.get(session)) is not None:
            paused.set()

    def model(self, name: str) -> LoadedModel:
        """The loaded model ``name`` (waiting for its load), if this app may load it."""
        return self.pool.get(self.access.check_model(name))

    def start_model(self, name: str) -> None:
        """Start loading ``name`` in the background, if this app may load it."""
        self.pool.start(self.access.check_model(name))

    def new_run(self, session: str, model: str, decoder: str, prompt: str, params: dict[str, Any],
                settings: RunSettings) -> Run:
        """A run of ``session``'s, recorded to the store."""
        self.access.check_params(get_decoder(decoder), params)
        run = Run(self.model(model), decoder, prompt, params, settings, sinks=[self.store.sink()], limits=self.limits)
        self.access.own(session, run.trace.run_id)
        self._runs.add(run)
        return run

    def load(self, session: str, ref: str) -> Trace:
        """A stored run ``session`` may open, by id or prefix, within the operator's limit on events."""
        run_id = self.access.resolve(self.store, session, ref)
        cap = self.limits.trace_events
        if cap is not None and (events := self.store.summary(run_id).num_events) > cap:
            raise ParamError(f"run {run_id[:12]} has {events:,} events, more than this server opens ({cap:,}: the "
                             f"operator raises it with {flag_name('trace_events')}); `decoding-explorer runs show "
                             "--steps` reads it a batch at a time")
        return self.store.load(run_id)

    def import_file(self, session: str, path: str) -> str:
        """Import a trace file as a new run of ``session``'s, within the operator's limit on events."""
        run_id = self.store.import_file(path, new_id=True, max_events=self.limits.trace_events)
        self.access.own(session, run_id)
        return run_id

    def list_runs(self, session: str, **filters: Any) -> list[RunSummary]:
        """The stored runs ``session`` may open, newest first (``filters`` as in TraceStore.list_runs)."""
        return self.store.list_runs(run_ids=self.access.readable(session), **filters)

    def forget_session(self, request: gr.Request) -> None:
        self.access.forget(request.session_hash)
        self.pause_replay(request.session_hash)
        self.replays.pop(request.session_hash, None)
        live = self.live.pop(request.session_hash, None)
        if live is not None and not live.done:
            live.stop()


def status_html(trace: Trace | None, paused: bool = False) -> str:
    """One line on a run: status (paused while waiting for Run or Step), reason, tokens, calls, speed, id."""
    if trace is None:
        return ""
    m = trace.metrics
    status = "paused" if paused and trace.status == "running" else trace.status
    reason = f" — {escape_text(trace.reason)}" if trace.reason else ""  # may quote user input
    if figures.diffusion_steps(trace):
        calls = escape_text(figures.diffusion_summary(trace))
    else:
        calls = f"{m.get('model_calls', 0)} model calls"
        if "mean_accepted_tokens" in m:
            calls += f" · {m['mean_accepted_tokens']} tokens per target call · acceptance {m.get('acceptance_rate', 0):.0%}"
    return (f"<b>{status}</b>{reason} · {m.get('new_tokens', 0)} tokens · {calls} · "
            f"{m.get('tokens_per_second', 0)} tok/s · run <code>{escape_text(trace.run_id[:12])}</code>")


def api_record(app: AppContext) -> Callable:
    def record(model: str, decoder_name: str, prompt_text: str, params: dict, request: gr.Request, seed_value: int = 0,
               max_new_tokens: int = 64, chat_on: bool = False) -> Iterator[dict]:
        """Record a run to the end and return the same summary as ``decoding-explorer record --json``; while it
        runs, its progress (run id, status, tokens, model calls). Cancelling the call stops the run."""
        # RunSettings.check types and checks the numbers, so a caller's "nan" or 2**70 gets a message, not a traceback
        settings = RunSettings(max_new_tokens=max_new_tokens, seed=seed_value, chat=bool(chat_on))
        with app.request_slot(request.session_hash):
            run = app.new_run(request.session_hash, model, decoder_name, prompt_text, params or {}, settings)
            yield from _progress(run)
        yield run.trace.summary()

    return user_errors(record)


def _progress(run: Run) -> Iterator[dict]:
    """Run ``run`` to its end, yielding its progress at least every CANCEL_POLL seconds: Gradio closes a cancelled
    or disconnected call's generator at a yield, which stops the run (status cancelled) before its next model call."""
    live = LiveRun(run)
    last = time.monotonic()
    with live.abandoned_if_closed():
        for _ in live.play():
            if time.monotonic() - last >= CANCEL_POLL:
                last = time.monotonic()
                metrics = run.trace.metrics
                yield {"run_id": run.trace.run_id, "status": run.trace.status,
                       "new_tokens": metrics.get("new_tokens", 0), "model_calls": metrics.get("model_calls", 0)}


def api_list_runs(app: AppContext) -> Callable:
    def list_runs(request: gr.Request, limit: int = 50) -> list[dict]:
        """Stored runs the caller may open, newest first."""
        return [r.__dict__ for r in app.list_runs(request.session_hash, limit=int(limit))]

    return list_runs
