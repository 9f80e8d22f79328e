"""The hostile-trace corpus through the command line: every hostile copy of a sample imports and shows as text
(no terminal escape reaches the terminal); every broken trace is refused in one line and stores nothing."""

from __future__ import annotations

import pytest

from cli.main import main
from storage import TraceStore
from tests.hostile import REASON, broken_traces, hostile_copy, write_gz
from ui.samples import SAMPLES_DIR

SAMPLES = sorted(SAMPLES_DIR.glob("*.json.gz"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return broken_traces(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name.removesuffix(".json.gz"))
def test_a_hostile_copy_imports_and_shows_as_text(sample, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'h.db'}"
    path = write_gz(hostile_copy(sample), tmp_path / "hostile.json.gz")
    assert main(["runs", "import", str(path), "--db", db]) == 0
    run_id = capsys.readouterr().out.split()[-1]
    assert main(["runs", "show", run_id, "--steps", "--db", db]) == 0
    shown = capsys.readouterr().out
    assert REASON in shown  # Markdown and HTML are plain text on a terminal
    assert "\x1b" not in shown and "\x07" not in shown  # a terminal escape would act: shown escaped instead
    stored = TraceStore(db).load(run_id)
    assert stored.reason == REASON and len(stored.events) == len(hostile_copy(sample)["events"])


@pytest.mark.parametrize("case", ["unknown-top-level-key", "lone-surrogate-in-prompt", "lone-surrogate-in-vocab",
                                  "400-digit-float", "5000-digit-vocab-key", "deep-nesting", "bomb"])
def test_a_broken_trace_is_refused_in_one_line(case, broken, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["runs", "import", str(broken[case]), "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err[:500]
    assert TraceStore(db).list_runs() == []
