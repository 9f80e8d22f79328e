"""Who may do what in the app. Local mode (the default of ``./run app``): everything, as on one's own machine.
Public mode (``--public``, the default on a Space): a run belongs to the browser session that made or imported
it; a session lists, opens and compares its own runs and the shipped samples, and deletes or exports its own runs
only; models come from an allow-list only, so no typed name ever reaches the file system or the Hub."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.decoders import DecoderSpec

from engine.models import BUILTIN_NAMES, ModelError
from storage.store import MIN_PREFIX, RunNotFound, TraceStore

ALLOW_MODELS_ENV = "DECODING_EXPLORER_ALLOW_MODELS"  # comma-separated names a public app offers besides the built-ins


@dataclass
class Access:
    public: bool = False
    allowed_models: frozenset[str] = frozenset()  # public mode: the only models it loads
    shared_runs: frozenset[str] = frozenset()  # run ids every session may read (the samples)
    _owned: dict[str, set[str]] = field(default_factory=dict)  # session hash -> the runs it made or imported
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_mode(cls, public: bool, default_model: str, shared_runs: frozenset[str] = frozenset(),
                 extra_models: Iterable[str] = ()) -> Access:
        """The access of a local or public app; a public one offers the built-ins, its default model, the names in
        ``extra_models`` and those in $DECODING_EXPLORER_ALLOW_MODELS."""
        listed = os.environ.get(ALLOW_MODELS_ENV, "").split(",")
        names = {n.strip() for n in (*BUILTIN_NAMES, default_model, *extra_models, *listed) if n and n.strip()}
        return cls(public=public, allowed_models=frozenset(names) if public else frozenset(), shared_runs=shared_runs)

    def check_model(self, name: str) -> str:
        """``name`` stripped, when this app may load it; a public app refuses any other name without looking it
        up, so the message reveals nothing about the server's files."""
        name = (name or "").strip()
        if self.public and name not in self.allowed_models:
            raise ModelError(f"this public app offers only the listed models: {', '.join(sorted(self.allowed_models))}")
        return name

    def check_params(self, spec: DecoderSpec, params: Mapping[str, Any]) -> None:
        """A public app's allow-list on the parameters that name a model or folder to load (a draft model, a
        trained filter): empty, the default, or an allowed model."""
        for param in spec.params:
            value = str(params.get(param.name, param.default) or "").strip()
            if param.loads_files and value and value != param.default:
                try:
                    self.check_model(value)
                except ModelError as exc:
                    raise ModelError(f"{param.name}: {exc}") from None

    def own(self, session: str, run_id: str) -> None:
        with self._lock:
            self._owned.setdefault(session, set()).add(run_id)

    def owned(self, session: str) -> set[str]:
        with self._lock:
            return set(self._owned.get(session, ()))

    def forget(self, session: str) -> None:
        with self._lock:
            self._owned.pop(session, None)

    def readable(self, session: str) -> set[str] | None:
        """The runs ``session`` may list and open; None: all of them (local mode)."""
        return self.owned(session) | self.shared_runs if self.public else None

    def resolve(self, store: TraceStore, session: str, ref: str, change: bool = False) -> str:
        """The full id of the run ``ref`` names (a full id or a unique prefix) among those ``session`` may open, or
        with ``change``, delete and export. Another session's run is "not found": its id is not confirmed."""
        ref = (ref or "").strip()
        if not self.public:
            return store.resolve(ref)
        visible = self.owned(session) if change else self.readable(session)
        prefixed = sorted(r for r in visible if len(ref) >= MIN_PREFIX and r.startswith(ref))
        matches = [ref] if ref in visible else prefixed
        if len(matches) > 1:
            raise RunNotFound(f"run id prefix {ref!r} is ambiguous: it matches {', '.join(matches[:5])}")
        if not matches:
            raise RunNotFound(f"no run with id {ref!r}" + (" of this session" if change else ""))
        return matches[0]
