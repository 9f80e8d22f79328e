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

import codecs
import gc
import gzip
import itertools
import json
import re
import uuid
import zlib
from collections.abc import Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

from engine.events import (
    TRACE_FORMAT,
    TRACE_VERSION,
    Event,
    RunStatus,
    TraceFormatError,
    event_from_dict,
    event_to_dict,
)
from engine.files import write_atomically

TOP_LEVEL_KEYS = ("format", "version", "run", "vocab", "events")

# Import limits, checked while the file is read, so that memory stays bounded whatever a file holds.
MAX_IMPORT_BYTES = 512 * 1024 * 1024  # decompressed bytes, counted as they come out of gzip
MAX_EVENTS = 2_000_000
MAX_VALUE_CHARS = 16 * 2**20  # one event, the run object or the vocabulary: 16 MiB holds an 8 MB attention map
# Array items and object members in one such value (a run's output ids: 2 million tokens fit). Counted before each
# parse of a growing value, so no parse builds more than ~3 million objects (~200 MB were they all empty lists).
MAX_VALUE_ITEMS = 2_500_000
_READ_BYTES = 2**20
_MAX_ID_DIGITS = 19  # a token id is a 64-bit integer
_DECODER = json.JSONDecoder()  # NaN and +-Infinity read as floats, as dumps writes them
_BLANKS = ("", " ", "\t", "\n", "\r")
_NOT_BLANK = re.compile(r"[^ \t\n\r]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")


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
    unknown = set(doc) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise TraceFormatError(f"unknown top-level key(s) {sorted(unknown)!r:.200}; a trace has {list(TOP_LEVEL_KEYS)}")
    if doc.get("format") != TRACE_FORMAT:
        raise TraceFormatError(f"not a Decoding Explorer trace (format is {doc.get('format')!r:.60})")
    version = doc.get("version")
    if version != TRACE_VERSION:
        raise TraceFormatError(f"unsupported trace version {version!r:.60}; this build reads version {TRACE_VERSION}")
    run = _obj(doc.get("run"), "run")
    info = _run_info(_obj(run.get("info"), "run.info"))
    status = run.get("status")
    if status not in get_args(RunStatus):
        raise TraceFormatError(f"run.status {status!r:.60} is not one of {'/'.join(get_args(RunStatus))}")
    events_raw = doc.get("events")
    if not isinstance(events_raw, list):
        raise TraceFormatError("events must be a list")
    if len(events_raw) > MAX_EVENTS:
        raise TraceFormatError(f"too many events (more than {MAX_EVENTS:,})")
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
        if len(key) > _MAX_ID_DIGITS:  # int() of thousands of digits is slow, then refused by Python
            raise TraceFormatError(f"vocab token id {key:.40} is out of range")
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
    return _json(trace_to_dict(trace))


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=True)


def loads(text: str | bytes) -> Trace:
    """A trace from its JSON text, under the same limits as a file."""
    if isinstance(text, str):
        try:
            text = text.encode("utf-8")
        except UnicodeEncodeError:
            raise TraceFormatError("the trace holds a lone UTF-16 surrogate, which is not text") from None
    return _read_whole(TraceReader(_utf8_chunks([text], "the trace")))


def write_file(trace: Trace, path: str | Path, events: Iterable[Event] | None = None) -> Path:
    """Write the JSON trace, event by event; ``events`` (an iterator, say) replaces ``trace.events`` when given.
    A ``.gz`` suffix writes it gzip-compressed. The bytes are :func:`dumps`'s."""
    path = Path(path)
    head = dumps(replace(trace, events=[]))  # ends with the empty events list: '"events":[]}'

    def write(partial: Path) -> None:
        with (gzip.open(partial, "wb") if path.suffix == ".gz" else open(partial, "wb")) as fh:
            fh.write(head[: -len("]}")].encode("utf-8"))
            for i, event in enumerate(trace.events if events is None else events):
                fh.write((("," if i else "") + _json(event_to_dict(event))).encode("utf-8"))
            fh.write(b"]}")

    write_atomically(path, write)
    return path


def read_file(path: str | Path) -> Trace:
    """Read a JSON trace (gzip detected by its magic bytes), validated, all in memory: for samples and tests.
    Imports use :func:`stream_file`, which never holds more than a batch of events."""
    with stream_file(path) as reader:
        return _read_whole(reader)


def _read_whole(reader: TraceReader) -> Trace:
    reader.trace.events = list(reader.events())
    return reader.trace


@contextmanager
def stream_file(path: str | Path) -> Iterator[TraceReader]:
    """Open a trace file (gzip detected by its magic bytes) to read it piecewise; see :class:`TraceReader`."""
    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"no such trace file: {path}")
    chunks = _file_chunks(path)
    try:
        yield TraceReader(chunks)
    finally:
        chunks.close()


