"""Constrained generation by adaptive weighted rejection sampling (AWRS), optionally inside sequential Monte Carlo.

Lipkin et al., "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (COLM
2025, arXiv 2504.05410), after genlm-control's ``AWRS`` (``recursive_awrs``) and ``SMC``. Each step targets
g(x) ∝ p(x | context) c(context + x): p is the processed next-token distribution (temperature, truncation), c the
Boolean constraint (EOS: the output is a complete match; any other token: the output is still a viable prefix).

- ``awrs``: walk the vocabulary in Gumbel-key order (sampling without replacement from p) and take the first token
  the constraint accepts, an exact sample from g. The weight increment is the recursive AWRS estimate of
  Z = Σ_x p(x) c(x): Ẑ = Π_rejected (1 - q_i) · (q_x if the next token in the order is rejected, else 1), with
  q = p / (mass not yet tried), unbiased for the price of that one extra check.
- ``mask``: check every token of the vocabulary, sample from the renormalised allowed set; Z is exact.

Particles' log-weights accumulate (with one particle the output is the locally normalised constrained sample);
they are resampled, multinomially, when the ESS falls below ``ess_threshold`` · N, and at the end one particle is
drawn by weight among those that completed a match. The winner is only known then, so the output comes as one
``Output`` event; each particle's token at each step is a ``ConstraintStep``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from engine.constraints import CONSTRAINT_TYPES, SHAPE_HELP, Constraint, allows, build_constraint
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Rows
from engine.event_arrays import effective_sample_size
from engine.events import ConstraintStep, DecoderMetric, Event, Output, Resampling
from engine.models.handle import LoadedModel
from engine.params import Param
from engine.processing import build_pipeline, process, sample
from engine.shared_params import PIPELINE_PARAMS

METHODS = ("awrs", "mask")
RECORDED_REJECTS = 64  # rejected tokens kept per ConstraintStep; ``checks`` still counts every one
_NEG_INF = float("-inf")
_TINY = torch.finfo(torch.float64).tiny  # a uniform draw of exactly 0 would give a -inf Gumbel key

PARAMS = (
    Param("constraint_type", "choice", "regex", "What the constraint is: a regular expression the whole output "
          "must match, or a JSON shape the output must be an object of.", choices=CONSTRAINT_TYPES),
    Param("constraint", "str", "(yes|no)", f"The regular expression, or a JSON shape: {SHAPE_HELP}."),
    Param("method", "choice", "awrs", "awrs: check tokens in sampled order until one passes (few checks); "
          "mask: check every token of the vocabulary, then sample from the allowed ones (the baseline).",
          choices=METHODS),
    Param("particles", "int", 1, "Sequential Monte Carlo particles (1 = one constrained sample, normalised at each "
          "step; more = weighted particles that correct towards the whole-sequence constrained distribution).", 1, 64, limit="samples"),
    Param("ess_threshold", "float", 0.5, "Resample when the effective sample size falls below this fraction of the "
          "particles (0 = never).", 0.0, 1.0),
    Param("max_rejects", "int", 0, "Give a particle up (weight 0) after this many rejected tokens in one step "
          "(0 = no limit; a limit saves checks but biases the weights).", 0, 1_000_000),
    *PIPELINE_PARAMS,
)


@dataclass(frozen=True)
class Draw:
    """One constrained token: ``token`` -1 when nothing was accepted (the particle's weight is then 0).

    ``shown`` = the rejected tokens (in the order tried, at most RECORDED_REJECTS), the accepted one, and for AWRS
    the next token in the order that was checked for the weight; ``log_z`` = log Ẑ (awrs) or log Z (mask).
    """

    token: int
    log_z: float
    shown: list[int]
    checks: int


def awrs_draw(
    logprobs: torch.Tensor, accepts: Callable[[int], bool], generator: torch.Generator, max_rejects: int = 0
) -> Draw:
    """Recursive AWRS over one [V] row of log-probs: an exact sample from p·c / Z and an unbiased Ẑ."""
    logp = logprobs.double()
    uniform = torch.rand(logp.shape, generator=generator, dtype=torch.float64).clamp_(min=_TINY)
    keys = logp - (-uniform.log()).log()
    order = keys.argsort(descending=True)[: int(torch.isfinite(logp).sum())]
    p = logp[order].exp()
    untried = p.flip(0).cumsum(0).flip(0)  # mass of this token and all after it: 1 - rejected mass, without cancellation
    q = (p / untried).clamp_(max=1.0).tolist()
    order_ids = order.tolist()
    log_w, rejected, checks = 0.0, [], 0
    for i, token in enumerate(order_ids):
        if max_rejects and i == max_rejects:
            break
        checks += 1
        if accepts(token):
            shown = rejected + [token]
            if q[i] < 1.0 and i + 1 < len(order_ids):  # q_x = 1: the factor q_x + (1 - q_x) c(y) is 1 either way
                checks += 1
                shown.append(order_ids[i + 1])
                if not accepts(order_ids[i + 1]):
                    log_w += math.log(q[i])
            return Draw(token, log_w, shown, checks)
        if len(rejected) < RECORDED_REJECTS:
            rejected.append(token)
        log_w += math.log1p(-q[i]) if q[i] < 1.0 else _NEG_INF
        if log_w == _NEG_INF:  # all the mass is rejected: what follows has probability 0
            break
    return Draw(-1, _NEG_INF, rejected, checks)


def mask_draw(logprobs: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator, shown_top: int) -> Draw:
    """Token masking: sample from p restricted to ``allowed`` ([V] bool, every token checked); Z is exact."""
    logp = logprobs.double()
    masked = logp.masked_fill(~allowed, _NEG_INF)
    log_z = float(masked.logsumexp(-1))
    top = logp.topk(min(shown_top, logp.shape[-1])).indices.tolist()
    rejected = [t for t in top if not allowed[t] and logp[t] > _NEG_INF]
    if log_z == _NEG_INF:
        return Draw(-1, _NEG_INF, rejected, int(allowed.numel()))
    token = int(sample(masked, generator))
    return Draw(token, log_z, rejected + [token], int(allowed.numel()))


class TokenChecker:
    """The constraint on token ids: decodes the output with the candidate appended, so a character spelt over
    several tokens is judged whole once its last byte arrives (before that its bytes read U+FFFD, which passes only
    where the constraint admits any character, e.g. inside a JSON string). EOS asks for a complete match; other
    special tokens, and ids the tokenizer does not know, are never allowed."""

    def __init__(self, model: LoadedModel, constraint: Constraint, ends: set[int]) -> None:
        self.tokenizer = model.tokenizer
        self.constraint = constraint
        self.ends = ends
        self.known = len(self.tokenizer)
        self.never = set(self.tokenizer.all_special_ids) - ends

    def accepts(self, output: list[int], token: int) -> bool:
        if token in self.ends:
            return allows(self.constraint, self._decode(output), end=True)
        if token >= self.known or token in self.never:
            return False
        return allows(self.constraint, self._decode(output + [token]), end=False)

    def allowed(self, output: list[int], vocab: int) -> torch.Tensor:
        """Every token of the vocabulary checked: [vocab] bool."""
        texts = self.tokenizer.batch_decode([output + [v] for v in range(min(vocab, self.known))],
                                            skip_special_tokens=False)
        can_end = allows(self.constraint, self._decode(output), end=True)
        flags = [
            can_end if v in self.ends else v < self.known and v not in self.never and allows(self.constraint, texts[v], end=False)
            for v in range(vocab)
        ]
        return torch.tensor(flags, dtype=torch.bool)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _draw_index(log_weights: Sequence[float], count: int, generator: torch.Generator) -> list[int]:
    """``count`` indices drawn with replacement in proportion to the weights."""
    w = torch.tensor(list(log_weights), dtype=torch.float64)
    return torch.multinomial((w - w.max()).exp(), count, replacement=True, generator=generator).tolist()


@dataclass
class _Particles:
    """The population: each particle's generated tokens, log-weight, and whether it stopped (and by completing)."""

    tokens: list[list[int]]
    log_w: list[float]
    done: list[bool]
    complete: list[bool]

    def reorder(self, ancestors: list[int]) -> None:
        mean = float(torch.tensor(self.log_w, dtype=torch.float64).logsumexp(0)) - math.log(len(ancestors))
        self.tokens = [list(self.tokens[a]) for a in ancestors]
        self.done = [self.done[a] for a in ancestors]
        self.complete = [self.complete[a] for a in ancestors]
        self.log_w = [mean] * len(ancestors)  # equal weights that keep the estimate of the normaliser

    def winner(self, generator: torch.Generator) -> int:
        """A particle drawn by weight among those that completed a match (else among the living, else any)."""
        n = len(self.log_w)
        pool = [i for i in range(n) if self.complete[i] and self.log_w[i] > _NEG_INF]
        pool = pool or [i for i in range(n) if self.log_w[i] > _NEG_INF] or list(range(n))
        if len(pool) == 1:
            return pool[0]
        return pool[_draw_index([self.log_w[i] for i in pool], 1, generator)[0]]


def constrained_decode(ctx: DecodeContext, constraint: Constraint) -> Iterator[Event]:
    """AWRS / masking with ``ctx.params`` (see PARAMS) under any constraint, a PredicateConstraint included."""
    params, model, generator = ctx.params, ctx.model, ctx.generator
    method, n = params["method"], params["particles"]
    stages = build_pipeline(params)
    checker = TokenChecker(model, constraint, set(ctx.eos_token_ids) | model.eos_token_ids)
    state = _Particles([[] for _ in range(n)], [0.0] * n, [False] * n, [False] * n)
    start = time.perf_counter()
    rows = Rows(ctx, n)  # the particles are rows of one batch: one forward extends them all
    checks, draws, z_values, resamplings = 0, 0, [], 0
    chosen: int | None = None  # the particle whose tokens are the output, once drawn

    def summary() -> Iterator[DecoderMetric]:
        yield DecoderMetric("constraint_checks", checks, "constraint evaluations, all particles")
        yield DecoderMetric("checks_per_token", checks / max(draws, 1), "constraint evaluations per drawn token")
        yield DecoderMetric("mean_z_hat" if method == "awrs" else "mean_z", sum(z_values) / max(len(z_values), 1),
                            "mean per-step weight increment: AWRS's estimate of the allowed mass (mask: exact)")
        if n > 1:
            yield DecoderMetric("resamplings", resamplings)
        if chosen is not None:
            yield DecoderMetric("constraint_satisfied", float(state.complete[chosen]), "1 = the output is a complete match")

    ctx.on_finish(summary)
    for step in range(ctx.max_new_tokens):
        processed = process(rows.logits, stages, context_ids=_contexts(ctx.prompt_ids, state.tokens))
        live = [i for i in range(n) if not state.done[i]]
        share = (time.perf_counter() - start) / len(live)
        for i in live:
            began = time.perf_counter()
            draw = _draw(method, processed.logprobs[i], state.tokens[i], checker, generator, params, ctx.record_top_k)
            state.log_w[i] += draw.log_z
            if draw.token >= 0:
                state.tokens[i].append(draw.token)
            state.done[i] = draw.token < 0 or draw.token in checker.ends
            state.complete[i] = draw.token in checker.ends
            checks, draws = checks + draw.checks, draws + 1
            z_values.append(math.exp(draw.log_z))
            yield ConstraintStep(
                step=step, particle=i, method=method, proposals=draw.shown, accepted=draw.token, checks=draw.checks,
                log_weight_increment=draw.log_z, log_weight=state.log_w[i],
                seconds=share + time.perf_counter() - began,
            )
        if all(state.done) or step + 1 == ctx.max_new_tokens:
            break
        ess = effective_sample_size(state.log_w)
        if n > 1 and ess < params["ess_threshold"] * n:
            ancestors = _draw_index(state.log_w, n, generator)
            yield Resampling(step=step, ess=ess, log_weights=list(state.log_w), ancestors=ancestors)
            state.reorder(ancestors)
            rows.reorder(ancestors)
            resamplings += 1
            if all(state.done):  # every ancestor had already stopped
                break
        start = time.perf_counter()
        rows.extend([(tokens or ctx.prompt_ids)[-1] for tokens in state.tokens])  # stopped particles idle
    chosen = state.winner(generator)
    yield Output(token_ids=list(state.tokens[chosen]), score=state.log_w[chosen])


def _draw(
    method: str, logprobs: torch.Tensor, output: list[int], checker: TokenChecker, generator: torch.Generator,
    params: dict, shown_top: int,
) -> Draw:
    if method == "mask":
        return mask_draw(logprobs, checker.allowed(output, logprobs.shape[-1]), generator, shown_top)
    return awrs_draw(logprobs, lambda token: checker.accepts(output, token), generator, params["max_rejects"])


def _contexts(prompt_ids: list[int], outputs: list[list[int]]) -> torch.Tensor:
    """[N, L] prompt + output ids, right-padded with -1 (repetition_penalty ignores ids outside the vocabulary)."""
    rows = [prompt_ids + tokens for tokens in outputs]
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)


def awrs(ctx: DecodeContext) -> Iterator[Event]:
    # Built before the first model call, so a bad pattern fails at once with its ParamError.
    return constrained_decode(ctx, build_constraint(ctx.params["constraint_type"], ctx.params["constraint"]))


SPEC = register(
    DecoderSpec(
        name="awrs",
        family="guided",
        summary="Constrained generation (regex or JSON shape) by adaptive weighted rejection sampling, optionally "
                "with SMC particles; or plain token masking (Lipkin et al., COLM 2025).",
        params=PARAMS,
        run=awrs,
    )
)
