"""The typed vocabulary every decoder speaks.

A decoder yields these events, one model call at a time; the recorder turns them into a trace.
Every event is a frozen dataclass with a class-level ``kind`` tag, serialisable to plain JSON types
by :func:`event_to_dict` and validated back by :func:`event_from_dict`. Later decoders add fields with
defaults or new event kinds here; they never fork the vocabulary.

Probabilities are rounded to 7 significant digits (float32 precision) when events are built, so a
stored trace is compact and its JSON export round-trips exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

TRACE_FORMAT = "decoding-explorer-trace"
TRACE_VERSION = 1

RunStatus = Literal["running", "finished", "failed", "cancelled", "interrupted"]  # interrupted: its writer died


def r7(x: float) -> float:
    """Round to float32 precision: keeps traces compact and exactly reproducible through JSON."""
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return x
    return float(f"{x:.7g}")


@dataclass(frozen=True)
class Candidate:
    """One entry of a top-k list: raw (model) and processed (sampled-from) probabilities."""

    token_id: int
    raw_prob: float
    prob: float


@dataclass(frozen=True)
class StageReport:
    """What one processing stage (temperature, top-k, top-p, ...) did to the distribution.

    ``survivors`` is a bitmask over the step's candidate list: bit i set = candidate i survived this
    stage (and all stages before it). ``kept`` counts surviving tokens over the whole vocabulary,
    ``mass`` is their probability mass under the distribution the stage received.
    """

    name: str
    kept: int
    mass: float
    survivors: int
    threshold: float | None = None


@dataclass(frozen=True)
class RunStarted:
    kind: ClassVar[str] = "run_started"
    prompt_token_ids: list[int]


@dataclass(frozen=True)
class TokenStep:
    """The distribution at one output position and the token taken there.

    ``step`` is the decoder step (model-call index) that produced the distribution; ``position`` the
    index in the output. Log-probs and entropies are in nats. ``rank`` is the 1-based rank of the
    chosen token in the raw distribution.
    """

    kind: ClassVar[str] = "token"
    step: int
    position: int
    token_id: int
    logprob: float
    raw_logprob: float
    rank: int
    entropy_raw: float
    entropy: float
    candidates: list[Candidate]
    stages: list[StageReport] = field(default_factory=list)
    forced: bool = False
    committed: bool = True
    model_calls: int = 1
    seconds: float = 0.0
    source: str = ""  # which model produced the distribution, for decoders that switch between models


@dataclass(frozen=True)
class BeamNode:
    """A hypothesis extension considered at a beam step.

    ``id`` is unique within the run; ``parent`` is the id of the beam it extends (-1 for the prompt).
    ``status``: live (kept for the next step), pruned (dropped), finished (ended with EOS or length).
    """

    id: int
    parent: int
    token_id: int
    token_logprob: float
    score: float
    status: Literal["live", "pruned", "finished"]
    normalized_score: float | None = None


@dataclass(frozen=True)
class BeamStep:
    kind: ClassVar[str] = "beam"
    step: int
    nodes: list[BeamNode]
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class DraftNode:
    """A node of a speculative draft tree, with its verification outcome once verified."""

    id: int
    parent: int
    token_id: int
    depth: int
    draft_prob: float
    source: str = "draft"
    target_prob: float | None = None
    accepted: bool | None = None
    draw: float | None = None
    ratio: float | None = None
    score: float | None = None  # the drafter's own ranking score (MCTS visits, Gumbel key, ...), when it has one


@dataclass(frozen=True)
class DraftRound:
    """One speculative round: the draft tree, its verification, and what was committed."""

    kind: ClassVar[str] = "draft_round"
    step: int
    nodes: list[DraftNode]
    accepted_path: list[int]
    committed: list[int]
    bonus_token: int | None = None
    bonus_is_correction: bool = False
    residual_top: list[Candidate] = field(default_factory=list)
    cache_slots_kept: list[int] = field(default_factory=list)
    draft_calls: int = 0
    model_calls: int = 1
    draft_seconds: float = 0.0
    seconds: float = 0.0
    mode: str = ""  # a decoder's phase for this round (PEARL's pre/post-verify, a Jacobi warm-up, ...)
    simulated_seconds: float | None = None  # the round's time had drafting and verifying run in parallel


@dataclass(frozen=True)
class DiffusionStep:
    """One denoising step of a diffusion LM over the canvas ``[prompt | generated]``.

    ``canvas`` holds the generated part; masked positions hold ``mask_id``. ``proposals`` are the
    per-position top candidates (the lattice), ``confidence`` the score the sampler ranked by.
    """

    kind: ClassVar[str] = "diffusion"
    step: int
    canvas: list[int]
    mask_id: int
    committed_positions: list[int]
    confidence: list[float] = field(default_factory=list)
    proposals: list[list[Candidate]] = field(default_factory=list)
    block: list[int] = field(default_factory=list)
    model_calls: int = 1
    seconds: float = 0.0
    cache: str = ""  # what the step's forward reused ("" = full canvas recomputed; "prefix", "dual", "delayed")
    remasked_positions: list[int] = field(default_factory=list)  # committed tokens sent back to MASK (revision)


@dataclass(frozen=True)
class AttentionMap:
    """Attention (or saliency) weights, aggregated as described, stored as float16 bytes.

    ``shape`` is (layers, queries, keys) after aggregation; ``layers`` names the layer indices kept
    (one entry "mean" layer is encoded as layers=[-1]).
    """

    kind: ClassVar[str] = "attention"
    step: int
    layers: list[int]
    head_reduction: str
    layer_reduction: str
    query_positions: list[int]
    shape: list[int]
    data: bytes
    name: str = "attention"


@dataclass(frozen=True)
class Output:
    """The decoder declares its final output (beam search, diffusion), replacing committed tokens."""

    kind: ClassVar[str] = "output"
    token_ids: list[int]
    score: float | None = None


@dataclass(frozen=True)
class DecoderMetric:
    """A number only this decoder knows (a divergence, a searched setting): the recorder files it under metrics."""

    kind: ClassVar[str] = "metric"
    name: str
    value: float
    detail: str = ""


@dataclass(frozen=True)
class ScoredCandidate:
    """One option a decoder weighed: a token (with an optional continuation or whole sample) and its score.

    ``parts`` are the score's components, named by the event's ``part_names``; ``token_scores`` holds one value
    per token of ``tokens`` (a look-ahead's log-probs, a sample's per-token certainty).
    """

    token_id: int
    score: float
    parts: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    token_scores: list[float] = field(default_factory=list)
    label: str = ""


@dataclass(frozen=True)
class Rerank:
    """A decision among scored candidates (AdaDec's paused steps, momentum's resistance, best-of-N selection).

    ``chosen`` and ``baseline`` index ``candidates``: what the decoder took, and what the plain rule (greedy, or
    the first sample) would have taken. ``label`` names the decision (paused, overridden, ...).
    """

    kind: ClassVar[str] = "rerank"
    step: int
    position: int
    method: str
    part_names: list[str]
    candidates: list[ScoredCandidate]
    chosen: int
    baseline: int
    label: str = ""
    threshold: float | None = None
    value: float | None = None  # the signal compared with the threshold (AdaDec: entropy in nats)
    model_calls: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class SuperposedStep:
    """One step of superposed decoding: the drafts entering it with their mixing weights, the draft x token
    candidates (LM and n-gram parts), and which candidates became the next drafts (``kept``, indices)."""

    kind: ClassVar[str] = "superposed"
    step: int
    drafts: list[ScoredCandidate]
    candidates: list[ScoredCandidate]
    kept: list[int]
    finished: list[int] = field(default_factory=list)
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class SpanScores:
    """exact-extract: the negative log-likelihood of every answer span, start x length, float32 bytes (inf where
    a span runs past the passage); ``starts`` are the prompt positions of the candidate first tokens."""

    kind: ClassVar[str] = "spans"
    step: int
    starts: list[int]
    max_length: int
    nll: bytes
    best_start: int
    best_length: int
    length_normalized: bool = False
    greedy_token_ids: list[int] = field(default_factory=list)
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class ConstraintStep:
    """One constrained token for one particle: the tokens tried (in Gumbel order for AWRS, or every token for
    plain masking), the one accepted (-1 if none), constraint checks spent and the particle's weights."""

    kind: ClassVar[str] = "constraint"
    step: int
    particle: int
    method: str
    proposals: list[int]
    accepted: int
    checks: int
    log_weight_increment: float
    log_weight: float
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class Resampling:
    """Sequential Monte Carlo: the effective sample size before, and each new particle's ancestor."""

    kind: ClassVar[str] = "resample"
    step: int
    ess: float
    log_weights: list[float]
    ancestors: list[int]


