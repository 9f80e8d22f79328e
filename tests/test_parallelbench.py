"""ParallelBench's waiting-line evaluation: test files, scoring through real runs, ``eval parallelbench``, ``bench dllm``."""

from __future__ import annotations

import json

import pytest

from cli.bench_dllm import default_settings, dllm
from cli.main import main
from engine.decoders import get_decoder
from engine.events import BenchPoint
from engine.models.handle import LoadedModel
from engine.offline.parallelbench import (
    evaluate,
    icl_turns,
    read_rows,
    task_rows,
    write_rows,
    write_task_files,
)
from engine.offline.waitline_data import OPERATIONS, WaitlineGenerator, prompt_text
from engine.parallel_goal import bench_summary, meets_goal
from engine.params import ParamError
from storage import TraceStore
from tests.helpers import hand_trace, tiny_waitline_model
from ui.figures.common import escape_text
from ui.figures.parallelism import bench_points, goal_figure, parallelism_figure

CANVAS = 16  # the tiny diffusion model's canvas (its config's diffusion_gen_length)


def tiny_waitline(kind: str) -> LoadedModel:
    """A random model with the waitline tokenizer: ``mdlm`` bidirectional with a mask token, ``ar`` causal."""
    extra = {} if kind == "ar" else {"diffusion_gen_length": CANVAS}
    return tiny_waitline_model(kind == "ar", name=f"tiny-{kind}", **extra)


@pytest.fixture(scope="module")
def tiny_models():
    return {"waitline-mdlm": tiny_waitline("mdlm"), "waitline-ar": tiny_waitline("ar")}


def test_written_files_read_back_row_for_row(tmp_path, capsys):
    path = write_rows(tmp_path / "reverse.jsonl", "reverse", 5, seed=30_001)
    assert read_rows(path, "reverse") == task_rows("reverse", 5, 30_001)
    assert read_rows(path) == task_rows("reverse", 5, 30_001)  # without a task: only the common fields checked
    assert task_rows("reverse", 5, 30_002) != task_rows("reverse", 5, 30_001)

    assert main(["data", "waitline", "--out", str(tmp_path / "pb"), "--per-task", "3"]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(tmp_path / "pb" / "waiting_line" / f"{op}.jsonl") for op in OPERATIONS]
    for operation, path in zip(OPERATIONS, written, strict=True):
        rows = read_rows(path, operation)
        assert len(rows) == 3 and all(row["input"]["icl_examples"] for row in rows)
    # each task draws from its own stream: the same rows whichever tasks are written
    assert write_task_files(tmp_path / "one", 3, operations=["sort"])[0].read_text() == \
        (tmp_path / "pb" / "waiting_line" / "sort.jsonl").read_text()


@pytest.mark.parametrize(
    ("line", "operation", "message"),
    [
        ("not json", None, "line 2: not valid JSON (Expecting value at column 1)"),
        ("[1, 2]", None, "line 2: a row must be a JSON object"),
        ('{"input": {}, "answer": "[]"}', None, 'line 2: a row needs "input": {"context"'),
        ('{"input": {"context": "Ann, Bob"}, "answer": "[]"}', None, "line 2: input.context is not a JSON list"),
        ('{"input": {"context": "[]"}}', None, 'line 2: a row needs an "answer"'),
        ('{"input": {"context": "[\\"A B\\"]", "word": "C D"}, "answer": "[]"}', "insert_index",
         "line 2: insert_index rows need input.index"),
        ('{"input": {"context": "[\\"A B\\"]"}, "answer": "[\\"A B\\"]"}', "shuffle", 'line 2: shuffle rows need "answer": {"input"'),
    ],
)
def test_a_bad_row_names_the_file_the_line_and_the_fault(tmp_path, line, operation, message):
    good = json.dumps(WaitlineGenerator(0).row(operation or "copy"))
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(ValueError) as error:
        read_rows(path, operation)
    assert str(error.value).startswith(f"{path} line 2: ") and message in str(error.value)


