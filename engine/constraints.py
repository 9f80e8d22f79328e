"""Constraints on generated text, for constrained decoding: is a prefix still viable, is a text a complete match.

A constraint judges the decoded text of the generated tokens (not the prompt). Three kinds:

- :class:`RegexConstraint`: a regular expression over the whole output; prefix viability via the ``regex``
  package's partial matching (``fullmatch(text, partial=True)`` succeeds when some continuation could still match).
- :func:`json_shape_constraint`: a small JSON shape such as ``{"name": "string", "age": "integer"}`` compiled to a
  regular expression that only matches JSON objects of that shape (keys in the given order).
- :class:`PredicateConstraint`: two Python functions, for API users only; text from the UI or the command line
  is never evaluated as code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import regex

from engine.params import ParamError

CONSTRAINT_TYPES = ("regex", "json")
MAX_PATTERN_CHARS = 4000
# A pattern from the UI could backtrack catastrophically; no single check may take longer than this.
CHECK_TIMEOUT_SECONDS = 1.0


class Constraint(Protocol):
    description: str

    def prefix(self, text: str) -> bool:
        """True when some continuation of ``text`` could still be a complete match."""
        ...

    def complete(self, text: str) -> bool:
        """True when ``text`` is a complete match (generation may end here)."""
        ...


class RegexConstraint:
    """The whole output must match ``pattern``; an invalid or oversized pattern raises ParamError."""

    def __init__(self, pattern: str, description: str = "") -> None:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise ParamError(f"constraint pattern is {len(pattern)} characters long; at most {MAX_PATTERN_CHARS} allowed")
        try:
            self._regex = regex.compile(pattern)
        except regex.error as error:
            raise ParamError(f"constraint is not a valid regular expression ({error}): {pattern!r:.200}") from None
        self.pattern = pattern
        self.description = description or f"regex {pattern}"

    def prefix(self, text: str) -> bool:
        return self._match(text, partial=True)

    def complete(self, text: str) -> bool:
        return self._match(text, partial=False)

    def _match(self, text: str, partial: bool) -> bool:
        try:
            return self._regex.fullmatch(text, partial=partial, timeout=CHECK_TIMEOUT_SECONDS) is not None
        except TimeoutError:
            raise ParamError(
                f"the constraint pattern took over {CHECK_TIMEOUT_SECONDS:g} s on one check (catastrophic "
                f"backtracking?); simplify it: {self.pattern!r:.200}"
            ) from None


@dataclass(frozen=True)
class PredicateConstraint:
    """A constraint written as Python functions (API only): ``prefix(text)`` and ``complete(text)``."""

    prefix: Callable[[str], bool]
    complete: Callable[[str], bool]
    description: str = "python predicate"


# ---------------------------------------------------------------- JSON shapes

_WS = r"[ \t\n\r]{0,8}"  # bounded: enough for pretty-printing, not a place for a model to wander forever
_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_INTEGER = r"-?(?:0|[1-9][0-9]{0,14})"  # at most 15 digits: integers a float64 JSON reader keeps exactly
_JSON_TYPES = {
    "string": _STRING,
    "integer": _INTEGER,
    "number": _INTEGER + r"(?:\.[0-9]{1,16})?(?:[eE][+-]?[0-9]{1,3})?",
    "boolean": r"(?:true|false)",
    "null": r"null",
}
MAX_SHAPE_DEPTH = 6
SHAPE_HELP = (
    'a JSON object whose values are type names (string, integer, number, boolean, null), nested objects, '
    'or a one-element list [type] for an array, e.g. {"name": "string", "age": "integer", "tags": ["string"]}'
)


def json_shape_pattern(shape_text: str) -> str:
    """The regular expression matching exactly the JSON objects of a shape (keys required, in the given order)."""
    try:
        shape = json.loads(shape_text)
    except (ValueError, RecursionError) as error:  # a JSONDecodeError, an over-long number, nesting too deep
        raise ParamError(f"JSON shape is not valid JSON ({error}); expected {SHAPE_HELP}") from None
    if not isinstance(shape, dict):
        raise ParamError(f"JSON shape must be an object; expected {SHAPE_HELP}")
    return _shape_regex(shape, 0)


def _shape_regex(shape: Any, depth: int) -> str:
    if depth > MAX_SHAPE_DEPTH:
        raise ParamError(f"JSON shape nests deeper than {MAX_SHAPE_DEPTH} levels")
    if isinstance(shape, str) and shape in _JSON_TYPES:
        return _JSON_TYPES[shape]
    if isinstance(shape, list) and len(shape) == 1:
        item = _shape_regex(shape[0], depth + 1)  # at most 65 items: arrays end within a token budget
        return rf"\[{_WS}(?:{item}(?:{_WS},{_WS}{item}){{0,64}})?{_WS}\]"
    if isinstance(shape, dict):
        members = [
            regex.escape(json.dumps(key)) + rf"{_WS}:{_WS}" + _shape_regex(value, depth + 1) for key, value in shape.items()
        ]
        return rf"\{{{_WS}" + rf"{_WS},{_WS}".join(members) + rf"{_WS}\}}"
    raise ParamError(f"JSON shape has an unknown entry {json.dumps(shape)[:80]}; expected {SHAPE_HELP}")


def json_shape_constraint(shape_text: str) -> RegexConstraint:
    return RegexConstraint(json_shape_pattern(shape_text), description=f"JSON shape {shape_text}")


def build_constraint(constraint_type: str, text: str) -> Constraint:
    """The constraint named by a decoder's parameters; ParamError says what is allowed."""
    if constraint_type == "regex":
        return RegexConstraint(text)
    if constraint_type == "json":
        return json_shape_constraint(text)
    raise ParamError(f"constraint_type {constraint_type!r} is not one of {list(CONSTRAINT_TYPES)}")


def allows(constraint: Constraint, text: str, end: bool) -> bool:
    """Whether the output ``text`` may continue (``end`` False) or end here (``end`` True: the EOS token)."""
    return constraint.complete(text) if end else constraint.prefix(text)
