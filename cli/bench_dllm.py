"""``bench dllm``: diffusion decoders on ParallelBench's waiting-line tasks, accuracy against parallelism, one run.

Every setting decodes the same rows of each task: fresh seeded lists of held-out names, or the first rows of
ParallelBench's own test files (``test_files``); diffusion decoders run on ``waitline-mdlm``, the others on its AR
twin ``waitline-ar``. Per setting, over copy/reverse/sort, the goal check compares with LLaDA at one
token per step: at least 3x fewer model calls at most 2 accuracy points lower.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.decoders import get_decoder
from engine.events import BenchPoint, RunStarted
from engine.models.handle import LoadedModel
from engine.offline.parallelbench import (
    BENCH_SEED, DEFAULT_CANVAS, EvalResult, RunFailed, answer_length, default_model, evaluate, read_rows, task_rows,
    task_seed,
)
from engine.parallel_goal import (
    BASELINE, GOAL_FEWER_CALLS, GOAL_MAX_DROP, MEANINGFUL_BASELINE, bench_summary, verdict,
)
from engine.offline.waitline_data import MAX_PEOPLE, OPERATIONS
from engine.params import ParamError, parse_setting as parse_label
from engine.recorder import Recorder, TraceSink, run_ending
from engine.run import software_versions
from engine.trace import RunInfo, Trace, new_run_id
from ui.figures.parallelism import parallelism_figure

def default_settings(canvas: int = DEFAULT_CANVAS) -> tuple[str, ...]:
    """The bench's settings when none are given; fixed-step schedules are in tokens per step of ``canvas``."""
    return (
        "llada",  # one token per step (steps = canvas): the baseline
        *(f"llada:steps={canvas // tokens}" for tokens in (2, 4, 8)),
        "fast_dllm:threshold=0.9",
        "fast_dllm:threshold=0.7",
        "fast_dllm:threshold=0.5",
        "fast_dllm:rule=factor:factor=1.0",
        "fast_dllm:threshold=0.9:cache=dual",
        f"dream:steps={canvas // 4}",
        "localleap",
        "learn2pd",
        "dkv_cache",
        "greedy",  # the AR twin: the reference line
        "diffuspec",  # AR target, diffusion drafter: its tokens per target call
    )


@dataclass(frozen=True)
class Setting:
    label: str
    decoder: str
    params: dict[str, str]
    model: str

    @property
    def line(self) -> str:
        """The parallelism curve it is drawn on."""
        return get_decoder(self.decoder).curve_line(self.params)


def parse_setting(label: str) -> Setting:
    """``fast_dllm:rule=factor:factor=1.0`` -> decoder, parameters and model; ``ParamError`` if it cannot run."""
    decoder, params = parse_label(label)
    get_decoder(decoder).validate(params)
    return Setting(label, decoder, params, default_model(decoder))


