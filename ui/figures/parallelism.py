"""A stored ``bench dllm`` run drawn as ParallelBench draws it: accuracy against parallelism, per task and decoder.

``parallelism_figure`` puts one panel per task (the scored copy, reverse and sort first), x = tokens per model call
(the parallelism each setting reached), y = accuracy, one line per decoder through the settings that differ only in
its parallelism parameters (LLaDA's steps; LLaDA in blocks of one token is a line of its own). ``goal_figure``
places every setting by how many times fewer model calls it made than LLaDA at one token per step and how many
points of accuracy it lost over the scored tasks, with the goal region (>= 3x fewer, <= 2 points lower) shaded.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from engine.events import BenchPoint
from engine.parallel_goal import (
    BASELINE, GOAL_FEWER_CALLS, GOAL_MAX_DROP, MEANINGFUL_BASELINE, SCORED_TASKS, bench_summary, verdict,
)
from engine.trace import Trace
from ui.figures.common import TEXT_COLOR, empty_figure, escape_text, style_figure

NO_BENCH = "This run has no bench cells: record one with <b>decoding-explorer bench dllm</b>."
COLUMNS = 5
PANEL_PX = 250
GOAL_SYMBOLS = {"baseline": "star", "reference": "diamond-open", "met": "circle", "missed": "x"}
LOG_TICKS = (0.01, 0.03, 0.1, 0.3, 1, 2, 3, 5, 10, 20, 50, 100, 200)


def bench_points(trace: Trace) -> list[BenchPoint]:
    return [e for e in trace.events if isinstance(e, BenchPoint)]


def _ordered_tasks(points: list[BenchPoint]) -> list[str]:
    tasks = list(dict.fromkeys(p.task for p in points))
    return sorted(tasks, key=lambda task: (task not in SCORED_TASKS, SCORED_TASKS.index(task)
                                           if task in SCORED_TASKS else tasks.index(task)))


def _line(point: BenchPoint) -> str:
    """The curve a cell is drawn on; traces recorded before curves had their own key drew one per decoder."""
    return point.line or point.decoder


def _colors(points: list[BenchPoint]) -> dict[str, str]:
    lines = list(dict.fromkeys(_line(p) for p in points))
    palette = qualitative.Plotly + qualitative.D3
    return {line: palette[i % len(palette)] for i, line in enumerate(lines)}


def parallelism_figure(trace: Trace) -> go.Figure:
    """Accuracy against tokens per model call, a panel per task and a line per decoder through its parallelism."""
    points = bench_points(trace)
    if not points:
        return empty_figure(NO_BENCH)
    tasks = _ordered_tasks(points)
    rows = math.ceil(len(tasks) / COLUMNS)
    columns = min(COLUMNS, len(tasks))
    fig = make_subplots(rows=rows, cols=columns, subplot_titles=[escape_text(task) for task in tasks],
                        horizontal_spacing=0.04, vertical_spacing=0.16 if rows > 1 else 0.1, shared_yaxes=True)
    colors = _colors(points)
    shown: set[str] = set()
    for index, task in enumerate(tasks):
        row, col = divmod(index, columns)
        by_line: dict[str, list[BenchPoint]] = {}
        for point in points:
            if point.task == task:
                by_line.setdefault(_line(point), []).append(point)
        for name, line in by_line.items():
            line.sort(key=lambda p: p.tokens_per_call)
            fig.add_trace(go.Scatter(
                x=[p.tokens_per_call for p in line], y=[100 * p.accuracy for p in line], mode="lines+markers",
                name=escape_text(name), legendgroup=escape_text(name), showlegend=name not in shown,
                line={"color": colors[name], "width": 2}, marker={"size": 7},
                customdata=[[escape_text(p.setting), p.model_calls, p.rows, escape_text(p.model)] for p in line],
                hovertemplate=("%{customdata[0]}<br>accuracy %{y:.1f} % over %{customdata[2]} rows<br>"
                               "%{x:.2f} tokens per call (%{customdata[1]} calls), %{customdata[3]}<extra></extra>"),
            ), row=row + 1, col=col + 1)
            shown.add(name)
    fig.update_xaxes(type="log", title_text="tokens per call")
    fig.update_yaxes(range=[-3, 103], title_text="accuracy %", col=1)
    info = trace.info.params
    title = (f"Accuracy against parallelism ({trace.status}): {len(points)} cells, "
             f"{escape_text(str(info.get('per_task', '?')))} rows per task<br>"
             "ParallelBench's view: the more tokens a step commits, the more the tasks whose tokens depend on each "
             "other (shuffle, the random edits) break")
    return style_figure(fig, title, height=120 + PANEL_PX * rows, role="primary", clamp=False)


def goal_figure(trace: Trace) -> go.Figure:
    """Each setting over the scored tasks: times fewer model calls than the baseline against accuracy change."""
    points = bench_points(trace)
    summary = bench_summary(points)
    base = summary.get(BASELINE)
    if not summary or base is None:
        return empty_figure(f"The goal check needs {BASELINE} (one token per step) and a cell on each scored task "
                            f"({', '.join(SCORED_TASKS)}) present.")
    lines = {p.setting: _line(p) for p in points}
    colors = _colors(points)
    fig = go.Figure()
    widest = max([total["fewer_calls"] for total in summary.values()] + [GOAL_FEWER_CALLS * 2])
    fig.add_shape(type="rect", x0=GOAL_FEWER_CALLS, x1=widest * 1.5, y0=-100 * GOAL_MAX_DROP, y1=100,
                  fillcolor="rgba(0, 160, 110, 0.12)", line={"width": 0}, layer="below")
    # neighbours along the x axis take their labels above and below in turn, so close settings stay readable
    by_x = sorted(summary, key=lambda label: summary[label]["fewer_calls"])
    label_side = {label: ("top center", "bottom center")[rank % 2] for rank, label in enumerate(by_x)}
    for label, total in summary.items():
        standing = verdict(label, total)
        described = {"baseline": "baseline", "reference": f"{escape_text(total['model'])}: a reference, not judged",
                     "met": "meets the goal", "missed": "misses the goal"}[standing]
        fig.add_trace(go.Scatter(
            x=[total["fewer_calls"]], y=[100 * total["accuracy_change"]], mode="markers+text",
            text=[escape_text(label)], textposition=label_side[label], showlegend=False,
            marker={"size": 10, "color": colors[lines[label]], "symbol": GOAL_SYMBOLS[standing]},
            hovertemplate=(f"{escape_text(label)}: {described}<br>%{{x:.2f}}x fewer calls, %{{y:+.1f}} points "
                           f"(mean accuracy {100 * total['accuracy']:.1f} %)<extra></extra>"),
        ))
    lowest = min(100 * total["accuracy_change"] for total in summary.values())
    fig.update_xaxes(type="log", title_text=f"times fewer model calls than {BASELINE}", tickvals=LOG_TICKS, range=[
        math.log10(0.8 * min(total["fewer_calls"] for total in summary.values() if total["fewer_calls"] > 0)),
        math.log10(widest * 1.3)])
    fig.update_yaxes(title_text="accuracy change, points", range=[min(lowest, -10) - 5, 10])
    vacuous = base["accuracy"] < MEANINGFUL_BASELINE
    title = (f"Goal: >= {GOAL_FEWER_CALLS:g}x fewer calls at <= {100 * GOAL_MAX_DROP:g} points lost (shaded), over "
             f"{', '.join(base['tasks'])}<br>{BASELINE} at one token per step scores {100 * base['accuracy']:.1f} %"
             + (": too low for keeping it to mean much" if vacuous else ""))
    fig.update_layout(font={"color": TEXT_COLOR})
    return style_figure(fig, title)
