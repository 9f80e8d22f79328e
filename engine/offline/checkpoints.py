"""Resumable training state shared by the offline trainers: one file per run, written atomically.

A checkpoint holds the settings it was written with, the state dicts of whatever the trainer needs to continue
exactly (module, optimizer, schedule, random generators) and the run record. A re-run with the same settings
continues from it; settings in ``free`` (a time cap, a logging rate) may change between runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engine.files import write_atomically
from engine.params import ParamError

CHECKPOINT = "checkpoint.pt"


def load_checkpoint(path: Path, settings: dict[str, Any], free: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (None if there is none), refused if written with other settings."""
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False, map_location="cpu")  # a GPU run continues anywhere
    changed = changed_settings(state["settings"], settings, free)
    if changed:
        raise ParamError(f"{path} was written with other settings ({', '.join(changed)}); "
                         "use another output folder or delete it")
    return state


def save_checkpoint(path: Path, settings: dict[str, Any], record: dict[str, Any], **states: Any) -> None:
    """Write the run's state; a run killed while writing leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda partial: torch.save({"settings": settings, "record": record, **states}, partial))


def changed_settings(written: dict[str, Any], current: dict[str, Any], free: tuple[str, ...] = ()) -> list[str]:
    """The settings outside ``free`` whose value differs from what a run was written with; one added since counts
    as unchanged. Compared as JSON, so a tuple read back from a log as a list is the same value."""
    as_json = lambda settings: json.loads(json.dumps(settings))  # noqa: E731
    before, now = as_json({**current, **written}), as_json(current)
    return sorted(key for key in now if key not in free and before.get(key) != now[key])
