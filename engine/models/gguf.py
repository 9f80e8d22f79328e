"""One-time conversion of a GGUF file into a float32 safetensors folder.

Transformers dequantises a GGUF on every load (30-130 s on a laptop CPU); reading the converted folder takes
well under a second, so each GGUF is converted once and the result kept.
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from engine.models.cache import building, write_marker
from engine.models.handle import ModelError

Progress = Callable[[str], None]
GGUF_MAGIC = b"GGUF"


def require_accelerate() -> None:
    """Transformers refuses GGUF files without accelerate; say so before any work starts."""
    if importlib.util.find_spec("accelerate") is None:
        raise ModelError("converting a GGUF model needs the accelerate package: run `pip install accelerate`")


def convert_to_cache(
    locate: Callable[[Path], Path],
    target: Path,
    *,
    stop_tokens: Sequence[str] = (),
    source: str = "",
    repair_hint: str = "replace the file",
    progress: Progress,
) -> float:
    """Convert the GGUF that ``locate`` returns (it may write into the scratch folder it is given) into ``target``.

    ``stop_tokens`` are added to the generation config's EOS ids (end-of-turn tokens).
    Returns the seconds taken. Nothing is left at ``target`` unless the whole conversion succeeded.
    """
    require_accelerate()
    progress(
        f"Converting {target.name} from GGUF to a float32 cache at {target} "
        "(once only; about a minute, more on a slow machine)..."
    )
    started = time.perf_counter()
    with building(target) as build:
        scratch = build / "scratch"
        scratch.mkdir()
        try:
            gguf_path = locate(scratch)
            check_gguf_header(gguf_path)
            model, tokenizer = load_gguf(gguf_path)
            set_stop_tokens(model, tokenizer, stop_tokens)
        except ModelError as error:
            raise ModelError(f"{error}; {repair_hint}") from error
        except Exception as error:
            raise ModelError(
                f"could not convert the GGUF model for {target.name}: the file looks corrupt, truncated or "
                f"unsupported ({error}); {repair_hint}"
            ) from error
        shutil.rmtree(scratch)
        try:
            save_converted(model, tokenizer, build)
        except OSError as error:
            raise ModelError(f"could not write the converted model into {target.parent} ({error})") from error
        seconds = time.perf_counter() - started
        write_marker(build, _marker(gguf_path, source, seconds))
    progress(f"Converted {target.name} in {seconds:.1f} s; later loads read the cache.")
    return seconds


def check_gguf_header(path: Path) -> None:
    """A cheap check that spares a long, confusing failure deep inside the GGUF reader."""
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise ModelError(f"cannot read the GGUF file {path} ({error.strerror})") from error
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it does not start with 'GGUF'), so it is corrupt or truncated")


def load_gguf(path: Path) -> tuple[Any, Any]:
    """Model and tokenizer from a GGUF file, dequantised into plain float32 layers (which can be saved)."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model, tokenizer


def set_stop_tokens(model: Any, tokenizer: Any, stop_tokens: Sequence[str]) -> None:
    """GGUF files carry a single EOS id; chat models also end a turn with their own token."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in stop_tokens if token not in vocab]
    if missing:
        raise ModelError(f"the tokenizer has no {', '.join(missing)} token")
    ids = [tokenizer.eos_token_id, *(vocab[token] for token in stop_tokens)]
    model.generation_config.eos_token_id = list(dict.fromkeys(i for i in ids if i is not None))


def save_converted(model: Any, tokenizer: Any, folder: Path) -> None:
    # A quantizer still attached would make save_pretrained refuse; the weights are plain tensors by now.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)  # also writes generation_config.json
    tokenizer.save_pretrained(folder)


def _marker(gguf_path: Path, source: str, seconds: float) -> dict[str, Any]:
    return {
        "gguf_file": gguf_path.name,
        "gguf_source": source or str(gguf_path),
        "conversion_seconds": round(seconds, 2),
        "transformers_version": transformers.__version__,
    }
