"""Models: built-in offline models, local folders and Hugging Face Hub ids, behind one ``LoadedModel`` API.

    from engine.models import load_model, list_models, fetch_model
    model = load_model("smollm2-135m-instruct")   # converts the GGUF once, then loads from the cache
    tiny = load_model("tiny-random-llama:seed=3")  # random weights, no files, for tests
"""

from engine.models.cache import data_dir
from engine.models.handle import ForwardResult, LoadedModel, ModelError
from engine.models.loading import canonical_name, fetch_model, load_model
from engine.models.registry import BUILTIN_NAMES, DEFAULT_MODEL, ModelEntry, PromptFormat, list_models, prompt_format

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
