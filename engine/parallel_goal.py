"""The parallel-decoding goal of the waiting-line bench, over stored ``BenchPoint`` cells: light enough for the
figures (no torch, no decoder)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.events import BenchPoint

# The parallel-decoding goal, checked per setting over the scored tasks against LLaDA at one token per step.
BASELINE = "llada"
SCORED_TASKS = ("copy", "reverse", "sort")
GOAL_FEWER_CALLS = 3.0
GOAL_MAX_DROP = 0.02  # accuracy, as a fraction: 2 points
MEANINGFUL_BASELINE = 0.5  # below this, keeping accuracy says little about the decoder


def meets_goal(calls: int, baseline_calls: int, accuracy: float, baseline_accuracy: float) -> bool:
    """At least ``GOAL_FEWER_CALLS`` times fewer model calls at most ``GOAL_MAX_DROP`` lower accuracy."""
    return calls * GOAL_FEWER_CALLS <= baseline_calls and accuracy >= baseline_accuracy - GOAL_MAX_DROP - 1e-9


def bench_summary(points: Iterable[BenchPoint]) -> dict[str, dict[str, Any]]:
    """Per setting with a cell on every scored task present: mean accuracy, calls, tokens per call, and against the
    baseline (when it ran) how many times fewer calls, the accuracy change and the goal check. The goal is judged
    only for settings on the baseline's model: another model (the AR twin) is a reference line, not a candidate."""
    cells = {(p.task, p.setting): p for p in points}
    scored = [task for task in SCORED_TASKS if any(task == t for t, _ in cells)]
    labels = list(dict.fromkeys(setting for _, setting in cells))
    totals: dict[str, dict[str, Any]] = {}
    for label in labels:
        mine = [cells.get((task, label)) for task in scored]
        if scored and all(mine):
            calls = sum(p.model_calls for p in mine)
            tokens = sum(p.tokens_per_call * p.model_calls for p in mine)
            totals[label] = {"accuracy": sum(p.accuracy for p in mine) / len(mine), "model_calls": calls,
                             "tokens_per_call": tokens / max(1, calls), "tasks": scored, "model": mine[0].model}
    base = totals.get(BASELINE)
    for label, total in totals.items() if base else ():
        total["fewer_calls"] = base["model_calls"] / total["model_calls"] if total["model_calls"] else 0.0
        total["accuracy_change"] = total["accuracy"] - base["accuracy"]
        if label != BASELINE and total["model"] == base["model"]:
            total["goal"] = meets_goal(total["model_calls"], base["model_calls"], total["accuracy"], base["accuracy"])
    return totals


def verdict(label: str, total: dict[str, Any]) -> str:
    """Where a ``bench_summary`` row stands: "baseline", "reference" (another model, not judged), "met" or "missed"."""
    if label == BASELINE:
        return "baseline"
    if "goal" not in total:
        return "reference"
    return "met" if total["goal"] else "missed"
