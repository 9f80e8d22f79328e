"""The trace library: save, stream-append, load, list, delete, export and import runs."""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import platformdirs
from sqlalchemy import Connection, Select, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from engine.events import Event
from engine.recorder import TraceSink
from engine.trace import Trace, new_run_id, read_file, write_file
from storage import codec, connect, migrations
from storage.schema import events, runs, vocab

PREVIEW_CHARS = 200  # output text shown per run in listings
MIN_PREFIX = 4
_INSERT_CHUNK = 1000  # events per INSERT batch: bounds memory for huge imports


class RunNotFound(KeyError):
    """No run with this id (or no single run with this id prefix)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class RunExists(ValueError):
    """A run with this id is already stored."""


@dataclass(frozen=True)
class RunSummary:
    """One row of the library listing."""

    run_id: str
    created_at: str
    model: str
    decoder: str
    status: str
    prompt: str
    output_text: str  # at most PREVIEW_CHARS characters
    metrics: dict[str, float]
    num_events: int
    parent_run_id: str | None  # set for a branch: the run it continues
    branch_step: int | None  # the parent's output position the branch leaves from


def default_db_url() -> str:
    """``$DECODING_EXPLORER_DB``, else a SQLite file in ``$DECODING_EXPLORER_HOME`` or the user data dir."""
    url = os.environ.get("DECODING_EXPLORER_DB")
    if url:
        return url
    home = Path(os.environ.get("DECODING_EXPLORER_HOME") or platformdirs.user_data_dir("decoding-explorer"))
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'traces.db'}"


class TraceStore:
    """Runs in a SQL database (SQLite by default); opening upgrades the schema to the current version.

    Runs are addressed by their full id or by a unique prefix of at least four characters.
    """

    def __init__(self, url: str | None = None) -> None:
        self._engine = connect.create(url or default_db_url())
        self._writer = self._engine.execution_options(**{connect.WRITE_OPTION: True})
        try:
            self._upgrade_schema()
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"TraceStore({self.url!r})"

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _upgrade_schema(self) -> None:
        with self._engine.connect() as conn:  # read first, so an up-to-date database takes no write lock
            version = migrations.current_version(conn)
        migrations.check_readable(version)
        if version < migrations.LATEST_VERSION:
            with self._write() as conn:
                migrations.upgrade(conn)

    def _write(self) -> AbstractContextManager[Connection]:
        """A write transaction (on SQLite it holds the write lock from its start)."""
        return self._writer.begin()

    # ------------------------------------------------------------ writing

    def sink(self) -> TraceSink:
        """A recorder sink that streams the run into this store as it proceeds."""
        return _StoreSink(self)

    def save(self, trace: Trace, replace: bool = False) -> str:
        """Store a whole trace in one transaction; returns its run id."""
        codec.check_vocab_ids(trace.vocab)
        with self._write() as conn:
            if _exists(conn, trace.run_id):
                if not replace:
                    raise RunExists(
                        f"run {trace.run_id} already exists; replace=True overwrites it, "
                        "import_file(..., new_id=True) stores a copy under a fresh id"
                    )
                conn.execute(delete(runs).where(runs.c.run_id == trace.run_id))
            conn.execute(insert(runs), codec.run_row(trace))
            _insert_events(conn, trace.run_id, 0, trace.events)
            _insert_vocab(conn, trace.run_id, trace.vocab)
        return trace.run_id

    def _open_run(self, trace: Trace) -> None:
        with self._write() as conn:
            if _exists(conn, trace.run_id):
                raise RunExists(f"run {trace.run_id} already exists")
            conn.execute(insert(runs), codec.run_row(trace))

    def _append(self, trace: Trace, new_events: Sequence[Event], new_vocab: Mapping[int, str]) -> None:
        with self._write() as conn:
            _update_run(conn, trace)
            next_seq = conn.scalar(select(func.coalesce(func.max(events.c.seq) + 1, 0)).where(events.c.run_id == trace.run_id))
            _insert_events(conn, trace.run_id, next_seq, new_events)
            _insert_vocab(conn, trace.run_id, new_vocab)

    def _close_run(self, trace: Trace) -> None:
        with self._write() as conn:
            _update_run(conn, trace)

    def delete(self, run_id: str) -> bool:
        """Delete a run with its events and vocabulary; False when no run matches."""
        with self._write() as conn:
            full_id = _match(conn, run_id)
            if full_id is None:
                return False
            conn.execute(delete(runs).where(runs.c.run_id == full_id))
        return True

    def import_file(self, path: str | Path, replace: bool = False, new_id: bool = False) -> str:
        """Import a JSON trace file (validated; nothing is stored unless it is valid); returns the run id."""
        if replace and new_id:
            raise ValueError("choose replace=True or new_id=True, not both")
        trace = read_file(path)
        if new_id:
            trace.run_id = new_run_id()
        return self.save(trace, replace=replace)

    # ------------------------------------------------------------ reading

    def resolve(self, run_id: str) -> str:
        """The full id of the run named by ``run_id`` (a full id or a unique prefix)."""
        with self._engine.connect() as conn:
            return _resolve(conn, run_id)

    def load(self, run_id: str) -> Trace:
        with self._engine.connect() as conn:  # one read transaction: a consistent snapshot of a growing run
            full_id = _resolve(conn, run_id)
            run = conn.execute(select(runs).where(runs.c.run_id == full_id)).mappings().one()
            event_rows = conn.execute(select(events).where(events.c.run_id == full_id).order_by(events.c.seq)).mappings().all()
            vocab_rows = conn.execute(select(vocab).where(vocab.c.run_id == full_id)).mappings().all()
        return codec.trace_from_rows(run, event_rows, vocab_rows)

    def export_file(self, run_id: str, path: str | Path) -> Path:
        """Write a run as a JSON trace file; a ``.gz`` suffix compresses it."""
        return write_file(self.load(run_id), path)

    def list_runs(
        self,
        model: str | None = None,
        decoder: str | None = None,
        text: str | None = None,
        status: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int = 100,
        offset: int = 0,
        run_ids: Collection[str] | None = None,
    ) -> list[RunSummary]:
        """Newest runs first. ``text`` matches prompt or output text (case-insensitive substring);
        ``since`` is inclusive and ``until`` exclusive, compared with the ISO-8601 ``created_at``; ``run_ids``, when
        given, lists only those runs."""
        query = _summaries()
        if run_ids is not None:
            query = query.where(runs.c.run_id.in_(list(run_ids)))
        for column, value in ((runs.c.model, model), (runs.c.decoder, decoder), (runs.c.status, status)):
            if value is not None:
                query = query.where(column == value)
        if text:
            query = query.where(
                or_(runs.c.prompt.icontains(text, autoescape=True), runs.c.output_text.icontains(text, autoescape=True))
            )
        if since is not None:
            query = query.where(runs.c.created_at >= _iso(since))
        if until is not None:
            query = query.where(runs.c.created_at < _iso(until))
        query = query.order_by(runs.c.created_at.desc(), runs.c.run_id).limit(limit).offset(offset)
        with self._engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [_summary(row) for row in rows]

    def summary(self, run_id: str) -> RunSummary:
        """One run's summary (as :meth:`list_runs` gives it) without reading its events."""
        with self._engine.connect() as conn:
            row = conn.execute(_summaries().where(runs.c.run_id == _resolve(conn, run_id))).mappings().one()
        return _summary(row)


