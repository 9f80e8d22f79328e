"""Broken databases: damaged files are refused whole and never written, read-only ones open for replay, runs whose
writer died are marked interrupted, and each problem is one line on the command line."""

from __future__ import annotations

import ctypes
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from engine.trace import Trace, new_run_id, read_file
from storage import DatabaseDamaged, DatabaseReadOnly, StoreError, TraceStore, connect
from ui.samples import SAMPLES_DIR, WithSamples

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = sorted(SAMPLES_DIR.glob("*.json.gz"))
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER = 24, 1, 2, 3  # <linux/prctl.h>, capability.h


def traces(n: int) -> list[Trace]:
    return [read_file(path) for path in SAMPLES[:n]]


def stored_db(path: Path, n: int = 4) -> list[str]:
    """A valid database at ``path`` holding ``n`` samples (no -wal file left); returns their run ids."""
    with TraceStore(f"sqlite:///{path}") as store:
        return [store.save(trace) for trace in traces(n)]


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line a failing command prints (exit code 2, no traceback)."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


# ---------------------------------------------------------------- damaged files


def garble_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16384] = bytes(range(256)) * 64
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "garbage in the middle", "not a database"])
def test_a_damaged_database_is_refused_in_one_line_and_never_written(capsys, db, tmp_path, damage):
    stored_db(db)
    if damage == "truncated":
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 2])
    elif damage == "garbage in the middle":
        garble_middle(db)
    else:
        db.write_bytes(b"not SQLite at all " * 500)
    before = db.read_bytes()
    url = f"sqlite:///{db}"
    with pytest.raises(DatabaseDamaged, match="is damaged"):
        TraceStore(url)
    for argv in (["runs", "list"], ["runs", "import", str(SAMPLES[5])],
                 ["record", "--model", "tiny-random-llama", "--prompt", "Hi", "--max-new-tokens", "2"]):
        err = cli_error(capsys, *argv, "--db", url)
        assert f"the database {db} is damaged" in err and "restore a backup" in err
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["traces.db"]  # no journal left either


def test_damage_met_after_opening_stops_all_writes(monkeypatch, db):
    """Above the size the open-time check covers, damage shows when a query reaches it: from then on the store
    writes nothing."""
    run_ids = stored_db(db, n=8)
    garble_middle(db)
    before = db.read_bytes()
    monkeypatch.setattr(connect, "QUICK_CHECK_MAX_BYTES", 0)
    with TraceStore(f"sqlite:///{db}") as store:
        with pytest.raises(DatabaseDamaged, match="is damaged"):
            for run_id in run_ids:
                store.load(run_id)
        trace = traces(9)[8]
        with pytest.raises(DatabaseDamaged):
            store.save(trace)
    assert db.read_bytes() == before


# ---------------------------------------------------------------- read-only databases


def test_a_read_only_store_lists_and_loads_and_refuses_writes(capsys, db, tmp_path):
    run_ids = stored_db(db)
    before = db.read_bytes()
    with TraceStore(f"sqlite:///{db}", read_only=True) as store:
        assert store.read_only
        assert {r.run_id for r in store.list_runs()} == set(run_ids)
        assert store.load(run_ids[0][:8]).run_id == run_ids[0]
        extra = traces(5)[4]
        for write in (lambda: store.save(extra), lambda: store.delete(run_ids[0]), lambda: store.sink().open(extra)):
            with pytest.raises(DatabaseReadOnly, match="is read-only"):
                write()
    url = f"sqlite:///file:{db}?mode=ro&uri=true"  # the same, asked for by URL
    assert main(["runs", "list", "--db", url]) == 0 and run_ids[0][:12] in capsys.readouterr().out
    err = cli_error(capsys, "runs", "import", str(SAMPLES[5]), "--db", url)
    assert f"the database {db} is read-only" in err
    assert "is read-only" in cli_error(capsys, "runs", "delete", run_ids[0], "--db", url)
    assert db.read_bytes() == before


