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
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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


# Issue 17 item 6: `record` inputs that gave tracebacks (bytes that are not UTF-8 reach argv as U+DC80..U+DCFF).
BAD_RECORD_ARGV: dict[str, list[str]] = {
    "400-digit float parameter": ["--decoder", "sample", "--param", "temperature=1" + "0" * 400, "--prompt", "x"],
    "lone surrogate in the prompt": ["--prompt", "a\ud800b"],
    "invalid UTF-8 in --prompt": ["--prompt", "ab\udcffcd"],
    "--seed 2**70": ["--seed", str(2**70), "--prompt", "x"],
    **{f"--attention-max-mb {mb}": ["--attention", "last", "--attention-max-mb", mb, "--prompt", "x"]
       for mb in ("nan", "inf", "-1")},
}
# The same through the app's /record endpoint: (decoder, prompt, params, seed_value, max_new_tokens).
BAD_RECORD_API: dict[str, tuple] = {
    "400-digit float parameter": ("sample", "x", {"temperature": 10**400}, 0, 2),
    "lone surrogate in the prompt": ("greedy", "a\ud800b", {}, 0, 2),
    "seed 2**70": ("greedy", "x", {}, 2**70, 2),
    "seed 'nan'": ("greedy", "x", {}, "nan", 2),
    "max_new_tokens inf": ("greedy", "x", {}, 0, math.inf),
}
BAD_INPUT_MODEL = "tiny-random-llama"
ERROR_LINE = re.compile(r"(decoding-explorer[\w ]*: )?error: ")  # ours, or argparse's after its usage lines


def cli_ends_in_one_line(argv: Sequence[str]) -> bool:
    """Whether the command line refuses ``argv`` with a non-zero exit and one error line, no traceback."""
    from cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse
            code = exit_.code
        except Exception:  # noqa: BLE001 -- what is measured: printed as a user would see it
            traceback.print_exc()
            code = None
    errors = [line for line in err.getvalue().splitlines() if ERROR_LINE.match(line)]
    return code not in (0, None) and len(errors) == 1 and "Traceback" not in err.getvalue()


def bad_inputs(workdir: Path, events: int) -> str:
    """Issue 17's bad `record` inputs through the command line and the app's API: how many end in one line."""
    import gradio as gr

    from storage import TraceStore
    from ui.context import AppContext, api_record
    from ui.pool import ModelPool

    base = ["record", "--model", BAD_INPUT_MODEL, "--no-save", "--max-new-tokens", "2"]
    cli_failed = [name for name, argv in BAD_RECORD_ARGV.items() if not cli_ends_in_one_line([*base, *argv])]
    record = api_record(AppContext(TraceStore(_db_url(workdir, "bad_inputs")), ModelPool(), BAD_INPUT_MODEL, False))
    api_failed = []
    for name, (decoder, prompt, params, seed, tokens) in BAD_RECORD_API.items():
        try:
            list(record(BAD_INPUT_MODEL, decoder, prompt, params, request=SimpleNamespace(session_hash="bench"),
                        seed_value=seed, max_new_tokens=tokens))
            api_failed.append(name)  # accepted
        except gr.Error as exc:
            if "\n" in exc.message or not exc.message:
                api_failed.append(name)
        except Exception:  # noqa: BLE001 -- a traceback for the app's user: what is counted
            api_failed.append(name)
    ended = f"CLI {len(BAD_RECORD_ARGV) - len(cli_failed)}/{len(BAD_RECORD_ARGV)}, " \
            f"API {len(BAD_RECORD_API) - len(api_failed)}/{len(BAD_RECORD_API)} end in one line"
    return ended + (f"; not: {', '.join(cli_failed + api_failed)}" if cli_failed or api_failed else "")


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
    Check("record: bad inputs", "all end in one line", "CLI 1/7, API 0/5 (tracebacks)", bad_inputs),
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
