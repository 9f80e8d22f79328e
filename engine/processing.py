"""The distribution-processing pipeline every sampling decoder uses.

Each stage reproduces one of transformers' logits processors (``generation/logits_process.py``): the same kept
sets and the same distributions. Where a token on the boundary could fall either way through float rounding, the
stage repeats transformers' arithmetic (sort direction, which softmax, how entropy is summed) so it falls the
same way. Stages run in transformers' order; :func:`process` also records what each stage did, for the trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from engine.events import StageReport
from engine.params import Param
from engine.shared_params import PIPELINE_PARAMS

_NEG_INF = float("-inf")
_TOP_H_CANDIDATES = 100  # transformers' TopHLogitsWarper.top_n: Top-H only looks at the 100 most likely tokens

Rule = Callable[[Tensor, float, Tensor | None], tuple[Tensor, Tensor | None]]


# ---------------------------------------------------------------- the rules, on [B, V] float32 logits


def _categorical(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(log-probs, probs) computed as torch.distributions.Categorical does, which transformers uses for entropy."""
    logp = logits - logits.logsumexp(-1, keepdim=True)
    return logp, logp.softmax(-1)


def _repetition_penalty(x: Tensor, penalty: float, context_ids: Tensor | None) -> tuple[Tensor, None]:
    if context_ids is None:
        raise ValueError("repetition_penalty needs context_ids (the prompt and the tokens generated so far)")
    batch, vocab = x.shape
    ids = context_ids.to(device=x.device, dtype=torch.long).expand(batch, -1)
    # Ids the output layer cannot produce (padding, an embedding table larger than the head) go to a spare column.
    ids = torch.where((ids >= 0) & (ids < vocab), ids, vocab)
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=x.device).scatter_(1, ids, True)[:, :vocab]
    return torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x), None


def _temperature(x: Tensor, t: float, _: Tensor | None) -> tuple[Tensor, None]:
    return x / t, None  # t >= the parameter's minimum 0.01: float32 logits cannot overflow


