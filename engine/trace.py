"""A trace: the ordered events of one run plus its metadata, and its versioned JSON form.

The JSON document (``format`` = ``decoding-explorer-trace``, ``version`` = 1)::

    {"format": ..., "version": 1,
     "run": {"run_id", "info": {...RunInfo...}, "status", "reason",
             "prompt_token_ids", "output_token_ids", "metrics"},
     "vocab": {"<token id>": "<token text>", ...},
     "events": [{"kind": ..., ...}, ...]}

Importing validates every field against the event dataclasses and size limits; nothing in the file is
ever executed or unpickled.
"""

from __future__ import annotations

import gzip
import json
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.events import (
    TRACE_FORMAT,
    TRACE_VERSION,
    Event,
    RunStatus,
    TraceFormatError,
    event_from_dict,
    event_to_dict,
)

MAX_IMPORT_BYTES = 512 * 1024 * 1024
MAX_EVENTS = 2_000_000


def new_run_id() -> str:
    return uuid.uuid4().hex


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class RunInfo:
    """What was run: enough to reproduce it and to label it in the library."""

    model: str
    decoder: str
    params: dict[str, Any]
    prompt: str
    seed: int | None = None
    chat: bool = False
    max_new_tokens: int = 0
    created_at: str = field(default_factory=utc_now)
    model_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    parent: dict[str, Any] | None = None  # a branch's origin: {"run_id", "step" (output position), "token_id"}


@dataclass
class Trace:
    run_id: str
    info: RunInfo
    events: list[Event] = field(default_factory=list)
    vocab: dict[int, str] = field(default_factory=dict)
    status: RunStatus = "running"
    reason: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def text_of(self, token_ids: list[int]) -> str:
        """Concatenated token texts from the stored vocabulary (replay needs no tokenizer)."""
        return "".join(self.vocab.get(t, f"<{t}>") for t in token_ids)

    def summary(self) -> dict[str, Any]:
        """The stable JSON object that ``record --json`` prints; scripts rely on these keys."""
        return {
            "run_id": self.run_id,
            "model": self.info.model,
            "decoder": self.info.decoder,
            "params": self.info.params,
            "seed": self.info.seed,
            "prompt": self.info.prompt,
            "prompt_token_ids": self.prompt_token_ids,
            "output_token_ids": self.output_token_ids,
            "output_text": self.output_text,
            "status": self.status,
            "reason": self.reason,
            "metrics": self.metrics,
        }


# ---------------------------------------------------------------- JSON


def trace_to_dict(trace: Trace) -> dict[str, Any]:
    return {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "run": {
            "run_id": trace.run_id,
            "info": asdict(trace.info),
            "status": trace.status,
            "reason": trace.reason,
            "prompt_token_ids": trace.prompt_token_ids,
            "output_token_ids": trace.output_token_ids,
            "output_text": trace.output_text,
            "metrics": trace.metrics,
        },
        "vocab": {str(k): v for k, v in sorted(trace.vocab.items())},
        "events": [event_to_dict(e) for e in trace.events],
    }


def trace_from_dict(doc: Any) -> Trace:
    if not isinstance(doc, dict):
        raise TraceFormatError("a trace file must hold one JSON object")
    if doc.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"not a Decoding Explorer trace (format is {doc.get('format')!r})")
    version = doc.get("version")
    if version != TRACE_VERSION:
        raise TraceFormatError(f"unsupported trace version {version!r}; this build reads version {TRACE_VERSION}")
    run = _obj(doc.get("run"), "run")
    info = _run_info(_obj(run.get("info"), "run.info"))
    status = run.get("status")
    if status not in ("running", "finished", "failed", "cancelled"):
        raise TraceFormatError(f"run.status {status!r} is not one of running/finished/failed/cancelled")
    events_raw = doc.get("events")
    if not isinstance(events_raw, list):
        raise TraceFormatError("events must be a list")
    if len(events_raw) > MAX_EVENTS:
        raise TraceFormatError(f"too many events ({len(events_raw)} > {MAX_EVENTS})")
    run_id = run.get("run_id")
    if not (isinstance(run_id, str) and 0 < len(run_id) <= 64 and run_id.isalnum()):
        raise TraceFormatError("run.run_id must be 1-64 letters or digits")
    return Trace(
        run_id=run_id,
        info=info,
        events=[event_from_dict(e, f"events[{i}]") for i, e in enumerate(events_raw)],
        vocab=_vocab(doc.get("vocab")),
        status=status,
        reason=_str(run.get("reason", ""), "run.reason"),
        prompt_token_ids=_ints(run.get("prompt_token_ids"), "run.prompt_token_ids"),
        output_token_ids=_ints(run.get("output_token_ids"), "run.output_token_ids"),
        output_text=_str(run.get("output_text", ""), "run.output_text"),
        metrics=_metrics(run.get("metrics")),
    )


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TraceFormatError(f"{where} must be an object")
    return value


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise TraceFormatError(f"{where} must be a string")
    return value


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TraceFormatError(f"{where} must be a list of integers")
    return value


