"""The Library's run listing as a tree (each run followed by its branches) and a short label for run pickers.

Pure functions of run summary objects (``storage.RunSummary`` or anything with the same attributes); the optional
``parent_run_id`` and ``branch_step`` are read with a default, so summaries from before branching still work. Rows
and labels are plain text for a Dataframe or a Dropdown, which show text as text: nothing here is HTML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ui.figures.common import shorten

RUN_TREE_HEADERS = ["run", "created", "model", "decoder", "status", "new tokens", "prompt"]
RUN_TREE_TYPES = ["str", "str", "str", "str", "str", "number", "str"]
PROMPT_CHARS = 80  # prompt text shown in a row
LABEL_PROMPT_CHARS = 40  # prompt text in a run label
ID_PREFIX = 8
INDENT = "\u00a0\u00a0\u00a0"  # non-breaking: a Dataframe cell keeps it


def _one_line(text: str, limit: int) -> str:
    """``text`` on one line (runs of whitespace become one space), cut to ``limit`` characters with an ellipsis."""
    return shorten(" ".join(str(text).split()), limit)


def run_tree_rows(rows: Sequence[Any]) -> list[list]:
    """Table rows (see :data:`RUN_TREE_HEADERS`: full run id first) ordered as a tree: each run followed by its
    branches, recursively, oldest branch first; the roots keep their given order (the store lists newest first).
    A branch's prompt cell is indented per depth ("└ " after non-breaking spaces) and starts with
    "branch of <parent id prefix> @ step N". A branch whose parent is not among ``rows`` is a root, and so is any
    run caught in a (malformed) parent cycle, so every run appears exactly once."""
    by_id = {r.run_id: r for r in rows}
    children: dict[str, list[Any]] = {}
    roots = []
    for r in rows:
        parent = getattr(r, "parent_run_id", None)
        if parent and parent in by_id and parent != r.run_id:
            children.setdefault(parent, []).append(r)
        else:
            roots.append(r)
    for kids in children.values():
        kids.sort(key=lambda r: str(r.created_at))
    out: list[list] = []
    placed: set[str] = set()

    def visit(run: Any, depth: int) -> None:
        if run.run_id in placed:
            return
        placed.add(run.run_id)
        out.append(_row(run, depth))
        for kid in children.get(run.run_id, []):
            visit(kid, depth + 1)

    for root in roots:
        visit(root, 0)
    for run in rows:  # parent cycles: nothing reached them from a root
        if run.run_id not in placed:
            visit(run, 0)
    return out


def _row(run: Any, depth: int) -> list:
    prompt = _one_line(run.prompt, PROMPT_CHARS)
    parent = getattr(run, "parent_run_id", None)
    if parent:
        step = getattr(run, "branch_step", None)
        marker = f"branch of {str(parent)[:ID_PREFIX]}" + (f" @ step {step}" if step is not None else "")
        prompt = f"{marker} · {prompt}"
    if depth:
        prompt = INDENT * (depth - 1) + "└ " + prompt
    metrics = getattr(run, "metrics", None) or {}
    return [run.run_id, str(run.created_at), str(run.model), str(run.decoder), str(run.status),
            int(metrics.get("new_tokens", 0) or 0), prompt]


def run_label(summary: Any) -> str:
    """A short label for a run picker: ``decoder · model · first 40 characters of the prompt · status ·
    created_at · id prefix``, plain text on one line."""
    prompt = _one_line(summary.prompt, LABEL_PROMPT_CHARS + 1)  # the first 40 characters, and an ellipsis
    return " · ".join([str(summary.decoder), str(summary.model), prompt, str(summary.status), str(summary.created_at),
                       str(summary.run_id)[:ID_PREFIX]])
