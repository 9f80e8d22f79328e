"""Schema versions and the ordered migrations between them (a minimal stand-in for Alembic).

Each migration's DDL is frozen here as it was written: later schema changes add a migration, they
never edit an old one, so a database of any past version upgrades along the same path. The table
``schema_version`` records every migration applied; its highest version is the database's version.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    and_,
    column,
    func,
    inspect,
    select,
    table,
    text,
)
from sqlalchemy.types import TypeEngine

_version_metadata = MetaData()
schema_version = Table(
    "schema_version",
    _version_metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", Text, nullable=False),
    Column("applied_at", Text, nullable=False),
)

_PG_LOCK_KEY = 0x44454558  # any constant shared by every Decoding Explorer process


class SchemaTooNewError(RuntimeError):
    """The database was written by a later version of the code, whose schema this one cannot read."""


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


def _v1_create_tables(conn: Connection) -> None:
    md = MetaData()
    Table(
        "runs",
        md,
        Column("run_id", Text, primary_key=True),
        Column("created_at", Text, nullable=False),
        Column("model", Text, nullable=False),
        Column("decoder", Text, nullable=False),
        Column("params", Text, nullable=False),
        Column("prompt", Text, nullable=False),
        Column("seed", BigInteger),
        Column("status", Text, nullable=False),
        Column("reason", Text, nullable=False),
        Column("prompt_token_ids", Text, nullable=False),
        Column("output_token_ids", Text, nullable=False),
        Column("output_text", Text, nullable=False),
        Column("metrics", Text, nullable=False),
        Column("info", Text, nullable=False),
    )
    Table(
        "events",
        md,
        Column("run_id", Text, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
        Column("seq", Integer, primary_key=True, autoincrement=False),
        Column("kind", Text, nullable=False),
        Column("step", BigInteger),
        Column("position", BigInteger),
        Column("token_id", BigInteger),
        Column("logprob", Double),
        Column("entropy", Double),
        Column("model_calls", BigInteger),
        Column("seconds", Double),
        Column("payload", Text, nullable=False),
        Column("blob", LargeBinary),
    )
    Table(
        "vocab",
        md,
        Column("run_id", Text, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
        Column("token_id", BigInteger, primary_key=True, autoincrement=False),
        Column("text", Text, nullable=False),
        sqlite_with_rowid=False,
    )
    md.create_all(conn, checkfirst=False)


def _v2_listing_indexes_and_token_view(conn: Connection) -> None:
    md = MetaData()
    runs = Table("runs", md, Column("created_at", Text), Column("model", Text), Column("decoder", Text))
    for name in ("created_at", "model", "decoder"):
        Index(f"ix_runs_{name}", runs.c[name]).create(conn)
    e = table("events", *(column(c) for c in ("run_id", "seq", "kind", "step", "position", "token_id", "logprob", "entropy")))
    v = table("vocab", column("run_id"), column("token_id"), column("text"))
    view = (
        select(e.c.run_id, e.c.seq, e.c.step, e.c.position, e.c.token_id, v.c.text.label("token_text"), e.c.logprob, e.c.entropy)
        .select_from(e.outerjoin(v, and_(v.c.run_id == e.c.run_id, v.c.token_id == e.c.token_id)))
        .where(e.c.kind == "token")
    )
    sql = view.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
    conn.execute(text(f"CREATE VIEW token_steps AS {sql}"))


def _add_run_columns(conn: Connection, *columns: tuple[str, TypeEngine]) -> None:
    for name, kind in columns:
        conn.execute(text(f"ALTER TABLE runs ADD COLUMN {name} {kind.compile(dialect=conn.dialect)}"))


def _v3_branch_columns(conn: Connection) -> None:
    _add_run_columns(conn, ("parent_run_id", Text()), ("branch_step", BigInteger()))
    runs = Table("runs", MetaData(), Column("parent_run_id", Text))
    Index("ix_runs_parent_run_id", runs.c.parent_run_id).create(conn)


def _v4_run_writers(conn: Connection) -> None:
    writer = (("writer_host", Text()), ("writer_pid", BigInteger()), ("writer_started", Double()))
    _add_run_columns(conn, *writer, ("heartbeat_at", Text()))
    runs = Table("runs", MetaData(), Column("status", Text))
    Index("ix_runs_status", runs.c.status).create(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs, events and vocab tables", _v1_create_tables),
    Migration(2, "listing indexes on runs; view token_steps (token events with their text)", _v2_listing_indexes_and_token_view),
    Migration(3, "branches: runs.parent_run_id (indexed) and runs.branch_step", _v3_branch_columns),
    Migration(4, "interrupted runs: runs.writer_host, writer_pid, writer_started, heartbeat_at; runs.status indexed",
              _v4_run_writers),
)
LATEST_VERSION = MIGRATIONS[-1].version


def current_version(conn: Connection) -> int:
    """The database's schema version; 0 for an empty database."""
    if not inspect(conn).has_table("schema_version"):
        return 0
    return conn.scalar(select(func.max(schema_version.c.version))) or 0


def check_readable(version: int) -> None:
    if version > LATEST_VERSION:
        raise SchemaTooNewError(
            f"this database has schema version {version}: it was created by a newer Decoding Explorer "
            f"(this one knows versions up to {LATEST_VERSION}); upgrade Decoding Explorer to open it"
        )


def upgrade(conn: Connection, target: int = LATEST_VERSION) -> int:
    """Apply the pending migrations up to ``target`` inside the caller's transaction; returns the version."""
    if conn.dialect.name == "postgresql":  # serialise concurrent first opens; SQLite's write lock does this
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    version = current_version(conn)
    check_readable(version)
    if version >= target:
        return version
    schema_version.create(conn, checkfirst=True)
    for migration in MIGRATIONS[version:target]:
        migration.apply(conn)
        conn.execute(
            schema_version.insert().values(
                version=migration.version,
                description=migration.description,
                applied_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
        )
    return target
