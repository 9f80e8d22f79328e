"""The tests' share of the machine when pytest-xdist runs them in several workers (``./run test`` does)."""

from __future__ import annotations

import os


def cores_per_worker() -> int:
    """This process's share of the cores: more torch threads than cores makes their busy-waiting threads spin
    against each other (measured: the real-model tests 10x slower with two workers of two threads on two cores)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, (os.cpu_count() or 1) // workers)
