"""Parameter schemas: described once per decoder, used to validate input and to build UI forms."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

ParamType = Literal["int", "float", "bool", "str", "choice"]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
_DIGITS = re.compile(r"\s*[+-]?\d+\s*")


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
    limit: str | None = None  # the engine.limits.Limits field that caps this value (it multiplies memory or time)
    loads_files: bool = False  # the value names a model or folder to load: a public app takes allow-listed names only
    # the value trades accuracy for model calls (a diffusion schedule's steps, a commit threshold): a parallelism
    # curve draws one line per decoder through such values, the other parameters fixed
    sets_parallelism: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["choices"] = list(self.choices) if self.choices else None
        return d

    def parse(self, value: Any) -> Any:
        """Turn a CLI string or a UI value into the typed value, checking range and choices."""
        typed = self._convert(value)
        if self.type in ("int", "float"):
            low, high = self._bounds()
            if _unbounded(typed):
                raise self._out_of_range(value)
            if typed < low:
                raise ParamError(f"{self.name}={shown(typed)} is below the minimum {_number(low)}")
            if typed > high:
                raise ParamError(f"{self.name}={shown(typed)} is above the maximum {_number(high)}")
        if self.type == "choice" and typed not in (self.choices or ()):
            raise ParamError(f"{self.name}={shown(typed)} is not one of {list(self.choices or ())}")
        if self.type in ("str", "choice"):
            check_text(typed, self.name)
        return typed

    def _bounds(self) -> tuple[float, float]:
        """The allowed range; an int is also bounded by int64, what torch and SQLite hold."""
        low = -math.inf if self.min is None else self.min
        high = math.inf if self.max is None else self.max
        if self.type == "int":
            low, high = max(low, INT64_MIN), min(high, INT64_MAX)
        return low, high

    def _out_of_range(self, given: Any) -> ParamError:
        low, high = self._bounds()
        allowed = "an integer" if self.type == "int" else "a finite number"
        if math.isfinite(low) and math.isfinite(high):
            allowed += f" between {_number(low)} and {_number(high)}"
        return ParamError(f"{self.name} must be {allowed}, got {shown(given)}")

    def _convert(self, value: Any) -> Any:
        if self.type == "int" and _long_integer_text(value):
            raise self._out_of_range(value)
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
            if not isinstance(value, (str, int, float)):
                raise TypeError
            return str(value)
        except OverflowError:  # an int too large for a float
            raise self._out_of_range(value) from None
        except (TypeError, ValueError):
            raise ParamError(f"{self.name} expects {self.type}, got {shown(value)}") from None


def with_defaults(params: tuple[Param, ...], **defaults: Any) -> tuple[Param, ...]:
    """``params`` with the named ones' defaults changed (a preset, a decoder that wants other starting values)."""
    unknown = set(defaults) - {p.name for p in params}
    if unknown:
        raise ValueError(f"with_defaults: no parameter {', '.join(sorted(unknown))} to change")
    return tuple(replace(p, default=defaults[p.name]) if p.name in defaults else p for p in params)


def validate(schema: tuple[Param, ...], given: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Defaults filled in, unknown names refused with the list of known ones."""
    if not isinstance(given, Mapping):
        raise ParamError(f"{owner}'s parameters must be a mapping of names to values, got {type(given).__name__}")
    known = {p.name: p for p in schema}
    unknown = [k for k in given if k not in known]
    if unknown:
        raise ParamError(
            f"{owner} has no parameter {', '.join(map(shown, unknown))}; "
            f"its parameters are: {', '.join(known) or '(none)'}"
        )
    return {p.name: p.parse(given[p.name]) if p.name in given else p.default for p in schema}


def parse_assignments(items: list[str]) -> dict[str, str]:
    """``["top_p=0.9", "temperature=0.8"]`` -> ``{"top_p": "0.9", ...}`` (typed later by the schema)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ParamError(f"--param expects NAME=VALUE, got {shown(item)}")
        out[name.strip()] = value.strip()
    return out


def parse_setting(label: str) -> tuple[str, dict[str, str]]:
    """``"fast_dllm:rule=factor:factor=1.0"`` -> ``("fast_dllm", {"rule": "factor", "factor": "1.0"})``, the
    ``NAME:KEY=VALUE:...`` form the bench commands take; empty parts are skipped, so ``"h2o:"`` is ``("h2o", {})``."""
    name, *parts = label.split(":")
    if not name.strip():
        raise ParamError(f"a setting is NAME:KEY=VALUE:..., got {shown(label)}")
    assignments = [part for part in parts if part.strip()]
    malformed = [part for part in assignments if not part.partition("=")[0].strip() or "=" not in part]
    if malformed:
        raise ParamError(f"setting {shown(label)}: {shown(malformed[0])} is not KEY=VALUE")
    return name.strip(), parse_assignments(assignments)


def check_text(text: Any, what: str) -> str:
    """Refuse what is not valid Unicode text: a lone surrogate (what undecodable bytes in argv or a bad JSON
    escape become) cannot be tokenized, stored or shown."""
    if not isinstance(text, str):
        raise ParamError(f"{what} must be text, got {type(text).__name__}")
    bad = _SURROGATE.search(text)
    if bad:
        raise ParamError(f"{what} holds an unpaired surrogate (U+{ord(bad.group()):04X}) at character {bad.start()}: "
                         "it is not valid text (is it UTF-8?)")
    return text


def shown(value: Any, limit: int = 40) -> str:
    """A value as a one-line message quotes it: its repr, cut short so a huge input keeps the line short."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr of one over 4300 digits raises
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _unbounded(number: float) -> bool:
    """Not finite, or an int beyond int64 (too large for torch, SQLite and often for a float)."""
    if isinstance(number, int):
        return not INT64_MIN <= number <= INT64_MAX
    return not math.isfinite(number)


def _long_integer_text(value: Any) -> bool:
    """Digits beyond int64's 19 (leading zeros aside): out of range, however many (int() refuses over 4300)."""
    return isinstance(value, str) and _DIGITS.fullmatch(value) is not None and len(value.strip().lstrip("+-").lstrip("0")) > 19


def _number(x: float) -> str:
    """A bound as people write it: 1000, not 1000.0; 0.5 stays 0.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
