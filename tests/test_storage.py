"""Storage: exact round trips, streaming, listing, files, hostile imports, migrations, size, concurrency."""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import random
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from engine.events import (
    EVENT_TYPES,
    Candidate,
    RunFinished,
    RunStarted,
    StageReport,
    TokenStep,
    TraceFormatError,
    event_to_dict,
    r7,
)
from engine.recorder import Recorder
from engine.trace import Trace, new_run_id, trace_to_dict
from storage import (
    LATEST_VERSION,
    RunExists,
    RunNotFound,
    SchemaTooNewError,
    TraceStore,
    connect,
    default_db_url,
    migrations,
    schema,
)
from tests.helpers import ATTENTION, INF, every_kind_trace, info, same, token_step


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


@pytest.fixture
def store(db: Path):
    with TraceStore(f"sqlite:///{db}") as s:
        yield s


# ---------------------------------------------------------------- round trips


def test_round_trip_is_exact_for_every_event_kind(store: TraceStore) -> None:
    trace = every_kind_trace()
    assert {e.kind for e in trace.events} == set(EVENT_TYPES)
    loaded = store.load(store.save(trace))
    assert same(loaded, trace)
    assert loaded.events[-3].data == ATTENTION.data
    assert math.isnan(loaded.events[1].entropy) and loaded.events[1].logprob == -INF
    assert math.copysign(1.0, loaded.events[1].seconds) == -1.0


def test_events_are_queryable_with_sql(store: TraceStore, db: Path) -> None:
    trace = every_kind_trace()
    store.save(trace)
    con = sqlite3.connect(db)
    rows = con.execute("SELECT step, position, token_id, entropy FROM events WHERE kind='token' ORDER BY seq").fetchall()
    # NaN and integers past 64 bits stay in the payload; SQLite could not give them back exactly
    assert rows == [(0, 0, 5, None), (1, 1, None, 1.25)]
    payload, blob = con.execute("SELECT payload, blob FROM events WHERE kind='attention'").fetchone()
    assert blob == ATTENTION.data and "data" not in json.loads(payload)
    payload = con.execute("SELECT payload FROM events WHERE kind='token' AND seq=1").fetchone()[0]
    assert ": " not in payload and not {"step", "position", "logprob", "model_calls"} & set(json.loads(payload))
    text_rows = con.execute("SELECT token_text FROM token_steps WHERE run_id=? ORDER BY seq", (trace.run_id,)).fetchall()
    assert text_rows == [("日本",), (None,)]
    con.close()


def test_recorder_streams_a_partial_then_a_cancelled_run(store: TraceStore) -> None:
    trace = Trace(run_id=new_run_id(), info=info())
    recorder = Recorder(trace, token_text=lambda t: f"<{t}>", sinks=[store.sink()])
    recorder.record(RunStarted(prompt_token_ids=[1, 2]))
    for pos in range(3):
        recorder.record(token_step(pos, token_id=10 + pos))
    recorder.flush()
    # the process could die here: the run is stored as far as it got, still marked running
    partial = store.load(trace.run_id)
    assert partial.status == "running" and len(partial.events) == 4
    assert partial.output_token_ids == [10, 11, 12] and partial.vocab[12] == "<12>"
    assert store.list_runs()[0].status == "running"

    recorder.record(token_step(3, token_id=10))
    recorder.record(RunFinished(status="cancelled", reason="stopped by the user"))
    recorder.close()
    final = store.load(trace.run_id[:8])
    assert final.status == "cancelled" and final.reason == "stopped by the user"
    assert same(final, trace)


def test_sink_refuses_an_existing_id_and_a_deleted_run(store: TraceStore) -> None:
    trace = Trace(run_id=new_run_id(), info=info())
    sink = store.sink()
    sink.open(trace)
    with pytest.raises(RunExists):
        store.sink().open(trace)
    store.delete(trace.run_id)
    with pytest.raises(RunNotFound, match="not in the store"):
        sink.append(trace, [RunStarted([1])], {1: "a"})


