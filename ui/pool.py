"""Models shared by every browser session: loaded in the background so the server listens at once, each once under
its canonical name, the least recently used dropped when too many are loaded or they take too much memory."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from engine.models import LoadedModel, ModelError, canonical_name, load_model

MAX_MODELS = 3  # loaded models kept at once
MEMORY_ENV = "DECODING_EXPLORER_MODEL_MEMORY_MB"  # the operator's budget for the loaded models' weights
MEMORY_SHARE = 0.5  # without it: this share of the machine's memory (activations and caches need the rest)


@dataclass
class Loading:
    """Where one model's load stands: its last progress line, and the model or the error once it ends."""

    message: str = "queued"
    model: LoadedModel | None = None
    error: str = ""
    bytes: int = 0  # the loaded model's parameters and buffers
    done: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.done = threading.Event()


def model_bytes(model: LoadedModel) -> int:
    """Memory of a model's parameters and buffers (tied weights counted once)."""
    tensors = [*model.model.parameters(), *model.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def default_budget() -> int:
    """$DECODING_EXPLORER_MODEL_MEMORY_MB, else MEMORY_SHARE of the machine's memory, in bytes."""
    if (given := os.environ.get(MEMORY_ENV, "").strip()):
        try:
            return int(float(given) * 2**20)
        except ValueError:
            raise ModelError(f"${MEMORY_ENV} must be a number of megabytes, got {given!r}") from None
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * MEMORY_SHARE)


class ModelPool:
    """Loads each model once, on a thread of its own; callers wait for it or read its progress.

    Past ``max_models`` loaded models or ``budget_bytes`` of weights, the least recently asked-for models are
    dropped, except the newest and those ``in_use`` returns (the models of runs still going)."""

    def __init__(self, max_models: int = MAX_MODELS, budget_bytes: int | None = None,
                 in_use: Callable[[], Iterable[LoadedModel]] = tuple) -> None:
        self._loads: OrderedDict[str, Loading] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_models
        self.budget_bytes = default_budget() if budget_bytes is None else budget_bytes
        self.in_use = in_use

    def start(self, name: str) -> Loading:
        """Begin loading ``name`` unless it is loading or loaded under its canonical name (see canonical_name)."""
        key = canonical_name(name)
        if not key:
            raise ModelError("type a model name first")
        with self._lock:
            loading = self._loads.get(key)
            if loading is None or (loading.done.is_set() and loading.error):
                loading = self._loads[key] = Loading()
                threading.Thread(target=self._load, args=(key, loading), daemon=True, name=f"load {key}").start()
            self._loads.move_to_end(key)
            self._evict()
            return loading

    def get(self, name: str, timeout: float | None = None) -> LoadedModel:
        """The loaded model, waiting for its load; a failed load raises its ModelError."""
        loading = self.start(name)
        if not loading.done.wait(timeout):
            raise ModelError(f"{name.strip()} is still loading ({loading.message}); try again in a moment")
        if loading.model is None:
            raise ModelError(loading.error)
        return loading.model

    def status(self, name: str) -> Loading | None:
        with self._lock:
            return self._loads.get(canonical_name(name))

    def loaded(self) -> dict[str, int]:
        """Canonical name -> bytes of each loaded model, least recently used first."""
        with self._lock:
            return {key: loading.bytes for key, loading in self._loads.items() if loading.model is not None}

    def _evict(self) -> None:
        """Drop least recently used models until the count and the memory fit (called holding the lock)."""
        busy = {id(model) for model in self.in_use()}
        newest = next(reversed(self._loads))
        while (len(self._loads) > self._max
               or sum(loading.bytes for loading in self._loads.values()) > self.budget_bytes):
            victim = next((key for key, loading in self._loads.items() if key != newest and loading.done.is_set()
                           and id(loading.model) not in busy), None)
            if victim is None:  # loading or in use: they stay until a later call finds them free
                return
            del self._loads[victim]

    def _load(self, name: str, loading: Loading) -> None:
        def progress(message: str) -> None:
            loading.message = str(message).strip() or loading.message

        loading.message = "loading"
        try:
            loading.model = load_model(name, progress=progress)
            loading.bytes = model_bytes(loading.model)
            loading.message = "ready"
        except ModelError as exc:
            loading.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken folder or config: say so, do not kill the thread silently
            loading.error = f"{name} could not be loaded: {type(exc).__name__}: {exc}"
        finally:
            loading.done.set()
        with self._lock:
            if self._loads:
                self._evict()
