"""What the event and parameter declarations imply by themselves: rounding, token-id fields, stage off values and
changed defaults (issue 18, "declared once")."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import pytest
import torch

from engine.events import (
    EVENT_TYPES,
    Candidate,
    DraftNode,
    DraftRound,
    Record,
    ScoredCandidate,
    TokenId,
    TokenStep,
    event_from_dict,
    event_to_dict,
    r7,
    token_ids_of,
)
from engine.params import Param, with_defaults
from engine.processing import OFF_VALUES
from engine.shared_params import DRAFT_LENGTH_PARAMS, PIPELINE_PARAMS
from engine.speculative.rounds import SAMPLING_PARAMS

LONG = 0.123456789123


def _example(tp: typing.Any, counter: list[int]) -> typing.Any:
    """A value of a field type; every int is distinct (from 1000 up), so a token id found is traceable to its field."""
    tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _example(next(a for a in args if a is not type(None)), counter)
    if origin is typing.Literal:
        return args[0]
    if origin is list:
        return [_example(args[0], counter), _example(args[0], counter)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, counter)
    if tp is int:
        counter[0] += 1
        return 1000 + counter[0]
    return {float: LONG, bool: True, str: "s", bytes: b"\0\1"}[tp]


def _build(cls: type, counter: list[int]) -> typing.Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    return cls(**{f.name: _example(hints[f.name], counter) for f in dataclasses.fields(cls)})


def _token_values(value: typing.Any, hint: typing.Any = None) -> set[int]:
    """The ints of ``value`` held in fields annotated TokenId, read from the annotations independently."""
    if dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(type(value), include_extras=True)
        return set().union(*(_token_values(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(value)))
    if isinstance(value, list):
        return set().union(set(), *(_token_values(v, typing.get_args(hint)[0] if hint else None) for v in value))
    inner = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is not typing.Annotated else [hint]
    return {value} if isinstance(value, int) and TokenId in (hint, *inner) else set()


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_token_ids_of_finds_every_token_field_of_every_event(kind: str) -> None:
    event = _build(EVENT_TYPES[kind], [0])
    assert token_ids_of(event) == _token_values(event)


def test_token_ids_cover_the_known_token_fields() -> None:
    # the fields the recorder needed texts for before the types carried them
    step = TokenStep(step=0, position=0, token_id=7, logprob=-1.0, raw_logprob=-1.0, rank=1, entropy_raw=1.0,
                     entropy=1.0, candidates=[Candidate(8, 0.5, 0.5)])
    assert token_ids_of(step) == {7, 8}
    draft = DraftRound(step=0, nodes=[DraftNode(id=0, parent=-1, token_id=9, depth=1, draft_prob=0.5, accepted=True)],
                       accepted_path=[123], committed=[9, 10], bonus_token=11)
    assert token_ids_of(draft) == {9, 10, 11}  # accepted_path holds node ids, accepted a flag: no tokens


def test_a_new_event_class_gets_its_token_fields_found_without_registration() -> None:
    @dataclass(frozen=True)
    class Probe(Record):
        kind: typing.ClassVar[str] = "probe"
        step: int
        chosen: TokenId
        options: list[ScoredCandidate]
        maybe: TokenId | None = None
        runner_up: list[TokenId] = field(default_factory=list)

    probe = Probe(step=3, chosen=5, options=[ScoredCandidate(6, 0.1, tokens=[7, 8])], runner_up=[9, -1])
    assert token_ids_of(probe) == {5, 6, 7, 8, 9}  # step is not a token; -1 (none) is left out


def test_floats_are_rounded_once_when_built() -> None:
    step = TokenStep(step=0, position=0, token_id=1, logprob=torch.tensor(-LONG), raw_logprob=-LONG, rank=1,
                     entropy_raw=LONG, entropy=math.inf, candidates=[Candidate(1, LONG, LONG)], seconds=LONG)
    assert (step.logprob, step.raw_logprob, step.entropy_raw, step.seconds) == (r7(-LONG), r7(-LONG), r7(LONG), r7(LONG))
    assert type(step.logprob) is float and step.entropy == math.inf
    assert step.candidates[0] == Candidate(1, 0.1234568, 0.1234568)
    scored = ScoredCandidate(1, LONG, parts=[LONG, 3.0], token_scores=[-LONG])
    assert (scored.score, scored.parts, scored.token_scores) == (0.1234568, [0.1234568, 3.0], [-0.1234568])
    assert DraftNode(0, -1, 1, 1, LONG, target_prob=None).target_prob is None


def test_a_new_record_gets_its_floats_rounded_without_registration() -> None:
    @dataclass(frozen=True)
    class Probe(Record):
        weights: list[float]
        score: float | None
        count: int

    assert Probe([LONG, 1 / 3], LONG, 123456789) == Probe([0.1234568, 0.3333333], 0.1234568, 123456789)


@pytest.mark.parametrize("kind", sorted(EVENT_TYPES))
def test_every_event_equals_its_serialised_and_reloaded_copy(kind: str) -> None:
    event = _build(EVENT_TYPES[kind], [0])
    assert event_from_dict(event_to_dict(event)) == event


def test_off_values_are_the_pipeline_parameters_defaults() -> None:
    defaults = {p.name: p.default for p in PIPELINE_PARAMS}
    assert OFF_VALUES == defaults


def test_speculative_sampling_shares_the_pipeline_declarations() -> None:
    shared = {p.name: p for p in (*PIPELINE_PARAMS, *DRAFT_LENGTH_PARAMS)}  # and the round loop's draft length
    for p in SAMPLING_PARAMS:
        if p.name != "temperature":  # its own: 0 means greedy verification
            assert p is shared[p.name]


def test_with_defaults_changes_only_the_named_defaults() -> None:
    params = (Param("a", "int", 1, "A.", 0, 9), Param("b", "float", 0.5, "B.", 0.0, 1.0))
    changed = with_defaults(params, b=0.25)
    assert changed[0] is params[0]
    assert changed[1] == dataclasses.replace(params[1], default=0.25)
    with pytest.raises(ValueError, match="no parameter c"):
        with_defaults(params, c=1)
