"""Run a decoder on a model: lifecycle events, stop rules, cancellation, and recording into a trace."""

from __future__ import annotations

import platform
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
import transformers

from engine.attention import AttentionCapture
from engine.context import DecodeContext, Summary
from engine.decoders import all_decoders, get_decoder
from engine.events import Event, RunFinished, RunStarted
from engine.ffn import FfnCapture
from engine.limits import Limits, RunGuard, RunStopped, check_request
from engine.models.handle import LoadedModel
from engine.models.vision import encode_with_image
from engine.params import INT64_MAX, Param, ParamError, check_text
from engine.prompt_spans import prompt_passages
from engine.recorder import Recorder, TraceSink
from engine.trace import RunInfo, Trace, new_run_id


@dataclass(frozen=True)
class BranchPoint:
    """Where a branch leaves its parent run: after the parent's first ``step`` output tokens, ``token_id`` comes next."""

    parent_run_id: str
    step: int
    token_id: int
    prompt_ids: tuple[int, ...]  # the parent's prompt, its first ``step`` output tokens, then ``token_id``


def branch_point(parent: Trace, position: int, token_id: int) -> BranchPoint:
    """Continue ``parent`` from output ``position`` with ``token_id`` (the model's vocabulary is checked by Run)."""
    output = parent.output_token_ids
    if not 0 <= position <= len(output):
        raise ParamError(f"branch position must be between 0 and {len(output)} (run {parent.run_id[:12]} has "
                         f"{len(output)} output tokens), got {position}")
    if token_id < 0:
        raise ParamError(f"branch token id must be >= 0, got {token_id}")
    if parent.info.settings.get("image"):
        raise ParamError(f"run {parent.run_id[:12]} read an image, which its trace does not keep; it cannot be branched")
    prompt_ids = (*parent.prompt_token_ids, *output[:position], token_id)
    return BranchPoint(parent.run_id, position, token_id, prompt_ids)


# Run-level numbers are checked by the same schema code as decoder parameters; a seed must fit torch's generator.
_MAX_NEW_TOKENS = Param("max_new_tokens", "int", 64, "most tokens to generate", min=1, max=100_000)
_SEED = Param("seed", "int", 0, "seed of the run's random generator", min=0, max=INT64_MAX)
_RECORD_TOP_K = Param("record_top_k", "int", 20, "candidates recorded per step", min=1, max=1000)