def test_evaluate_scores_the_decoded_text(llama):
    """The ``forced`` decoder emits a chosen text: the right answer scores 1, a wrong one 0, per task kind."""
    generator = WaitlineGenerator(5)
    copy_row, shuffle_row = generator.row("copy", count=2), generator.row("shuffle", count=3)
    people = json.loads(shuffle_row["input"]["context"])
    cases = [
        ("copy", copy_row, copy_row["answer"], 1.0),
        ("copy", copy_row, json.dumps(json.loads(copy_row["answer"])[::-1]), 0.0),
        ("shuffle", shuffle_row, shuffle_row["answer"]["example"], 1.0),  # a different order of the same people
        ("shuffle", shuffle_row, json.dumps(people), 0.0),  # the input order is not a shuffle
    ]
    for operation, row, text, expected in cases:
        result = evaluate(llama, "forced", {"continuation": text}, [row], operation)
        tokens = len(llama.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert (result.accuracy, result.n, result.model_calls, result.tokens) == (expected, 1, 1, tokens)
        assert result.per_row[0].output == text and result.tokens_per_call == tokens


def test_evaluate_runs_on_the_models_canvas_with_limit_and_progress(tiny_models):
    rows = task_rows("sort", 4, 30_002)
    seen = []
    result = evaluate(tiny_models["waitline-mdlm"], "llada", {}, rows, "sort", limit=3,
                      progress=lambda done, total, accuracy: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and result.n == 3
    assert result.model_calls == 3 * CANVAS  # one token per step over the config's canvas, not the default 72
    assert all(0 < row.tokens <= CANVAS for row in result.per_row)
    assert result.tokens == sum(row.tokens for row in result.per_row)
    assert result.tokens_per_call == result.tokens / result.model_calls
    taus = [row.order_tau for row in result.per_row]  # each run's unmasking order, and their mean in the JSON
    assert all(-1 <= tau <= 1 for tau in taus) and result.summary()["order_kendall_tau"] == round(sum(taus) / 3, 4)
    left_to_right = evaluate(tiny_models["waitline-mdlm"], "llada", {"block_length": 1}, rows, "sort", limit=1)
    assert left_to_right.order_tau == 1.0
    again = evaluate(tiny_models["waitline-mdlm"], "llada", {}, rows, "sort", limit=3)
    assert [row.output for row in again.per_row] == [row.output for row in result.per_row]  # seeded
    shorter = evaluate(tiny_models["waitline-mdlm"], "llada", {}, rows, "sort", limit=3, canvas=CANVAS // 2)
    assert shorter.model_calls == 3 * CANVAS // 2 and all(0 < row.tokens <= CANVAS // 2 for row in shorter.per_row)


def test_the_bench_decodes_on_the_canvas_asked_for_and_scales_its_default_schedules(tiny_models, tmp_path, capsys):
    assert default_settings()[:4] == ("llada", "llada:steps=96", "llada:steps=48", "llada:steps=24")  # 192 tokens
    assert default_settings(32)[:4] == ("llada", "llada:steps=16", "llada:steps=8", "llada:steps=4")
    assert "dream:steps=8" in default_settings(32)
    store = TraceStore(f"sqlite:///{tmp_path / 'bench.db'}")
    report = dllm(per_task=2, tasks=["copy"], settings=["llada", "greedy"], models=tiny_models, canvas=8,
                  log=lambda _: None, sinks=[store.sink()])
    assert report["canvas"] == {"waitline-mdlm": 8, "waitline-ar": 8}
    assert report["results"]["copy"]["llada"]["model_calls"] == 2 * 8  # one token per step over 8, not the model's 16
    assert report["results"]["copy"]["greedy"]["tokens"] <= 2 * 8
    assert store.load(report["run_id"]).info.params["canvas"] == 8  # the stored bench says how it decoded
    assert "canvas {'waitline-mdlm': 8, 'waitline-ar': 8}" in capsys.readouterr().out

    path = write_rows(tmp_path / "copy.jsonl", "copy", 2, seed=30_000)
    argv = ["eval", "parallelbench", "--file", str(path), "--decoder", "llada", "--model", "waitline-mdlm"]
    assert main([*argv, "--canvas", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["canvas"], report["model_calls"]) == (5, 2 * 5)
    with pytest.raises(SystemExit):  # argparse refuses it before anything loads
        main([*argv, "--canvas", "0"])
    assert "canvas=0 is below the minimum 1" in capsys.readouterr().err


def test_eval_command_prints_the_four_keys(tmp_path, capsys):
    path = write_rows(tmp_path / "copy.jsonl", "copy", 2, seed=30_000)
    argv = ["eval", "parallelbench", "--file", str(path), "--decoder", "greedy", "--model", "tiny-random-llama"]
    assert main([*argv, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert {"accuracy", "n", "model_calls", "tokens_per_call"} <= report.keys()
    assert report["n"] == 2 and report["task"] == "copy" and report["model_calls"] > 0
    assert report["tokens_per_call"] == 1.0  # greedy: one token per call
    assert "order_kendall_tau" not in report  # an order only diffusion decoders choose
    assert "2/2 rows" in captured.err  # progress on stderr

    assert main([*argv, "--limit", "1"]) == 0
    assert "copy: accuracy 0.0% over 1 rows" in capsys.readouterr().out
    (tmp_path / "notes.jsonl").write_text(path.read_text())
    assert main(["eval", "parallelbench", "--file", str(tmp_path / "notes.jsonl"), "--decoder", "greedy"]) == 2
    assert "is not a waiting-line task file" in capsys.readouterr().err


def test_goal_needs_three_times_fewer_calls_and_at_most_two_points_lost():
    assert meets_goal(calls=100, baseline_calls=300, accuracy=0.93, baseline_accuracy=0.95)
    assert not meets_goal(calls=101, baseline_calls=300, accuracy=0.95, baseline_accuracy=0.95)
    assert not meets_goal(calls=100, baseline_calls=300, accuracy=0.929, baseline_accuracy=0.95)
    assert meets_goal(calls=10, baseline_calls=300, accuracy=1.0, baseline_accuracy=0.5)


def test_bench_skips_what_cannot_run_and_compares_calls_with_one_token_per_step(tiny_models, capsys):
    notes = []
    report = dllm(per_task=2, tasks=["copy", "shuffle"],
                  settings=["llada", "llada:steps=4", "no_such_decoder:x=1", "llada:bogus=1", "greedy"],
                  models=tiny_models, log=notes.append)
    assert set(report["skipped"]) == {"no_such_decoder:x=1", "llada:bogus=1"}
    assert any("skipping no_such_decoder:x=1: unknown decoder" in note for note in notes)
    assert set(report["results"]["copy"]) == {"llada", "llada:steps=4", "greedy"}
    assert report["results"]["copy"]["llada"]["model_calls"] == 2 * CANVAS  # one token per step
    assert report["results"]["shuffle"]["llada:steps=4"]["model_calls"] == 2 * 4

    summary = report["summary"]  # over the scored tasks present: copy only
    assert summary["llada"]["tasks"] == ["copy"] and "goal" not in summary["llada"]
    assert summary["llada:steps=4"]["fewer_calls"] == CANVAS / 4
    total, base = summary["llada:steps=4"], summary["llada"]
    expected = meets_goal(total["model_calls"], base["model_calls"], total["accuracy"], base["accuracy"])
    assert total["goal"] is expected
    assert "goal" not in summary["greedy"] and summary["greedy"]["model"] == "waitline-ar"  # a reference line
    table = capsys.readouterr().out
    assert "summary over copy;" in table
    assert next(line for line in table.splitlines() if line.startswith("greedy ") and "x " in line).endswith(
        "not judged (waitline-ar)")
    line = next(line for line in table.splitlines() if line.startswith("llada:steps=4 "))  # the summary row
    verdict = "PASS" if summary["llada:steps=4"]["goal"] else "FAIL"
    base = summary["llada"]["accuracy"]  # a random tiny model scores ~0 %: keeping that proves nothing
    assert line.endswith(f"{verdict} (vacuous: the baseline scores {base:.0%})" if base < 0.5 else verdict)


def test_the_bench_is_stored_as_a_run_and_drawn_as_accuracy_against_parallelism(tiny_models, tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 'bench.db'}")
    settings = ["llada", "llada:steps=4", "llada:steps=2", "greedy", "llada:block_length=1"]
    report = dllm(per_task=2, tasks=["copy", "sort", "shuffle"], settings=settings, models=tiny_models,
                  log=lambda _: None, sinks=[store.sink()], figure=tmp_path / "curve.html")
    trace = store.load(report["run_id"])
    points = bench_points(trace)
    assert trace.status == "finished" and trace.info.decoder == "bench_dllm"
    assert [(p.task, p.setting) for p in points] == [(t, s) for t in ("copy", "sort", "shuffle") for s in settings]
    for point in points:  # each cell as the report has it
        cell = report["results"][point.task][point.setting]
        assert (point.model_calls, point.rows) == (cell["model_calls"], 2)
        assert point.accuracy == cell["accuracy"] and point.tokens_per_call == pytest.approx(cell["tokens_per_call"])
    assert bench_summary(points) == report["summary"]  # the figure's goal check is the table's

    figure = parallelism_figure(trace)
    assert [a.text for a in figure.layout.annotations] == ["copy", "sort", "shuffle"]  # scored tasks first
    llada_sort = next(t for t in figure.data if t.name == "llada" and t.xaxis == "x2")
    expected = sorted((p.tokens_per_call, 100 * p.accuracy) for p in points if p.task == "sort" and p.line == "llada")
    assert len(expected) == 3 and list(zip(llada_sort.x, llada_sort.y)) == expected  # one line through its steps
    # LLaDA in blocks of one token is another method at the same parallelism: a line (a point) of its own
    assert [t.name for t in figure.data if t.showlegend] == ["llada", "greedy", escape_text("llada:block_length=1")]
    goal = goal_figure(trace)
    marked = {t.text[0]: (t.x[0], t.y[0]) for t in goal.data}
    summary = report["summary"]["llada:steps=4"]
    assert marked["llada:steps=4"] == (summary["fewer_calls"], 100 * summary["accuracy_change"])
    symbols = {t.text[0]: (t.marker.symbol, t.hovertemplate) for t in goal.data}
    assert symbols["llada:steps=4"][0] == ("circle" if summary["goal"] else "x")
    assert symbols["greedy"][0] == "diamond-open" and "waitline-ar: a reference, not judged" in symbols["greedy"][1]
    sides = [t.textposition for t in sorted(goal.data, key=lambda t: t.x[0])]  # neighbours' labels alternate
    assert all(left != right for left, right in zip(sides, sides[1:]))
    assert "Accuracy against parallelism" in (tmp_path / "curve.html").read_text()



def test_the_bench_runs_on_the_first_rows_of_parallelbench_test_files(tiny_models, tmp_path, capsys):
    folder = tmp_path / "waiting_line"
    for task, seed in (("copy", 31_000), ("shuffle", 31_001)):
        write_rows(folder / f"{task}.jsonl", task, 3, seed=seed, max_people=4)
    report = dllm(per_task=2, tasks=["copy", "shuffle"], settings=["llada:steps=4", "greedy"], models=tiny_models,
                  log=lambda _: None, test_files=folder, icl=True)
    assert report["test_files"] == str(folder) and report["icl"]
    for task in ("copy", "shuffle"):  # each cell is that file's first two rows, prompted after their example
        rows = read_rows(folder / f"{task}.jsonl", task)[:2]
        for label, decoder, params, model in (("llada:steps=4", "llada", {"steps": "4"}, "waitline-mdlm"),
                                              ("greedy", "greedy", {}, "waitline-ar")):
            expected = evaluate(tiny_models[model], decoder, params, rows, task, icl=True)
            cell = report["results"][task][label]
            assert (cell["accuracy"], cell["model_calls"], cell["tokens"]) == (
                expected.accuracy, expected.model_calls, expected.tokens)
    assert f"the first 2 rows of {folder}" in capsys.readouterr().out
    with pytest.raises(ParamError, match="holds 3 rows, fewer than the 5 asked for"):
        dllm(per_task=5, tasks=["copy"], settings=["greedy"], models=tiny_models, test_files=folder)
    assert main(["bench", "dllm", "--parallelbench", str(folder), "--tasks", "copy,sort", "--per-task", "2",
                 "--no-save"]) == 2
    assert "cannot read ParallelBench's sort rows from" in capsys.readouterr().err

def test_a_failing_bench_keeps_its_cells_marked_failed(tiny_models, tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 'bench.db'}")

    def no_ar_twin(name: str) -> LoadedModel:
        raise OSError(f"{name} is not here")

    models = {"waitline-mdlm": tiny_models["waitline-mdlm"]}
    with pytest.raises(OSError, match="waitline-ar is not here"):
        dllm(per_task=1, tasks=["copy"], settings=["llada", "greedy"], models=models, load=no_ar_twin,
             log=lambda _: None, sinks=[store.sink()])
    (summary,) = store.list_runs()
    trace = store.load(summary.run_id)
    assert trace.status == "failed" and "waitline-ar is not here" in trace.reason
    assert [p.setting for p in bench_points(trace)] == ["llada"]


def test_a_curve_joins_the_settings_that_differ_only_in_their_parallelism():
    assert get_decoder("llada").curve_line({"steps": "8"}) == "llada"
    assert get_decoder("llada").curve_line({"block_length": "1", "steps": "8"}) == "llada:block_length=1"
    assert get_decoder("fast_dllm").curve_line({"threshold": "0.7", "cache": "dual"}) == "fast_dllm:cache=dual"
    assert get_decoder("localleap").curve_line({"threshold": "0.99", "relaxed_threshold": "0.95"}) == "localleap"
    # a trace recorded before the curves had their own key draws one line per decoder, as it did then
    old = [BenchPoint(task="copy", setting=label, decoder="llada", model="m", rows=4, accuracy=0.5,
                      tokens_per_call=tpc, model_calls=calls)
           for label, tpc, calls in (("llada", 1.0, 9), ("llada:block_length=1", 1.0, 9))]
    assert [len(t.x) for t in parallelism_figure(hand_trace(old, {}, decoder="bench_dllm")).data] == [2]


def test_bench_labels_are_shown_as_text():
    hostile = "<img src=x onerror=alert(1)>"
    points = [BenchPoint(task=task, setting=label, decoder=label.split(":")[0], model="m", rows=4, accuracy=0.5,
                         tokens_per_call=tpc, model_calls=calls)
              for task in ("copy", "reverse", "sort")
              for label, tpc, calls in (("llada", 1.0, 90), (f"{hostile}:x=1", 4.0, 30))]
    trace = hand_trace(points, {}, decoder="bench_dllm")
    text = json.dumps([parallelism_figure(trace).to_plotly_json(), goal_figure(trace).to_plotly_json()])
    assert hostile not in text and "&lt;img src=x onerror=alert(1)&gt;" in text


@pytest.mark.parametrize("operation", ["sort", "shuffle", "insert_random"])
def test_one_shot_prompts_are_token_for_token_the_training_datas(tiny_models, operation):
    """``--icl`` puts a row's in-context example first as chat turns: exactly what the models saw in training."""
    from engine.offline.train_dllm import encode_messages
    from engine.run import Run, RunSettings

    model = tiny_models["waitline-ar"]
    example = WaitlineGenerator(4, icl_share=1.0, split="held_out").example(operation)
    row = json.loads(json.dumps(example.row()))  # as read back from a test file
    history = icl_turns(row, operation)
    assert len(history) == 1 and history[0][1] in (example.icl[0].answer_text,)
    run = Run(model, "greedy", prompt_text(row, operation), {}, RunSettings(max_new_tokens=1, chat=True, history=history))
    assert run.prompt_ids == encode_messages(model.tokenizer, example.messages)
    trace = run.to_end()
    assert trace.info.settings["history"] == [list(turn) for turn in history]
    with pytest.raises(ParamError, match="need chat formatting"):
        Run(model, "greedy", "x", {}, RunSettings(history=history))


def test_eval_with_icl_scores_the_one_shot_prompts(tiny_models, tmp_path, capsys):
    path = write_rows(tmp_path / "copy.jsonl", "copy", 2, seed=30_001, max_people=4)
    assert all(row["input"]["icl_examples"] for row in read_rows(path))
    assert main(["eval", "parallelbench", "--file", str(path), "--decoder", "greedy", "--model", "waitline-ar",
                 "--limit", "1", "--icl", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1
    zero = evaluate(tiny_models["waitline-ar"], "greedy", {}, read_rows(path), "copy")
    one = evaluate(tiny_models["waitline-ar"], "greedy", {}, read_rows(path), "copy", icl=True)
    assert (zero.n, one.n) == (2, 2) and zero.per_row != one.per_row  # another prompt, another (random) output