def _summaries() -> Select:
    """The query behind :class:`RunSummary` rows: a run's columns, its output's preview and its event count."""
    num_events = select(func.count()).where(events.c.run_id == runs.c.run_id).scalar_subquery()
    return select(
        runs.c.run_id,
        runs.c.created_at,
        runs.c.model,
        runs.c.decoder,
        runs.c.status,
        runs.c.prompt,
        func.substr(runs.c.output_text, 1, PREVIEW_CHARS).label("output_text"),
        runs.c.metrics,
        num_events.label("num_events"),
        runs.c.parent_run_id,
        runs.c.branch_step,
    )


def _summary(row: Mapping[str, Any]) -> RunSummary:
    return RunSummary(**{**row, "metrics": json.loads(row["metrics"])})


class _StoreSink:
    """TraceSink over a store: a crash leaves the run stored as far as it got, with status "running"."""

    def __init__(self, store: TraceStore) -> None:
        self._store = store

    def open(self, trace: Trace) -> None:
        self._store._open_run(trace)

    def append(self, trace: Trace, events: Sequence[Event], vocab: Mapping[int, str]) -> None:
        self._store._append(trace, events, vocab)

    def close(self, trace: Trace) -> None:
        self._store._close_run(trace)


# ---------------------------------------------------------------- helpers


def _exists(conn: Connection, run_id: str) -> bool:
    return conn.scalar(select(runs.c.run_id).where(runs.c.run_id == run_id)) is not None


def _match(conn: Connection, ref: str) -> str | None:
    """The full id for ``ref``, None when nothing matches; an ambiguous prefix is an error."""
    if _exists(conn, ref):
        return ref
    if len(ref) < MIN_PREFIX:
        return None
    # substr, not LIKE: exact and case-sensitive on every backend, with no wildcard escaping
    query = select(runs.c.run_id).where(func.substr(runs.c.run_id, 1, len(ref)) == ref).limit(6)
    matches = conn.scalars(query).all()
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RunNotFound(f"run id prefix {ref!r} is ambiguous: it matches {shown}; give more characters")
    return matches[0] if matches else None


def _resolve(conn: Connection, ref: str) -> str:
    full_id = _match(conn, ref)
    if full_id is None:
        hint = "" if len(ref) >= MIN_PREFIX else f" (a prefix needs at least {MIN_PREFIX} characters)"
        raise RunNotFound(f"no run with id {ref!r}{hint}")
    return full_id


def _update_run(conn: Connection, trace: Trace) -> None:
    values = codec.run_row(trace)
    del values["run_id"]
    if conn.execute(update(runs).where(runs.c.run_id == trace.run_id).values(values)).rowcount == 0:
        raise RunNotFound(f"run {trace.run_id} is not in the store (it was never opened, or was deleted)")


def _insert_events(conn: Connection, run_id: str, first_seq: int, new_events: Sequence[Event]) -> None:
    for start in range(0, len(new_events), _INSERT_CHUNK):
        chunk = new_events[start : start + _INSERT_CHUNK]
        rows = [{"run_id": run_id, "seq": first_seq + start + i, **codec.event_row(e)} for i, e in enumerate(chunk)]
        conn.execute(insert(events), rows)


def _insert_vocab(conn: Connection, run_id: str, texts: Mapping[int, str]) -> None:
    if not texts:
        return
    rows = [{"run_id": run_id, "token_id": token_id, "text": text} for token_id, text in texts.items()]
    conn.execute(_insert_ignoring_duplicates(conn), rows)


def _insert_ignoring_duplicates(conn: Connection) -> Any:
    # A sink may be handed a token text the store already has; that is not an error.
    dialect = {"sqlite": sqlite, "postgresql": postgresql}.get(conn.dialect.name)
    if dialect is None:
        return insert(vocab)
    return dialect.insert(vocab).on_conflict_do_nothing()


def _iso(moment: datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:  # naive datetimes are taken as UTC, like the recorded created_at
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")

