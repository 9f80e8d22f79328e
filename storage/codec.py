"""Rows <-> trace objects, on top of the one event serialiser in :mod:`engine.events`.

An event row is ``event_to_dict(event)`` split in three: the fields named in :data:`EVENT_COLUMNS`
go to typed columns (so SQL can filter and aggregate them), the first ``bytes`` field goes to
``blob`` as raw bytes, and the rest stays in the compact JSON ``payload``. A value that a typed column
cannot hold exactly (NaN, -0.0, an integer past 64 bits) simply stays in the payload.

In the payload, records nested in lists (candidates, stage reports, beam and draft nodes) are arrays
in their dataclass's field order, ``[token_id, raw_prob, prob]`` rather than an object: the repeated
keys would otherwise be half of a token step's bytes. The packing is driven by the dataclass type
hints, so new event kinds need nothing here; new record fields must be appended at the end.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import math
import typing
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from engine.events import EVENT_TYPES, Event, TraceFormatError, event_from_dict, event_to_dict
from engine.trace import RunInfo, Trace

EVENT_COLUMNS: dict[str, type] = {
    "step": int,
    "position": int,
    "token_id": int,
    "logprob": float,
    "entropy": float,
    "model_calls": int,
    "seconds": float,
}
_INT64 = range(-(2**63), 2**63)
_NESTED = (list, dict)  # the plain form's only containers


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Dataclass field name -> resolved type, in field order (ClassVars such as ``kind`` left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# kind -> name of the event's first bytes field, stored raw in the blob column instead of base64 text
_BLOB_FIELDS: dict[str, str] = {
    kind: next(name for name, tp in _field_types(cls).items() if tp is bytes)
    for kind, cls in EVENT_TYPES.items()
    if bytes in _field_types(cls).values()
}


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def fits_column(value: Any, tp: type) -> bool:
    """Whether a typed column (SQLite or PostgreSQL) gives ``value`` back exactly."""
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool) and value in _INT64
    # SQLite turns NaN into NULL and drops the sign of -0.0
    return isinstance(value, float) and not math.isnan(value) and (value != 0 or math.copysign(1.0, value) > 0)


@functools.cache
def _shape(tp: Any) -> tuple[Any, bool]:
    """A field type's list item type (None if not a list) and whether it is a record: typing's introspection is
    slow, and packing asks for every nested value of every event."""
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
    return item, dataclasses.is_dataclass(tp)


def _pack(value: Any, tp: Any) -> Any:
    """Plain (event_to_dict) form -> stored form: nested records become arrays in field order."""
    item, is_record = _shape(tp)
    if item is not None and isinstance(value, list):
        return [_pack(v, item) if type(v) in _NESTED else v for v in value]
    if is_record and isinstance(value, dict):
        return [_pack(value[name], hint) if type(value[name]) in _NESTED else value[name]
                for name, hint in _field_types(tp).items()]
    return value


def _unpack(value: Any, tp: Any) -> Any:
    """Stored form -> plain form; a shape that does not fit is passed on for event_from_dict to report."""
    if typing.get_origin(tp) is list and isinstance(value, list):
        return [_unpack(v, typing.get_args(tp)[0]) for v in value]
    if dataclasses.is_dataclass(tp) and isinstance(value, list):
        types = _field_types(tp)
        if len(value) <= len(types):  # shorter: written before trailing fields were added
            return {name: _unpack(v, hint) for (name, hint), v in zip(types.items(), value, strict=False)}
    return value


def event_row(event: Event) -> dict[str, Any]:
    """Column values of one event (without run_id and seq); every row has the same keys."""
    data = event_to_dict(event)
    kind = data.pop("kind")
    row: dict[str, Any] = {"kind": kind, "blob": None}
    for name, tp in EVENT_COLUMNS.items():
        row[name] = data.pop(name) if name in data and fits_column(data[name], tp) else None
    blob_field = _BLOB_FIELDS.get(kind)
    if blob_field is not None:
        del data[blob_field]
        row["blob"] = getattr(event, blob_field)
    types = _field_types(type(event))
    # only lists and records need packing: the other values, most of them, skip the call
    packed = {name: _pack(value, types[name]) if type(value) in _NESTED else value for name, value in data.items()}
    row["payload"] = dumps(packed)
    return row


def event_from_row(row: Mapping[str, Any], where: str) -> Event:
    try:
        data = json.loads(row["payload"])
    except ValueError as exc:
        raise TraceFormatError(f"{where}: payload is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TraceFormatError(f"{where}: payload must be a JSON object")
    cls = EVENT_TYPES.get(row["kind"])
    types = _field_types(cls) if cls is not None else {}  # an unknown kind is reported by event_from_dict
    data = {name: _unpack(value, types.get(name)) for name, value in data.items()}
    for name in EVENT_COLUMNS:
        if row[name] is not None:
            data[name] = row[name]
    blob_field = _BLOB_FIELDS.get(row["kind"])
    if blob_field is not None and row["blob"] is not None:
        data[blob_field] = base64.b64encode(row["blob"]).decode("ascii")
    data["kind"] = row["kind"]
    return event_from_dict(data, where)


def run_row(trace: Trace) -> dict[str, Any]:
    """Column values of a run; ``info`` keeps the RunInfo fields that have no column of their own."""
    info = asdict(trace.info)
    row = {name: info.pop(name) for name in ("created_at", "model", "decoder", "prompt")}
    row["params"] = dumps(info.pop("params"))
    row["seed"] = info.pop("seed") if info["seed"] is None or fits_column(info["seed"], int) else None
    # A branch's parent stays whole in ``info``; its run id and step are mirrored in columns for listing and lookups.
    parent = info["parent"] or {}
    row["parent_run_id"] = parent.get("run_id")
    row["branch_step"] = parent["step"] if fits_column(parent.get("step"), int) else None
    row.update(
        run_id=trace.run_id,
        status=trace.status,
        reason=trace.reason,
        prompt_token_ids=dumps(trace.prompt_token_ids),
        output_token_ids=dumps(trace.output_token_ids),
        output_text=trace.output_text,
        metrics=dumps(trace.metrics),
        info=dumps(info),
    )
    return row


def trace_from_rows(run: Mapping[str, Any], events: Iterable[Mapping[str, Any]], vocab: Iterable[Mapping[str, Any]]) -> Trace:
    run_id = run["run_id"]
    info_fields = {name: run[name] for name in ("created_at", "model", "decoder", "prompt", "seed")}
    info = RunInfo(params=json.loads(run["params"]), **{**info_fields, **json.loads(run["info"])})
    return Trace(
        run_id=run_id,
        info=info,
        events=[event_from_row(row, f"run {run_id} event {row['seq']}") for row in events],
        vocab={row["token_id"]: row["text"] for row in vocab},
        status=run["status"],
        reason=run["reason"],
        prompt_token_ids=json.loads(run["prompt_token_ids"]),
        output_token_ids=json.loads(run["output_token_ids"]),
        output_text=run["output_text"],
        metrics=json.loads(run["metrics"]),
    )


def check_vocab_ids(vocab: Mapping[int, str]) -> None:
    """Token ids are table keys, so they must fit a 64-bit column (files may hold any integer)."""
    for token_id in vocab:
        if not fits_column(token_id, int):
            raise TraceFormatError(f"vocab token id {str(token_id)[:40]} is out of range")

