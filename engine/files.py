"""Writing files so that no reader ever sees a half-written one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write through a temporary sibling and rename it: a crash never leaves a half-written file under ``path``,
    and the sibling is this process's own, so two processes writing ``path`` at once never mix their bytes."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)