# ---------------------------------------------------------------- listing, ids, delete


def make_run(store: TraceStore, created: str, run_id: str | None = None, n_events: int = 1, **kw) -> Trace:
    fields = {k: kw.pop(k) for k in ("status", "output_text") if k in kw}
    trace = Trace(
        run_id=run_id or new_run_id(),
        info=info(created_at=created, **kw),
        events=[token_step(i) for i in range(n_events)],
        vocab={5: "five", 9: "nine"},
        **fields,
    )
    store.save(trace)
    return trace


def test_list_filters_and_searches(store: TraceStore) -> None:
    a = make_run(store, "2024-05-01T10:00:00+00:00", model="m1", decoder="greedy", prompt="The 100% sure cat", status="finished")
    b = make_run(store, "2024-05-02T10:00:00+00:00", model="m2", decoder="greedy", prompt="dogs", output_text="A CAT" + "x" * 500)
    c = make_run(store, "2024-05-03T10:00:00+00:00", model="m1", decoder="top_p", prompt="birds", n_events=3, status="failed")

    def ids(**kw) -> list[str]:
        return [r.run_id for r in store.list_runs(**kw)]

    assert ids() == [c.run_id, b.run_id, a.run_id]
    assert ids(model="m1") == [c.run_id, a.run_id]
    assert ids(decoder="greedy", model="m2") == [b.run_id]
    assert ids(status="failed") == [c.run_id]
    assert ids(text="cat") == [b.run_id, a.run_id]
    assert ids(text="100%") == [a.run_id] and ids(text="1_0") == []
    assert ids(since="2024-05-02") == [c.run_id, b.run_id]
    assert ids(until="2024-05-02") == [a.run_id]
    assert ids(since=datetime(2024, 5, 2, 13, tzinfo=timezone(timedelta(hours=2)))) == [c.run_id]
    assert ids(limit=1, offset=1) == [b.run_id]
    summary = store.list_runs(decoder="top_p")[0]
    assert (summary.num_events, summary.model, summary.prompt, summary.status) == (3, "m1", "birds", "failed")
    assert len(store.list_runs(model="m2")[0].output_text) == 200
    assert store.summary(c.run_id[:6]) == summary  # one run's line, by id or prefix
    with pytest.raises(RunNotFound):
        store.summary("ffff" + c.run_id[4:])


def test_delete_cascades(store: TraceStore, db: Path) -> None:
    keep = make_run(store, "2024-01-01T00:00:00+00:00", n_events=2)
    gone = make_run(store, "2024-01-02T00:00:00+00:00", n_events=5)
    assert store.delete(gone.run_id[:6]) is True
    assert store.delete(gone.run_id) is False
    con = sqlite3.connect(db)
    for table in ("events", "vocab"):
        counts = dict(con.execute(f"SELECT run_id, count(*) FROM {table} GROUP BY run_id").fetchall())
        assert set(counts) == {keep.run_id}
    con.close()
    with pytest.raises(RunNotFound):
        store.load(gone.run_id)


def test_runs_are_addressed_by_unique_prefix(store: TraceStore) -> None:
    one = make_run(store, "2024-01-01T00:00:00+00:00", run_id="abcd1111" + "0" * 24)
    make_run(store, "2024-01-01T00:00:00+00:00", run_id="abcd2222" + "0" * 24)
    assert store.load("abcd1").run_id == one.run_id
    assert store.resolve(one.run_id) == one.run_id
    with pytest.raises(RunNotFound, match="ambiguous"):
        store.load("abcd")
    with pytest.raises(RunNotFound, match="at least 4"):
        store.load("abc")
    with pytest.raises(KeyError) as err:
        store.load("ABCD1")  # case-sensitive, unlike SQLite's LIKE
    assert str(err.value) == "no run with id 'ABCD1'"