@dataclass(frozen=True)
class CacheStep:
    """A compressed KV cache beside the full one at one decoding step.

    ``evicted`` is float16 bytes over the cache positions: the share of (layer, head) slots in which the position
    is hidden, or for element-wise policies the share of its elements pruned. ``kl`` = KL(p_full || p_compressed)
    of the next-token distributions, in nats.
    """

    kind: ClassVar[str] = "cache"
    step: int
    policy: str
    kl: float
    top1_agree: bool
    kept_fraction: float
    evicted: bytes
    error: float = 0.0  # relative reconstruction error of the cache (quantising / pruning policies)
    model_calls: int = 2
    seconds: float = 0.0


@dataclass(frozen=True)
class Steering:
    """Attention steering applied at one decoding step (GIFT): per enhanced layer the heads boosted towards the
    context and towards the query, the query factor r, and the last row's context mass before and after."""

    kind: ClassVar[str] = "steering"
    step: int
    layers: list[int]
    context_heads: list[list[int]]
    query_heads: list[list[int]]
    ratios: list[float]
    context_mass_before: list[float]
    context_mass_after: list[float]
    plain_token_id: int = -1  # what plain greedy decoding would take after the same prefix
    kl_from_plain: float = 0.0  # KL(p_plain || p_steered) of the next-token distributions, nats


