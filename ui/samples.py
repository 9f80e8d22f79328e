"""Sample traces shipped in ``assets/samples``: listed by the app beside the stored runs (from memory, never written
to the database, which may be read-only), so a replay-only app has runs to show.

``decoding-explorer assets rebuild samples`` records them anew from ``assets/samples/recipes.json``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from engine.trace import Trace, read_file
from storage import RunNotFound, RunSummary, TraceStore

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "samples"

def import_samples(store: TraceStore) -> int:
    """Store every shipped sample the database does not have yet; returns how many were added."""
    added = 0
    for path in sorted(SAMPLES_DIR.glob("*.json.gz")):
        trace = read_file(path)
        try:
            store.resolve(trace.run_id)
        except KeyError:
            store.save(trace)
            added += 1
    return added


class WithSamples:
    """A store and the shipped samples, listed and opened together. The samples live in an in-memory store, so the
    database is never written for them; everything else (recording, importing, the URL) is the store's own."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self._samples = TraceStore("sqlite://")
        self._lock = threading.Lock()  # the in-memory database is one connection: one transaction at a time
        added = import_samples(self._samples)  # a new, empty store: every sample is added
        self.sample_ids = frozenset(run.run_id for run in self._samples.list_runs(limit=added))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def list_runs(self, *, limit: int = 100, offset: int = 0, **filters: Any) -> list[RunSummary]:
        """As TraceStore.list_runs over both; a sample the database also holds is listed once."""
        stored = self.store.list_runs(limit=limit + offset, **filters)
        with self._lock:
            samples = self._samples.list_runs(limit=limit + offset, **filters)
        ids = {run.run_id for run in stored}
        rows = sorted(stored + [run for run in samples if run.run_id not in ids], key=lambda run: run.run_id)
        rows.sort(key=lambda run: run.created_at, reverse=True)  # the store's order: newest first, then by id
        return rows[offset : offset + limit]

    def resolve(self, run_id: str) -> str:
        return self._either("resolve", run_id)

    def load(self, run_id: str) -> Trace:
        return self._either("load", run_id)

    def summary(self, run_id: str) -> RunSummary:
        return self._either("summary", run_id)

    def export_file(self, run_id: str, path: str | Path) -> Path:
        return self._either("export_file", run_id, path)

    def delete(self, run_id: str) -> bool:
        """Delete a stored run, else a sample (until the app restarts)."""
        if self.store.delete(run_id):
            return True
        with self._lock:
            return self._samples.delete(run_id)

    def _either(self, method: str, run_id: str, *args: Any) -> Any:
        """The store's answer, else the samples' (a sample the database also holds is the database's)."""
        try:
            return getattr(self.store, method)(run_id, *args)
        except RunNotFound:
            with self._lock:
                return getattr(self._samples, method)(run_id, *args)