# ---------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_export_import_round_trip(store: TraceStore, tmp_path: Path, suffix: str) -> None:
    trace = every_kind_trace()
    store.save(trace)
    path = store.export_file(trace.run_id[:10], tmp_path / f"t{suffix}")
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == suffix.endswith(".gz")

    with TraceStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        assert same(other.load(other.import_file(path)), trace)
    with pytest.raises(RunExists, match="new_id=True"):
        store.import_file(path)
    assert store.import_file(path, replace=True) == trace.run_id
    copy_id = store.import_file(path, new_id=True)
    assert copy_id != trace.run_id and same(store.load(copy_id), Trace(**{**vars(trace), "run_id": copy_id}))
    assert len(store.list_runs()) == 2


def valid_doc() -> dict:
    return trace_to_dict(Trace(run_id="r1", info=info(), events=[token_step(0)], vocab={5: "five"}))


def edited(change) -> str:
    doc = valid_doc()
    change(doc)
    return json.dumps(doc)


HOSTILE = {
    "not json": b"this is not json {",
    "pickle": b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94.",
    "json array": b"[1, 2, 3]",
    "wrong format tag": edited(lambda d: d.update(format="something-else")),
    "wrong version": edited(lambda d: d.update(version=99)),
    "unknown event kind": edited(lambda d: d["events"].append({"kind": "exec", "code": "import os"})),
    "wrong field type": edited(lambda d: d["events"][0].update(token_id="5")),
    "bool as int": edited(lambda d: d["events"][0].update(rank=True)),
    "__class__ in event": edited(lambda d: d["events"][0].update(__class__="os.system")),
    "__reduce__ in info": edited(lambda d: d["run"]["info"].update(__reduce__=["os.system", ["echo hi"]])),
    "bad run id": edited(lambda d: d["run"].update(run_id="../../etc/passwd")),
    "bad base64": edited(lambda d: d["events"].append({**event_to_dict(ATTENTION), "data": "@@"})),
    "vocab id past 64 bits": edited(lambda d: d["vocab"].update({"9" * 30: "x"})),
    "5000-digit integer": '{"format": ' + "1" * 5000 + "}",
    "deep nesting": "[" * 100_000 + "]" * 100_000,
    "corrupt gzip": (lambda g: g[:10] + b"\xff" + g[11:])(gzip.compress(b'{"format": 1}' * 50)),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_imports_are_rejected_and_write_nothing(store: TraceStore, tmp_path: Path, name: str) -> None:
    content = HOSTILE[name]
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TraceFormatError) as err:
        store.import_file(path)
    assert str(err.value)
    assert store.list_runs() == []


def test_huge_integers_import_fine(store: TraceStore, tmp_path: Path) -> None:
    doc = valid_doc()
    doc["events"][0]["token_id"] = doc["events"][0]["candidates"][0]["token_id"] = 10**30
    doc["run"]["info"]["seed"] = -(10**25)
    path = tmp_path / "big.json"
    path.write_text(json.dumps(doc))
    loaded = store.load(store.import_file(path))
    assert loaded.events[0].token_id == 10**30 and loaded.info.seed == -(10**25)
    assert trace_to_dict(loaded) == doc


# ---------------------------------------------------------------- schema versions


