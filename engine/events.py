"""The typed vocabulary every decoder speaks.

A decoder yields these events, one model call at a time; the recorder turns them into a trace.
Every event is a frozen dataclass with a class-level ``kind`` tag, serialisable to plain JSON types
by :func:`event_to_dict` and validated back by :func:`event_from_dict`. Later decoders add fields with
defaults or new event kinds here; they never fork the vocabulary.

Every float an event holds is rounded to 7 significant digits (float32 precision) when the event is built, so a
stored trace is compact and its JSON export round-trips exactly; token ids are the fields typed :data:`TokenId`, so
the recorder finds their texts for replay. Both follow from the type hints: a new field needs no other declaration.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import types
import typing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Union

TRACE_FORMAT = "decoding-explorer-trace"
TRACE_VERSION = 1

RunStatus = Literal["running", "finished", "failed", "cancelled", "interrupted"]  # interrupted: its writer died


def r7(x: float) -> float:
    """Round to float32 precision: keeps traces compact and exactly reproducible through JSON."""
    return float(f"{float(x):.7g}")  # nan and +-inf come back as they are


TokenId = Annotated[int, "token id"]  # a field typed so holds token ids: the recorder stores their texts for replay


class Record:
    """Base of every event and of the records inside them: on construction, each float field (a float, an optional
    float or a list of them) is rounded by :func:`r7`. Nested records round themselves, being Records too. Events
    read back by :func:`event_from_dict` keep their numbers as stored."""

    def __post_init__(self) -> None:
        if _AS_STORED.get():  # read back from a file or the database: kept exactly as written (and no slower)
            return
        fields = self.__dict__  # written directly: the record is frozen, and this runs for every record built
        for name in _float_fields(type(self)):
            value = fields[name]
            if type(value) is float:  # most values: rounded without a further call
                fields[name] = r7(value)
            elif value is not None and type(value) is not int:
                fields[name] = _rounded(value)


# Set while event_from_dict builds an event: its numbers were rounded when it was recorded, and a file's are
# kept as the file has them, so that import -> export is exact.
_AS_STORED: ContextVar[bool] = ContextVar("events_as_stored", default=False)


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    """The fields of a record that hold floats (and nothing else but None), from its type hints."""
    hints = typing.get_type_hints(cls)
    return tuple(name for name in _field_names(cls) if float in _leaves(hints[name]) <= {float, type(None)})


def _rounded(value: Any) -> Any:
    if value is None or type(value) is int:  # a count filed as a float (a metric) is exact already
        return value
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    try:
        return r7(value)  # a 0-d tensor, a numpy number
    except TypeError:  # no number (a test's pytest.approx): left for the comparison it is made for
        return value


def _leaves(tp: Any) -> frozenset[Any]:
    """The types a hint bottoms out in, through lists and unions (``list[TokenId] | None`` -> {TokenId, None})."""
    if typing.get_origin(tp) in (list, Union, types.UnionType):
        return frozenset().union(*map(_leaves, typing.get_args(tp)))
    return frozenset({tp})


@dataclass(frozen=True)
class Candidate(Record):
    """One entry of a top-k list: raw (model) and processed (sampled-from) probabilities."""

    token_id: TokenId
    raw_prob: float
    prob: float


@dataclass(frozen=True)
class StageReport(Record):
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
class RunStarted(Record):
    kind: ClassVar[str] = "run_started"
    prompt_token_ids: list[TokenId]


@dataclass(frozen=True)
class TokenStep(Record):
    """The distribution at one output position and the token taken there.

    ``step`` is the decoder step (model-call index) that produced the distribution; ``position`` the
    index in the output. Log-probs and entropies are in nats. ``rank`` is the 1-based rank of the
    chosen token in the raw distribution.
    """

    kind: ClassVar[str] = "token"
    step: int
    position: int
    token_id: TokenId
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
class BeamNode(Record):
    """A hypothesis extension considered at a beam step.

    ``id`` is unique within the run; ``parent`` is the id of the beam it extends (-1 for the prompt).
    ``status``: live (kept for the next step), pruned (dropped), finished (ended with EOS or length).
    """

    id: int
    parent: int
    token_id: TokenId
    token_logprob: float
    score: float
    status: Literal["live", "pruned", "finished"]
    normalized_score: float | None = None


@dataclass(frozen=True)
class BeamStep(Record):
    kind: ClassVar[str] = "beam"
    step: int
    nodes: list[BeamNode]
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class DraftNode(Record):
    """A node of a speculative draft tree, with its verification outcome once verified."""

    id: int
    parent: int
    token_id: TokenId
    depth: int
    draft_prob: float
    source: str = "draft"
    target_prob: float | None = None
    accepted: bool | None = None
    draw: float | None = None
    ratio: float | None = None
    score: float | None = None  # the drafter's own ranking score (MCTS visits, Gumbel key, ...), when it has one
    block: int | None = None  # the drafter forward that drafted it, for block drafters (Falcon: 1 = the first)


@dataclass(frozen=True)
class DraftRound(Record):
    """One speculative round: the draft tree, its verification, and what was committed."""

    kind: ClassVar[str] = "draft_round"
    step: int
    nodes: list[DraftNode]
    accepted_path: list[int]
    committed: list[TokenId]
    bonus_token: TokenId | None = None
    bonus_is_correction: bool = False
    residual_top: list[Candidate] = field(default_factory=list)
    cache_slots_kept: list[int] = field(default_factory=list)
    draft_calls: int = 0
    model_calls: int = 1
    draft_seconds: float = 0.0
    seconds: float = 0.0
    mode: str = ""  # a decoder's phase for this round (PEARL's pre/post-verify, a Jacobi warm-up, ...)
    simulated_seconds: float | None = None  # the round's time had drafting and verifying run in parallel
    draft_depth_limit: int | None = None  # the cost-aware draft length's cap this round (None: the drafter's own)
    kv_cache_bytes: int | None = None  # target + draft KV caches after the round (None: not measured)


@dataclass(frozen=True)
class DiffusionStep(Record):
    """One denoising step of a diffusion LM over the canvas ``[prompt | generated]``.

    ``canvas`` holds the generated part; masked positions hold ``mask_id``. ``proposals`` are the
    per-position top candidates (the lattice), ``confidence`` the score the sampler ranked by.
    """

    kind: ClassVar[str] = "diffusion"
    step: int
    canvas: list[TokenId]
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
class AttentionMap(Record):
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
class Output(Record):
    """The decoder declares its final output (beam search, diffusion), replacing committed tokens."""

    kind: ClassVar[str] = "output"
    token_ids: list[TokenId]
    score: float | None = None


@dataclass(frozen=True)
class DecoderMetric(Record):
    """A number only this decoder knows (a divergence, a searched setting): the recorder files it under metrics."""

    kind: ClassVar[str] = "metric"
    name: str
    value: float
    detail: str = ""


@dataclass(frozen=True)
class ScoredCandidate(Record):
    """One option a decoder weighed: a token (with an optional continuation or whole sample) and its score.

    ``parts`` are the score's components, named by the event's ``part_names``; ``token_scores`` holds one value
    per token of ``tokens`` (a look-ahead's log-probs, a sample's per-token certainty).
    """

    token_id: TokenId
    score: float
    parts: list[float] = field(default_factory=list)
    tokens: list[TokenId] = field(default_factory=list)
    token_scores: list[float] = field(default_factory=list)
    label: str = ""


@dataclass(frozen=True)
class Rerank(Record):
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
class SuperposedStep(Record):
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
class SpanScores(Record):
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
    greedy_token_ids: list[TokenId] = field(default_factory=list)
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class ConstraintStep(Record):
    """One constrained token for one particle: the tokens tried (in Gumbel order for AWRS, or every token for
    plain masking), the one accepted (-1 if none), constraint checks spent and the particle's weights."""

    kind: ClassVar[str] = "constraint"
    step: int
    particle: int
    method: str
    proposals: list[TokenId]
    accepted: TokenId  # -1: none
    checks: int
    log_weight_increment: float
    log_weight: float
    model_calls: int = 1
    seconds: float = 0.0


