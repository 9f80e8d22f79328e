"""Imports with bounded memory: a trace file is decompressed, parsed, validated and stored piecewise, its limits are
checked while it is read, and a refused file stores nothing."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.bench_reliability import write_bomb
from cli.main import main
from engine import trace as trace_module
from engine.events import DecoderMetric, TraceFormatError
from engine.trace import RunInfo, Trace, dumps, read_file, trace_to_dict
from storage import TraceStore
from storage import store as store_module
from tests.helpers import every_kind_trace, same, token_step


@pytest.fixture
def store(tmp_path: Path):
    with TraceStore(f"sqlite:///{tmp_path / 'traces.db'}") as s:
        yield s


def small_trace(n_events: int = 3) -> Trace:
    return Trace(
        run_id="r1",
        info=RunInfo(model="m", decoder="greedy", params={}, prompt="p", created_at="2026-01-01T00:00:00+00:00"),
        events=[token_step(i) for i in range(n_events)],
        vocab={5: "five", 9: "nine"},
        status="finished",
    )


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def refused(store: TraceStore, path: Path, match: str) -> str:
    """Import ``path``: it must fail with a one-line TraceFormatError and leave the store empty."""
    with pytest.raises(TraceFormatError, match=match) as err:
        store.import_file(path)
    assert "\n" not in str(err.value)
    assert store.list_runs() == []
    return str(err.value)


# ---------------------------------------------------------------- limits checked while reading


def test_a_gzip_bomb_is_refused_before_it_is_inflated(store: TraceStore, tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb.json.gz", empty_lists=5_000_000)  # 15 MB of JSON in 15 KB: 360 MB as objects
    assert bomb.stat().st_size < 40_000
    refused(store, bomb, r"events\[0\] holds more than 2,500,000 items")
    with pytest.raises(TraceFormatError, match="items"):
        read_file(bomb)


def test_a_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    """In a process of its own, so that its peak RSS is measured alone."""
    bomb = write_bomb(tmp_path / "bomb.json.gz", empty_lists=60_000_000)  # 180 MB of JSON: json.loads needs ~4 GB
    db = f"sqlite:///{tmp_path / 'b.db'}"
    probe = (
        "from cli.bench_reliability import peak_rss_mb\n"
        "from engine.events import TraceFormatError\n"
        "from storage import TraceStore\n"
        "try:\n"
        f"    TraceStore({db!r}).import_file({str(bomb)!r})\n"
        "except TraceFormatError as exc:\n"
        "    print(peak_rss_mb(), exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120).stdout
    peak_mb, message = out.split(" ", 1)
    assert "holds more than" in message
    assert float(peak_mb) < 400  # issue 17: under 500 MB


def test_decompressed_bytes_are_counted_as_they_come_out_of_gzip(
    store: TraceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(dumps(small_trace(200)).encode()))
    monkeypatch.setattr(trace_module, "MAX_IMPORT_BYTES", 20_000)
    monkeypatch.setattr(trace_module, "_READ_BYTES", 4096)  # the limit is crossed within the file's first 20 KB
    refused(store, path, "larger than")
    refused(store, write(tmp_path / "t.json", dumps(small_trace(200))), "larger than")  # uncompressed: by its size


def test_too_many_events_are_refused_and_the_batches_stored_so_far_roll_back(
    store: TraceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace_module, "MAX_EVENTS", 7)
    monkeypatch.setattr(store_module, "_INSERT_CHUNK", 2)  # three batches are inserted before the eighth event
    refused(store, write(tmp_path / "t.json", dumps(small_trace(8))), r"too many events \(more than 7\)")
    run_id = store.import_file(write(tmp_path / "ok.json", dumps(small_trace(7))))
    assert store.load(run_id).events == small_trace(7).events


def test_a_value_too_long_is_refused_before_it_is_all_read(
    store: TraceStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trace_module, "MAX_VALUE_CHARS", 50_000)
    monkeypatch.setattr(trace_module, "_READ_BYTES", 4096)  # so the value arrives in pieces, as a long one does
    trace = small_trace()
    trace.events.append(DecoderMetric("m", 1.0, "x" * 60_000))
    refused(store, write(tmp_path / "t.json", dumps(trace)), r"events\[3\] is longer than 50,000 characters")


def test_nesting_too_deep_is_refused(store: TraceStore, tmp_path: Path) -> None:
    text = dumps(small_trace()).replace('"params":{}', '"params":' + "[" * 50_000 + "]" * 50_000)
    refused(store, write(tmp_path / "t.json", text), "run: JSON nested too deeply")


# ---------------------------------------------------------------- keys and text


def test_unknown_top_level_keys_are_refused(store: TraceStore, tmp_path: Path) -> None:
    text = dumps(small_trace())
    refused(store, write(tmp_path / "a.json", text[:-1] + ',"payload":[1,2,3]}'), "unknown top-level key 'payload'")
    with pytest.raises(TraceFormatError, match="unknown top-level key"):
        trace_module.trace_from_dict({**trace_to_dict(small_trace()), "extra": 1})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: {"events": d.pop("events"), **d}, "format, version, run must come before events"),
        (lambda d: d, None),  # as built here, vocab after the events: fine
        (lambda d: {k: v for k, v in d.items() if k != "vocab"}, "vocab must be an object"),
    ],
    ids=["events first", "vocab last", "no vocab"],
)
def test_key_order(store: TraceStore, tmp_path: Path, edit, match: str | None) -> None:
    doc = trace_to_dict(small_trace())
    doc = edit({k: doc[k] for k in ("format", "version", "run", "events", "vocab")})
    path = write(tmp_path / "t.json", json.dumps(doc))
    if match:
        refused(store, path, match)
    else:
        assert same(store.load(store.import_file(path)), small_trace())


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[:-1] + ',"vocab":{}}', "top-level key 'vocab' appears twice"),
        (lambda t: t + "{}", "holds more after its JSON object"),
        (lambda t: t[:-3], "not valid JSON|ends before"),
        (lambda t: t.replace('"5":"five"', '"' + "9" * 5000 + '":"x"'), "vocab token id 9{40} is out of range"),
        (lambda t: t.replace('"rank":1', '"rank":' + "1" * 5000), "Exceeds the limit"),
        (lambda t: t.replace('"raw_logprob":-0.5', '"raw_logprob":' + "1" * 400), "past a float's range"),
        (lambda t: t.replace('"prompt":"p"', '"prompt":"\\ud800"'), "run: a string holds a lone UTF-16 surrogate"),
        (lambda t: t.replace('"five"', '"a\\udfffb"'), "vocab: a string holds a lone UTF-16 surrogate"),
        (lambda t: t.replace('"name":"top_p"', '"name":"\\uDBFF"'), r"events\[0\]: a string holds a lone"),
        (lambda t: t.encode().replace(b'"five"', b'"\xed\xa0\x80"'), "is not UTF-8 text"),
    ],
    ids=["duplicate key", "trailing data", "truncated", "5000-digit vocab key", "5000-digit integer",
         "400-digit float", "surrogate in prompt", "surrogate in vocab", "surrogate in event", "surrogate bytes"],
)
def test_bad_text_is_one_line_error(store: TraceStore, tmp_path: Path, edit, match: str) -> None:
    refused(store, write(tmp_path / "t.json", edit(dumps(small_trace()))), match)


def test_paired_surrogates_and_escaped_backslashes_are_text(store: TraceStore, tmp_path: Path) -> None:
    text = dumps(small_trace()).replace('"prompt":"p"', '"prompt":"\\ud83d\\ude00 \\\\ud800"')
    assert store.load(store.import_file(write(tmp_path / "t.json", text))).info.prompt == "\U0001f600 \\ud800"


# ---------------------------------------------------------------- round trips and the command line


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_an_exported_trace_round_trips_exactly_across_batches(store: TraceStore, tmp_path: Path, suffix: str) -> None:
    trace = every_kind_trace()  # NaN, infinities, -0.0, 70-bit integers, attention bytes
    trace.events[1:1] = [token_step(i, token_id=i % 50) for i in range(2_500)]  # three insert batches
    store.save(trace)
    path = store.export_file(trace.run_id, tmp_path / f"t{suffix}")  # written event by event
    data = path.read_bytes()
    assert (gzip.decompress(data) if suffix.endswith(".gz") else data) == dumps(trace).encode()
    with TraceStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
        assert same(other.load(other.import_file(path)), trace)
    assert same(read_file(path), trace)
    copy_id = store.import_file(path, new_id=True)
    assert same(store.load(copy_id), Trace(**{**vars(trace), "run_id": copy_id}))


def test_runs_show_reads_no_event_without_steps(store: TraceStore, tmp_path: Path, capsys, monkeypatch) -> None:
    trace = small_trace(5)
    trace.output_token_ids = [5, 9]
    store.save(trace)
    db = store.url
    monkeypatch.setattr(store_module.codec, "event_from_row", lambda *a: pytest.fail("an event was decoded"))
    assert main(["runs", "show", "r1", "--db", db]) == 0
    assert "output_token_ids   [5, 9]" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["runs", "show", "r1", "--db", db, "--steps"]) == 0
    assert capsys.readouterr().out.count("rank=1") == 5


def test_the_cli_refuses_a_bomb_in_one_line(tmp_path: Path, capsys) -> None:
    bomb = write_bomb(tmp_path / "bomb.json.gz", empty_lists=3_000_000)
    assert main(["runs", "import", str(bomb), "--db", f"sqlite:///{tmp_path / 'cli.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "items" in err
