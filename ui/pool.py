"""Models shared by every browser session: loaded in the background so the server listens at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from engine.models import LoadedModel, ModelError, load_model

MAX_MODELS = 3  # loaded models kept at once (the least recently used one is dropped): memory stays bounded


@dataclass
class Loading:
    """Where one model's load stands: its last progress line, and the model or the error once it ends."""

    message: str = "queued"
    model: LoadedModel | None = None
    error: str = ""
    done: threading.Event = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.done = threading.Event()


class ModelPool:
    """Loads each model once, on a thread of its own; callers wait for it or read its progress."""

    def __init__(self, max_models: int = MAX_MODELS) -> None:
        self._loads: OrderedDict[str, Loading] = OrderedDict()
        self._lock = threading.Lock()
        self._max = max_models

    def start(self, name: str) -> Loading:
        """Begin loading ``name`` (stripped: the same model is never loaded twice) unless it is loading or loaded."""
        name = name.strip()
        if not name:
            raise ModelError("type a model name first")
        with self._lock:
            loading = self._loads.get(name)
            if loading is None or (loading.done.is_set() and loading.error):
                loading = self._loads[name] = Loading()
                threading.Thread(target=self._load, args=(name, loading), daemon=True, name=f"load {name}").start()
            self._loads.move_to_end(name)
            while len(self._loads) > self._max:
                self._loads.popitem(last=False)
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
            return self._loads.get(name.strip())

    def _load(self, name: str, loading: Loading) -> None:
        def progress(message: str) -> None:
            loading.message = str(message).strip() or loading.message

        loading.message = "loading"
        try:
            loading.model = load_model(name, progress=progress)
            loading.message = "ready"
        except ModelError as exc:
            loading.error = str(exc)
        except Exception as exc:  # a broken folder or config: say so instead of killing the thread silently
            loading.error = f"{name} could not be loaded: {type(exc).__name__}: {exc}"
        finally:
            loading.done.set()
