"""Model variants: a base model quantised or pruned, kept as what differs from the base, loadable by name.

    spec = VariantSpec(prune="wanda", pattern="2:4")
    variant = apply_variant(load_model("smollm2-135m-instruct"), spec)   # in memory: smollm2-135m-instruct~wanda-2of4
    folder = derive("smollm2-135m-instruct", spec)                       # saved; load_model(folder) or by its name

Only the decoder layers' linear maps change (attention q/k/v/o, MLP gate/up/down; GPT-2's fused ``Conv1D``s),
never the embeddings or the LM head. Quantisation is weight-only and symmetric, rounded to nearest per group of
``group_size`` input weights (int8: per output channel unless a group is given; int4: groups of 64); the forward runs
on the dequantised weights, so a variant shows how the numbers change, not how fast int kernels are.
Wanda's activation norms come from one calibration forward of the dense base (one-shot, not layer by layer).

Layer profile (``--layer-profile FILE``; EvoPress writes it): JSON

    {"method": "wanda" | "magnitude" | "int", "levels": {"0": 0.3, "1": 0.5, ...}, "group_size": 64}

``levels`` maps a decoder layer index to its level: a sparsity in [0, 1) for wanda/magnitude, bits 4, 8 or 16
(16: left as it is) for int. Layers not named keep their base weights. ``group_size`` (int only) is optional.

A variant folder (``$DECODING_EXPLORER_HOME/variants/<base>~<tag>`` unless ``--out``) holds ``variant.json`` (base,
method, settings, calibration, sizes), a README.md card and ``delta.safetensors``: per changed weight either the
quantised ints and their scales, or a 1-bit keep mask over the base weight (a pruned weight is the base's with zeros,
so the mask is all that differs: 1/32 of the fp32 matrix), or a replacement tensor (``save_variant``). The base
reloads offline by its name or path; a mask records the base weight's sum and refuses a base that changed.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.models.errors import ModelError
from engine.models.handle import LoadedModel
from engine.models.prune import parse_pattern, prune_weight
from engine.models.quantize import dequantize, quantize
from engine.models.variant_spec import (
    CALIBRATION_TEXTS,
    CALIBRATIONS,
    KEPT_BITS,
    VariantSpec,
)
from engine.models.variant_store import (
    DELTA,
    RECORD,
    SEPARATOR,
    folder_name,
    read_record,
    variants_dir,
)
from engine.params import ParamError

Progress = Callable[[str, int, int], None]  # (stage, done, total)


# ---------------------------------------------------------------- the model's decoder linears


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted prefix, the decoder layers) of a causal or masked LM; a vision tower's layers are not among them."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and "vision" not in name and "visual" not in name:
            return name, module
    raise ModelError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def decoder_linears(model: nn.Module) -> list[dict[str, nn.Module]]:
    """Per decoder layer, its linear maps by dotted name inside the layer (``self_attn.q_proj``, ``mlp.down_proj``).

    They are ``nn.Linear`` or, in GPT-2, ``transformers``' ``Conv1D`` (weight stored [in, out]): read and write
    their weights as [out, in] matrices with ``weight_matrix`` and ``set_weight_matrix``.
    """
    _, layers = decoder_layers(model)
    return [{name: module for name, module in layer.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
            for layer in layers]


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] (a view: a Conv1D's is transposed)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    with torch.no_grad():
        weight_matrix(module).copy_(matrix)


def linear_names(model: nn.Module) -> dict[str, str]:
    """``"<layer>.<name>"`` (the key ``input_norms`` uses) -> the module's full dotted name in the model."""
    prefix, _ = decoder_layers(model)
    return {f"{index}.{name}": f"{prefix}.{index}.{name}"
            for index, linears in enumerate(decoder_linears(model)) for name in linears}