def dllm(
    per_task: int = 20,
    tasks: Sequence[str] = OPERATIONS,
    settings: Sequence[str] | None = None,
    *,
    models: dict[str, LoadedModel] | None = None,
    load: Callable[[str], LoadedModel] | None = None,
    seed: int = BENCH_SEED,
    max_people: int = MAX_PEOPLE,
    as_json: bool = False,
    log: Callable[[str], None] | None = None,
    sinks: Sequence[TraceSink] = (),
    figure: Path | None = None,
    test_files: Path | None = None,
    icl: bool = False,
    canvas: int | None = None,
) -> dict[str, Any]:
    """Run every setting on ``per_task`` rows of every task; print the table and the goal check (or JSON).

    ``models`` maps model names to loaded models (tests inject tiny ones); missing ones come from ``load``.
    A setting whose decoder is not registered, or whose parameters it refuses, is skipped with a note.
    The bench is recorded as a run (decoder ``bench_dllm``, one ``BenchPoint`` per cell as it completes) into
    ``sinks``: the Library draws its accuracy-against-parallelism curve, and a bench that fails keeps its cells.
    ``figure``: an HTML file to write that curve to. ``test_files``: a folder of ParallelBench's own test files
    (``<task>.jsonl``), whose first ``per_task`` rows replace the fresh lists. ``icl``: each row's in-context
    example goes before its prompt as chat turns, as ParallelBench prompts. ``canvas``: every row's answer length in
    tokens (default: each model's own); ``settings`` default to ``default_settings`` of it.
    """
    log = log or _to_stderr
    unknown = [task for task in tasks if task not in OPERATIONS]
    if unknown:
        raise ParamError(f"unknown task {', '.join(unknown)}; tasks: {', '.join(OPERATIONS)}")
    rows_of = _test_file_rows(test_files, tasks, per_task) if test_files else {
        task: task_rows(task, per_task, task_seed(seed, task), max_people) for task in tasks}
    usable, skipped = _usable(settings or default_settings(canvas or DEFAULT_CANVAS), log)
    models = models if models is not None else {}
    results: dict[str, dict[str, EvalResult | None]] = {task: {} for task in tasks}
    cells, done = len(tasks) * len(usable), 0
    recorder = _bench_recorder(per_task, tasks, [s.label for s in usable], seed, max_people, sinks, test_files, icl,
                               canvas)
    points: list[BenchPoint] = []
    with run_ending(recorder, f"{cells} cells"):
        for task in tasks:
            rows = rows_of[task]
            for setting in usable:
                done += 1
                if setting.label in skipped:  # failed on an earlier task: it would fail again
                    results[task][setting.label] = None
                    continue
                model = _model(models, setting.model, load)
                start = time.perf_counter()
                try:
                    result = evaluate(model, setting.decoder, setting.params, rows, task, icl=icl, canvas=canvas)
                except RunFailed as error:
                    skipped[setting.label] = str(error)
                    results[task][setting.label] = None
                    log(f"note: {setting.label} failed and is dropped: {error}")
                    continue
                results[task][setting.label] = result
                seconds = time.perf_counter() - start
                points.append(BenchPoint(task=task, setting=setting.label, decoder=setting.decoder, model=setting.model,
                                         rows=len(rows), accuracy=result.accuracy,
                                         tokens_per_call=result.tokens_per_call, model_calls=result.model_calls,
                                         draft_calls=result.draft_calls, seconds=seconds, line=setting.line))
                recorder.record(points[-1])
                log(f"[{done}/{cells}] {task} / {setting.label}: accuracy {result.accuracy:.1%}, "
                    f"{result.model_calls} calls, {result.tokens_per_call:.2f} tokens/call ({seconds:.1f} s)")
    summary = bench_summary(points)
    report = {
        "per_task": per_task, "seed": seed, "icl": icl, "test_files": str(test_files) if test_files else None,
        "canvas": {name: answer_length(m, canvas) for name, m in models.items()},
        "results": {task: {label: _cell(r) for label, r in by_setting.items()} for task, by_setting in results.items()},
        "summary": summary, "skipped": skipped, "run_id": recorder.trace.run_id,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, usable)
    if figure is not None:
        figure.write_text(parallelism_figure(recorder.trace).to_html(include_plotlyjs=True))
        log(f"curve written to {figure}")
    return report


def _test_file_rows(folder: Path, tasks: Sequence[str], per_task: int) -> dict[str, list[dict[str, Any]]]:
    """The first ``per_task`` rows of each task's file, all read (and checked) before any decoding starts."""
    rows = {}
    for task in tasks:
        path = folder / f"{task}.jsonl"
        try:
            rows[task] = read_rows(path, task)[:per_task]
        except (OSError, ValueError) as error:
            raise ParamError(f"cannot read ParallelBench's {task} rows from {path}: {error}") from error
        if len(rows[task]) < per_task:
            raise ParamError(f"{path} holds {len(rows[task])} rows, fewer than the {per_task} asked for")
    return rows


def _bench_recorder(per_task: int, tasks: Sequence[str], labels: list[str], seed: int, max_people: int,
                    sinks: Sequence[TraceSink], test_files: Path | None = None, icl: bool = False,
                    canvas: int | None = None) -> Recorder:
    source = (f"first rows of ParallelBench's test files in {test_files}" if test_files
              else f"lists of up to {max_people} people, seed {seed}")
    prompt = (f"bench dllm: {len(labels)} settings x {len(tasks)} waiting-line tasks, {per_task} rows each "
              f"({source}{'; each after its in-context example' if icl else ''})")
    params = {"per_task": per_task, "tasks": ",".join(tasks), "settings": ",".join(labels), "max_people": max_people,
              **({"test_files": str(test_files)} if test_files else {}), **({"icl": True} if icl else {}),
              **({"canvas": canvas} if canvas else {})}
    info = RunInfo(model="waitline-mdlm + waitline-ar", decoder="bench_dllm", params=params, prompt=prompt, seed=seed,
                   versions=software_versions())
    recorder = Recorder(Trace(run_id=new_run_id(), info=info), str, sinks)
    recorder.record(RunStarted(prompt_token_ids=[]))
    return recorder


