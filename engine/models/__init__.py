"""Models: built-in offline models, local folders and Hugging Face Hub ids, behind one ``LoadedModel`` API.

    from engine.models import load_model, list_models, fetch_model
    model = load_model("smollm2-135m-instruct")   # converts the GGUF once, then loads from the cache
    tiny = load_model("tiny-random-llama:seed=3")  # random weights, no files, for tests
"""

from engine.models.cache import data_dir
from engine.models.errors import ModelError
from engine.models.registry import BUILTIN_NAMES, DEFAULT_MODEL, ModelEntry, PromptFormat, list_models, prompt_format

_HEAVY = {"ForwardResult": "handle", "LoadedModel": "handle", "canonical_name": "loading", "fetch_model": "loading",
          "load_model": "loading"}


def __getattr__(name: str):
    # Lazy, as in engine/__init__: the command line's listing and storage commands do not pay for torch.
    if name in _HEAVY:
        import importlib

        return getattr(importlib.import_module(f"engine.models.{_HEAVY[name]}"), name)
    raise AttributeError(f"module 'engine.models' has no attribute {name!r}")

__all__ = [
    "BUILTIN_NAMES",
    "DEFAULT_MODEL",
    "ForwardResult",
    "LoadedModel",
    "ModelEntry",
    "ModelError",
    "PromptFormat",
    "canonical_name",
    "data_dir",
    "fetch_model",
    "list_models",
    "load_model",
    "prompt_format",
]