def test_schema_matches_the_latest_migration(store: TraceStore, db: Path) -> None:
    assert [m.version for m in migrations.MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    inspector = inspect(create_engine(f"sqlite:///{db}"))
    for table in schema.metadata.sorted_tables:
        assert [c["name"] for c in inspector.get_columns(table.name)] == list(table.columns.keys())
        assert {i["name"] for i in inspector.get_indexes(table.name)} == {i.name for i in table.indexes}
    assert "token_steps" in inspector.get_view_names()


def test_version_1_database_is_upgraded(db: Path) -> None:
    url = f"sqlite:///{db}"
    engine = create_engine(url)
    with engine.begin() as conn:
        assert migrations.upgrade(conn, target=1) == 1
        conn.execute(
            text(
                "INSERT INTO runs VALUES ('old1run', '2023-01-01T00:00:00+00:00', 'gpt2', 'greedy', '{}', 'Hi', NULL,"
                " 'finished', '', '[1]', '[42]', ' there', :metrics, '{}')"
            ),
            {"metrics": '{"new_tokens":1}'},
        )
        payload = '{"raw_logprob":-0.5,"rank":1,"entropy_raw":1.0,"candidates":[[42,0.6,0.7]],"stages":[]}'
        conn.execute(
            text("INSERT INTO events VALUES ('old1run', 0, 'token', 0, 0, 42, -0.25, 0.5, 1, 0.01, :p, NULL)"),
            {"p": payload},
        )
        conn.execute(text("INSERT INTO vocab VALUES ('old1run', 42, ' there')"))
    engine.dispose()

    with TraceStore(url) as store:
        trace = store.load("old1run")
        assert trace.events == [
            TokenStep(0, 0, 42, -0.25, -0.5, 1, 1.0, 0.5, [Candidate(42, 0.6, 0.7)], [], seconds=0.01)
        ]
        assert trace.info.prompt == "Hi" and trace.metrics == {"new_tokens": 1}
        assert [r.run_id for r in store.list_runs(model="gpt2")] == ["old1run"]
    con = sqlite3.connect(db)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (LATEST_VERSION,)
    assert con.execute("SELECT token_text, logprob FROM token_steps").fetchall() == [(" there", -0.25)]
    con.close()


def test_upgrade_is_one_transaction(db: Path) -> None:
    url = f"sqlite:///{db}"
    engine = create_engine(url)
    with engine.begin() as conn:
        migrations.upgrade(conn, target=1)
    engine.dispose()
    engine = connect.create(url)
    with pytest.raises(RuntimeError, match="power cut"):
        with engine.execution_options(**{connect.WRITE_OPTION: True}).begin() as conn:
            migrations.upgrade(conn)
            raise RuntimeError("power cut")
    with engine.connect() as conn:
        assert migrations.current_version(conn) == 1
        assert not inspect(conn).get_view_names() and not inspect(conn).get_indexes("runs")
    engine.dispose()


def test_newer_database_is_refused(db: Path) -> None:
    url = f"sqlite:///{db}"
    TraceStore(url).close()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO schema_version VALUES (?, 'from the future', '2099-01-01')", (LATEST_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(SchemaTooNewError, match="created by a newer Decoding Explorer"):
        TraceStore(url)


def test_default_db_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DECODING_EXPLORER_DB", "postgresql://u@h/db")
    assert default_db_url() == "postgresql://u@h/db"
    monkeypatch.delenv("DECODING_EXPLORER_DB")
    monkeypatch.setenv("DECODING_EXPLORER_HOME", str(tmp_path / "home"))
    assert default_db_url() == f"sqlite:///{tmp_path / 'home' / 'traces.db'}"
    assert (tmp_path / "home").is_dir()


# ---------------------------------------------------------------- size and concurrency


def long_token_run(n: int = 1000, k: int = 20, vocab_size: int = 50_000) -> list[TokenStep]:
    """Seeded random token steps. Candidate ids follow Zipf's law over the vocabulary, as token
    frequencies do, so top-k lists overlap from step to step as a real model's do (about 7,100
    distinct tokens here; uniformly random ids would give 16,500 and about 2.04 MB)."""
    rng = random.Random(1234)
    zipf = list(itertools.accumulate(1 / rank for rank in range(1, vocab_size + 1)))
    steps = []
    for pos in range(n):
        ids: list[int] = []
        while len(ids) < k:
            ids += [t for t in dict.fromkeys(rng.choices(range(vocab_size), cum_weights=zipf, k=k)) if t not in ids]
        ids = ids[:k]
        raw = sorted((rng.random() ** 3 for _ in range(k)), reverse=True)
        raw = [r7(p / sum(raw)) for p in raw]
        prob = [r7(p * 1.25) for p in raw]
        stages = [
            StageReport("temperature", vocab_size, 1.0, 2**k - 1),
            StageReport("top_k", 50, r7(rng.random()), 2**k - 1, 50.0),
            StageReport("top_p", rng.randint(1, k), r7(rng.random()), 2 ** rng.randint(1, k) - 1, 0.9),
        ]
        steps.append(
            TokenStep(
                step=pos,
                position=pos,
                token_id=ids[0],
                logprob=r7(math.log(prob[0])),
                raw_logprob=r7(math.log(raw[0])),
                rank=1,
                entropy_raw=r7(rng.random() * 6),
                entropy=r7(rng.random() * 4),
                candidates=[Candidate(t, a, b) for t, a, b in zip(ids, raw, prob, strict=True)],
                stages=stages,
                seconds=r7(rng.random() / 50),
            )
        )
    return steps


def test_a_1000_token_run_fits_in_2_mb(store: TraceStore, db: Path) -> None:
    trace = Trace(run_id=new_run_id(), info=info())
    recorder = Recorder(trace, token_text=lambda t: f"tok{t}", sinks=[store.sink()], flush_seconds=3600)
    recorder.record(RunStarted(prompt_token_ids=list(range(20))))
    for i, step in enumerate(long_token_run()):
        recorder.record(step)
        if i % 10 == 9:
            recorder.flush()
    recorder.record(RunFinished(status="finished"))
    recorder.close()
    sqlite3.connect(db).execute("PRAGMA wal_checkpoint(TRUNCATE)").close()
    size = os.path.getsize(db)
    print(f"\n1,000-token run with {len(trace.vocab)} distinct tokens: {size:,} bytes in SQLite")
    assert size <= 2_000_000


def test_concurrent_writers_on_one_file(db: Path) -> None:
    url = f"sqlite:///{db}"
    n_events = 150
    start = threading.Barrier(2)
    run_ids: list[str] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            start.wait()
            with TraceStore(url) as store:  # both open (and create the schema) at once
                trace = Trace(run_id=new_run_id(), info=info())
                run_ids.append(trace.run_id)
                recorder = Recorder(trace, token_text=str, sinks=[store.sink()], flush_seconds=0)
                for pos in range(n_events):
                    recorder.record(token_step(pos, token_id=pos))
                    store.list_runs()
                recorder.record(RunFinished(status="finished"))
                recorder.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with TraceStore(url) as store:
        for run_id in run_ids:
            trace = store.load(run_id)
            assert trace.status == "finished" and len(trace.events) == n_events + 1
            assert [e.position for e in trace.events[:-1]] == list(range(n_events))
            assert len(trace.vocab) == n_events


@pytest.mark.skipif(not os.environ.get("DECODING_EXPLORER_TEST_DB_URL"), reason="set DECODING_EXPLORER_TEST_DB_URL")
def test_another_backend() -> None:
    """The same API on e.g. PostgreSQL: DECODING_EXPLORER_TEST_DB_URL=postgresql+psycopg://user@host/db."""
    url = os.environ["DECODING_EXPLORER_TEST_DB_URL"]
    sql = create_engine(url)
    with TraceStore(url) as store:
        trace = every_kind_trace()
        store.save(trace)
        streamed = Trace(run_id=new_run_id(), info=info(prompt="Streamed 100% <b>"))
        recorder = Recorder(streamed, token_text=lambda t: f"<{t}>", sinks=[store.sink()], flush_seconds=0)
        for pos in range(3):
            recorder.record(token_step(pos))
        recorder.record(RunFinished(status="finished"))
        recorder.close()
        try:
            assert same(store.load(trace.run_id[:8]), trace) and same(store.load(streamed.run_id), streamed)
            assert [r.num_events for r in store.list_runs(text="streamed 100%")] == [4]
            with sql.connect() as conn:
                rows = conn.execute(text("SELECT token_text FROM token_steps WHERE run_id = :r"), {"r": streamed.run_id})
                assert [r[0] for r in rows] == ["<5>"] * 3
        finally:
            assert store.delete(trace.run_id) and store.delete(streamed.run_id)
        with sql.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM events WHERE run_id = :r"), {"r": trace.run_id}).scalar() == 0
    sql.dispose()