READER = """
import sys
from engine.trace import read_file
from storage import DatabaseReadOnly, TraceStore
store = TraceStore("sqlite:///" + sys.argv[1])
ids = sorted(r.run_id for r in store.list_runs())
assert store.read_only and store.load(ids[0]).run_id == ids[0], ids
try:
    store.save(read_file(sys.argv[2]))
except DatabaseReadOnly as exc:
    print("refused:", exc)
print(" ".join(ids))
"""


def _obey_file_modes() -> None:
    """In a child of root, before its exec: drop the capabilities that let root ignore file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER):
        if libc.prctl(PR_CAPBSET_DROP, capability) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def as_reader(*argv: str) -> subprocess.CompletedProcess[str]:
    """Python running ``argv`` under the file modes, even when the tests run as root (for whom chmod does nothing)."""
    try:
        return subprocess.run([sys.executable, *argv], check=False, cwd=ROOT, capture_output=True, text=True,
                              timeout=60, preexec_fn=_obey_file_modes if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:  # the container does not let root drop the capabilities
        pytest.skip(f"running as root, and file modes cannot be enforced: {exc}")


@pytest.mark.parametrize("locked", ["file", "folder"])
def test_a_database_its_user_cannot_write_opens_read_only(tmp_path, locked):
    folder = tmp_path / "data"
    folder.mkdir()
    db = folder / "traces.db"
    run_ids = stored_db(db)
    before = db.read_bytes()
    if locked == "file":
        folder.chmod(0o777)  # the folder is writable: only the file is not
        db.chmod(0o444)
    else:
        folder.chmod(0o555)
    done = as_reader("-c", READER, str(db), str(SAMPLES[5]))
    assert done.returncode == 0, done.stderr
    refused, listed = done.stdout.splitlines()
    assert listed.split() == sorted(run_ids)
    assert refused.startswith(f"refused: the database {db} is read-only")
    assert db.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["traces.db"]  # no -wal/-shm left for its owner to trip on
    folder.chmod(0o755)  # so pytest can clean up


def test_samples_are_listed_beside_a_read_only_database_without_writing_it(db, tmp_path):
    run_ids = stored_db(db, n=2)
    before = db.read_bytes()
    store = WithSamples(TraceStore(f"sqlite:///{db}", read_only=True))
    listed = [r.run_id for r in store.list_runs(limit=500)]
    assert len(listed) == len(set(listed)) == len(SAMPLES)  # the two stored samples are listed once
    assert set(run_ids) < set(listed)
    assert [r.run_id for r in store.list_runs(limit=3)] == listed[:3]
    assert [r.run_id for r in store.list_runs(limit=3, offset=3)] == listed[3:6]
    sample = read_file(SAMPLES[-1])
    assert store.load(sample.run_id[:10]).run_id == sample.run_id == store.summary(sample.run_id).run_id
    assert read_file(store.export_file(sample.run_id, tmp_path / "sample.json")).events == sample.events
    with pytest.raises(DatabaseReadOnly):
        store.delete(sample.run_id)
    assert store.read_only and db.read_bytes() == before


def test_the_app_starts_on_a_read_only_database_and_says_so(db):
    from ui.app import build

    stored_db(db, n=1)
    before = db.read_bytes()
    demo = build("tiny-random-llama", f"sqlite:///file:{db}?mode=ro&uri=true", replay_only=True)
    header = next(block.value for block in demo.blocks.values() if getattr(block, "elem_id", None) == "header")
    assert "Read-only database" in header
    assert db.read_bytes() == before


# ---------------------------------------------------------------- bad URLs and folders


@pytest.mark.parametrize(
    "url,message",
    [
        ("notaurl://x", "names an unknown kind of database (notaurl)"),
        ("no url at all", "is not a database URL"),
        ("postgresql+nosuchdriver://u@h/db", "names an unknown kind of database"),
        ("sqlite://host/x.db", "is not valid"),
    ],
)
def test_a_bad_url_is_one_line(capsys, url, message):
    assert message in cli_error(capsys, "runs", "list", "--db", url)


def test_a_database_folder_that_cannot_be_made_is_one_line(capsys, monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = cli_error(capsys, "runs", "list", "--db", f"sqlite:///{blocker}/sub/traces.db")
    assert f"cannot create the database folder {blocker}/sub" in err
    monkeypatch.delenv("DECODING_EXPLORER_DB", raising=False)
    monkeypatch.setenv("DECODING_EXPLORER_HOME", str(blocker / "home"))
    assert f"cannot create the database folder {blocker}/home" in cli_error(capsys, "runs", "list")
    with pytest.raises(StoreError, match=f"cannot open the database {tmp_path} "):
        TraceStore(f"sqlite:///{tmp_path}")  # a folder, not a file


# ---------------------------------------------------------------- interrupted runs


WRITER = """
import os, sys
from engine.events import RunStarted
from engine.recorder import Recorder
from engine.trace import Trace
from storage import TraceStore
from tests.helpers import info, token_step
store = TraceStore("sqlite:///" + sys.argv[1])
recorder = Recorder(Trace(run_id=sys.argv[2], info=info()), token_text=str, sinks=[store.sink()], flush_seconds=3600)
recorder.record(RunStarted(prompt_token_ids=[1, 2]))
for pos in range(3):
    recorder.record(token_step(pos))
