"""Trace storage: SQLAlchemy (SQLite by default, any URL) behind a small repository API.

    from storage import TraceStore
    store = TraceStore()                     # default_db_url(): $DECODING_EXPLORER_DB or a local SQLite file
    trace = record(model, "greedy", "Hello", sinks=[store.sink()])   # streamed while it runs
    store.list_runs(decoder="greedy"); store.load(trace.run_id[:8]); store.export_file(trace.run_id, "t.json.gz")
"""

from storage.connect import DatabaseDamaged, DatabaseReadOnly, StoreError
from storage.migrations import LATEST_VERSION, SchemaTooNewError
from storage.store import RunExists, RunNotFound, RunSummary, TraceStore, default_db_url

__all__ = [
    "LATEST_VERSION",
    "DatabaseDamaged",
    "DatabaseReadOnly",
    "RunExists",
    "RunNotFound",
    "RunSummary",
    "SchemaTooNewError",
    "StoreError",
    "TraceStore",
    "default_db_url",
]
