"""Engine creation: any SQLAlchemy URL; SQLite is tuned for several concurrent writers on one file."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.pool import StaticPool

BUSY_TIMEOUT_S = 60.0
WRITE_OPTION = "decoding_explorer_write"  # execution option marking a connection that will write


def create(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True)
    # timeout = SQLite's busy timeout: a writer waits this long for another to commit
    kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}}
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool  # one shared connection, or every checkout sees a new empty DB
    else:
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit at the driver level, so that _sqlite_begin alone opens transactions (and DDL is
    # transactional: a failed upgrade rolls back whole).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA page_size=8192")  # only a new file takes it: ~1 KB token-step rows waste less of a page
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a power cut may lose only the last commits
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """WAL: readers and the writer never block each other.

    Switching a new file to WAL takes an exclusive lock without waiting for it (SQLite skips the busy
    handler there), so two processes that open a new database at once retry; the mode then persists.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _sqlite_begin(conn: Any) -> None:
    # A writer takes the write lock up front: a deferred transaction that reads and then writes can fail
    # with SQLITE_BUSY at once in WAL mode, without waiting out the busy timeout.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
