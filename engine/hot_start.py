"""What decoders learn in one run and keep for the next runs on the same model in this process (hot start).

Token Recycling's adjacency matrix and layer_skip's scored skip sets live here, one store per decoder, so a
benchmark can :func:`save` them all before a prompt and :func:`restore` them before each repeat of it: a repeat must
start from what the first run of that prompt started from, not from what that run learnt.
"""

from __future__ import annotations

import copy
from typing import Any

_STORES: dict[str, dict[Any, Any]] = {}


def store(decoder: str) -> dict[Any, Any]:
    """The decoder's store: whatever it keys by (a model name, its settings) to what it learnt."""
    return _STORES.setdefault(decoder, {})


def save() -> dict[str, dict[Any, Any]]:
    """A deep copy of every store, for :func:`restore`."""
    return copy.deepcopy(_STORES)


def restore(saved: dict[str, dict[Any, Any]]) -> None:
    """Every store back to ``saved``'s contents, in place (``saved`` stays as it is and serves every repeat)."""
    for name in list(_STORES):
        _STORES[name].clear()
    for name, contents in copy.deepcopy(saved).items():
        store(name).update(contents)
