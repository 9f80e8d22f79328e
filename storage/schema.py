"""The current database schema, as the queries see it.

The tables are created and changed only by :mod:`storage.migrations`; these definitions mirror the
latest migration (a test checks that they agree). JSON columns are plain text written by
:func:`storage.codec.dumps`, so every backend stores them alike, NaN and infinities included.

For SQL users: one ``runs`` row per run; one ``events`` row per event in order (``seq``), with the
common fields in typed columns (NULL where the event has no such field, or holds NaN) and the rest in
``payload``, where nested records are arrays in field order (a candidate is ``[token_id, raw_prob,
prob]``); ``vocab`` holds each run's token texts; the view ``token_steps`` joins token events with them::

    SELECT r.decoder, avg(t.entropy) FROM token_steps t JOIN runs r USING (run_id) GROUP BY r.decoder;
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Double, ForeignKey, Index, Integer, LargeBinary, MetaData, Table, Text

metadata = MetaData()

runs = Table(
    "runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("created_at", Text, nullable=False),  # ISO-8601 text as recorded, so it round-trips exactly
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
    Column("parent_run_id", Text),  # a branch's parent run (also in info.parent, with the token)
    Column("branch_step", BigInteger),  # the parent's output position the branch leaves from
    # who records a running run, so a run whose writer died is marked interrupted (storage.store.TraceStore)
    Column("writer_host", Text),
    Column("writer_pid", BigInteger),
    Column("writer_started", Double),  # the writer process's start time (Unix seconds): a reused pid is not it
    Column("heartbeat_at", Text),  # ISO-8601 UTC time of the writer's last append
    Index("ix_runs_created_at", "created_at"),
    Index("ix_runs_model", "model"),
    Index("ix_runs_decoder", "decoder"),
    Index("ix_runs_parent_run_id", "parent_run_id"),
    Index("ix_runs_status", "status"),
)

events = Table(
    "events",
    metadata,
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

vocab = Table(
    "vocab",
    metadata,
    Column("run_id", Text, ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    Column("token_id", BigInteger, primary_key=True, autoincrement=False),
    Column("text", Text, nullable=False),
    sqlite_with_rowid=False,  # tiny rows keyed by their primary key: no separate rowid b-tree
)
