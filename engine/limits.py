"""What one request may cost: the operator's caps on a run's size, checked before any model work, and the guard
that stops a run at its next model call once it is cancelled or has used its compute time.

A decoder parameter that multiplies a run's memory or time names its cap once, in its schema
(``Param(..., limit="beams")``); :func:`check_request` reads those tags, so no decoder repeats the check.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from engine.params import ParamError

if TYPE_CHECKING:
    from engine.decoders.base import DecoderSpec
    from engine.run import RunSettings

ENV_PREFIX = "DECODING_EXPLORER_"
UNLIMITED = ("", "none", "off", "unlimited")  # what an operator writes for "no cap"


def _cap(meaning: str, default: int | None = None) -> Any:
    return field(default=default, metadata={"help": meaning})


@dataclass(frozen=True)
class Limits:
    """Per-request caps set by the operator; None: no cap beyond the schemas' own ranges and the model's context.

    Each field's operator setting is ``--<field>-limit`` of ``app.py`` or ``$DECODING_EXPLORER_<FIELD>_LIMIT``.
    """

    max_new_tokens: int | None = _cap("tokens a run may generate")
    prompt_tokens: int | None = _cap("tokens of a prompt (the model's context applies anyway)")
    beams: int | None = _cap("hypotheses kept side by side (beam search, look-ahead beams, path search)")
    samples: int | None = _cap("sequences drawn together (best-of-N, particles, superposed drafts)")
    draft_tokens: int | None = _cap("tokens drafted or verified in one forward (draft length, tree size, window)")
    attention_mb: float | None = _cap("megabytes of attention a run may capture")
    record_top_k: int | None = _cap("candidates recorded per step (the trace's size)")
    run_seconds: float | None = _cap("seconds of compute of one run (pauses between Steps do not count)")
    trace_events: int | None = _cap("events of a trace imported or opened in the app (its memory and time)")
    session_runs: int | None = _cap("requests one browser session may have running at once", 1)

    @classmethod
    def local(cls) -> Limits:
        """One person on their own machine: only the schemas' ranges, as before limits existed."""
        return cls()

    @classmethod
    def public(cls) -> Limits:
        """A shared server on a few CPU cores (a free Space): a run of a 135M model takes a minute at most."""
        return cls(max_new_tokens=512, prompt_tokens=2048, beams=8, samples=8, draft_tokens=80, attention_mb=8.0,
                   record_top_k=50, run_seconds=120.0, trace_events=100_000)

    @classmethod
    def from_env(cls, public: bool, environ: Mapping[str, str] | None = None) -> Limits:
        """The mode's defaults, each replaced by its ``$DECODING_EXPLORER_<FIELD>_LIMIT`` where that is set."""
        environ = os.environ if environ is None else environ
        base = cls.public() if public else cls.local()
        given = {f.name: environ[env_name(f.name)] for f in fields(cls) if env_name(f.name) in environ}
        return base.updated(given, lambda name: "$" + env_name(name))

    @classmethod
    def from_args(cls, args: argparse.Namespace, public: bool) -> Limits:
        """``from_env``, then the ``--<field>-limit`` options given on the command line (see :func:`add_arguments`)."""
        given = {f.name: value for f in fields(cls) if (value := getattr(args, f"{f.name}_limit", None)) is not None}
        return cls.from_env(public).updated(given, flag_name)

    def updated(self, given: Mapping[str, str], setting: Callable[[str], str]) -> Limits:
        """These limits with the fields in ``given`` parsed from text (``none`` lifts a cap); ``setting`` names the
        operator's setting of a field in messages."""
        return replace(self, **{name: _parse(name, text, setting(name)) for name, text in given.items()})


def env_name(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}_LIMIT"


def flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}-limit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--<field>-limit`` options of an app's command line; each falls back to its environment variable."""
    group = parser.add_argument_group("limits per request (default: Limits.local(), or Limits.public() with --public; "
                                      "'none' lifts one)")
    for f in fields(Limits):
        group.add_argument(flag_name(f.name), metavar="N", default=None,
                           help=f"{f.metadata['help']} (or ${env_name(f.name)})")


def check_request(spec: DecoderSpec, params: Mapping[str, Any], settings: RunSettings, prompt_tokens: int,
                  limits: Limits) -> None:
    """Refuse a run that asks for more than ``limits`` allow, naming the limit and how the operator raises it."""
    _at_most(limits, "max_new_tokens", settings.max_new_tokens, "max_new_tokens")
    _at_most(limits, "prompt_tokens", prompt_tokens, "the prompt's token count")
    _at_most(limits, "record_top_k", settings.record_top_k, "record_top_k")
    if settings.attention is not None:
        _at_most(limits, "attention_mb", settings.attention.max_bytes / 2**20, "the attention capture budget (MB)")
    for param in spec.params:
        if param.limit is not None:
            _at_most(limits, param.limit, params[param.name], param.name)


def _at_most(limits: Limits, name: str, value: float, what: str) -> None:
    cap = getattr(limits, name)
    if cap is not None and value > cap:
        raise ParamError(f"{what} is {value:g}, above this server's limit of {cap:g} on {name.replace('_', ' ')} "
                         f"(the operator raises it with {flag_name(name)} or ${env_name(name)})")


def _parse(name: str, text: str, setting: str) -> int | float | None:
    kind = next(f.type for f in fields(Limits) if f.name == name)
    text = str(text).strip().lower()
    if text in UNLIMITED:
        return None
    try:
        value = float(text) if "float" in kind else int(text)
    except ValueError:
        raise ParamError(f"{setting} must be {'a number' if 'float' in kind else 'a whole number'} or 'none', "
                         f"got {text!r}") from None
    if not 0 < value < float("inf"):
        raise ParamError(f"{setting} must be above 0 (or 'none'), got {text!r}")
    return value


class RunStopped(BaseException):
    """Raised at the model call of a run that was cancelled or used its time. A BaseException, as KeyboardInterrupt
    is, so that a decoder's ``except Exception`` cannot swallow it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_ACTIVE: ContextVar[RunGuard | None] = ContextVar("decoding_explorer_run_guard", default=None)


@dataclass
class RunGuard:
    """A run's cancel flag and compute clock, checked before every model call made while the run advances."""

    cancel: threading.Event = field(default_factory=threading.Event)
    max_seconds: float | None = None
    used_seconds: float = 0.0
    _since: float | None = None  # when the current advance began

    def check(self) -> None:
        if self.cancel.is_set():
            raise RunStopped("stopped by the user")
        used = self.used_seconds + (time.monotonic() - self._since if self._since is not None else 0.0)
        if self.max_seconds is not None and used > self.max_seconds:
            raise RunStopped(f"stopped after {self.max_seconds:g} s of compute, this server's limit per run (the "
                             f"operator raises it with {flag_name('run_seconds')} or ${env_name('run_seconds')})")

    def advance(self, events: Iterator[Any]) -> Iterator[Any]:
        """``events``, each produced with this guard active: model calls inside may raise :class:`RunStopped`."""
        try:
            while True:
                with self._active():
                    try:
                        event = next(events)
                    except StopIteration:
                        return
                yield event
        finally:
            events.close()

    @contextmanager
    def _active(self) -> Iterator[None]:
        token = _ACTIVE.set(self)  # set and reset within one advance: a run may advance on a new thread each time
        self._since = time.monotonic()
        try:
            yield
        finally:
            self.used_seconds += time.monotonic() - self._since
            self._since = None
            _ACTIVE.reset(token)


def check_run() -> None:
    """Before a model call: raise :class:`RunStopped` if the run making it was cancelled or ran out of time."""
    guard = _ACTIVE.get()
    if guard is not None:
        guard.check()
