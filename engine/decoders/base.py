"""What every decoder is: a registered generator of events, with its parameters described once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from engine.attention import AttentionCapture
from engine.events import Event
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError, validate


@dataclass
class DecodeContext:
    """Everything a decoder may use besides its own parameters. Decoders never print or store."""

    model: LoadedModel
    prompt_ids: list[int]
    params: dict[str, Any]
    max_new_tokens: int
    eos_token_ids: set[int]
    generator: torch.Generator
    record_top_k: int = 20
    attention: AttentionCapture | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra inputs of the prefill (VLM pixels)


DecoderFn = Callable[[DecodeContext], Iterator[Event]]


@dataclass(frozen=True)
class DecoderSpec:
    name: str
    family: str
    summary: str
    params: tuple[Param, ...]
    run: DecoderFn
    lossless: bool = False
    accepts_images: bool = False  # passes ``ctx.prompt_inputs`` to its prefill, so VLM image prompts work

    def validate(self, given: Mapping[str, Any]) -> dict[str, Any]:
        return validate(self.params, given, f"decoder {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "summary": self.summary,
            "lossless": self.lossless,
            "accepts_images": self.accepts_images,
            "params": [p.to_dict() for p in self.params],
        }


_REGISTRY: dict[str, DecoderSpec] = {}


def register(spec: DecoderSpec) -> DecoderSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"decoder {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def get_decoder(name: str) -> DecoderSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ParamError(f"unknown decoder {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def all_decoders() -> list[DecoderSpec]:
    return list(_REGISTRY.values())
