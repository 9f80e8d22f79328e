"""The command line over engine and storage, on a tiny model and a temporary database."""

from __future__ import annotations

import gzip
import json

import pytest

from cli.main import main


@pytest.fixture
def db(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.db'}"


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_record_json_summary_and_runs_commands(capsys, db, tmp_path):
    summary = run_json(
        capsys, "record", "--model", "tiny-random-llama", "--decoder", "top_p", "--param", "top_p=0.9",
        "--param", "temperature=0.8", "--seed", "7", "--prompt", "Explain <script>", "--max-new-tokens", "12",
        "--db", db, "--json",
    )
    keys = {"run_id", "model", "decoder", "params", "prompt_token_ids", "output_token_ids", "output_text", "status", "metrics"}
    assert keys <= summary.keys()
    assert summary["params"]["top_p"] == 0.9 and summary["params"]["temperature"] == 0.8
    assert {"model_calls", "new_tokens", "decode_seconds"} <= summary["metrics"].keys()
    assert summary["metrics"]["new_tokens"] == len(summary["output_token_ids"]) > 0
    run_id = summary["run_id"]

    listed = run_json(capsys, "runs", "list", "--db", db, "--json")
    assert [r["run_id"] for r in listed] == [run_id]
    shown = run_json(capsys, "runs", "show", run_id[:8], "--db", db, "--json")
    assert shown["output_token_ids"] == summary["output_token_ids"]

    path = tmp_path / "trace.json.gz"
    assert main(["runs", "export", run_id, str(path), "--db", db]) == 0
    assert json.loads(gzip.decompress(path.read_bytes()))["run"]["run_id"] == run_id
    assert main(["runs", "import", str(path), "--db", db]) == 2  # same id again: refused, clearly
    assert "already" in capsys.readouterr().err
    assert main(["runs", "import", str(path), "--new-id", "--db", db]) == 0
    capsys.readouterr()
    assert len(run_json(capsys, "runs", "list", "--db", db, "--json")) == 2
    assert main(["runs", "delete", run_id, "--db", db]) == 0
    capsys.readouterr()
    assert len(run_json(capsys, "runs", "list", "--db", db, "--json")) == 1


def test_same_seed_same_tokens(capsys, db):
    argv = ["record", "--model", "tiny-random-llama", "--decoder", "sample", "--seed", "3", "--prompt", "x", "--max-new-tokens", "8", "--no-save", "--json"]
    assert run_json(capsys, *argv)["output_token_ids"] == run_json(capsys, *argv)["output_token_ids"]


def test_decoders_list_json_schema(capsys):
    specs = run_json(capsys, "decoders", "list", "--json")
    by_name = {s["name"]: s for s in specs}
    top_p = {p["name"]: p for p in by_name["top_p"]["params"]}
    assert top_p["top_p"]["default"] == 0.9 and top_p["top_p"]["min"] == 0.0 and top_p["top_p"]["max"] == 1.0
    assert all({"name", "type", "default", "help", "min", "max", "choices"} <= p.keys() for s in specs for p in s["params"])
    assert by_name["greedy"]["lossless"] is True


@pytest.mark.parametrize(
    "argv,message",
    [
        (["record", "--model", "no-such-model-xyz", "--prompt", "x", "--no-save"], "no-such-model-xyz"),
        (["record", "--model", "tiny-random-llama", "--decoder", "nope", "--prompt", "x", "--no-save"], "unknown decoder"),
        (["record", "--model", "tiny-random-llama", "--decoder", "top_p", "--param", "top_p", "--prompt", "x", "--no-save"], "NAME=VALUE"),
        (["record", "--model", "tiny-random-llama", "--param", "top_k=abc", "--decoder", "top_k", "--prompt", "x", "--no-save"], "top_k expects int"),
    ],
)
def test_bad_input_gives_one_clear_error(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err


def test_import_rejects_hostile_file(capsys, db, tmp_path):
    path = tmp_path / "evil.json"
    path.write_text('{"format": "decoding-explorer-trace", "version": 1, "run": {"__class__": "os.system"}}')
    assert main(["runs", "import", str(path), "--db", db]) == 2
    assert "error:" in capsys.readouterr().err
    assert run_json(capsys, "runs", "list", "--db", db, "--json") == []


def test_unknown_run(capsys, db):
    assert main(["runs", "show", "deadbeef", "--db", db]) == 2
    assert "deadbeef" in capsys.readouterr().err


def test_bench_spec_times_each_run_by_its_fastest_repeat(capsys, monkeypatch):
    """With --repeats, a variant's time on a prompt is its fastest run (order rotated), greedy's included."""
    import cli.bench as bench

    real_run, calls = bench._spec_run, {}
    times = {"greedy": (99.0, 3.0, 1.0), "prompt_lookup": (0.5, 2.0)}  # greedy's first call is the untimed reference

    def fake_times(model, name, params, prompt, tokens, plain=False):
        trace, _ = real_run(model, name, params, prompt, tokens, plain)
        calls[name] = calls.get(name, -1) + 1
        return trace, times[name][calls[name] % len(times[name])]

    monkeypatch.setattr(bench, "_spec_run", fake_times)
    real_prompts = bench._spec_prompts  # the tiny model reads 1,024 positions: the short questions only
    monkeypatch.setattr(bench, "_spec_prompts", lambda n: [p for p in real_prompts(n) if len(p["turns"][0]) < 1500])
    assert main(["bench", "spec", "--model", "tiny-random-llama", "--tokens", "4", "--decoders", "prompt_lookup",
                 "--hf", "", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastest of 2 runs each" in out and "greedy-equality mismatches: 0" in out
    row = next(line.split() for line in out.splitlines() if line.strip().startswith("prompt_lookup "))
    assert row[1] == "2.000x"  # greedy's fastest 1.0 s over prompt lookup's 0.5 s, on every prompt


def test_a_bench_repeat_starts_from_the_hot_start_its_prompts_first_run_had(capsys, monkeypatch):
    """Token Recycling's matrix outlives a run: a repeat must not draft from what the prompt's first run learnt."""
    import cli.bench as bench

    real_run, known, ran = bench._spec_run, [], []

    def record_known(model, name, params, prompt, tokens, plain=False):
        trace, seconds = real_run(model, name, params, prompt, tokens, plain)
        if name == "token_recycling":
            known.append(trace.metrics["matrix_rows_known_at_start"])
            ran.append(prompt)
        return trace, seconds

    monkeypatch.setattr(bench, "_spec_run", record_known)
    real_prompts = bench._spec_prompts
    monkeypatch.setattr(bench, "_spec_prompts", lambda n: [p for p in real_prompts(n) if len(p["turns"][0]) < 1500][:2])
    assert main(["bench", "spec", "--model", "tiny-random-llama", "--tokens", "6", "--decoders", "token_recycling",
                 "--hf", "", "--repeats", "2"]) == 0
    warmup, *timed = known
    # the warm-up learns from a prompt outside the measured ones, never from a measured prompt's own run
    assert ran[0] == bench.SPEC_WARM_UP_PROMPT and ran[0] not in ran[1:] and known[0] == 0
    assert len(timed) == 4 and timed[0] == timed[1] and timed[2] == timed[3]  # each prompt's two runs alike
    assert timed[2] > timed[0]  # while the matrix still carries over from one prompt to the next
    assert "greedy-equality mismatches: 0" in capsys.readouterr().out
