"""Parameter schemas: described once per decoder, used to validate input and to build UI forms."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

ParamType = Literal["int", "float", "bool", "str", "choice"]


class ParamError(ValueError):
    """A parameter value that the schema rejects; the message says what is allowed."""


@dataclass(frozen=True)
class Param:
    name: str
    type: ParamType
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices) if self.choices else None
        return d

    def parse(self, value: Any) -> Any:
        """Turn a CLI string or a UI value into the typed value, checking range and choices."""
        value = self._convert(value)
        if self.type in ("int", "float"):
            if isinstance(value, float) and not math.isfinite(value):
                raise ParamError(f"{self.name} must be a finite number, got {value}")
            if self.min is not None and value < self.min:
                raise ParamError(f"{self.name}={value} is below the minimum {self.min}")
            if self.max is not None and value > self.max:
                raise ParamError(f"{self.name}={value} is above the maximum {self.max}")
        if self.type == "choice" and value not in (self.choices or ()):
            raise ParamError(f"{self.name}={value!r} is not one of {list(self.choices or ())}")
        return value

    def _convert(self, value: Any) -> Any:
        try:
            if self.type == "int":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                return int(value)
            if self.type == "float":
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
            if self.type == "bool":
                if isinstance(value, bool):
                    return value
                text = str(value).strip().lower()
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return str(value)
        except (TypeError, ValueError):
            raise ParamError(f"{self.name} expects {self.type}, got {value!r}") from None


def validate(schema: tuple[Param, ...], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Defaults filled in, unknown names refused with the list of known ones."""
    known = {p.name: p for p in schema}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ParamError(
            f"{owner} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(known) or '(none)'}"
        )
    return {p.name: p.parse(given[p.name]) if p.name in given else p.default for p in schema}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["top_p=0.9", "temperature=0.8"]`` -> ``{"top_p": "0.9", ...}`` (typed later by the schema)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParamError(f"--param expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out
