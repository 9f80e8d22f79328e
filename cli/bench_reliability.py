"""``bench reliability``: what hostile or huge inputs cost, each check measured in a fresh Python process.

A check is a name, its target, issue 17's measurement before the fix, an unmeasured ``prepare`` (run here, to build
its input) and a ``run`` executed in a subprocess of its own, whose wall time and peak RSS are reported with the
outcome line it prints. Checks run in order in one work folder, so a later check may use what an
earlier one stored. Add a check by appending to :data:`CHECKS`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.events import Candidate, StageReport, TokenStep, TraceFormatError, r7
from engine.trace import RunInfo, Trace, dumps, write_file

BOMB_RUN_ID = "bomb"
LONG_RUN_ID = "long"
VOCAB_SIZE = 50_000


@dataclass(frozen=True)
class Check:
    name: str
    target: str
    before: str  # issue 17's measurement before the fix
    run: Callable[[Path, int], str]  # in the subprocess: does the work, returns the outcome line
    prepare: Callable[[Path, int], None] = lambda workdir, events: None


@dataclass(frozen=True)
class Result:
    check: Check
    outcome: str
    exit_code: int
    seconds: float
    peak_mb: float


# ---------------------------------------------------------------- inputs


def _db_url(workdir: Path, name: str = "bench") -> str:
    return f"sqlite:///{workdir / name}.db"


def write_bomb(path: Path, empty_lists: int = 105_000_000) -> Path:
    """About 310 KB of gzip that inflate to 315 MB of JSON: one event holding a hundred million empty lists, which
    ``json.loads`` turns into about 7 GB of objects."""
    head = dumps(Trace(run_id=BOMB_RUN_ID, info=RunInfo(model="m", decoder="greedy", params={}, prompt="p")))
    piece = b"[]," * 1_000_000
    with gzip.open(path, "wb") as fh:
        fh.write(head[: -len("]}")].encode() + b'{"kind":"output","token_ids":[')
        for _ in range(empty_lists // 1_000_000):
            fh.write(piece)
        fh.write(b"[]]}]}")
    return path


def token_steps(n: int) -> Iterator[TokenStep]:
    """Sampling steps shaped as recorded ones (top-2 candidates, a top-p stage), seeded; the token at position p is
    :func:`_token_at` (p)."""
    rng = random.Random(17)
    for pos in range(n):
        ids = [_token_at(pos), (pos * 31 + 7) % VOCAB_SIZE]
        raw = sorted((r7(rng.random()) for _ in ids), reverse=True)
        prob = [r7(p / sum(raw)) for p in raw]
        yield TokenStep(
            step=pos, position=pos, token_id=ids[0], logprob=r7(math.log(prob[0])), raw_logprob=r7(math.log(raw[0])),
            rank=1, entropy_raw=r7(rng.random() * 6), entropy=r7(rng.random() * 4),
            candidates=[Candidate(t, a, b) for t, a, b in zip(ids, raw, prob, strict=True)],
            stages=[StageReport("top_p", 2, r7(sum(raw)), 0b11, 0.9)], seconds=r7(rng.random() / 50),
        )


def _token_at(pos: int) -> int:
    return (pos * 7919) % VOCAB_SIZE


def write_long_trace(path: Path, n: int) -> Path:
    """A finished sampling run of ``n`` token steps, written event by event."""
    output = [_token_at(pos) for pos in range(n)]
    trace = Trace(
        run_id=LONG_RUN_ID,
        info=RunInfo(model="tiny-random-llama", decoder="sample", params={"temperature": 0.7, "top_p": 0.9},
                     prompt="Tell me a long story.", seed=0, max_new_tokens=n),
        vocab={t: f"tok{t}" for t in range(VOCAB_SIZE)},
        status="finished",
        reason="length",
        prompt_token_ids=list(range(20)),
        output_token_ids=output,
        output_text="".join(f"tok{t}" for t in output[:1000]),
        metrics={"new_tokens": n, "model_calls": n},
    )
    return write_file(trace, path, token_steps(n))


# ---------------------------------------------------------------- checks (run in the subprocess)


def _import_bomb(workdir: Path, events: int) -> str:
    from storage import TraceStore

    with TraceStore(_db_url(workdir, "bomb")) as store:
        try:
            store.import_file(workdir / "bomb.json.gz")
        except TraceFormatError as exc:
            stored = "nothing stored" if not store.list_runs() else "RUNS STORED"
            return f"refused, {stored}: {exc}"
    return "IMPORTED (the bomb was not refused)"


def _import_long(workdir: Path, events: int) -> str:
    from storage import TraceStore

    with TraceStore(_db_url(workdir)) as store:
        store.delete(LONG_RUN_ID)
        run_id = store.import_file(workdir / "long.json.gz")
        return f"imported {store.summary(run_id).num_events:,} events"


def _show_long(workdir: Path, events: int) -> str:
    from cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["runs", "show", LONG_RUN_ID, "--db", _db_url(workdir)])
    return f"exit {code}, printed {len(out.getvalue().splitlines())} lines"


def _prepare_bomb(workdir: Path, events: int) -> None:
    (workdir / "bomb.db").unlink(missing_ok=True)
    if not (workdir / "bomb.json.gz").exists():
        write_bomb(workdir / "bomb.json.gz")


def _prepare_long(workdir: Path, events: int) -> None:
    """The long trace, rebuilt only when the number of events changes (writing a million events takes a while)."""
    path, stamp = workdir / "long.json.gz", workdir / "long.events"
    if not (path.exists() and stamp.exists() and stamp.read_text() == str(events)):
        write_long_trace(path, events)
        stamp.write_text(str(events))


CHECKS: list[Check] = [
    Check("import: 310 KB gzip bomb", "refused, < 500 MB", "MemoryError at 7.5 GB", _import_bomb, _prepare_bomb),
    Check("import: long trace", "< 60 s, < 1 GB (1e6 events)", "176 s, 3.25 GB (1e6 events)", _import_long,
          _prepare_long),
    Check("runs show: long run", "< 5 s, < 1 GB (1e6 events)", "104 s, 2.2 GB (1e6 events)", _show_long),
]


# ---------------------------------------------------------------- running and reporting


def peak_rss_mb() -> float:
    """This process's peak resident memory, in MB. Linux's VmHWM, not ru_maxrss: a child's ru_maxrss starts at the
    size of the process that spawned it."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


