"""The trace library: save, stream-append, load, list, delete, export and import runs."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import platformdirs
import psutil
from sqlalchemy import (
    Connection,
    ExceptionContext,
    Row,
    Select,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from engine.events import Event, TraceFormatError
from engine.params import Param, check_text, shown
from engine.recorder import TraceSink
from engine.trace import Trace, new_run_id, stream_file, write_file
from storage import codec, connect, migrations
from storage.schema import events, runs, vocab

PREVIEW_CHARS = 200  # output text shown per run in listings
MIN_PREFIX = 4
_INSERT_CHUNK = 1000  # events per INSERT batch: bounds memory for huge imports
_LIMIT = Param("limit", "int", 100, "most runs listed", min=0)  # int64, as the database takes
_OFFSET = Param("offset", "int", 0, "runs skipped", min=0)
# A running run written from another host, with no append for this long, is taken as interrupted (a run of this
# host is checked exactly: its writer process is gone). A paused run wrongly marked runs again at its next append.
FOREIGN_WRITER_TIMEOUT = timedelta(hours=1)
_HOST = socket.gethostname()


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
    connect.make_folder(home)
    return f"sqlite:///{home / 'traces.db'}"


class TraceStore:
    """Runs in a SQL database (SQLite by default); opening upgrades the schema to the current version and marks the
    runs whose writer died ``interrupted``.

    Runs are addressed by their full id or by a unique prefix of at least four characters. A damaged database is
    refused (:class:`connect.DatabaseDamaged`); a read-only one (``read_only``, or a SQLite file that cannot be
    written) is listed and loaded, and refuses writes with :class:`connect.DatabaseReadOnly`.
    """

    def __init__(self, url: str | None = None, read_only: bool = False) -> None:
        self._engine = connect.create(url or default_db_url(), read_only)
        self._writer = self._engine.execution_options(**{connect.WRITE_OPTION: True})
        self._damage: connect.DatabaseDamaged | None = None  # once seen, nothing more is written
        event.listen(self._engine, "handle_error", self._user_error)
        try:
            self._upgrade_schema()
            self._mark_interrupted()
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def url(self) -> str:
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def read_only(self) -> bool:
        return connect.is_read_only(self._engine)

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
            if self.read_only:
                raise connect.DatabaseReadOnly(
                    f"the database {connect.describe(self._engine)} is read-only and has schema version {version}, "
                    f"older than this Decoding Explorer's {migrations.LATEST_VERSION}: open it once with write access "
                    "so it can be upgraded"
                )
            with self._write() as conn:
                migrations.upgrade(conn)

    def _write(self) -> AbstractContextManager[Connection]:
        """A write transaction (on SQLite it holds the write lock from its start)."""
        if self._damage is not None:
            raise self._damage
        if self.read_only:
            raise connect.read_only_error(connect.describe(self._engine))
        return self._writer.begin()

    def _user_error(self, context: ExceptionContext) -> BaseException | None:
        """The store's boundary: a damaged, read-only or unopenable database becomes a user error (see
        connect.user_error); a damaged one is never written to again."""
        error = connect.user_error(context.original_exception, connect.describe(self._engine))
        if isinstance(error, connect.DatabaseDamaged):
            self._damage = error
        return error

    def _mark_interrupted(self) -> None:
        """Mark ``interrupted`` the running runs whose writer is gone; their events stay."""
        if self.read_only:
            return
        with self._engine.connect() as conn:
            running = conn.execute(
                select(runs.c.run_id, runs.c.writer_host, runs.c.writer_pid, runs.c.writer_started, runs.c.heartbeat_at)
                .where(runs.c.status == "running", runs.c.writer_host.is_not(None))
            ).all()
        gone = [(row, reason) for row in running if (reason := _writer_gone(row))]
        if not gone:
            return
        with self._write() as conn:
            for row, reason in gone:  # unless its writer wrote meanwhile
                still_gone = update(runs).where(runs.c.run_id == row.run_id, runs.c.status == "running",
                                                runs.c.heartbeat_at == row.heartbeat_at)
                conn.execute(still_gone.values(status="interrupted", reason=reason))

    # ------------------------------------------------------------ writing

    def sink(self) -> TraceSink:
        """A recorder sink that streams the run into this store as it proceeds."""
        return _StoreSink(self)

    def save(self, trace: Trace, replace: bool = False) -> str:
        """Store a whole trace in one transaction; returns its run id."""
        codec.check_vocab_ids(trace.vocab)
        with self._write() as conn:
            _insert_run(conn, trace, replace)
            _insert_events(conn, trace.run_id, 0, trace.events)
            _insert_vocab(conn, trace.run_id, trace.vocab)
        return trace.run_id

    def _open_run(self, trace: Trace) -> None:
        with self._write() as conn:
            if _exists(conn, trace.run_id):
                raise RunExists(f"run {trace.run_id} already exists")
            writer = {"writer_host": _HOST, "writer_pid": os.getpid(), "writer_started": _process_started()}
            conn.execute(insert(runs), {**codec.run_row(trace), **writer, "heartbeat_at": _now()})

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

    def import_file(self, path: str | Path, replace: bool = False, new_id: bool = False,
                    max_events: int | None = None) -> str:
        """Import a JSON trace file; returns the run id. ``max_events``: refuse a longer trace (a server's limit).

        The file is streamed: its events are validated and stored a batch at a time in one transaction, so memory stays
        bounded however long the trace, and a file found invalid anywhere stores nothing (the transaction rolls back).
        """
        if replace and new_id:
            raise ValueError("choose replace=True or new_id=True, not both")
        with stream_file(path) as reader, self._write() as conn:
            trace = reader.trace
            if new_id:
                trace.run_id = new_run_id()
            _insert_run(conn, trace, replace)
            stream = reader.events()
            for first_seq in itertools.count(0, _INSERT_CHUNK):
                batch = list(itertools.islice(stream, _INSERT_CHUNK))
                if not batch:
                    break
                if max_events is not None and first_seq + len(batch) > max_events:
                    raise TraceFormatError(f"the trace has more than {max_events:,} events, the most this server takes")
                _insert_events(conn, trace.run_id, first_seq, batch)
            codec.check_vocab_ids(trace.vocab)  # complete once the events are read: it may follow them
            _insert_vocab(conn, trace.run_id, trace.vocab)
        return trace.run_id

    # ------------------------------------------------------------ reading

    def resolve(self, run_id: str) -> str:
        """The full id of the run named by ``run_id`` (a full id or a unique prefix)."""
        with self._engine.connect() as conn:
            return _resolve(conn, run_id)

    def load(self, run_id: str) -> Trace:
        with self.reading(run_id) as (trace, stream):
            trace.events = list(stream)
        return trace

    @contextmanager
    def reading(self, run_id: str) -> Iterator[tuple[Trace, Iterator[Event]]]:
        """A run without its events (but with its vocabulary), and its events in order, read a batch at a time: a run
        of a million steps is summarised or exported in bounded memory.

        Both come from one read transaction, a consistent snapshot of a growing run; read the events inside the block.
        """
        with self._engine.connect() as conn:
            full_id = _resolve(conn, run_id)
            run = conn.execute(select(runs).where(runs.c.run_id == full_id)).mappings().one()
            vocab_rows = conn.execute(select(vocab).where(vocab.c.run_id == full_id)).mappings().all()
            rows = conn.execution_options(yield_per=_INSERT_CHUNK).execute(
                select(events).where(events.c.run_id == full_id).order_by(events.c.seq)
            )
            stream = (codec.event_from_row(row, f"run {full_id} event {row['seq']}") for row in rows.mappings())
            yield codec.trace_from_rows(run, [], vocab_rows), stream

    def export_file(self, run_id: str, path: str | Path) -> Path:
        """Write a run as a JSON trace file, event by event; a ``.gz`` suffix compresses it."""
        with self.reading(run_id) as (trace, stream):
            return write_file(trace, path, stream)

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
        limit, offset = _LIMIT.parse(limit), _OFFSET.parse(offset)
        for what, value in (("model", model), ("decoder", decoder), ("search text", text), ("status", status)):
            if value is not None:  # the driver cannot send a lone surrogate
                check_text(value, f"the {what}")
        self._mark_interrupted()
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
    """TraceSink over a store: a crash leaves the run stored as far as it got, with status "running" until the store
    is next opened or listed, which marks it "interrupted"."""

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
    check_text(ref, "a run id")
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
        raise RunNotFound(f"no run with id {shown(ref)}{hint}")
    return full_id


def _insert_run(conn: Connection, trace: Trace, replace: bool) -> None:
    if _exists(conn, trace.run_id):
        if not replace:
            raise RunExists(
                f"run {trace.run_id} already exists; replace=True overwrites it, "
                "import_file(..., new_id=True) stores a copy under a fresh id"
            )
        conn.execute(delete(runs).where(runs.c.run_id == trace.run_id))
    conn.execute(insert(runs), codec.run_row(trace))


def _update_run(conn: Connection, trace: Trace) -> None:
    """A sink's update of its run: its columns and the heartbeat (a run marked interrupted meanwhile runs again)."""
    values = codec.run_row(trace)
    del values["run_id"]
    values["heartbeat_at"] = _now()
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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _process_started() -> float:
    """This process's start time (Unix seconds): with its pid, it tells it apart from a later process."""
    return psutil.Process().create_time()


def _writer_gone(row: Row) -> str | None:
    """Why the writer of a running run is gone (its process ended, or another host's writer fell silent), else None."""
    if row.writer_host == _HOST:
        try:
            process = psutil.Process(row.writer_pid)
            if abs(process.create_time() - row.writer_started) < 1 and process.status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.AccessDenied:
            return None  # it lives
        except psutil.NoSuchProcess:
            pass
        return f"its writer (process {row.writer_pid}) ended before the run did"
    last = datetime.fromisoformat(row.heartbeat_at)
    if datetime.now(timezone.utc) - last < FOREIGN_WRITER_TIMEOUT:
        return None
    return f"its writer on {row.writer_host} has not written since {row.heartbeat_at}"


def _iso(moment: datetime | str) -> str:
    if isinstance(moment, str):
        return moment
    if moment.tzinfo is None:  # naive datetimes are taken as UTC, like the recorded created_at
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="seconds")

