"""Engine creation: any SQLAlchemy URL. A SQLite file is checked for damage when first opened, opened read-only when
asked to or when it (or its folder) cannot be written, and otherwise tuned for several concurrent writers on one file.

Database problems a user can meet (a bad URL, a damaged or read-only file) become :class:`StoreError`\\ s whose one
line names the database and says what to do.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import StaticPool
from sqlalchemy.util import asbool

BUSY_TIMEOUT_S = 60.0
WRITE_OPTION = "decoding_explorer_write"  # execution option marking a connection that will write
# PRAGMA quick_check reads every page: opening a 100 MB database takes 130-170 ms with it, 6 ms without (file in the
# page cache; more from a cold disk). Above this size a start would wait too long for it; SQLite still reports damage
# when a query reaches a damaged page, and the store then writes nothing more.
QUICK_CHECK_MAX_BYTES = 512 * 2**20
_ELSEWHERE = "point --db (or $DECODING_EXPLORER_DB) at another database"


class StoreError(RuntimeError):
    """The database cannot be opened or used as asked; the message names it and says what to do."""


class DatabaseDamaged(StoreError):
    """The database file is damaged: the store refuses it, so nothing more is written into it."""


class DatabaseReadOnly(StoreError):
    """The database can be read, not written."""


def create(url: str, read_only: bool = False) -> Engine:
    """An engine for ``url``. A SQLite file opens read-only when ``read_only``, when its URL says ``mode=ro``, or when
    the file or its folder cannot be written; a new file's folder is created."""
    parsed = _parse(url)
    if parsed.get_backend_name() != "sqlite":
        return _engine(parsed, pool_pre_ping=True)
    # timeout = SQLite's busy timeout: a writer waits this long for another to commit
    kwargs: dict[str, Any] = {"connect_args": {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}}
    path = sqlite_file(parsed)
    if path is None:
        kwargs["poolclass"] = StaticPool  # one shared connection, or every checkout sees a new empty DB
    elif read_only or parsed.query.get("mode") == "ro" or not _writable(path):
        parsed = _read_only_url(parsed, path)
    else:
        make_folder(path.parent)
    engine = _engine(parsed, **kwargs)
    event.listen(engine, "first_connect", functools.partial(_check_integrity, describe(engine)))
    event.listen(engine, "connect", _sqlite_connect_read_only if is_read_only(engine) else _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def is_read_only(engine: Engine) -> bool:
    return engine.url.get_backend_name() == "sqlite" and engine.url.query.get("mode") == "ro"


def describe(engine: Engine) -> str:
    """The database as messages name it: a SQLite file's path, else the URL without its password."""
    path = sqlite_file(engine.url)
    return str(path) if path is not None else engine.url.render_as_string(hide_password=True)


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL (plain, or a ``file:`` URI with ``uri=true``); None for an in-memory database."""
    database = url.database or ""
    if asbool(url.query.get("uri", False)):
        if url.query.get("mode") == "memory":
            return None
        database = unquote(urlsplit(database).path)
    return None if database in ("", ":memory:") else Path(database)


def make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the database folder {folder}: {exc.strerror or exc}; {_ELSEWHERE}") from None


def user_error(exc: BaseException, where: str) -> StoreError | None:
    """The user error a driver error stands for (a damaged, read-only, unopenable or full database), else None:
    any other error is a bug to be seen whole."""
    if not isinstance(exc, sqlite3.Error):
        return None
    name = getattr(exc, "sqlite_errorname", None) or ""
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or name == "SQLITE_IOERR_SHORT_READ":
        return damaged(where, str(exc))
    if name.startswith("SQLITE_READONLY"):
        return read_only_error(where)
    if name.startswith("SQLITE_CANTOPEN"):
        return StoreError(f"cannot open the database {where} ({exc}): check that it exists and that you may read it "
                          f"and its folder; or {_ELSEWHERE}")
    if name == "SQLITE_FULL":
        return StoreError(f"the disk holding the database {where} is full: free some space, or {_ELSEWHERE}")
    return None


def damaged(where: str, detail: str) -> DatabaseDamaged:
    return DatabaseDamaged(f"the database {where} is damaged ({detail}); nothing is written to it: restore a backup, "
                           f"or {_ELSEWHERE}")


def read_only_error(where: str) -> DatabaseReadOnly:
    return DatabaseReadOnly(f"the database {where} is read-only: its runs can be listed, opened and exported, not "
                            f"recorded, imported or deleted; make it and its folder writable, or {_ELSEWHERE}")


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise StoreError(f"{url!r} is not a database URL; give one such as sqlite:///path/to/traces.db") from None


def _engine(url: URL, **kwargs: Any) -> Engine:
    where = url.render_as_string(hide_password=True)
    try:
        return create_engine(url, **kwargs)
    except NoSuchModuleError:
        raise StoreError(f"the database URL {where} names an unknown kind of database ({url.drivername}); give one "
                         "such as sqlite:///path/to/traces.db") from None
    except ImportError as exc:  # the dialect's driver module
        raise StoreError(f"the database URL {where} needs the Python package {exc.name!r}, which is not "
                         "installed") from None
    except ArgumentError as exc:
        raise StoreError(f"the database URL {where} is not valid: {str(exc).splitlines()[0]}") from None


def _writable(path: Path) -> bool:
    # SQLite writes journal (-wal, -shm) files next to the database: a writable file in a read-only folder is read-only
    return not path.exists() or (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def _read_only_url(url: URL, path: Path) -> URL:
    """The ``file:`` URI opening ``path`` read-only.

    Reading a WAL database makes SQLite create its -wal and -shm files when they are missing: in a folder we cannot
    write it cannot, and files made by a reader who may not write the database would keep its owner from writing
    later. So a database we may not write, with no -wal file (no open writer, nothing waiting in a journal), is read
    as immutable: no files, no locks.
    """
    query = {**url.query, "mode": "ro", "uri": "true"}
    if not _writable(path) and not Path(f"{path}-wal").exists():
        query["immutable"] = "1"
    return url.set(database="file:" + quote(str(path.absolute())), query=query)


def _check_integrity(where: str, dbapi_conn: Any, _record: Any) -> None:
    """On an engine's first connection, before anything is written: a damaged database is refused whole."""
    cursor = dbapi_conn.cursor()
    size = cursor.execute("PRAGMA page_count").fetchone()[0] * cursor.execute("PRAGMA page_size").fetchone()[0]
    if size <= QUICK_CHECK_MAX_BYTES:
        problems = [row[0] for row in cursor.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:  # the first problem, without its "*** in database main ***" heading
            raise damaged(where, " ".join(line for line in problems[0].splitlines() if not line.startswith("***")))
    cursor.close()


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


def _sqlite_connect_read_only(dbapi_conn: Any, _record: Any) -> None:
    # The file keeps its journal mode: a reader does not change someone's database.
    dbapi_conn.isolation_level = None
    dbapi_conn.execute("PRAGMA foreign_keys=ON")


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
