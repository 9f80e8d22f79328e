"""Weight-only quantisation of one [out, in] matrix with optimum-quanto, as tensors to store and back.

int8: symmetric, one absmax scale per output channel (quanto's qint8 takes no groups). int4: asymmetric per group of
``group_size`` consecutive input weights (scale and shift from the group's min and max), packed two per byte.
Round to nearest: every weight dequantises within half its group's scale. optimum-quanto was chosen over torchao and
hqq (BENCHMARKS.md, "Quantisation libraries on CPU"): it runs on the CPU, and unlike them transformers does not import
it on every model load.
"""

from __future__ import annotations

import torch

from engine.params import ParamError

BITS = (4, 8)
INT4_GROUP = 64  # divides the widths of SmolLM2 (576, 1536), Gemma 3 270M (640, 2048) and the tiny models


def _quanto():
    import optimum.quanto as quanto  # lazy: a few seconds to import, needed only while quantising or loading a variant
    from optimum.quanto.tensor.grouped import group
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.packed import PackedTensor
    from optimum.quanto.tensor.weights import (
        WeightQBitsTensor,
        WeightQBytesTensor,
        quantize_weight,
    )

    return quanto, group, AbsmaxOptimizer, MaxOptimizer, PackedTensor, WeightQBitsTensor, WeightQBytesTensor, \
        quantize_weight


def check_group(bits: int, group_size: int | None, in_features: int) -> None:
    if bits not in BITS:
        raise ParamError(f"{bits}-bit quantisation is not supported; use one of {', '.join(map(str, BITS))}")
    if bits == 8 and group_size is not None:
        raise ParamError("int8 keeps one scale per output channel; a group size applies to int4 only")
    if bits == 4 and (group_size is None or group_size < 2 or group_size % 2 or in_features % group_size):
        raise ParamError(f"int4 needs an even group size dividing the {in_features} input weights of every matrix; "
                         f"got {group_size}")


@torch.no_grad()
def quantize(matrix: torch.Tensor, bits: int, group_size: int | None) -> dict[str, torch.Tensor]:
    """The stored form of ``matrix`` at ``bits``: ``q`` (int8, or int4 packed in uint8), ``scale`` (and ``shift``)."""
    check_group(bits, group_size, matrix.shape[1])
    quanto, group, absmax, minmax, _, _, _, quantize_weight = _quanto()
    weight = matrix.detach().float().cpu()
    if bits == 8:
        scale = absmax()(weight, quanto.qint8, axis=0)
        quantized = quantize_weight(weight, quanto.qint8, 0, scale, optimized=False)
        return {"q": quantized._data, "scale": quantized._scale}
    scale, shift = minmax()(group(weight, axis=0, group_size=group_size), quanto.qint4, axis=0)
    quantized = quantize_weight(weight, quanto.qint4, 0, scale, shift, group_size=group_size, optimized=False)
    return {"q": quantized._data._data, "scale": quantized._scale, "shift": quantized._shift}


@torch.no_grad()
def dequantize(
    tensors: dict[str, torch.Tensor], bits: int, group_size: int | None, shape: tuple[int, int]
) -> torch.Tensor:
    """The float32 [out, in] matrix that ``quantize``'s tensors stand for."""
    quanto, _, _, _, packed, qbits, qbytes, _ = _quanto()
    size, stride = torch.Size(shape), (shape[1], 1)
    if bits == 8:
        return qbytes(quanto.qint8, 0, size, stride, tensors["q"], tensors["scale"], None).dequantize()
    grouped = torch.Size((shape[0] * shape[1] // group_size, group_size))
    data = packed(tensors["q"], 4, grouped, (group_size, 1))
    return qbits(quanto.qint4, 0, group_size, size, stride, data, tensors["scale"], tensors["shift"]).dequantize()


def error_bound(tensors: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """Half of each weight's quantisation step, [out, in]: round to nearest never misses by more."""
    scale = tensors["scale"].float().reshape(shape[0], -1)
    return (scale / 2).repeat_interleave(shape[1] // scale.shape[1], dim=1)