def _vocab(value: Any) -> dict[int, str]:
    vocab = _obj(value, "vocab")
    out: dict[int, str] = {}
    for key, text in vocab.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or not isinstance(text, str):
            raise TraceFormatError(f"vocab entries map token ids to text; bad entry {key!r:.40}")
        out[int(key)] = text
    return out


def _metrics(value: Any) -> dict[str, float]:
    metrics = _obj(value, "run.metrics")
    for key, v in metrics.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise TraceFormatError(f"run.metrics.{key} must be a number")
    return metrics


_INFO_TYPES = {
    "model": str,
    "decoder": str,
    "prompt": str,
    "created_at": str,
    "chat": bool,
    "max_new_tokens": int,
    "params": dict,
    "model_info": dict,
    "versions": dict,
    "settings": dict,
}


def _run_info(raw: dict[str, Any]) -> RunInfo:
    unknown = set(raw) - set(RunInfo.__dataclass_fields__)
    if unknown:
        raise TraceFormatError(f"run.info has unknown field(s) {sorted(unknown)}")
    for name, kind in _INFO_TYPES.items():
        value = raw.get(name)
        if (name in raw or name in ("model", "decoder", "prompt")) and (
            not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        ):
            raise TraceFormatError(f"run.info.{name} must be {kind.__name__}")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TraceFormatError("run.info.seed must be an integer or null")
    _check_parent(raw.get("parent"))
    return RunInfo(**raw)


def _check_parent(parent: Any) -> None:
    if parent is None:
        return
    if not (
        isinstance(parent, dict)
        and set(parent) == {"run_id", "step", "token_id"}
        and isinstance(parent["run_id"], str)
        and all(isinstance(parent[k], int) and not isinstance(parent[k], bool) for k in ("step", "token_id"))
    ):
        raise TraceFormatError("run.info.parent must be null or an object with a string run_id and integer step and token_id")


def dumps(trace: Trace) -> str:
    return json.dumps(trace_to_dict(trace), ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def loads(text: str | bytes) -> Trace:
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise TraceFormatError("not a trace: JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers past Python's digit limit
        raise TraceFormatError(f"not valid JSON: {exc}") from None
    return trace_from_dict(doc)


def _reject_constant(name: str) -> float:
    # NaN/Infinity are legitimate (e.g. -inf log-probs of filtered tokens); anything else is refused by json.
    return float(name.replace("Infinity", "inf"))


def write_file(trace: Trace, path: str | Path) -> Path:
    """Write the JSON trace; a ``.gz`` suffix writes it gzip-compressed."""
    path = Path(path)
    data = dumps(trace).encode("utf-8")
    tmp = path.with_name(path.name + ".partial")
    with (gzip.open(tmp, "wb") if path.suffix == ".gz" else open(tmp, "wb")) as fh:
        fh.write(data)
    tmp.replace(path)
    return path


def read_file(path: str | Path) -> Trace:
    """Read a JSON trace (gzip detected by its magic bytes), validated; size-bounded."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"no such trace file: {path}")
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read(MAX_IMPORT_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise TraceFormatError(f"cannot read {path}: {exc}") from None
    if len(data) > MAX_IMPORT_BYTES:
        raise TraceFormatError(f"{path} is larger than {MAX_IMPORT_BYTES // 2**20} MiB uncompressed")
    return loads(data)
