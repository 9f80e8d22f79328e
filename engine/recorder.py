"""Events -> Trace, in memory, streamed to sinks (storage, UI, JSON) while the run proceeds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Mapping, Protocol, Sequence

from engine.events import DecoderMetric, DraftRound, Event, Output, RunFinished, RunStarted, TokenStep, token_ids_of
from engine.trace import Trace


class TraceSink(Protocol):
    """Receives a trace as it grows. ``append`` gets the new events and the token texts first seen in them."""

    def open(self, trace: Trace) -> None: ...

    def append(self, trace: Trace, events: Sequence[Event], vocab: Mapping[int, str]) -> None: ...

    def close(self, trace: Trace) -> None: ...


def depth_outcomes(rnd: DraftRound) -> list[tuple[int, bool]]:
    """(depth, accepted) for each draft level the target tried in a round, shallowest first.

    A level counts once however many siblings it had (a tree's acceptance rate is the chance of advancing a
    level), and only where the verifier looked: levels below a rejection were never tried.
    """
    levels = sorted({n.depth for n in rnd.nodes if n.accepted is not None})
    reached = len(rnd.accepted_path)
    return [(depth, depth <= reached) for depth in levels]


class Recorder:
    """Applies each event to the trace (output, metrics, vocabulary) and forwards batches to sinks.

    Sinks are flushed at least every ``flush_seconds`` so a crash loses at most that much, and always at
    the end of the run; the output text is decoded at each flush, so partial runs show their text too.
    """

    def __init__(
        self,
        trace: Trace,
        token_text: Callable[[int], str],
        sinks: Sequence[TraceSink] = (),
        flush_seconds: float = 0.5,
        decode: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.trace = trace
        self._token_text = token_text
        self._decode = decode or trace.text_of
        self._sinks = list(sinks)
        self._flush_seconds = flush_seconds
        self._pending: list[Event] = []
        self._pending_vocab: dict[int, str] = {}
        self._last_flush = time.monotonic()
        self._calls = {"model_calls": 0, "draft_calls": 0, "decode_seconds": 0.0}
        self._rounds: list[int] = []
        # per draft depth: rounds whose accepted path reached the depth's parent level and had a node there, and
        # how many of those accepted one
        self._depth_tried: list[int] = []
        self._depth_accepted: list[int] = []
        self._decoder_metrics: dict[str, float] = {}
        for sink in self._sinks:
            sink.open(trace)

    def record(self, event: Event) -> None:
        trace = self.trace
        trace.events.append(event)
        for token_id in token_ids_of(event) - trace.vocab.keys():
            trace.vocab[token_id] = self._pending_vocab[token_id] = self._token_text(token_id)
        self._apply(event)
        self._pending.append(event)
        if isinstance(event, RunFinished) or time.monotonic() - self._last_flush >= self._flush_seconds:
            self.flush()

    def _apply(self, event: Event) -> None:
        trace = self.trace
        if isinstance(event, RunStarted):
            trace.prompt_token_ids = list(event.prompt_token_ids)
        elif isinstance(event, TokenStep) and event.committed:
            trace.output_token_ids.append(event.token_id)
        elif isinstance(event, DraftRound):
            trace.output_token_ids.extend(event.committed)
            self._rounds.append(len(event.committed))
            self._calls["draft_calls"] += event.draft_calls
            self._count_depths(event)
        elif isinstance(event, DecoderMetric):
            self._decoder_metrics[event.name] = event.value
        elif isinstance(event, Output):
            trace.output_token_ids = list(event.token_ids)
        elif isinstance(event, RunFinished):
            trace.status = event.status
            trace.reason = event.reason
        # every step event carries its cost; lifecycle events carry none
        self._calls["model_calls"] += getattr(event, "model_calls", 0)
        self._calls["decode_seconds"] += getattr(event, "seconds", 0.0)
        self._update_metrics()

    def _count_depths(self, event: DraftRound) -> None:
        for depth, accepted in depth_outcomes(event):
            while len(self._depth_tried) < depth:
                self._depth_tried.append(0)
                self._depth_accepted.append(0)
            self._depth_tried[depth - 1] += 1
            self._depth_accepted[depth - 1] += accepted

    def truncate_output(self, length: int) -> None:
        """Drop committed tokens past a stop point (EOS or the token budget inside a multi-token step)."""
        del self.trace.output_token_ids[length:]
        self._update_metrics()

    def _update_metrics(self) -> None:
        seconds = self._calls["decode_seconds"]
        new_tokens = len(self.trace.output_token_ids)
        metrics = {
            "model_calls": self._calls["model_calls"],
            "new_tokens": new_tokens,
            "decode_seconds": round(seconds, 6),
            "tokens_per_second": round(new_tokens / seconds, 3) if seconds > 0 else 0.0,
            "tokens_per_call": round(new_tokens / self._calls["model_calls"], 4) if self._calls["model_calls"] else 0.0,
        }
        if self._rounds:
            metrics["draft_calls"] = self._calls["draft_calls"]
            metrics["rounds"] = len(self._rounds)
            metrics["mean_accepted_tokens"] = round(sum(self._rounds) / len(self._rounds), 4)
            if self._depth_tried:
                metrics["acceptance_rate"] = round(sum(self._depth_accepted) / sum(self._depth_tried), 4)
            for depth, (tried, accepted) in enumerate(zip(self._depth_tried, self._depth_accepted), start=1):
                metrics[f"acceptance_depth_{depth}"] = round(accepted / tried, 4)
        metrics.update(self._decoder_metrics)
        self.trace.metrics = metrics

    def flush(self) -> None:
        self.trace.output_text = self._decode(self.trace.output_token_ids)
        if self._pending or self._pending_vocab:
            for sink in self._sinks:
                sink.append(self.trace, self._pending, self._pending_vocab)
        self._pending = []
        self._pending_vocab = {}
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        for sink in self._sinks:
            sink.close(self.trace)


@contextmanager
def run_ending(recorder: Recorder, done: str) -> Iterator[None]:
    """Record how a run recorded outside the decoder loop (a search, a bench) ends, whatever ends it: finished
    (reason ``done``), cancelled by Ctrl-C, or failed with the error; then flush and close the sinks, so what was
    recorded so far is kept."""
    status, reason = "failed", "interrupted"
    try:
        yield
        status, reason = "finished", done
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        raise
    finally:
        recorder.record(RunFinished(status=status, reason=reason))
        recorder.close()