@dataclass(frozen=True)
class RunFinished:
    kind: ClassVar[str] = "run_finished"
    status: RunStatus
    reason: str = ""


Event = Union[
    RunStarted, TokenStep, BeamStep, DraftRound, DiffusionStep, AttentionMap, Output, DecoderMetric, Rerank,
    SuperposedStep, SpanScores, ConstraintStep, Resampling, CacheStep, Steering, RunFinished,
]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in typing.get_args(Event)}


def token_ids_of(event: Event) -> set[int]:
    """Every token id an event mentions, so the recorder can store their texts for replay."""
    ids: set[int] = set()

    def walk(value: Any, name: str = "") -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name), f.name)
        elif isinstance(value, list):
            for item in value:
                walk(item, name)
        elif isinstance(value, int) and not isinstance(value, bool) and name in _TOKEN_FIELDS:
            if value >= 0:
                ids.add(value)

    walk(event)
    return ids


_TOKEN_FIELDS = {
    "token_id", "token_ids", "prompt_token_ids", "committed", "bonus_token", "canvas", "tokens", "proposals",
    "accepted", "greedy_token_ids", "plain_token_id",
}


# ---------------------------------------------------------------- serialisation


def event_to_dict(event: Event) -> dict[str, Any]:
    """Plain-JSON form of an event: ``{"kind": ..., field: value, ...}``; bytes become base64."""
    out: dict[str, Any] = {"kind": event.kind}
    out.update(_plain(event))
    return out


def _plain(value: Any) -> Any:
    # Numbers, strings, flags and None are taken as they are, without a call: this runs for every value of an event.
    if dataclasses.is_dataclass(value):
        fields = {}
        for name in _field_names(type(value)):
            v = getattr(value, name)
            fields[name] = v if type(v) in _PLAIN else _plain(v)
        return fields
    if isinstance(value, list):
        return [v if type(v) in _PLAIN else _plain(v) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return value


class TraceFormatError(ValueError):
    """A trace or event that does not match the documented format."""


def event_from_dict(data: Any, where: str = "event") -> Event:
    """Validate a plain dict against the event schema and build the event; never evaluates anything."""
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where}: expected an object, got {type(data).__name__}")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise TraceFormatError(f"{where}: unknown event kind {kind!r}; known: {sorted(EVENT_TYPES)}")
    body = {k: v for k, v in data.items() if k != "kind"}
    return _build(cls, body, f"{where} ({kind})")


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    """Resolved type hints and fields of an event class (resolving is slow; traces hold many events)."""
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where}: expected an object, got {type(data).__name__}")
    hints, fields = _schema(cls)
    unknown = set(data) - set(fields)
    if unknown:
        raise TraceFormatError(f"{where}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TraceFormatError(f"{where}: missing field {name!r}")
            continue
        value, tp = data[name], hints[name]
        # a number, string or flag of exactly its field's type needs no coercion (most fields: imports go faster)
        kwargs[name] = value if tp is type(value) and tp in _SCALARS else _coerce(tp, value, f"{where}.{name}")
    return cls(**kwargs)


_SCALARS = (int, float, str, bool)
_PLAIN = frozenset({*_SCALARS, type(None)})


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _shape(tp: Any) -> tuple[Any, tuple[Any, ...], bool]:
    """A type's origin, arguments and whether it is a dataclass: typing's introspection is slow, and imports of long
    traces ask it for every value."""
    return typing.get_origin(tp), typing.get_args(tp), dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args, is_record = _shape(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except TraceFormatError:
                continue
        raise TraceFormatError(f"{where}: {value!r:.60} matches none of {args}")
    if origin is Literal:
        if value in args:
            return value
        raise TraceFormatError(f"{where}: {value!r:.60} is not one of {args}")
    if origin is list:
        if not isinstance(value, list):
            raise TraceFormatError(f"{where}: expected a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise TraceFormatError(f"{where}: expected null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TraceFormatError(f"{where}: expected true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TraceFormatError(f"{where}: expected an integer, got {value!r:.60}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise TraceFormatError(f"{where}: {value!r:.60}... is past a float's range") from None
        raise TraceFormatError(f"{where}: expected a number, got {value!r:.60}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TraceFormatError(f"{where}: expected a string")
    if tp is bytes:
        if not isinstance(value, str):
            raise TraceFormatError(f"{where}: expected base64 text")
        try:
            return base64.b64decode(value.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise TraceFormatError(f"{where}: invalid base64 ({exc})") from None
    if is_record:
        return _build(tp, value, where)
    raise TraceFormatError(f"{where}: unsupported type {tp}")  # pragma: no cover - schema bug
