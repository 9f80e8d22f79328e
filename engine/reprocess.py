"""Live re-processing of a recorded step: apply other sampling settings to its distribution without decoding again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from engine.events import StageReport, TokenStep, r7
from engine.models.handle import LoadedModel
from engine.params import ParamError
from engine.processing import OFF_VALUES, Processed, Stage, build_pipeline, entropy, process, stage_reports
from engine.trace import Trace


@dataclass(frozen=True)
class StageCut:
    """What one stage did under the new settings: tokens it kept (over the whole vocabulary when exact, over the
    recorded candidates when approximate), their mass under the distribution the stage received, its threshold,
    and which of the shown candidates survived it (cumulative)."""

    name: str
    kept: int
    mass: float
    threshold: float | None
    survivors: tuple[bool, ...]


@dataclass(frozen=True)
class Reprocessed:
    """A recorded step's distribution processed with ``settings``. ``token_ids``/``raw_probs``/``probs`` are the
    shown candidates (most probable raw first); ``exact`` is False when computed from the recorded top candidates
    only (replay without the model), in which case the candidates' raw mass is renormalised and ``covered_mass``
    says how much of the true distribution they held."""

    position: int
    settings: dict[str, float]
    token_ids: tuple[int, ...]
    texts: tuple[str, ...]
    raw_probs: tuple[float, ...]
    probs: tuple[float, ...]
    stages: tuple[StageCut, ...]
    entropy_raw: float
    entropy: float
    exact: bool
    covered_mass: float
    chosen_token_id: int


SETTING_KEYS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "top_h", "repetition_penalty")
_RECOMPUTE_TOLERANCE = 1e-3  # recorded vs recomputed raw probabilities: float32 cache-vs-full-forward noise is ~1e-6


def recorded_settings(trace: Trace) -> dict[str, float]:
    """The run's own sampling settings (off values where its decoder has no such parameter)."""
    return {key: float(trace.info.params.get(key, OFF_VALUES[key])) for key in SETTING_KEYS}


def reprocess_step(
    trace: Trace,
    position: int,
    settings: Mapping[str, float],
    model: LoadedModel | None = None,
    shown: int = 20,
) -> Reprocessed:
    """The distribution at output ``position`` processed with ``settings`` (keys of SETTING_KEYS, missing = off).

    Exact when ``model`` reproduces the recorded step (same vocabulary, and a plain forward over the prompt and the
    output before ``position`` gives the recorded raw probabilities: token-level decoders without steering); else
    approximate, from the step's recorded candidates renormalised. repetition_penalty needs exact mode.
    """
    step = _token_step(trace, position)
    values = _checked_settings(settings)
    if shown < 1:
        raise ParamError(f"shown must be at least 1, got {shown}")
    logits = None if model is None else _exact_logits(trace, step, model)
    if logits is None and values["repetition_penalty"] != OFF_VALUES["repetition_penalty"]:
        raise ParamError("repetition_penalty needs the model that recorded the run (it reads the whole context)")
    stages = _stages(values)
    common = {"position": position, "settings": values, "chosen_token_id": step.token_id}
    if logits is not None:
        context = torch.tensor(trace.prompt_token_ids + trace.output_token_ids[:position])
        processed = process(logits, stages, context_ids=context)
        return _result(processed, range(logits.shape[-1]), model.token_text, shown, exact=True, covered_mass=1.0, **common)
    candidates = sorted(step.candidates, key=lambda c: -c.raw_prob)
    recorded = torch.tensor([c.raw_prob for c in candidates], dtype=torch.float64)
    processed = process(recorded.log(), stages)  # renormalised: process's raw log-probs are a log_softmax
    ids = [c.token_id for c in candidates]
    covered = r7(recorded.sum())
    return _result(processed, ids, lambda t: trace.text_of([t]), shown, exact=False, covered_mass=covered, **common)


def _token_step(trace: Trace, position: int) -> TokenStep:
    steps = [e for e in trace.events if isinstance(e, TokenStep) and e.position == position]
    if not steps:
        raise ParamError(f"run {trace.run_id[:12]} has no token step at output position {position}")
    return steps[-1]  # a decoder that revisits a position records its final distribution last


def _checked_settings(settings: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(settings) - set(SETTING_KEYS))
    if unknown:
        raise ParamError(f"unknown setting(s) {', '.join(unknown)}; reprocessing takes {', '.join(SETTING_KEYS)}")
    try:
        return {key: float(settings.get(key, OFF_VALUES[key])) for key in SETTING_KEYS}
    except (TypeError, ValueError):
        raise ParamError(f"reprocessing settings must be numbers, got {dict(settings)!r:.200}") from None


def _stages(values: Mapping[str, float]) -> list[Stage]:
    try:
        return build_pipeline(values)
    except ValueError as error:
        raise ParamError(str(error)) from None


def _exact_logits(trace: Trace, step: TokenStep, model: LoadedModel) -> torch.Tensor | None:
    """The full logits at the step recomputed with ``model``, or None when they would not be the recorded ones."""
    vocab = model.vocab_size
    ids = [c.token_id for c in step.candidates]
    if (
        trace.info.model_info.get("vocab_size") != vocab
        or trace.info.settings.get("image")  # the image's pixels are not in the trace
        or step.position > len(trace.output_token_ids)
        or not all(0 <= t < vocab for t in ids + trace.prompt_token_ids + trace.output_token_ids)
    ):
        return None
    context = trace.prompt_token_ids + trace.output_token_ids[: step.position]
    logits = model.forward(torch.tensor([context]), keep=1).logits[0, -1]
    recomputed = logits.double().softmax(-1)[ids]
    recorded = torch.tensor([c.raw_prob for c in step.candidates], dtype=torch.float64)
    return logits if torch.allclose(recomputed, recorded, rtol=0, atol=_RECOMPUTE_TOLERANCE) else None


def _result(processed: Processed, ids: Sequence[int], text: Callable[[int], str], shown: int, **fields: Any) -> Reprocessed:
    """``ids`` maps the entries of ``processed`` (the whole vocabulary, or the recorded candidates) to token ids."""
    top_raw, order = processed.raw_logprobs.topk(min(shown, len(ids)))
    rows = order.tolist()
    token_ids = tuple(ids[row] for row in rows)
    return Reprocessed(
        token_ids=token_ids,
        texts=tuple(text(t) for t in token_ids),
        raw_probs=tuple(r7(p) for p in top_raw.exp().tolist()),
        probs=tuple(r7(p) for p in processed.logprobs[order].exp().tolist()),
        stages=tuple(_cut(report, len(rows)) for report in stage_reports(processed, rows)),
        entropy_raw=r7(entropy(processed.raw_logprobs)),
        entropy=r7(entropy(processed.logprobs)),
        **fields,
    )


def _cut(report: StageReport, shown: int) -> StageCut:
    survivors = tuple(bool(report.survivors >> i & 1) for i in range(shown))
    return StageCut(report.name, report.kept, report.mass, report.threshold, survivors)
