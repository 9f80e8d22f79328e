"""ParallelBench's waiting-line tasks as an evaluation: read or write its test files, run a decoder, score it.

A test file (``waiting_line/<task>.jsonl``) holds one row per line in ParallelBench's layout (see
``waitline_data``). Each row's prompt is rendered without its in-context examples, decoded by any registered
decoder through ``engine.run.Run`` on a canvas of the model's length (or one given: ParallelBench's own runs use
``waitline_data.PARALLELBENCH_CANVAS``), and scored by ParallelBench's rules.
Model calls and output tokens are summed over the rows, so ``tokens_per_call`` is the parallelism achieved.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.decoders import get_decoder
from engine.models.handle import LoadedModel
from engine.offline.waitline_data import (
    MAX_PEOPLE, OPEN_ENDED, OPERATIONS, TEMPLATES, WaitlineGenerator, prompt_text, score,
)
from engine.run import Run, RunSettings

DEFAULT_CANVAS = 192  # the waitline models' answer side (15 people of varied names); an AR model stops at end of text
BENCH_SEED = 30_000  # training draws seeds 0.., train.py's held-out score 10_000: bench lists are fresh
Progress = Callable[[int, int, float], None]  # (rows done, rows in all, accuracy so far)


class RunFailed(RuntimeError):
    """A decoder run ended in failure (a wrong model kind, a bad setting); scoring it as wrong would mislead."""


@dataclass(frozen=True)
class RowResult:
    output: str
    score: float
    model_calls: int
    draft_calls: int
    tokens: int
    order_tau: float | None = None  # a diffusion decoder's unmasking order against left to right (Kendall tau-b)


@dataclass
class EvalResult:
    accuracy: float
    n: int
    model_calls: int
    draft_calls: int
    tokens: int
    per_row: list[RowResult] = field(default_factory=list)

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / self.model_calls if self.model_calls else 0.0

    @property
    def order_tau(self) -> float | None:
        """The rows' mean unmasking-order tau (ParallelBench's decoding-order measure); None for other decoders."""
        taus = [row.order_tau for row in self.per_row if row.order_tau is not None]
        return sum(taus) / len(taus) if taus else None

    def summary(self) -> dict[str, float | int]:
        order = {} if self.order_tau is None else {"order_kendall_tau": round(self.order_tau, 4)}
        return {"accuracy": self.accuracy, "n": self.n, "model_calls": self.model_calls,
                "tokens_per_call": round(self.tokens_per_call, 4), **order}


# --- test files --------------------------------------------------------------------------------------------------


def task_rows(operation: str, count: int, seed: int, max_people: int = MAX_PEOPLE) -> list[dict[str, Any]]:
    """``count`` seeded rows of one task in ParallelBench's format (one in-context example each, as theirs), people
    drawn from the held-out names only; ``max_people`` 6 gives the list lengths of ParallelBench's own files (3-6)."""
    generator = WaitlineGenerator(seed, max_people=max_people, split="held_out")
    return [generator.row(operation) for _ in range(count)]


def task_seed(base: int, operation: str) -> int:
    """One random stream per task, so a task's rows do not depend on which other tasks are written."""
    return base + OPERATIONS.index(operation)


def write_rows(path: str | Path, operation: str, count: int, seed: int = BENCH_SEED,
               max_people: int = MAX_PEOPLE) -> Path:
    """Write a held-out test file of ``count`` rows; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in task_rows(operation, count, seed, max_people)))
    return path


def write_task_files(folder: str | Path, per_task: int, seed: int = BENCH_SEED,
                     operations: Iterable[str] = OPERATIONS, max_people: int = MAX_PEOPLE) -> list[Path]:
    """``folder/waiting_line/<task>.jsonl`` for every task, ParallelBench's layout."""
    return [write_rows(Path(folder) / "waiting_line" / f"{op}.jsonl", op, per_task, task_seed(seed, op), max_people)
            for op in operations]


def read_rows(path: str | Path, operation: str | None = None) -> list[dict[str, Any]]:
    """The rows of a test file, each checked; with ``operation`` also the fields its instruction needs.

    A bad row raises ``ValueError`` naming the file, the line and what is wrong.
    """
    if operation is not None:
        _template_fields(operation)  # an unknown task is the caller's error, not the file's
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})") from None
        try:
            check_row(row, operation)
        except ValueError as error:
            raise ValueError(f"{path} line {number}: {error}") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