def _file_chunks(path: Path) -> Generator[str, None, None]:
    """The file's text in chunks, decompressed as it is read: past MAX_IMPORT_BYTES it stops with an error."""
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"

    def raw() -> Iterator[bytes]:
        total = 0
        try:
            with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as fh:
                while data := fh.read(_READ_BYTES):  # a gzip read decompresses at most this much
                    total += len(data)
                    if total > MAX_IMPORT_BYTES:
                        raise too_large
                    yield data
        except (OSError, EOFError, zlib.error) as exc:
            raise TraceFormatError(f"cannot read {path}: {exc}") from None

    too_large = TraceFormatError(f"{path} is larger than {MAX_IMPORT_BYTES / 2**20:g} MiB uncompressed")
    if gzipped:  # a bomb is refused by a pass that only decompresses (about 1 s per GB), before any parsing
        for _ in raw():
            pass
    elif path.stat().st_size > MAX_IMPORT_BYTES:
        raise too_large
    yield from _utf8_chunks(raw(), str(path))


def _utf8_chunks(raw: Iterable[bytes], name: str) -> Iterator[str]:
    """Decode UTF-8 (a leading BOM skipped) strictly: the bytes of a lone surrogate are not text."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        for data in raw:
            yield decoder.decode(data)
        yield decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise TraceFormatError(f"{name} is not UTF-8 text ({exc.reason})") from None


class TraceReader:
    """A trace read as it arrives, validated piece by piece so that memory holds one event at a time.

    ``trace`` is the run as soon as the reader is made: everything but its events, checked as :func:`trace_from_dict`
    checks it. The keys ``format``, ``version`` and ``run`` must come before ``events`` (as :func:`write_file` writes
    them); a file with its events first is refused rather than buffered, since the events are most of a file.
    ``vocab`` may come before or after the events: ``trace.vocab`` is complete once :meth:`events` is exhausted, which
    also checks that nothing follows the trace.
    """

    def __init__(self, chunks: Iterator[str]) -> None:
        self._text = _JsonText(chunks)
        self._keys = self._text.members("a trace file")
        self._seen: dict[str, Any] = {}
        self.trace = self._head()

    def _next_key(self) -> str | None:
        key = next(self._keys, None)
        if key is None:
            return None
        if key not in TOP_LEVEL_KEYS:  # refused before its value is read: a bomb under an unknown key costs nothing
            raise TraceFormatError(f"unknown top-level key {key!r:.60}; a trace has {list(TOP_LEVEL_KEYS)}")
        if key in self._seen:
            raise TraceFormatError(f"top-level key {key!r} appears twice")
        self._seen[key] = None
        return key

    def _head(self) -> Trace:
        while (key := self._next_key()) != "events":
            if key is None:
                raise TraceFormatError("events must be a list")
            self._seen[key] = self._text.value(key)
        missing = [key for key in ("format", "version", "run") if key not in self._seen]
        if missing:
            raise TraceFormatError(f"{', '.join(missing)} must come before events (the order an export writes)")
        return trace_from_dict({**self._seen, "vocab": self._seen.get("vocab", {}), "events": []})

    def events(self) -> Iterator[Event]:
        """The events in order, each validated as it is read; then the rest of the file."""
        for i, raw in enumerate(self._text.items("events")):
            if i >= MAX_EVENTS:
                raise TraceFormatError(f"too many events (more than {MAX_EVENTS:,})")
            yield event_from_dict(raw, f"events[{i}]")
        while (key := self._next_key()) is not None:
            self._seen[key] = self._text.value(key)
            self.trace.vocab = _vocab(self._seen[key])  # only vocab is left: the others come before events
        if "vocab" not in self._seen:
            raise TraceFormatError("vocab must be an object")
        self._text.end("a trace file")


class _JsonText:
    """JSON text read piecewise from str chunks. The standard library's C scanner parses each value; this class only
    steps through one object's members and one array's items, so it holds one value at a time, never the whole text.

    Limits are checked as the text arrives: a value longer than MAX_VALUE_CHARS, or one with more than MAX_VALUE_ITEMS
    items (counted by their commas), is refused before it is all read, so no parse builds more than a bounded number
    of objects; nesting deeper than Python's recursion limit is refused by the scanner itself.
    """

    def __init__(self, chunks: Iterator[str]) -> None:
        self._chunks = chunks
        self._buf = ""
        self._pos = 0
        self._offset = 0  # characters dropped from the front of the buffer, for error positions
        self._eof = False

    def _more(self) -> bool:
        """Append the next chunk, dropping what was consumed; False at the end of the text."""
        chunk = next(self._chunks, None)
        if chunk is None:
            self._eof = True
            return False
        self._offset += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def _peek(self) -> str:
        """The next character that is not blank, left unconsumed ('' at the end of the text)."""
        while True:
            if self._buf[self._pos : self._pos + 1] not in _BLANKS:  # compact JSON: nothing to skip
                return self._buf[self._pos]
            match = _NOT_BLANK.search(self._buf, self._pos)
            if match:
                self._pos = match.start()
                return match.group()
            self._pos = len(self._buf)
            if not self._more():
                return ""

    def _expect(self, chars: str, where: str) -> str:
        found = self._peek()
        if not found or found not in chars:
            wanted = " or ".join(repr(c) for c in chars)
            raise TraceFormatError(f"{where}: expected {wanted} at character {self._offset + self._pos}, "
                                   f"found {found!r}" if found else f"{where}: the text ends before {wanted}")
        self._pos += 1
        return found

    def value(self, where: str) -> Any:
        """Parse the next value."""
        self._peek()
        while True:
            try:
                with _collector_paused():
                    value, stop = _DECODER.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                if self._eof or not _maybe_cut_short(exc, len(self._buf)):
                    at = self._offset + exc.pos
                    raise TraceFormatError(f"{where}: not valid JSON: {exc.msg} at character {at}") from None
                stop = None
            except RecursionError:
                raise TraceFormatError(f"{where}: JSON nested too deeply") from None
            except ValueError as exc:  # an integer past Python's digit limit
                raise TraceFormatError(f"{where}: {exc}") from None
            if stop is not None and (stop < len(self._buf) or self._eof):  # else a number cut at the end may go on
                self._check_size(stop, where)
                _check_text(value, self._buf, self._pos, stop, where)
                self._pos = stop
                return value
            self._read_more(where)

    def _read_more(self, where: str) -> None:
        """Check the limits on the incomplete value's text so far (it is all that value's), then read one chunk more.

        One chunk, not as much again: the buffer then never holds more than a chunk past the value, which the next
        values are parsed from unchecked. A value of n chunks is parsed n times, which only long values pay."""
        self._check_size(len(self._buf), where)
        self._more()

    def _check_size(self, end: int, where: str) -> None:
        """The limits on the value whose text runs from the read position to ``end`` (so far, if it is incomplete)."""
        if end - self._pos > MAX_VALUE_CHARS:
            raise TraceFormatError(f"{where} is longer than {MAX_VALUE_CHARS:,} characters of JSON")
        if self._buf.count(",", self._pos, end) > MAX_VALUE_ITEMS:  # commas in strings count too: a safe bound
            raise TraceFormatError(f"{where} holds more than {MAX_VALUE_ITEMS:,} items")

    def members(self, where: str) -> Iterator[str]:
        """An object's keys in order; the caller reads each key's value before it asks for the next key."""
        if self._peek() != "{":
            raise TraceFormatError(f"{where} must hold one JSON object")
        self._pos += 1
        if self._peek() == "}":
            self._pos += 1
            return
        while True:
            if self._peek() != '"':
                self._expect('"', where)  # raises: a key is a string
            key = self.value(f"a key of {where}")
            self._expect(":", where)
            yield key
            if self._expect(",}", where) == "}":
                return

    def items(self, where: str) -> Iterator[Any]:
        """An array's items in order."""
        if self._peek() != "[":
            raise TraceFormatError(f"{where} must be a list")
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            return
        for i in itertools.count():
            yield self.value(f"{where}[{i}]")
            if self._expect(",]", where) == "]":
                return

    def end(self, where: str) -> None:
        if self._peek():
            at = self._offset + self._pos
            raise TraceFormatError(f"{where} holds more after its JSON object (at character {at})")


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: json builds no cycles, and in a large process (the app) the collections
    that a value of a million containers sets off take seconds (3.3 s against 0.15 s for a 4 MB bomb)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _maybe_cut_short(error: json.JSONDecodeError, end: int) -> bool:
    """Whether a decoding error may only mean that the buffered text ends too soon: an unterminated string, or an error
    so near the end that a token cut there ("-Infinit", "1e", half a "\\uD83D\\uDE00" pair) could explain it."""
    return error.msg.startswith("Unterminated string") or error.pos >= end - 16


def _check_text(value: Any, text: str, start: int, stop: int, where: str) -> None:
    """Refuse a lone UTF-16 surrogate in any string: it is not text, and no UTF-8 column can store it.

    The text was decoded strictly, so only a ``\\uD800``-``\\uDFFF`` escape can make one: the exact check runs only on
    a value whose text holds such an escape.
    """
    if text.find("\\u", start, stop) < 0 or _SURROGATE_ESCAPE.search(text, start, stop) is None:
        return
    try:
        _json(value).encode("utf-8")
    except UnicodeEncodeError:
        raise TraceFormatError(f"{where}: a string holds a lone UTF-16 surrogate, which is not text") from None
