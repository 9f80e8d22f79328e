"""The hostile-trace corpus: copies of the shipped samples with an attacker's text in every free-text field, and
traces that are broken on purpose (bombs, unknown keys, surrogates, huge numbers, deep nesting). Written at test
time, so the corpus follows the samples and the trace format."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
from pathlib import Path
from typing import Any

from engine.events import event_from_dict
from engine.trace import read_file, trace_to_dict
from ui.samples import SAMPLES_DIR

EVIL_HOST = "evil.example"
# The run's reason is shown in the status line of every view: the payload of the report, kept verbatim.
REASON = "![pixel](http://evil.example/reason.png) [phish](https://evil.example/login)"
PROMPT = "<img src=http://evil.example/prompt.png onerror=alert('prompt')> **bold** `code` $$x$$"
# A terminal would clear itself and show a link: the command line's views must print it escaped.
TERMINAL = "\x1b[2J\x1b]8;;http://evil.example/term\x07terminal link\x1b]8;;\x07"
HOSTILE_TEXTS = [
    "![md](http://evil.example/md.png)",
    "<img src=http://evil.example/img.png onerror=alert(1)>",
    "<script>alert(2)</script>",
    "[js](javascript:alert(3))",
    "<a href='javascript:alert(4)'>click</a>",
    "<iframe src=http://evil.example/frame></iframe>",
    "<style>*{background:url(http://evil.example/css.png)}</style>",
    "$$\\href{http://evil.example/tex}{x}$$",
    "<svg onload=alert(5)>",
    "nul\x00byte",
    "\u202eright-to-left override",
    TERMINAL,
]
# Strings the viewer dispatches on or decodes, not free text: the copy keeps them.
STRUCTURAL = {"kind", "status", "format", "run_id", "created_at", "decoder", "method", "data", "nll", "evicted"}


def hostile_copy(sample: Path) -> dict[str, Any]:
    """The sample's trace with every free-text string replaced by a hostile one, where the event schema takes it
    (an event whose field only takes fixed values keeps that value); the vocabulary is all hostile text."""
    doc = trace_to_dict(read_file(sample))
    texts = itertools.cycle(HOSTILE_TEXTS)
    doc["run"] = _replaced(doc["run"], texts)
    doc["run"]["reason"] = REASON
    doc["run"]["output_text"] = TERMINAL
    doc["run"]["info"]["prompt"] = PROMPT
    doc["run"]["info"]["model"] = next(texts)
    doc["vocab"] = {key: next(texts) for key in doc["vocab"]}
    doc["events"] = [_hostile_event(event, texts) for event in doc["events"]]
    return doc


def _hostile_event(event: dict[str, Any], texts: itertools.cycle) -> dict[str, Any]:
    changed = _replaced(event, texts)
    try:
        event_from_dict(changed)
    except ValueError:  # a Literal field: the schema refuses free text there, as it should
        return event
    return changed


def _replaced(value: Any, texts: itertools.cycle, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _replaced(v, texts, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replaced(v, texts, key) for v in value]
    if isinstance(value, str) and key not in STRUCTURAL:
        return next(texts)
    return value


def write_gz(doc: Any, path: Path, text: str | None = None) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps(doc) if text is None else text)
    return path


def broken_traces(folder: Path) -> dict[str, Path]:
    """Traces an import must refuse, each with a one-line message, storing nothing."""
    base = trace_to_dict(read_file(sorted(SAMPLES_DIR.glob("top-p*.json.gz"))[0]))
    first_float = next(k for k, v in base["events"][1].items() if isinstance(v, float))
    cases: dict[str, Any] = {}
    cases["unknown-top-level-key"] = {**base, "payload": {"x": 1}}
    cases["lone-surrogate-in-prompt"] = _with(base, lambda d: d["run"]["info"].__setitem__("prompt", "a\ud800b"))
    cases["lone-surrogate-in-vocab"] = _with(base, lambda d: d["vocab"].__setitem__("1", "\udfff"))
    cases["400-digit-float"] = _with(base, lambda d: d["events"][1].__setitem__(first_float, 10**400))
    cases["5000-digit-vocab-key"] = _with(base, lambda d: d["vocab"].__setitem__("9" * 5000, "x"))
    paths = {name: write_gz(doc, folder / f"{name}.json.gz") for name, doc in cases.items()}
    paths["deep-nesting"] = write_gz(None, folder / "deep-nesting.json.gz", text="[" * 200_000 + "]" * 200_000)
    paths["bomb"] = _bomb(folder / "bomb.json.gz", base)
    return paths


def _with(doc: dict[str, Any], change: Any) -> dict[str, Any]:
    changed = copy.deepcopy(doc)
    change(changed)
    return changed


def _bomb(path: Path, base: dict[str, Any], inflated_mb: int = 1100) -> Path:
    """A valid-looking trace whose events list inflates to about a gigabyte from about a megabyte of gzip."""
    head = json.dumps({k: v for k, v in base.items() if k != "events"})[:-1] + ',"events":['
    event = json.dumps(base["events"][1])
    chunk = ("," + event) * (2**20 // (len(event) + 1))  # about 1 MB of events
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=9) as fh:
        fh.write(head + event)
        for _ in range(inflated_mb):
            fh.write(chunk)
        fh.write("]}")
    return path
