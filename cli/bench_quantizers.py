"""``decoding-explorer bench quantizers``: torchao, optimum-quanto and hqq quantising a model's decoder linears on
the CPU, int8 per output channel and int4 in groups of 64, measured in one run.

Per library and setting: whether it imports, the time to quantise, one forward of 128 tokens against the float32
model, the largest |w - dequantised w| over the decoder linears, and the bytes of the quantised state dict
(``torch.save``, the whole model). A library that is missing or fails shows its error instead of numbers; only
optimum-quanto is a dependency, so install the others beside it to compare (BENCHMARKS.md has the command).
"""

from __future__ import annotations

import copy
import importlib
import io
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.models.handle import LoadedModel
from engine.models.variants import (
    decoder_layers,
    decoder_linears,
    linear_names,
    weight_matrix,
)

SETTINGS = {"int8 per channel": (8, None), "int4 g64": (4, 64)}
TOKENS = 128


def _torchao(model: nn.Module, names: set[str], bits: int, group: int | None) -> Callable[[nn.Module], torch.Tensor]:
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=group)
    quantize_(model, config, filter_fn=lambda _module, name: name in names)
    return lambda module: module.weight.dequantize()


def _quanto(model: nn.Module, names: set[str], bits: int, group: int | None) -> Callable[[nn.Module], torch.Tensor]:
    from optimum import quanto

    prefix, _ = decoder_layers(model)
    quanto.quantize(model, weights=quanto.qint8 if bits == 8 else quanto.qint4, include=[f"{prefix}.*"])
    quanto.freeze(model)
    return lambda module: module.weight.dequantize()


def _hqq(model: nn.Module, names: set[str], bits: int, group: int | None) -> Callable[[nn.Module], torch.Tensor]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=group)
    for name in names:
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child,
                HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu", del_orig=False))
    return lambda module: module.dequantize()


LIBRARIES = {"torchao": ("torchao", _torchao), "optimum-quanto": ("optimum.quanto", _quanto), "hqq": ("hqq", _hqq)}


def _forward_seconds(model: nn.Module, ids: torch.Tensor, repeats: int = 3) -> float:
    times = []
    with torch.no_grad():  # not inference_mode: quanto's int4 forward fails there (it sets a version counter)
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _state_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def measure(base: LoadedModel, library: str, bits: int, group: int | None, ids: torch.Tensor,
            base_seconds: float) -> dict[str, Any]:
    row: dict[str, Any] = {"library": library, "setting": f"int{bits}" + (f" g{group}" if group else " per channel")}
    module_name, quantise = LIBRARIES[library]
    try:
        importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (an install that fails to import is a result to report)
        return {**row, "error": f"import failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    names = set(linear_names(base.model).values())
    dense = {name: weight_matrix(base.model.get_submodule(name)).detach().float() for name in names}
    model = copy.deepcopy(base.model)
    try:
        start = time.perf_counter()
        dequantised = quantise(model, names, bits, group)
        row["quantise_s"] = time.perf_counter() - start
        errors = []
        for name in names:
            restored = dequantised(model.get_submodule(name)).detach().float()
            restored = restored.T if restored.shape != dense[name].shape else restored
            errors.append(float((restored - dense[name]).abs().max()))
        row["max_abs_error"] = max(errors)
        row["forward_ratio"] = _forward_seconds(model, ids) / base_seconds
        row["state_mb"] = _state_bytes(model) / 1e6
    except Exception as error:  # noqa: BLE001
        last = traceback.extract_tb(error.__traceback__)[-1]
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]} ({last.filename.split('/')[-1]})"
    return row


def main(model: LoadedModel, libraries: list[str]) -> list[dict[str, Any]]:
    from tqdm import tqdm

    ids = torch.tensor([model.encode("The history of the city begins " * 40)[:TOKENS]])
    base_seconds = _forward_seconds(model.model, ids)
    layers = len(decoder_linears(model.model))
    print(f"{model.name}: {layers} decoder layers, fp32 forward of {ids.shape[1]} tokens {base_seconds * 1000:.0f} ms, "
          f"fp32 state dict {_state_bytes(model.model) / 1e6:.1f} MB; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    jobs = [(library, *setting) for library in libraries for setting in SETTINGS.values()]
    rows = [measure(model, library, bits, group, ids, base_seconds)
            for library, bits, group in tqdm(jobs, unit="setting", file=sys.stderr, disable=None)]
    print("| library | setting | quantise (s) | forward vs fp32 | max abs error | state dict (MB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['library']} | {row['setting']} | fails: {row['error']} | | | |")
        else:
            print(f"| {row['library']} | {row['setting']} | {row['quantise_s']:.1f} | {row['forward_ratio']:.2f}x | "
                  f"{row['max_abs_error']:.2e} | {row['state_mb']:.1f} |")
    return rows