def measure(check: Check, workdir: Path, events: int) -> Result:
    """Run ``check`` in a fresh Python process, which prints its outcome and then its peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "cli.bench_reliability", check.name, str(workdir), str(events)],
        stdout=subprocess.PIPE, text=True, check=False,
    )
    seconds = time.perf_counter() - start
    *lines, peak = done.stdout.strip().splitlines() or ["(no output)", "nan"]
    return Result(check, lines[-1] if lines else "(no output)", done.returncode, seconds, float(peak))


def main(workdir: Path, events: int = 1_000_000, names: Sequence[str] = ()) -> list[Result]:
    workdir.mkdir(parents=True, exist_ok=True)
    checks = [c for c in CHECKS if not names or c.name in names]
    results = []
    for check in checks:
        print(f"preparing {check.name} ...", file=sys.stderr, flush=True)
        check.prepare(workdir, events)
        results.append(measure(check, workdir, events))
    print(f"{events:,}-event long trace; each check in its own process (wall time includes Python's start)")
    print(f"{'check':26} {'target':28} {'before (issue 17)':28} {'wall s':>7} {'peak MB':>8}  outcome")
    for r in results:
        failed = "" if r.exit_code == 0 else f" [exit {r.exit_code}]"
        print(f"{r.check.name:26} {r.check.target:28} {r.check.before:28} {r.seconds:7.1f} {r.peak_mb:8.0f}  "
              f"{r.outcome[:100]}{failed}")
    return results


if __name__ == "__main__":
    _name, _workdir, _events = sys.argv[1:4]
    print(next(c for c in CHECKS if c.name == _name).run(Path(_workdir), int(_events)))
    print(peak_rss_mb())
