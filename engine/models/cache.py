"""Where converted models live, and how a conversion is published so that no half-written cache is ever seen."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import platformdirs

HOME_ENV = "DECODING_EXPLORER_HOME"
MARKER = "decoding_explorer.json"  # written last inside a build: what was converted, and how long it took


# Small models trained by this project; their folders ship in the repository.
ASSET_MODELS_DIR = Path(__file__).resolve().parents[2] / "assets" / "models"


def data_dir() -> Path:
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("decoding-explorer"))


def cache_dir(name: str) -> Path:
    return data_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (cache_dir(name) / MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_marker(folder: Path, values: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps(values, indent=2), encoding="utf-8")


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; it becomes ``target`` only if the block completes.

    The rename is atomic, so readers see either no cache or a complete one; on any error or interrupt
    the temporary folder is removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(target)
    build = Path(tempfile.mkdtemp(prefix=f"{_build_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        yield build
        _publish(build, target)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def remove_stale_builds(target: Path) -> None:
    """Delete temporary folders left by conversions whose process has died (killed, power loss)."""
    for leftover in target.parent.glob(f"{_build_prefix(target)}*"):
        pid = leftover.name[len(_build_prefix(target)) :].split("-")[0]
        if not (pid.isdigit() and _is_running(int(pid))):
            shutil.rmtree(leftover, ignore_errors=True)


def _build_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _publish(build: Path, target: Path) -> None:
    try:
        os.replace(build, target)
    except OSError:
        if not (target / MARKER).is_file():
            raise
        # Another process published the same conversion first; keep theirs.


def _is_running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would signal the process on Windows; treat leftovers as stale
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