@dataclass(frozen=True)
class Resampling(Record):
    """Sequential Monte Carlo: the effective sample size before, and each new particle's ancestor."""

    kind: ClassVar[str] = "resample"
    step: int
    ess: float
    log_weights: list[float]
    ancestors: list[int]


@dataclass(frozen=True)
class CacheStep(Record):
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
class Steering(Record):
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
    plain_token_id: TokenId = -1  # what plain greedy decoding would take after the same prefix
    kl_from_plain: float = 0.0  # KL(p_plain || p_steered) of the next-token distributions, nats


@dataclass(frozen=True)
class SearchGeneration(Record):
    """One generation of an evolutionary search over per-layer compression levels (EvoPress).

    ``profile`` is the best individual's level (sparsity) per decoder layer and ``best_fitness`` its fitness (mean
    per-token KL to the base model on the whole calibration set, lower is better). Per selection stage,
    ``stage_tokens`` counts the calibration tokens it scored on and ``stage_fitnesses`` holds each candidate's
    fitness there; the last stage is the whole set. Generation 0 is the starting (uniform) profile.
    """

    kind: ClassVar[str] = "search_generation"
    generation: int
    best_fitness: float
    profile: list[float]
    mean_sparsity: float
    stage_tokens: list[int]
    stage_fitnesses: list[list[float]]
    accepted: bool = False  # an offspring replaced the parent
    seconds: float = 0.0


@dataclass(frozen=True)
class BenchPoint(Record):
    """One cell of a parallel-decoding benchmark (``bench dllm``): a decoder setting on ``rows`` rows of one task.

    ``tokens_per_call`` is the realised parallelism (answer tokens per model call, the x axis of ParallelBench's
    figures); ``accuracy`` the share of rows solved (exact match, or validity for the open-ended tasks)."""

    kind: ClassVar[str] = "bench_point"
    task: str
    setting: str  # the label, such as ``fast_dllm:threshold=0.9``
    decoder: str
    model: str
    rows: int
    accuracy: float
    tokens_per_call: float
    model_calls: int
    draft_calls: int = 0
    seconds: float = 0.0
    line: str = ""  # the setting without its parallelism parameters (DecoderSpec.curve_line); "" = the decoder