recorder.flush()
os._exit(0)  # a crash: no RunFinished, no close
"""


def test_a_run_whose_writer_died_is_marked_interrupted_with_its_events(db):
    run_id = new_run_id()
    done = subprocess.run([sys.executable, "-c", WRITER, str(db), run_id], check=False, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with TraceStore(f"sqlite:///{db}") as store:
        trace = store.load(run_id)
        assert trace.status == "interrupted" and "ended before the run did" in trace.reason
        assert [e.kind for e in trace.events] == ["run_started", "token", "token", "token"]
        assert [r.status for r in store.list_runs(status="interrupted")] == ["interrupted"]


def test_only_runs_whose_writer_is_gone_are_marked(db):
    from tests.helpers import info, token_step

    with TraceStore(f"sqlite:///{db}") as store:
        sinks = {}
        for name in ("alive", "reused pid", "quiet host", "busy host"):
            trace = Trace(run_id=new_run_id(), info=info(prompt=name))
            sink = store.sink()
            sink.open(trace)
            trace.events.append(token_step(0))
            sink.append(trace, trace.events, {5: "five"})
            sinks[name] = (trace, sink)
    con = sqlite3.connect(db)
    ids = {name: trace.run_id for name, (trace, _) in sinks.items()}
    con.execute("UPDATE runs SET writer_started = writer_started - 100 WHERE run_id = ?", (ids["reused pid"],))
    con.execute("UPDATE runs SET writer_host = 'elsewhere', heartbeat_at = '2000-01-01T00:00:00+00:00' "
                "WHERE run_id = ?", (ids["quiet host"],))
    con.execute("UPDATE runs SET writer_host = 'elsewhere' WHERE run_id = ?", (ids["busy host"],))
    con.commit()
    con.close()
    with TraceStore(f"sqlite:///{db}") as store:
        status = {r.prompt: r.status for r in store.list_runs()}
        assert status == {"alive": "running", "reused pid": "interrupted", "quiet host": "interrupted",
                          "busy host": "running"}
        assert "elsewhere" in store.load(ids["quiet host"]).reason
        trace, sink = sinks["reused pid"]  # a writer wrongly taken for dead takes its run back at its next append
        trace.events.append(token_step(1))
        sink.append(trace, trace.events[1:], {})
        assert store.summary(trace.run_id).status == "running"