def _top_h(x: Tensor, top_h: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    top, top_ids = x.topk(min(_TOP_H_CANDIDATES, x.shape[-1]), dim=-1)  # sorted, most likely first
    _, q = _categorical(top)  # renormalised inside the top 100
    tau = entropy(top) * top_h
    # -q log q is nan where q underflows to 0; nan <= tau is False, so (as in transformers) those tokens go.
    chosen = (-q * q.log()).cumsum(-1) <= tau[:, None]
    chosen[:, 0] = True
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(1, top_ids, chosen)
    return x.masked_fill(~keep, _NEG_INF), tau


def _top_k(x: Tensor, k: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    kth = x.topk(min(int(k), x.shape[-1]), dim=-1).values[:, -1:]
    # Compared on logits: every token tied with the k-th survives.
    return x.masked_fill(x < kth, _NEG_INF), (kth - x.logsumexp(-1, keepdim=True)).exp()[:, 0]


def _top_p(x: Tensor, top_p: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    # Ascending sort and cumsum, as transformers: the tail summing to <= 1 - top_p goes, the top token always stays.
    ascending, order = x.sort(-1)
    probs = ascending.softmax(-1)
    drop = probs.cumsum(-1) <= 1 - top_p
    drop[:, -1] = False
    least_kept = probs.gather(1, drop.sum(-1, keepdim=True))[:, 0]
    return x.masked_fill(drop.scatter(1, order, drop), _NEG_INF), least_kept


def _min_p(x: Tensor, min_p: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    probs = x.softmax(-1)
    cut = min_p * probs.amax(-1, keepdim=True)
    # min_p <= 1, so the most likely token always passes: transformers' min_tokens_to_keep=1 never binds here.
    return x.masked_fill(probs < cut, _NEG_INF), cut[:, 0]


def _typical(x: Tensor, mass: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    logp = x.log_softmax(-1)
    ent = -(logp * logp.exp()).nansum(-1, keepdim=True)  # transformers' entropy here (nansum), not Categorical's
    deviation = (-logp - ent).abs()
    ascending, order = deviation.sort(-1)
    cumulative = x.gather(1, order).softmax(-1).cumsum(-1)
    # The token whose mass crosses `mass` is kept, and so is every token tied with its deviation; the
    # most typical token always passes, so min_tokens_to_keep=1 never binds.
    crossing = (cumulative < mass).sum(-1, keepdim=True).clamp_(max=x.shape[-1] - 1)
    drop = deviation > ascending.gather(1, crossing)
    # Report the largest deviation actually kept (finite even when the crossing index lands on a -inf entry).
    widest = deviation.masked_fill(drop | (x == _NEG_INF), _NEG_INF).amax(-1)
    return x.masked_fill(drop, _NEG_INF), widest


def _drop_below(x: Tensor, cut: Tensor) -> Tensor:
    # If nothing reaches the cut, the most likely token (and every token tied with its logit) stays.
    drop = (x.softmax(-1) < cut[:, None]) & (x < x.amax(-1, keepdim=True))
    return x.masked_fill(drop, _NEG_INF)


def _epsilon(x: Tensor, eps: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    cut = torch.full(x.shape[:1], eps, dtype=x.dtype, device=x.device)
    return _drop_below(x, cut), cut


def _eta(x: Tensor, eps: float, _: Tensor | None) -> tuple[Tensor, Tensor]:
    e = torch.tensor(eps, dtype=x.dtype, device=x.device)
    # The code's formula, not the docstring's sqrt(eps * exp(-H)); H in nats over the full vocabulary.
    cut = torch.minimum(e, e.sqrt() * (-entropy(x)).exp())
    return _drop_below(x, cut), cut


class _Spec(NamedTuple):
    # The decoder parameter that switches the stage on: its range is the stage's domain, and its default is the
    # value meaning "no stage" (a stage built at it passes the logits through).
    param: Param
    rule: Rule

    @property
    def key(self) -> str:
        return self.param.name

    @property
    def off(self) -> float:
        return self.param.default


_PARAMS = {p.name: p for p in PIPELINE_PARAMS}
_STAGES = {
    "repetition_penalty": _Spec(_PARAMS["repetition_penalty"], _repetition_penalty),
    "temperature": _Spec(_PARAMS["temperature"], _temperature),
    "top_h": _Spec(_PARAMS["top_h"], _top_h),
    "top_k": _Spec(_PARAMS["top_k"], _top_k),
    "top_p": _Spec(_PARAMS["top_p"], _top_p),
    "min_p": _Spec(_PARAMS["min_p"], _min_p),
    "typical": _Spec(_PARAMS["typical_p"], _typical),
    "epsilon": _Spec(_PARAMS["epsilon"], _epsilon),
    "eta": _Spec(_PARAMS["eta"], _eta),
}
PIPELINE_ORDER = tuple(_STAGES)  # transformers' order (repetition penalty, then the warpers of _get_logits_processor)
OFF_VALUES: dict[str, float] = {spec.key: spec.off for spec in _STAGES.values()}  # parameter -> the value meaning "off"
STAGE_PARAMS: dict[str, str] = {name: spec.key for name, spec in _STAGES.items()}  # stage -> its parameter


def _batched(t: Tensor) -> tuple[Tensor, bool]:
    return (t[None], True) if t.dim() == 1 else (t, False)


# ---------------------------------------------------------------- public API


@dataclass(frozen=True)
class Stage:
    """One processing stage; ``value`` is its parameter (top_k's k too, as a float), checked against the parameter's
    schema (ParamError, a ValueError, says what is allowed). At the parameter's off value the stage is the identity.

    The threshold :meth:`apply` reports per row: top_k the k-th probability, top_p the probability of the least
    likely kept token, min_p min_p * p_max, epsilon eps, eta the cut min(eps, sqrt(eps) e^-H), top_h tau in nats,
    typical the largest |surprisal - H| kept (nats); repetition_penalty and temperature have none.
    """

    name: str
    value: float

    def __post_init__(self) -> None:
        if self.name not in _STAGES:
            raise ValueError(f"unknown processing stage {self.name!r}; known: {', '.join(PIPELINE_ORDER)}")
        value = float(_STAGES[self.name].param.parse(self.value))
        object.__setattr__(self, "value", value)

    def apply(self, logits: Tensor, context_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(logits with removed entries at -inf, per-row cut value or None); [B, V] or [V] float logits.

        ``context_ids`` ([B, L], or [L] shared by all rows) is only read by repetition_penalty.
        """
        x, single = _batched(logits.float())
        spec = _STAGES[self.name]
        if self.value == spec.off:
            return x[0] if single else x, None
        out, threshold = spec.rule(x, self.value, context_ids)
        if single:
            return out[0], None if threshold is None else threshold[0]
        return out, threshold


def build_pipeline(params: Mapping[str, float]) -> list[Stage]:
    """The active stages for a decoder's parameters, in transformers' order; other keys are ignored."""
    stages = []
    for name, spec in _STAGES.items():
        value = params.get(spec.key)
        if value is not None and value != spec.off:
            stages.append(Stage(name, value))
    return stages


@dataclass
class StageResult:
    """What one stage did: ``keep`` = tokens alive after it (cumulative); ``kept_mass`` = their mass under the
    distribution the stage received; ``threshold`` = the stage's cut value per row, or None."""

    name: str
    keep: Tensor
    kept_mass: Tensor
    threshold: Tensor | None


@dataclass
class Processed:
    """Raw and processed log-probs (float32, -inf where removed) and the per-stage record.

    Tensors are [B, V] / [B], or [V] / scalar when :func:`process` got 1-D logits.
    """

    raw_logprobs: Tensor
    logprobs: Tensor
    stages: list[StageResult]


def process(logits: Tensor, stages: Sequence[Stage], context_ids: Tensor | None = None) -> Processed:
    """Run ``stages`` in the given order over [B, V] (or [V]) logits, recording each stage."""
    x, single = _batched(logits.float())
    pick = (lambda t: t[0]) if single else (lambda t: t)
    raw = x.log_softmax(-1)
    results = []
    for stage in stages:
        incoming = x.softmax(-1)
        x, threshold = stage.apply(x, context_ids)
        keep = x > _NEG_INF
        mass = (incoming * keep).sum(-1)
        results.append(StageResult(stage.name, pick(keep), pick(mass), None if threshold is None else pick(threshold)))
    final = raw if not stages else x.log_softmax(-1)  # no stages: the same tensor, computed once
    return Processed(pick(raw), pick(final), results)


def stage_reports(processed: Processed, candidate_ids: Sequence[int], row: int = 0) -> list[StageReport]:
    """One StageReport per stage for one row; bit i of ``survivors`` = candidate_ids[i] alive after the stage."""
    pick = (lambda t: t[row]) if processed.logprobs.dim() == 2 else (lambda t: t)
    ids = torch.as_tensor(list(candidate_ids), dtype=torch.long)
    reports = []
    for s in processed.stages:
        keep = pick(s.keep)
        survivors = sum(1 << i for i, alive in enumerate(keep[ids].tolist()) if alive)
        threshold = None if s.threshold is None else pick(s.threshold)
        reports.append(StageReport(s.name, int(keep.sum()), pick(s.kept_mass), survivors, threshold))
    return reports


def entropy(logprobs: Tensor) -> Tensor:
    """Entropy in nats per row (last dim); -inf entries count 0. Input need not be normalised (logits work too)."""
    logp, p = _categorical(logprobs)
    # Clamp as Categorical.entropy does: 0 * -inf would be nan, 0 * finfo.min is 0.
    return -(logp.clamp(min=torch.finfo(logp.dtype).min) * p).sum(-1)


def sample(logprobs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row ([B], or a scalar for [V]) drawn from softmax(logprobs).

    Drawn in float64: multinomial's cumulative sum and uniform draw then resolve probabilities far below float32's
    ~6e-8 step at 1.0, so tail tokens of a 100k+ vocabulary are sampled at their own rate, not rounded to 0 or 2^-24.
    """
    x, single = _batched(logprobs)
    probs = (x.double() - x.double().amax(-1, keepdim=True)).exp()  # multinomial normalises each row itself
    drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return drawn[0] if single else drawn


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> float:
    """KL(p || q) in nats between the softmax distributions of two logit vectors (rounding below 0 clipped)."""
    logp, logq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return max(0.0, float((logp.exp() * (logp - logq)).sum()))