def calibration_texts(name: str = "assistant-answers") -> list[str]:
    """A built-in calibration text, as a few texts of consecutive paragraphs."""
    if name not in CALIBRATIONS:
        raise ParamError(f"calibration {name!r} is not one of {', '.join(CALIBRATIONS)}")
    paragraphs = [p for p in CALIBRATIONS[name].read_text(encoding="utf-8").split("\n\n") if p.strip()]
    size = math.ceil(len(paragraphs) / CALIBRATION_TEXTS)
    return ["\n\n".join(paragraphs[start:start + size]) for start in range(0, len(paragraphs), size)]


@torch.inference_mode()
def input_norms(model: LoadedModel, texts: list[str], max_tokens: int = 512) -> dict[str, torch.Tensor]:
    """Wanda's ``||X_j||_2`` per input channel j of every decoder linear, over every token of ``texts`` (each cut
    to ``max_tokens``), keyed ``"<layer>.<name>"`` as ``decoder_linears`` names them; float32 on the CPU."""
    if not texts:
        raise ParamError("input norms need at least one calibration text")
    squares: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            squares[key] = squares.get(key, 0) + (x * x).sum(dim=0).double().cpu()
        return accumulate

    handles = [module.register_forward_pre_hook(hook(f"{index}.{name}"))
               for index, linears in enumerate(decoder_linears(model.model)) for name, module in linears.items()]
    try:
        for text in texts:
            ids = model.tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens]
            # the LM head over every position would cost more than the layers; one position is enough
            model.model(input_ids=torch.tensor([ids], device=model.device), use_cache=False,
                        **({"logits_to_keep": 1} if model.keeps_logits else {}))
    finally:
        for handle in handles:
            handle.remove()
    return {key: total.sqrt().float() for key, total in squares.items()}


# ---------------------------------------------------------------- deltas: what differs from the base


def _pack_mask(keep: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(keep.cpu().numpy().reshape(-1)))


def _unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    bits = np.unpackbits(packed.numpy(), count=math.prod(shape))
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _weight_sum(matrix: torch.Tensor) -> float:
    return float(matrix.detach().double().sum())


def _layer_levels(spec: VariantSpec, layers: int) -> list[float | None]:
    """Each layer's level: a sparsity (pruning) or bits (int profile); None where the layer is not pruned."""
    if spec.layer_profile is None:
        return [spec.sparsity] * layers
    outside = [layer for layer in spec.layer_profile if layer >= layers]
    if outside:
        raise ModelError(f"the layer profile names layer(s) {outside}, but the model has layers 0 to {layers - 1}")
    return [spec.layer_profile.get(layer) for layer in range(layers)]


def compute_deltas(model: LoadedModel, spec: VariantSpec, progress: Progress | None = None) -> dict[str, Any]:
    """The changed weights of ``model`` under ``spec`` as stored: ``{parameter name: {"kind", "tensors", ...}}``."""
    linears = decoder_linears(model.model)
    full_names = linear_names(model.model)
    levels = _layer_levels(spec, len(linears))
    norms = {}
    if spec.prune == "wanda":
        report = progress or (lambda *_: None)
        report("calibrating", 0, 1)
        norms = input_norms(model, calibration_texts(spec.calibration))
        report("calibrating", 1, 1)
    deltas: dict[str, Any] = {}
    for index, layer in enumerate(linears):
        for name, module in layer.items():
            matrix = weight_matrix(module).detach()
            key = f"{full_names[f'{index}.{name}']}.weight"
            if spec.prune is not None and (levels[index] is not None or spec.pattern is not None):
                pattern = parse_pattern(spec.pattern) if spec.pattern else None
                pruned = prune_weight(matrix, None if pattern else levels[index], pattern, spec.prune,
                                      norms.get(f"{index}.{name}"))
                if spec.quantize is None:
                    deltas[key] = {"kind": "mask", "shape": list(matrix.shape), "base_sum": _weight_sum(matrix),
                                   "tensors": {"mask": _pack_mask(pruned != 0)}}
                    continue
                matrix = pruned
            bits = _bits(spec, levels[index])
            if bits is not None:
                group_size = spec.int4_group_size if bits == 4 else None
                deltas[key] = {"kind": f"int{bits}", "shape": list(matrix.shape), "group_size": group_size,
                               "tensors": quantize(matrix, bits, group_size)}
        if progress:
            progress("layers", index + 1, len(linears))
    return deltas