def _usable(labels: Sequence[str], log: Callable[[str], None]) -> tuple[list[Setting], dict[str, str]]:
    usable, skipped = [], {}
    for label in labels:
        try:
            usable.append(parse_setting(label))
        except ParamError as error:  # another helper's decoder may not be registered yet
            skipped[label] = str(error)
            log(f"note: skipping {label}: {error}")
    return usable, skipped


def _model(models: dict[str, LoadedModel], name: str, load: Callable[[str], LoadedModel] | None) -> LoadedModel:
    if name not in models:
        if load is None:
            from engine.models import load_model

            load = load_model
        models[name] = load(name)
    return models[name]


def _cell(result: EvalResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    return {**result.summary(), "draft_calls": result.draft_calls, "tokens": result.tokens}


def _print(report: dict[str, Any], usable: list[Setting]) -> None:
    width = max([len(s.label) for s in usable] + [7])
    rows = (f"the first {report['per_task']} rows of {report['test_files']}" if report["test_files"]
            else f"{report['per_task']} fresh rows per task (seed {report['seed']})")
    print(f"waiting-line bench: {rows}, "
          f"diffusion decoders on waitline-mdlm, others on waitline-ar; canvas {report['canvas']}")
    print(f"{'task':15} {'setting':{width}} {'model':14} {'acc %':>6} {'tok/call':>8} {'calls':>7} {'draft':>6}")
    models = {s.label: s.model for s in usable}
    for task, by_setting in report["results"].items():
        for label, cell in by_setting.items():
            if cell is None:
                print(f"{task:15} {label:{width}} {models[label]:14} {'failed':>6}")
                continue
            print(f"{task:15} {label:{width}} {models[label]:14} {cell['accuracy'] * 100:6.1f} "
                  f"{cell['tokens_per_call']:8.2f} {cell['model_calls']:7d} {cell['draft_calls']:6d}")
    summary = report["summary"]
    if not summary:
        print("no copy/reverse/sort task in this run: no goal check")
        return
    tasks = ", ".join(next(iter(summary.values()))["tasks"])
    print(f"\nsummary over {tasks}; goal: >= {GOAL_FEWER_CALLS:g}x fewer model calls than {BASELINE} "
          f"(one token per step) at <= {GOAL_MAX_DROP * 100:g} points lower accuracy")
    print(f"{'setting':{width}} {'mean acc %':>10} {'calls':>7} {'tok/call':>8} {'fewer calls':>11} {'acc change':>10}  goal")
    base_accuracy = summary.get(BASELINE, {}).get("accuracy", 0.0)
    for label, total in summary.items():
        if "fewer_calls" not in total:
            print(f"{label:{width}} {total['accuracy'] * 100:10.1f} {total['model_calls']:7d} "
                  f"{total['tokens_per_call']:8.2f}  (no {BASELINE} baseline in this run)")
            continue
        standing = verdict(label, total)
        goal = {"baseline": "reference", "reference": f"not judged ({total['model']})", "met": "PASS",
                "missed": "FAIL"}[standing]
        if standing in ("met", "missed") and base_accuracy < MEANINGFUL_BASELINE:  # "no lower than 0 %" proves nothing
            goal += f" (vacuous: the baseline scores {base_accuracy:.0%})"
        print(f"{label:{width}} {total['accuracy'] * 100:10.1f} {total['model_calls']:7d} "
              f"{total['tokens_per_call']:8.2f} {total['fewer_calls']:10.2f}x {total['accuracy_change'] * 100:+10.1f}  {goal}")
    for label, reason in report["skipped"].items():
        print(f"skipped {label}: {reason}")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
