"""Where derived model variants live and what each is, read without torch (the model list and the CLI use it).

A variant folder holds ``variant.json`` (its record), ``delta.safetensors`` (what differs from its base) and a
README.md card; ``engine.models.variants`` writes and loads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from engine.models.cache import ASSET_MODELS_DIR, data_dir

RECORD = "variant.json"
DELTA = "delta.safetensors"
SEPARATOR = "~"  # base~tag: a variant's name never collides with a built-in, a folder path or a Hub id


def variants_dir() -> Path:
    return data_dir() / "variants"


def folder_name(name: str) -> str:
    """``name`` as one safe folder name (a tiny model's ``:seed=3`` or a path's slashes become dashes)."""
    return re.sub(r"[^A-Za-z0-9._~-]+", "-", name).strip("-.") or "variant"


def is_variant_folder(path: Path) -> bool:
    try:
        return (path / RECORD).is_file()
    except (OSError, ValueError):  # a name no file system accepts (too long, NUL)
        return False


def find_variant(spec: str) -> Path | None:
    """The variant folder ``spec`` names: a saved variant's name or a folder holding ``variant.json``."""
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # an unknown ~user
        return None
    return saved_variant(spec) or (path if is_variant_folder(path) else None)


def read_record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RECORD).read_text(encoding="utf-8"))


def saved_variant(name: str) -> Path | None:
    """The folder of the saved or shipped variant called ``name``, or None (only names with ``~`` are looked up)."""
    if SEPARATOR not in name or folder_name(name) != name:
        return None
    folder = variants_dir() / name
    if is_variant_folder(folder):
        return folder
    return next((Path(record["path"]) for record in _records(ASSET_MODELS_DIR) if record.get("name") == name), None)


def saved_variants() -> list[dict[str, Any]]:
    """The records of every saved variant, then of those shipped in assets/models (a damaged folder is skipped)."""
    return _records(variants_dir()) + _records(ASSET_MODELS_DIR)


def _records(root: Path) -> list[dict[str, Any]]:
    records = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not is_variant_folder(folder):
            continue
        try:
            records.append({**read_record(folder), "path": str(folder)})
        except (OSError, ValueError):
            continue
    return records