def check_row(row: Any, operation: str | None = None) -> None:
    """Raise ``ValueError`` saying what is missing or malformed in a ParallelBench waiting-line row."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, got {type(row).__name__}")
    inputs = row.get("input")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("context"), str):
        raise ValueError('a row needs "input": {"context": "<JSON list of people>", ...}')
    _json_list(inputs["context"], "input.context")
    if "answer" not in row:
        raise ValueError('a row needs an "answer"')
    answer = row["answer"]
    if operation is None:
        if not isinstance(answer, (str, dict)):
            raise ValueError('"answer" must be a JSON list as text, or an object with the input list')
        return
    missing = [name for name in _template_fields(operation) if name not in inputs]
    if missing:
        raise ValueError(f"{operation} rows need input.{', input.'.join(missing)}")
    if operation not in OPEN_ENDED:
        if not isinstance(answer, str):
            raise ValueError(f'{operation} rows need "answer" as a JSON list in text, got {type(answer).__name__}')
        _json_list(answer, "answer")
        return
    if not isinstance(answer, dict) or not isinstance(answer.get("input"), list):
        raise ValueError(f'{operation} rows need "answer": {{"input": [people], ...}} (many answers are valid)')
    if operation in ("insert_random", "replace_random") and not isinstance(answer.get("word"), str):
        raise ValueError(f'{operation} rows need "answer": {{"word": "<new person>", ...}}')


def _template_fields(operation: str) -> list[str]:
    """The row fields the task's instruction names (``context``, and ``word`` or ``index`` for some)."""
    if operation not in TEMPLATES:
        raise ValueError(f"unknown waiting-line task {operation!r}; tasks: {', '.join(OPERATIONS)}")
    return sorted({name for _, name, _, _ in string.Formatter().parse(TEMPLATES[operation]) if name})


def _json_list(text: str, where: str) -> None:
    try:
        value = json.loads(text)
    except ValueError:
        raise ValueError(f"{where} is not a JSON list: {text[:60]!r}") from None
    if not isinstance(value, list):
        raise ValueError(f"{where} is not a JSON list: {text[:60]!r}")


# --- evaluation --------------------------------------------------------------------------------------------------


def default_model(decoder: str) -> str:
    """The built-in model a decoder runs on: the diffusion model for diffusion decoders, else its AR twin."""
    return "waitline-mdlm" if get_decoder(decoder).family == "diffusion" else "waitline-ar"


def icl_turns(row: dict[str, Any], operation: str) -> tuple[tuple[str, str], ...]:
    """A row's in-context examples as (prompt, answer) chat turns; an open-ended task's answer is its example."""
    turns = []
    for example in row["input"].get("icl_examples", []):
        answer = example["answer"]
        turns.append((prompt_text(example, operation), answer if isinstance(answer, str) else answer["example"]))
    return tuple(turns)


def answer_length(model: LoadedModel, canvas: int | None = None) -> int:
    """The answer length rows are decoded on: ``canvas`` where given, else the diffusion canvas the model was
    trained with (an AR model gets as long, then stops at end of text)."""
    return canvas or int(getattr(model.model.config, "diffusion_gen_length", None) or DEFAULT_CANVAS)


def evaluate(
    model: LoadedModel,
    decoder: str,
    params: dict[str, Any],
    rows: list[dict[str, Any]],
    operation: str,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
    icl: bool = False,
    canvas: int | None = None,
) -> EvalResult:
    """Decode every row's prompt with ``decoder`` and score the output text. Without ``icl`` the prompt is the row's
    instruction alone; with it, the row's in-context examples come first as chat turns, as ParallelBench prompts.
    ``canvas``: the answer's length in tokens (a diffusion decoder's canvas, an AR decoder's limit); default the
    model's (``answer_length``).

    Runs are seeded (seed 0) and so deterministic. A failed run raises ``RunFailed`` with its reason.
    """
    rows = rows[:limit] if limit else rows
    results: list[RowResult] = []
    for row in rows:
        history = icl_turns(row, operation) if icl else ()
        settings = RunSettings(max_new_tokens=answer_length(model, canvas),
                               chat=model.has_chat_template or bool(history), history=history)
        trace = Run(model, decoder, prompt_text(row, operation), params, settings).to_end()
        if trace.status != "finished":
            raise RunFailed(f"{decoder} on {model.name} ({operation}, row {len(results) + 1}): {trace.reason}")
        text = model.decode(trace.output_token_ids, skip_special_tokens=True)
        results.append(RowResult(
            output=text, score=score(operation, text, row["answer"]),
            model_calls=trace.metrics.get("model_calls", 0), draft_calls=trace.metrics.get("draft_calls", 0),
            tokens=len(trace.output_token_ids), order_tau=trace.metrics.get("order_kendall_tau"),
        ))
        if progress:
            progress(len(results), len(rows), sum(r.score for r in results) / len(results))
    return EvalResult(
        accuracy=sum(r.score for r in results) / len(results) if results else 0.0,
        n=len(results),
        model_calls=sum(r.model_calls for r in results),
        draft_calls=sum(r.draft_calls for r in results),
        tokens=sum(r.tokens for r in results),
        per_row=results,
    )
