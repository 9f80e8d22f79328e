"""What every decoder is: a registered generator of events, with its parameters described once.

The run protocol: a decoder yields step events and never decides when the run ends; the runner
(engine/run.py) stops it after any event on EOS, a stop string, the token budget, a cancel or an error.
Numbers that sum up the whole run go in a summary registered with :meth:`DecodeContext.on_finish`
early in the decoder: however the run ends, the runner calls it once after the last step and records
the :class:`~engine.events.DecoderMetric` events it yields, so every stop reason records the same
summary. A summary reads the decoder's state as far as it got (it may be empty), and its model calls
are guarded like the run's: after a cancel, those raise and the metrics that need them are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from engine.context import DecodeContext
from engine.events import Event
from engine.params import Param, ParamError, validate


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

    def curve_line(self, given: Mapping[str, Any]) -> str:
        """The setting without its parallelism parameters, as ``name:key=value:...``: a parallelism curve joins
        the settings that share it (LLaDA's steps make one line; LLaDA in blocks of one token another)."""
        parallel = {p.name for p in self.params if p.sets_parallelism}
        return ":".join([self.name, *(f"{key}={value}" for key, value in given.items() if key not in parallel)])

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


def param_defaults() -> dict[str, dict[str, Any]]:
    """Every registered decoder's parameter defaults, by decoder name (what a run's settings are compared with)."""
    return {spec.name: {p.name: p.default for p in spec.params} for spec in _REGISTRY.values()}