def _bits(spec: VariantSpec, level: float | None) -> int | None:
    if spec.quantize == "int":
        return None if level is None or level == KEPT_BITS else int(level)
    return int(spec.quantize.removeprefix("int")) if spec.quantize else None


def apply_deltas(model: nn.Module, deltas: Mapping[str, Any]) -> None:
    """Write each delta into ``model``'s weights in place (their dtype kept)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for key, delta in deltas.items():
        if key not in parameters:
            raise ModelError(f"the base model has no weight {key!r}; the variant belongs to another model")
        tensors, kind = delta["tensors"], delta["kind"]
        if kind == "replace":
            with torch.no_grad():
                parameters[key].copy_(tensors["value"].to(parameters[key].dtype))
            continue
        module = model.get_submodule(key.removesuffix(".weight"))
        matrix = weight_matrix(module).detach()
        shape = tuple(delta["shape"])
        if tuple(matrix.shape) != shape:
            raise ModelError(f"{key} has shape {tuple(matrix.shape)} in the base, {shape} in the variant")
        if kind == "mask":
            if not math.isclose(_weight_sum(matrix), delta["base_sum"], rel_tol=1e-9, abs_tol=1e-9):
                raise ModelError(f"the base's {key} differs from the one this variant was pruned from; derive it again")
            new = torch.where(_unpack_mask(tensors["mask"], shape).to(matrix.device), matrix,
                              torch.zeros((), dtype=matrix.dtype))
        else:
            new = dequantize(tensors, int(kind.removeprefix("int")), delta["group_size"], shape)
        set_weight_matrix(module, new.to(matrix.dtype))


def apply_variant(model: LoadedModel, spec: VariantSpec, progress: Progress | None = None) -> LoadedModel:
    """A transformed deep copy of ``model``, named ``<base>~<tag>``, with the same tokenizer; the base is untouched."""
    variant = LoadedModel(f"{model.name}{SEPARATOR}{spec.tag}", copy.deepcopy(model.model), model.tokenizer,
                          "variant", {"base": model.name, "variant": spec.to_dict()}, processor=model.processor)
    apply_deltas(variant.model, compute_deltas(variant, spec, progress))
    return variant


# ---------------------------------------------------------------- saved variants


def _delta_tensors(deltas: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{key}::{part}": tensor.contiguous().cpu()
            for key, delta in deltas.items() for part, tensor in delta["tensors"].items()}


def save_variant(
    base: str,
    name: str,
    deltas: Mapping[str, Any] | None = None,
    *,
    replace: Mapping[str, torch.Tensor] | None = None,
    method: str,
    settings: Mapping[str, Any] | None = None,
    card: str = "",
    out: Path | None = None,
) -> Path:
    """Write a variant folder of ``base`` (a model spec ``load_model`` takes; it must reload offline) and return it.

    ``deltas`` are ``compute_deltas``'s encoded weights; ``replace`` maps parameter names (as ``named_parameters``
    gives them) to whole new tensors, stored as given (pass bfloat16 to halve the size): a fine-tuned variant ships
    its changed tensors this way, such as ``save_variant("smollm2-135m-instruct", "smollm2-135m-instruct~hyperfit",
    replace={k: v for k, v in tuned.state_dict().items() if changed(k)}, method="hyperfitting", settings={...},
    card="...")``. ``name`` is the name it loads by; ``out`` defaults to ``$DECODING_EXPLORER_HOME/variants/<name>``.
    ``card`` is markdown added to the README.md below the generated summary.
    """
    from engine.models.loading import canonical_name

    everything = {**(deltas or {}),
                  **{key: {"kind": "replace", "shape": list(value.shape), "tensors": {"value": value.detach()}}
                     for key, value in (replace or {}).items()}}
    if not everything:
        raise ModelError("a variant needs at least one changed weight")
    target = Path(out) if out is not None else variants_dir() / folder_name(name)
    if target.exists() and not (target / RECORD).is_file() and any(target.iterdir()):
        raise ModelError(f"{target} exists and is not a variant folder; pick another --out")
    build = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    try:
        save_file(_delta_tensors(everything), str(build / DELTA))
        record = {
            "format": 1,
            "name": name,
            "base": canonical_name(base),
            "method": method,
            "settings": dict(settings or {}),
            "tensors": {key: {k: v for k, v in delta.items() if k != "tensors"} for key, delta in everything.items()},
            "size_bytes": (build / DELTA).stat().st_size,
        }
        (build / RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        (build / "README.md").write_text(_card(record, card), encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        build.rename(target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return target


def _card(record: Mapping[str, Any], extra: str) -> str:
    kinds = sorted({entry["kind"] for entry in record["tensors"].values()})
    lines = [
        f"# {record['name']}",
        "",
        f"A {record['method']} variant of `{record['base']}`, stored as what differs from it "
        f"({len(record['tensors'])} weights: {', '.join(kinds)}; {record['size_bytes']:,} bytes).",
        "",
        "Load it with `decoding-explorer record --model <this folder or its name>` or "
        "`engine.models.load_model(...)`; the base model must load offline.",
        "",
        "Settings:",
        "",
        "```json",
        json.dumps(record["settings"], indent=2),
        "```",
    ]
    return "\n".join(lines) + (f"\n\n{extra.strip()}\n" if extra.strip() else "\n")


def derive(base: str, spec: VariantSpec, out: Path | None = None, progress: Progress | None = None) -> Path:
    """Load ``base``, transform it by ``spec`` and save the variant folder; returns the folder."""
    from engine.models.loading import load_model

    model = load_model(base)
    deltas = compute_deltas(model, spec, progress)
    name = folder_name(f"{Path(model.name).name if model.source == 'local' else model.name}{SEPARATOR}{spec.tag}")
    settings = {**spec.to_dict(), "group_size": spec.int4_group_size if spec.quantize in ("int4", "int") else None}
    if spec.prune == "wanda":
        settings["calibration_texts"] = CALIBRATION_TEXTS
    method = " + ".join(part for part in (spec.prune and f"{spec.prune} pruning",
                                          spec.quantize and f"{spec.quantize} quantisation") if part)
    dense = sum(m.weight.numel() * m.weight.element_size() for layer in decoder_linears(model.model)
                for m in layer.values())
    return save_variant(base, name, deltas, method=method, settings={**settings, "dense_linear_bytes": dense},
                        out=out)


def load_variant(folder: Path, dtype: str = "float32", attn_implementation: str | None = None,
                 progress: Callable[[str], None] | None = None) -> LoadedModel:
    """A saved variant: its base loaded by name or path, then its stored deltas applied."""
    from engine.models.loading import load_model

    try:
        record = read_record(folder)
        stored = load_file(str(folder / DELTA))
    except (OSError, ValueError) as error:
        raise ModelError(f"the variant folder {folder} is damaged ({error}); derive it again") from error
    base = load_model(record["base"], dtype=dtype, attn_implementation=attn_implementation, offline=True,
                      progress=progress)
    deltas = {key: {**entry, "tensors": {}} for key, entry in record["tensors"].items()}
    for stored_name, tensor in stored.items():
        key, _, part = stored_name.rpartition("::")
        if key not in deltas:
            raise ModelError(f"the variant folder {folder} is damaged: {stored_name} is not in its record")
        deltas[key]["tensors"][part] = tensor
    apply_deltas(base.model, deltas)
    details = {"base": record["base"], "method": record["method"], "settings": record["settings"],
               "path": str(folder.resolve()), "size_bytes": record["size_bytes"]}
    return LoadedModel(record["name"], base.model, base.tokenizer, "variant", details, processor=base.processor)
