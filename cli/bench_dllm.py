"""``bench dllm``: diffusion decoders on ParallelBench's waiting-line tasks, accuracy against parallelism, one run.

Every setting decodes the same fresh seeded rows of each task (diffusion decoders on ``waitline-mdlm``, the others
on its AR twin ``waitline-ar``). Per setting, over copy/reverse/sort, the goal check compares with LLaDA at one
token per step: at least 3x fewer model calls at most 2 accuracy points lower.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.decoders import get_decoder
from engine.models.handle import LoadedModel
from engine.offline.parallelbench import (
    BENCH_SEED, EvalResult, RunFailed, canvas_length, default_model, evaluate, task_rows, task_seed,
)
from engine.offline.waitline_data import MAX_PEOPLE, OPERATIONS
from engine.params import ParamError, parse_setting as parse_label

DEFAULT_SETTINGS = (
    "llada",  # one token per step (steps = canvas): the baseline
    "llada:steps=18",  # 4 tokens per step on the 72-token canvas
    "llada:steps=9",
    "fast_dllm:threshold=0.9",
    "fast_dllm:threshold=0.7",
    "fast_dllm:threshold=0.5",
    "fast_dllm:rule=factor:factor=1.0",
    "fast_dllm:threshold=0.9:cache=dual",
    "dream:steps=24",
    "localleap",
    "learn2pd",
    "dkv_cache",
    "greedy",  # the AR twin: the reference line
    "diffuspec",  # AR target, diffusion drafter: its tokens per target call
)
BASELINE = "llada"
SCORED_TASKS = ("copy", "reverse", "sort")
GOAL_FEWER_CALLS = 3.0
GOAL_MAX_DROP = 0.02  # accuracy, as a fraction: 2 points
MEANINGFUL_BASELINE = 0.5  # below this, keeping accuracy says little about the decoder


@dataclass(frozen=True)
class Setting:
    label: str
    decoder: str
    params: dict[str, str]
    model: str


def parse_setting(label: str) -> Setting:
    """``fast_dllm:rule=factor:factor=1.0`` -> decoder, parameters and model; ``ParamError`` if it cannot run."""
    decoder, params = parse_label(label)
    get_decoder(decoder).validate(params)
    return Setting(label, decoder, params, default_model(decoder))


def meets_goal(calls: int, baseline_calls: int, accuracy: float, baseline_accuracy: float) -> bool:
    """At least ``GOAL_FEWER_CALLS`` times fewer model calls at most ``GOAL_MAX_DROP`` lower accuracy."""
    return calls * GOAL_FEWER_CALLS <= baseline_calls and accuracy >= baseline_accuracy - GOAL_MAX_DROP - 1e-9


def dllm(
    per_task: int = 20,
    tasks: Sequence[str] = OPERATIONS,
    settings: Sequence[str] = DEFAULT_SETTINGS,
    *,
    models: dict[str, LoadedModel] | None = None,
    load: Callable[[str], LoadedModel] | None = None,
    seed: int = BENCH_SEED,
    max_people: int = MAX_PEOPLE,
    as_json: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every setting on ``per_task`` rows of every task; print the table and the goal check (or JSON).

    ``models`` maps model names to loaded models (tests inject tiny ones); missing ones come from ``load``.
    A setting whose decoder is not registered, or whose parameters it refuses, is skipped with a note.
    """
    log = log or _to_stderr
    unknown = [task for task in tasks if task not in OPERATIONS]
    if unknown:
        raise ParamError(f"unknown task {', '.join(unknown)}; tasks: {', '.join(OPERATIONS)}")
    usable, skipped = _usable(settings, log)
    models = models if models is not None else {}
    results: dict[str, dict[str, EvalResult | None]] = {task: {} for task in tasks}
    cells, done = len(tasks) * len(usable), 0
    for task in tasks:
        rows = task_rows(task, per_task, task_seed(seed, task), max_people)
        for setting in usable:
            done += 1
            if setting.label in skipped:  # failed on an earlier task: it would fail again
                results[task][setting.label] = None
                continue
            model = _model(models, setting.model, load)
            start = time.perf_counter()
            try:
                result = evaluate(model, setting.decoder, setting.params, rows, task)
            except RunFailed as error:
                skipped[setting.label] = str(error)
                results[task][setting.label] = None
                log(f"note: {setting.label} failed and is dropped: {error}")
                continue
            results[task][setting.label] = result
            log(f"[{done}/{cells}] {task} / {setting.label}: accuracy {result.accuracy:.1%}, "
                f"{result.model_calls} calls, {result.tokens_per_call:.2f} tokens/call "
                f"({time.perf_counter() - start:.1f} s)")
    summary = _summary(results, [s.label for s in usable])
    report = {
        "per_task": per_task, "seed": seed, "canvas": {name: canvas_length(m) for name, m in models.items()},
        "results": {task: {label: _cell(r) for label, r in by_setting.items()} for task, by_setting in results.items()},
        "summary": summary, "skipped": skipped,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, usable)
    return report


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


def _summary(results: Mapping[str, Mapping[str, EvalResult | None]], labels: list[str]) -> dict[str, Any]:
    """Per setting over the scored tasks present: mean accuracy, calls, and the goal check against the baseline."""
    scored = [task for task in SCORED_TASKS if task in results]
    if not scored:
        return {}
    totals = {}
    for label in labels:
        cells = [results[task].get(label) for task in scored]
        if all(cell is not None for cell in cells):
            totals[label] = {
                "accuracy": sum(c.accuracy for c in cells) / len(cells),
                "model_calls": sum(c.model_calls for c in cells),
                "tokens_per_call": sum(c.tokens for c in cells) / max(1, sum(c.model_calls for c in cells)),
            }
    base = totals.get(BASELINE)
    for label, total in totals.items():
        total["tasks"] = scored
        if base is None:
            continue
        total["fewer_calls"] = base["model_calls"] / total["model_calls"] if total["model_calls"] else 0.0
        total["accuracy_change"] = total["accuracy"] - base["accuracy"]
        if label != BASELINE:
            total["goal"] = meets_goal(total["model_calls"], base["model_calls"], total["accuracy"], base["accuracy"])
    return totals


def _print(report: dict[str, Any], usable: list[Setting]) -> None:
    width = max([len(s.label) for s in usable] + [7])
    print(f"waiting-line bench: {report['per_task']} rows per task (seed {report['seed']}), "
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
        goal = "reference" if label == BASELINE else ("PASS" if total["goal"] else "FAIL")
        if label != BASELINE and base_accuracy < MEANINGFUL_BASELINE:  # "no lower than 0 %" proves nothing
            goal += f" (vacuous: the baseline scores {base_accuracy:.0%})"
        print(f"{label:{width}} {total['accuracy'] * 100:10.1f} {total['model_calls']:7d} "
              f"{total['tokens_per_call']:8.2f} {total['fewer_calls']:10.2f}x {total['accuracy_change'] * 100:+10.1f}  {goal}")
    for label, reason in report["skipped"].items():
        print(f"skipped {label}: {reason}")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
