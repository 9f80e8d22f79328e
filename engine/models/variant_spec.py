"""What a model variant is: the spec of a quantisation or pruning, its tag, and the layer-profile file format.

Layer profile (``--layer-profile FILE``; EvoPress writes it): JSON

    {"method": "wanda" | "magnitude" | "int", "levels": {"0": 0.3, "1": 0.5, ...}, "group_size": 64}

``levels`` maps a decoder layer index to its level: a sparsity in [0, 1) for wanda/magnitude, bits 4, 8 or 16
(16: left as it is) for int. Layers not named keep their base weights. ``group_size`` (int4 layers) is optional.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.models.prune import METHODS as PRUNE_METHODS
from engine.models.prune import parse_pattern
from engine.models.quantize import BITS, INT4_GROUP
from engine.ngram import CORPUS
from engine.params import ParamError

# Built-in calibration texts for Wanda's activation norms: name -> file (its paragraphs, joined into a few texts).
CALIBRATIONS = {"assistant-answers": CORPUS}
CALIBRATION_TEXTS = 4
PROFILE_METHODS = (*PRUNE_METHODS, "int")
KEPT_BITS = 16  # a layer profile's "leave this layer as it is" level for int


@dataclass(frozen=True)
class VariantSpec:
    """What to do to a base model. ``quantize``: "int8" | "int4" ("int" with a layer profile of bits);
    ``prune``: "magnitude" | "wanda" with a ``sparsity``, an N:M ``pattern`` ("2:4") or a ``layer_profile``
    (layer -> sparsity). Pruning and quantisation may be combined (prune first); a profile belongs to one of them."""

    quantize: str | None = None
    group_size: int | None = None
    prune: str | None = None
    sparsity: float | None = None
    pattern: str | None = None
    layer_profile: Mapping[int, float] | None = None
    calibration: str = "assistant-answers"

    def __post_init__(self) -> None:
        if self.quantize is None and self.prune is None:
            raise ParamError("a variant needs --quantize int8|int4 or --prune magnitude|wanda (or a layer profile)")
        if self.quantize not in (None, "int8", "int4", "int"):
            raise ParamError(f"quantize {self.quantize!r} is not int8 or int4")
        if self.quantize == "int" and (self.layer_profile is None or self.prune is not None):
            raise ParamError("quantize 'int' takes its bits per layer from a layer profile (and no pruning)")
        if self.group_size is not None and self.quantize not in ("int4", "int"):
            raise ParamError("a group size applies to int4 only (int8 keeps one scale per output channel)")
        if self.prune not in (None, *PRUNE_METHODS):
            raise ParamError(f"prune {self.prune!r} is not one of {', '.join(PRUNE_METHODS)}")
        if self.prune is not None:
            given = [self.sparsity is not None, self.pattern is not None, self.layer_profile is not None]
            if sum(given) != 1:
                raise ParamError("pruning needs exactly one of a sparsity, an N:M pattern and a layer profile")
        elif self.sparsity is not None or self.pattern is not None:
            raise ParamError("a sparsity or pattern needs a pruning method (--prune magnitude|wanda)")
        if self.sparsity is not None and not 0 <= self.sparsity < 1:
            raise ParamError(f"sparsity {self.sparsity} is outside [0, 1)")
        if self.pattern is not None:
            parse_pattern(self.pattern)
        if self.layer_profile is not None:
            self._check_profile()
        if self.calibration not in CALIBRATIONS:
            raise ParamError(f"calibration {self.calibration!r} is not one of {', '.join(CALIBRATIONS)}")

    def _check_profile(self) -> None:
        if not self.layer_profile:
            raise ParamError("a layer profile names at least one layer")
        for layer, level in self.layer_profile.items():
            if not isinstance(layer, int) or layer < 0:
                raise ParamError(f"layer profile key {layer!r} is not a layer index (0, 1, ...)")
            if self.prune is not None and not 0 <= level < 1:
                raise ParamError(f"layer {layer}: sparsity {level} is outside [0, 1)")
            if self.prune is None and level not in (*BITS, KEPT_BITS):
                raise ParamError(f"layer {layer}: {level} bits is not one of {', '.join(map(str, (*BITS, KEPT_BITS)))}")

    @property
    def tag(self) -> str:
        """A short name suffix: ``int4-g64``, ``wanda-50``, ``magnitude-2of4``, ``wanda-profile-1a2b3c4d``."""
        parts = []
        if self.prune is not None:
            if self.layer_profile is not None:
                parts.append(f"{self.prune}-profile-{self.profile_hash}")
            elif self.pattern is not None:
                parts.append(f"{self.prune}-{'of'.join(map(str, parse_pattern(self.pattern)))}")
            else:
                parts.append(f"{self.prune}-{self.sparsity * 100:g}")
        if self.quantize == "int":
            parts.append(f"int-profile-{self.profile_hash}")
        elif self.quantize is not None:
            parts.append(self.quantize if self.quantize == "int8" else f"int4-g{self.int4_group_size}")
        return "-".join(parts)

    @property
    def profile_hash(self) -> str:
        text = json.dumps({str(k): v for k, v in sorted((self.layer_profile or {}).items())})
        return hashlib.sha1(f"{text}|{self.group_size}".encode()).hexdigest()[:8]

    @property
    def int4_group_size(self) -> int:
        """Input weights per int4 scale (int8 keeps one scale per output channel)."""
        return self.group_size if self.group_size is not None else INT4_GROUP

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.layer_profile is not None:
            values["layer_profile"] = {str(k): v for k, v in self.layer_profile.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VariantSpec:
        values = dict(values)
        if values.get("layer_profile") is not None:
            values["layer_profile"] = {int(k): v for k, v in values["layer_profile"].items()}
        return cls(**values)


def spec_from_profile(profile: Mapping[str, Any], calibration: str = "assistant-answers") -> VariantSpec:
    """The spec of a layer-profile document (the module docstring's format)."""
    method, levels = profile.get("method"), profile.get("levels")
    if method not in PROFILE_METHODS:
        raise ParamError(f"layer profile method {method!r} is not one of {', '.join(PROFILE_METHODS)}")
    if not isinstance(levels, Mapping):
        raise ParamError('a layer profile has "levels": {"<layer index>": level, ...}')
    try:
        parsed = {int(layer): float(level) for layer, level in levels.items()}
    except (TypeError, ValueError) as error:
        raise ParamError(f"layer profile levels must map layer indices to numbers ({error})") from None
    if method == "int":
        return VariantSpec(quantize="int", group_size=profile.get("group_size"),
                           layer_profile={k: int(v) for k, v in parsed.items()}, calibration=calibration)
    return VariantSpec(prune=method, layer_profile=parsed, calibration=calibration)


def read_profile(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ParamError(f"cannot read the layer profile {path}: {error}") from None