@dataclass
class RunSettings:
    """Run-level settings shared by all decoders (decoder-specific ones live in its params)."""

    max_new_tokens: int = 64
    seed: int | None = 0
    chat: bool = False
    stop: Sequence[str] = ()
    record_top_k: int = 20
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    attention: AttentionCapture | None = None
    ffn: FfnCapture | None = None  # FFN activation sparsity per token
    image: str | None = None  # an image file for a vision-language model's prompt
    branch: BranchPoint | None = None  # start from a token of a stored run instead of the prompt text
    history: Sequence[tuple[str, str]] = ()  # earlier (user, assistant) chat turns before the prompt, such as a
    # few-shot example; needs chat
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse bad values with a ParamError, and type the numbers (the app's API passes what its caller sent)."""
        self.max_new_tokens = _MAX_NEW_TOKENS.parse(self.max_new_tokens)
        self.seed = None if self.seed is None else _SEED.parse(self.seed)
        self.record_top_k = _RECORD_TOP_K.parse(self.record_top_k)
        for stop in self.stop:
            check_text(stop, "a stop string")
        if self.history and not self.chat:
            raise ParamError("earlier chat turns (a few-shot example) need chat formatting on")
        if self.history and (self.image or self.branch is not None):
            raise ParamError("earlier chat turns go with a text prompt, not with an image or a branch")
        self.history = tuple((check_text(user, "an earlier chat turn"), check_text(answer, "an earlier chat turn"))
                             for user, answer in self.history)
        if self.branch is not None and self.image:
            raise ParamError("a branch continues its parent's token ids and cannot take an image; drop the image")


class Run:
    """One decoding run. Iterate it for events (the trace grows as you go), or call :meth:`to_end`.

    A decoder error or a cancel ends the run cleanly: the trace keeps everything recorded so far and
    its status says what happened (``failed`` with the reason, or ``cancelled``).
    """

    def __init__(
        self,
        model: LoadedModel,
        decoder: str,
        prompt: str,
        params: Mapping[str, Any] | None = None,
        settings: RunSettings | None = None,
        sinks: Sequence[TraceSink] = (),
        run_id: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.spec = get_decoder(decoder)
        self.params = self.spec.validate({} if params is None else params)
        check_text(prompt, "the prompt")
        self.settings = settings or RunSettings()
        self.settings.check()
        self.model = model
        # a run without a seed still records the one it drew, so it can be reproduced
        self.seed = self.settings.seed if self.settings.seed is not None else int(torch.seed() % 2**63)
        self.prompt_inputs: dict[str, torch.Tensor] = {}
        if self.settings.branch is not None:
            self.prompt_ids = _branch_prompt(model, self.settings.branch)
        elif self.settings.image:
            if not self.spec.accepts_images:
                accepting = ", ".join(s.name for s in all_decoders() if s.accepts_images)
                raise ParamError(f"decoder {decoder!r} reads text prompts only; prompts with an image work with {accepting}")
            self.prompt_ids, self.prompt_inputs = encode_with_image(model, prompt, self.settings.image, self.settings.chat)
        else:
            self.prompt_ids = model.encode(prompt, chat=self.settings.chat, history=self.settings.history)
        _check_context(model, len(self.prompt_ids), self.settings.max_new_tokens)
        if self.settings.attention is not None:
            self.settings.attention.check(model.num_layers, model.model.config.get_text_config().num_attention_heads)
        if self.settings.ffn is not None:
            self.settings.ffn.check(model.model)
        if limits is not None:  # the operator's caps, before any model work
            check_request(self.spec, self.params, self.settings, len(self.prompt_ids), limits)
        # checked before every model call: a cancel or a spent time budget stops the run within one call
        self.guard = RunGuard(max_seconds=limits.run_seconds if limits is not None else None)
        self.cancel_event = self.guard.cancel
        self._checked = 0  # output tokens already scanned for EOS
        self._summaries: list[Summary] = []  # the decoder's, recorded by _finish whatever ends the run
        self.error: Exception | None = None  # what ended a failed run (a front end reports a user error as such)
        info = RunInfo(
            model=model.name,
            decoder=decoder,
            params=self.params,
            prompt=prompt,
            seed=self.seed,
            chat=self.settings.chat,
            max_new_tokens=self.settings.max_new_tokens,
            model_info=model.info(),
            versions=software_versions(),
            settings=_settings_dict(self.settings),
            parent=_parent_dict(self.settings.branch),
        )
        self.trace = Trace(run_id=run_id or new_run_id(), info=info)
        self.recorder = Recorder(self.trace, model.token_text, sinks, decode=model.decode)

    def cancel(self) -> None:
        """Ask the run to stop after the current model call (thread-safe)."""
        self.cancel_event.set()

    def __iter__(self) -> Iterator[Event]:
        status, reason = "finished", ""
        events = self.guard.advance(self._events())
        try:
            for event in events:
                yield event
                if self.cancel_event.is_set():
                    status, reason = "cancelled", "stopped by the user"
                    break
                stop = self._stop_reason()
                if stop:
                    reason = stop
                    break
            else:
                reason = "decoder finished"
        except (KeyboardInterrupt, GeneratorExit):
            status, reason = "cancelled", "interrupted"
            self.cancel_event.set()  # nobody waits for the summary: it makes no more model calls
            self._finish(status, reason)
            raise
        except RunStopped as stop:  # raised at a model call
            status, reason = "cancelled", stop.reason
        except Exception as exc:  # the trace so far is kept and marked failed
            status, reason = "failed", f"{type(exc).__name__}: {exc}"
            self.error = exc
        finally:
            events.close()
        self._finish(status, reason)
        yield self.trace.events[-1]

    def to_end(self) -> Trace:
        for _ in self:
            pass
        return self.trace

    def _events(self) -> Iterator[Event]:
        started = RunStarted(prompt_token_ids=list(self.prompt_ids))
        self.recorder.record(started)
        yield started
        capture = self.settings.attention
        passages = None if capture is None else prompt_passages(self.model, self.prompt_ids, capture.passage_marker,
                                                                capture.question_marker)
        if passages is not None:
            self.recorder.record(passages)
            yield passages
        generator = torch.Generator().manual_seed(self.seed)
        ctx = DecodeContext(
            model=self.model,
            prompt_ids=list(self.prompt_ids),
            params=self.params,
            max_new_tokens=self.settings.max_new_tokens,
            eos_token_ids=set() if self.settings.ignore_eos else self.model.eos_token_ids,
            generator=generator,
            record_top_k=self.settings.record_top_k,
            attention=self.settings.attention,
            ffn=self.settings.ffn,
            cancel=self.cancel_event,
            prompt_inputs=self.prompt_inputs,
            summaries=self._summaries,
        )
        events = self.spec.run(ctx)
        try:
            for event in events:
                self.recorder.record(event)
                yield event
        finally:
            events.close()

    def _stop_reason(self) -> str:
        """EOS, stop strings and the token budget apply to every decoder's committed output."""
        output = self.trace.output_token_ids
        eos = set() if self.settings.ignore_eos else self.model.eos_token_ids
        for i in range(min(self._checked, len(output)), len(output)):
            if output[i] in eos:
                self.recorder.truncate_output(i + 1)
                return "end of sequence"
        self._checked = len(output)
        if self.settings.stop:
            text = self.model.decode(output)
            for stop in self.settings.stop:
                if stop and stop in text:
                    self._truncate_at_text(text.index(stop) + len(stop))
                    return f"stop string {stop!r}"
        if len(output) >= self.settings.max_new_tokens:
            self.recorder.truncate_output(self.settings.max_new_tokens)
            return "max_new_tokens reached"
        return ""

    def _record_summaries(self, status: str, reason: str) -> tuple[str, str]:
        """Record the decoder's summary metrics; a summary that raises fails a run that had not failed already."""
        try:
            for summary in self._summaries:
                for metric in self.guard.advance(metric for metric in summary()):  # model calls obey a cancel
                    self.recorder.record(metric)
        except RunStopped:  # cancelled or out of time: the metrics that needed a model call are left out
            pass
        except Exception as exc:
            if status != "failed":
                status, reason, self.error = "failed", f"{type(exc).__name__}: {exc}", exc
        return status, reason

    def _truncate_at_text(self, length: int) -> None:
        output = self.trace.output_token_ids
        for n in range(1, len(output) + 1):
            if len(self.model.decode(output[:n])) >= length:
                self.recorder.truncate_output(n)
                return

    def _finish(self, status: str, reason: str) -> None:
        status, reason = self._record_summaries(status, reason)
        self.recorder.record(RunFinished(status=status, reason=reason))
        self.recorder.close()


def record(
    model: LoadedModel,
    decoder: str,
    prompt: str,
    params: Mapping[str, Any] | None = None,
    settings: RunSettings | None = None,
    sinks: Sequence[TraceSink] = (),
) -> Trace:
    """Run a decoder to the end and return its trace."""
    return Run(model, decoder, prompt, params, settings, sinks).to_end()


def _check_context(model: LoadedModel, prompt_tokens: int, new_tokens: int) -> None:
    """Refuse, before any forward, a run whose prompt and budget do not fit the positions the model reads."""
    limit = model.context_length
    if limit is None or prompt_tokens + new_tokens <= limit:
        return
    advice = (f"lower max_new_tokens to {limit - prompt_tokens} or less" if prompt_tokens < limit
              else "shorten the prompt")
    raise ParamError(f"the prompt is {prompt_tokens} tokens and max_new_tokens is {new_tokens}, but {model.name} reads "
                     f"at most {limit} positions: {advice}")


def _branch_prompt(model: LoadedModel, branch: BranchPoint) -> list[int]:
    vocab = model.vocab_size
    if branch.token_id >= vocab:
        raise ParamError(f"branch token id {branch.token_id} is outside {model.name}'s vocabulary (ids 0 to {vocab - 1})")
    if any(not 0 <= t < vocab for t in branch.prompt_ids):
        raise ParamError(f"run {branch.parent_run_id[:12]}'s tokens do not fit {model.name}'s vocabulary; "
                         "branch it with the model that recorded it")
    return list(branch.prompt_ids)


def _parent_dict(branch: BranchPoint | None) -> dict[str, Any] | None:
    if branch is None:
        return None
    return {"run_id": branch.parent_run_id, "step": branch.step, "token_id": branch.token_id}


def software_versions() -> dict[str, str]:
    from engine import __version__

    return {
        "decoding_explorer": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def _settings_dict(settings: RunSettings) -> dict[str, Any]:
    capture = settings.attention
    return {
        "stop": list(settings.stop),
        "record_top_k": settings.record_top_k,
        "attention": None if capture is None else {"layers": capture.layers, "heads": capture.heads, "max_bytes": capture.max_bytes,
                                                   "passage_marker": capture.passage_marker,
                                                   "question_marker": capture.question_marker},
        "ffn": None if settings.ffn is None else settings.ffn.settings(),
        "image": Path(settings.image).name if settings.image else None,
        **({"history": [list(turn) for turn in settings.history]} if settings.history else {}),
        **settings.extra,
    }