@dataclass(frozen=True)
class PromptPassages(Record):
    """The prompt's marked passages and question as token index ranges [start, stop), found with the tokenizer when
    a run that captures attention starts: the attention each part gets then reads from the trace alone."""

    kind: ClassVar[str] = "passages"
    passages: list[list[int]]
    question: list[int]  # empty (start == stop) when the prompt has no question marker
    passage_marker: str
    question_marker: str


@dataclass(frozen=True)
class VariantStep(Record):
    """A model variant (quantised, pruned, searched, ...) beside its base at one decoding step: the variant chose the
    token, the base read the same tokens teacher-forced with its own cache.

    ``kl`` = KL(p_base || p_variant) of the raw next-token distributions, in nats. Ranks count from 1 over a raw
    distribution, ties ranking first: ``base_top_rank`` is the rank of the base's top-1 token under the variant (1: the
    variant's top-1 too), ``token_base_rank`` the rank of the chosen token under the base (1: the base's greedy choice).
    """

    kind: ClassVar[str] = "variant"
    step: int
    variant: str
    kl: float
    top1_agree: bool
    base_top: TokenId
    variant_top: TokenId
    base_top_rank: int
    token_base_rank: int
    token_base_logprob: float  # log p_base(chosen token): its mean negated is the base's cross-entropy on the text
    base_entropy: float  # nats, raw distributions
    variant_entropy: float
    model_calls: int = 1  # the base's forward
    seconds: float = 0.0


@dataclass(frozen=True)
class FfnSparsity(Record):
    """FFN activation sparsity of one output token, per decoder layer (BlockFFN's measures; see engine/ffn.py).

    ``token_level[l]``: the share of layer l's FFN neurons inactive for the token. ``chunk_level[l]``: the share
    inactive for every token of the chunk this token completes (fixed chunks of ``chunk`` output positions, as in
    the run's settings), None at a token that completes none. ``step`` is the decoder step, ``position`` the output
    position whose token the activations predicted.
    """

    kind: ClassVar[str] = "ffn_sparsity"
    step: int
    position: int
    token_level: list[float]
    chunk_level: list[float] | None = None


@dataclass(frozen=True)
class RunFinished(Record):
    kind: ClassVar[str] = "run_finished"
    status: RunStatus
    reason: str = ""


Event = Union[
    RunStarted, TokenStep, BeamStep, DraftRound, DiffusionStep, AttentionMap, Output, DecoderMetric, Rerank,
    SuperposedStep, SpanScores, ConstraintStep, Resampling, CacheStep, Steering, SearchGeneration, PromptPassages,
    VariantStep, BenchPoint, FfnSparsity, RunFinished,
]
EVENT_TYPES: dict[str, type] = {cls.kind: cls for cls in typing.get_args(Event)}


def token_ids_of(event: Event) -> set[int]:
    """Every token id an event mentions (its :data:`TokenId` fields, its records' too), so the recorder can store
    their texts for replay; negative ids (none, padding) are left out."""
    ids: set[int] = set()
    _collect_token_ids(event, ids)
    return ids


def _collect_token_ids(record: Any, ids: set[int]) -> None:
    for name, holds_ids in _token_fields(type(record)):
        for value in _flattened(getattr(record, name)):
            if not holds_ids:
                _collect_token_ids(value, ids)
            elif value >= 0:
                ids.add(value)


def _flattened(value: Any) -> list[Any]:
    """A field's values, lists flattened, None left out."""
    if isinstance(value, list):
        return [v for item in value for v in _flattened(item)]
    return [] if value is None else [value]


@functools.cache
def _token_fields(cls: type) -> tuple[tuple[str, bool], ...]:
    """(name, holds token ids itself) for the fields of a record typed TokenId, or holding records that may have them."""
    hints = typing.get_type_hints(cls, include_extras=True)
    found = []
    for name in _field_names(cls):
        leaves = _leaves(hints[name])
        if TokenId in leaves:
            found.append((name, True))
        elif any(dataclasses.is_dataclass(tp) and _token_fields(tp) for tp in leaves):
            found.append((name, False))
    return tuple(found)


# ---------------------------------------------------------------- serialisation


def event_to_dict(event: Event) -> dict[str, Any]:
    """Plain-JSON form of an event: ``{"kind": ..., field: value, ...}``; bytes become base64."""
    out: dict[str, Any] = {"kind": event.kind}
    out.update(_plain(event))
    return out


def _plain(value: Any) -> Any:
    # Numbers, strings, flags and None are taken as they are, without a call: this runs for every value of an event.
    if isinstance(value, Record):  # every dataclass of the vocabulary (dataclasses.is_dataclass is slower)
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
    token = _AS_STORED.set(True)
    try:
        return _build(cls, body, f"{where} ({kind})")
    finally:
        _AS_STORED.reset(token)


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
        item = args[0]
        if item in _SCALARS and all(type(v) is item for v in value):  # a list of plain numbers: nothing to coerce
            return value
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
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
