"""One browser session's live run: step it one model call at a time, run it, pause it, stop it.

No Gradio here: the UI holds a :class:`LiveRun` in per-session state and calls these methods.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from engine.events import Event, RunFinished
from engine.run import Run
from engine.trace import Trace


class LiveRun:
    """Pull-driven wrapper over :class:`engine.run.Run`: events are produced only when asked for."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._events: Iterator[Event] = iter(run)
        self._pause = threading.Event()
        self._lock = threading.Lock()  # Stop arrives on another thread while Run is stepping
        self.done = False
        self.paused = False  # set when a Pause ended play() before the run did

    @property
    def trace(self) -> Trace:
        return self.run.trace

    def step(self) -> list[Event]:
        """Advance by one model call: the events up to and including the next one that cost a call."""
        with self._lock:
            events = self._step()
        self.paused = not self.done  # a single step leaves the run waiting for the next
        self.run.recorder.flush()  # a waiting run is stored as far as it got, not a flush interval behind
        return events

    def _step(self) -> list[Event]:
        produced: list[Event] = []
        for event in self._events:
            produced.append(event)
            if isinstance(event, RunFinished):
                self.done = True
                break
            if getattr(event, "model_calls", 0) > 0:
                break
        else:
            self.done = True
        return produced

    def play(self) -> Iterator[list[Event]]:
        """Step until the run ends or :meth:`pause` is called; yields each step's events."""
        self._pause.clear()
        self.paused = False
        while not self.done and not self._pause.is_set():
            with self._lock:
                events = self._step()
            yield events
        self.paused = not self.done
        self.run.recorder.flush()

    def pause(self) -> None:
        self._pause.set()

    def stop(self) -> None:
        """Cancel: the run records its end (status cancelled) at the next event boundary."""
        self.run.cancel()
        self._pause.set()
        while not self.done:
            self.step()

    def abandon(self) -> None:
        """Stop without waiting, for a caller that must not block (Gradio closes a cancelled handler's generator on
        its event loop): no model call starts after this returns; the end is recorded on a thread of its own."""
        self.run.cancel()
        threading.Thread(target=self.stop, daemon=True, name=f"stop {self.trace.run_id[:12]}").start()

    @contextmanager
    def abandoned_if_closed(self) -> Iterator[None]:
        """Around a handler's generator that plays this run: when Gradio closes it (its client cancelled or went
        away), :meth:`abandon` the run, so it holds neither its memory nor a queue slot for nobody."""
        try:
            yield
        except GeneratorExit:
            self.abandon()
            raise
