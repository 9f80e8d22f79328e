"""Self-speculation by layer skipping (Draft & Verify, Zhang et al. ACL 2024; SWIFT, Xia et al. ICLR 2025).

The draft is the target itself with a set of decoder layers skipped (identity residual), weights and KV cache shared
as in Draft & Verify: the kept layers read the target's KV of the verified context, and the positions a draft adds
are cropped before the target verifies (:class:`engine.speculative.skip.SharedSkipCache`). A draft needs no prefill
of its own, so it runs from the second round, once the target holds the prompt. It drafts up to
``num_draft_tokens`` tokens and stops early once its probability for the token it just drafted is below
``stop_threshold`` (SWIFT's top-1 confidence stop under greedy decoding); the full model verifies the chain in one
forward (speculative.md §0.1, §11). Verification is standard: lossless.

The skip set is given, or found training-free on the prompt itself, SWIFT-style but small. The target runs the
prompt but its last ``context_window`` tokens (the first round reuses that cache); a candidate set of
``round(skip_ratio * layers)`` layers scores the fraction of those last positions where the skipped model's greedy
next token (teacher-forced on the target's KV of the earlier prompt, as it drafts) equals the full model's. Half of
the ``search_iterations`` candidates are random sets, the rest refine the best set so far by swapping one skipped
layer for a kept one (a move is kept unless it scores worse). The search draws from its own fixed-seed generator, so
a scored choice depends on the prompt only.

The search is cost-aware: it may spend at most ``search_budget`` of the run's expected greedy time
(``max_new_tokens`` one-token target steps, one of them timed) at the measured cost of scoring a set; a run that
cannot afford two sets takes ``num_skip`` layers spread evenly over the depth (the first and the last kept, as Draft
& Verify found them the most needed) and only scores that set. The tail's own KV is set aside while sets are scored
and put back after, so the target runs the prompt once (the first round reads the logits after it from that run).
With the cost-aware draft length (the default) a set whose agreement is below its draft cost (its forward time over
the tail as a share of the target's) does not draft at all: a drafted token then costs more than it is expected to
save. On SmolLM2-135M, where skipping 45 % of the layers leaves 0-20 % agreement, that is the usual outcome, so a
single set scored only for that decision (given, or the spread set) is scored on the tail's first
``QUICK_POSITIONS`` positions first and given up when its agreement there clearly cannot reach the kept share of
the layers (the least that pays).

Hot start (SWIFT amortises its search over a task's inputs): the scores of every set scored are pooled per model and
skip choice (the given set, or the size of the searched ones, and the search settings) for the process's later runs
(:mod:`engine.hot_start`). Cost-aware runs then decide without scoring once the memory is clear
(:meth:`SkipMemory.settled`): drafting pays when the best set, scored on ``MIN_PROMPTS`` prompts, agrees more than
two standard errors above its mean draft cost; it does not once ``MIN_PROMPTS`` runs scored and every set scored
agrees more than two standard errors below its own. Such a run takes that set and that decision with no timed tail:
the prompt runs in one forward, as greedy's. Until then a run that scores still times no step of its own: the first
scoring run's one-token step time serves the later ones. ``reset_search`` forgets all of it. Scoring costs a run
0.1-0.2 s of 2 s on SmolLM2 with 32 new tokens.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from engine import hot_start
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import DraftModelDrafter
from engine.speculative.rounds import NO_DRAFT, SAMPLING_PARAMS, Draft, Sampling, speculative_rounds
from engine.speculative.skip import SharedSkipCache, layer_skipped_model

SEARCH_SEED = 0
QUICK_POSITIONS = 16  # a set weighed against its draft cost is scored on this many tail positions first
SEARCH_SETTINGS = ("context_window", "search_iterations", "search_budget")  # a memory serves runs with the same ones
MIN_PROMPTS = 3  # a remembered set settles whether drafting pays once scored on this many prompts (agreement varies by prompt)


@dataclass(frozen=True)
class SkipChoice:
    """A skip set (ascending layer indices), its agreement score, and how many candidate sets were scored."""

    skip: tuple[int, ...]
    score: float
    candidates: int

    @property
    def label(self) -> str:
        return ",".join(map(str, self.skip))


class PromptTail:
    """The prompt's last ``window`` positions, on which skip sets are scored (module docstring).

    It runs the prompt into the run's empty target cache as greedy's prefill would. Given ``step_seconds`` (the
    time of a one-token target step, remembered from an earlier run on the model) that is one forward; otherwise two:
    all but the last token, then the last as a timed one-token step (about 50 ms more than one forward on SmolLM2).
    It sets the tail's KV aside while sets are scored against the rest, and :meth:`restore` puts it back with the
    logits after the prompt, so the run's first round runs no forward. ``full`` are the full model's greedy next
    tokens after each tail token, ``tail_seconds`` the time of the target over the tail (its share of the prefill's
    time plus a step: a forward of the tail alone beside one of the head had cost 0.1 s more than the prefill on a
    57-token prompt), and ``seconds`` that of each scored set over it.
    """

    def __init__(self, target: PrefixCache, prompt_ids: list[int], window: int,
                 step_seconds: float | None = None) -> None:
        size = min(window, len(prompt_ids))
        self.tokens = prompt_ids[-size:]
        self.target = target
        timed_step = step_seconds is None and len(prompt_ids) > 1
        start = time.perf_counter()
        # The prompt, or every token but the last; logits of the tail's positions only (at least one row).
        ran = prompt_ids[:-1] if timed_step else prompt_ids
        logits = target.forward(ran, keep=max(size - timed_step, 1)).logits[0]
        prefill_seconds = time.perf_counter() - start
        if timed_step:
            start = time.perf_counter()
            logits = torch.cat([logits[len(logits) - (size - 1):], target.forward(prompt_ids[-1:], keep=1).logits[0]])
            step_seconds = time.perf_counter() - start
        elif step_seconds is None:  # a one-token prompt: its forward is a step
            step_seconds = prefill_seconds
        self.step_seconds = step_seconds
        self.tail_seconds = prefill_seconds * (size - 1) / max(len(ran), 1) + step_seconds
        self.full = logits.argmax(-1)
        self.aside = target.set_aside(size)
        self.seconds: dict[tuple[int, ...], float] = {}
        self.scored: dict[tuple[int, ...], tuple[float, int]] = {}  # each scored set's agreement, positions covered
        self.gave_up: dict[tuple[int, ...], float] = {}  # sets scored in part: the cost they could not reach

    def agreement(self, skip: tuple[int, ...], give_up_below: float | None = None) -> float:
        """The fraction of tail positions where the model minus ``skip`` predicts the full model's token.

        With ``give_up_below`` (the least agreement that would pay), the first ``QUICK_POSITIONS`` positions are
        scored first and the rest only if their agreement could still reach it: a set that clearly cannot pay (on
        SmolLM2, 10-20 % against 55 %) costs a third of a full score, and its score covers those positions only."""
        cache = SharedSkipCache(layer_skipped_model(self.target.model, skip), self.target)
        start = time.perf_counter()
        first = self.tokens[:QUICK_POSITIONS] if give_up_below is not None else self.tokens
        rest = self.tokens[len(first):]
        predicted = cache.forward(first, keep=len(first)).logits[0].argmax(-1)
        score = float((predicted == self.full[: len(first)]).double().mean())
        self.gave_up.pop(skip, None)
        if rest and score + _margin(score, len(first)) >= give_up_below:
            predicted = torch.cat([predicted, cache.forward(rest, keep=len(rest)).logits[0].argmax(-1)])
            score = float((predicted == self.full).double().mean())
        elif rest:
            self.gave_up[skip] = give_up_below
        self.seconds[skip] = time.perf_counter() - start
        self.scored[skip] = (score, len(predicted))
        cache.release()
        return score

    def draft_cost(self, skip: tuple[int, ...]) -> float:
        """A scored set's forward time as a share of the target's (for a set given up on, the cost it was weighed
        against: its forward covered only part of the tail)."""
        if skip in self.gave_up:
            return self.gave_up[skip]
        return self.seconds[skip] / max(self.tail_seconds, 1e-9)

    def restore(self) -> None:
        self.target.put_back(self.aside)


def _margin(score: float, positions: int) -> float:
    """Two binomial standard errors of an agreement of ``score`` over ``positions`` positions (the variance floored,
    for scores near 0 or 1): how far the agreement over other positions may plausibly lie."""
    return 2.0 * math.sqrt(max(score * (1.0 - score), 0.05) / positions)


@dataclass
class SetRecord:
    """One skip set's scores on earlier prompts of a model, pooled (module docstring: hot start)."""

    agreeing: float = 0.0  # scored positions where the skipped model's token was the full model's
    positions: int = 0
    prompts: int = 0
    costs: float = 0.0  # the draft costs measured, summed over the prompts

    def add(self, score: float, positions: int, cost: float) -> None:
        self.agreeing += score * positions
        self.positions += positions
        self.prompts += 1
        self.costs += cost

    @property
    def agreement(self) -> float:
        return self.agreeing / self.positions

    @property
    def cost(self) -> float:
        return self.costs / self.prompts

    def clearly_pays(self) -> bool:
        return self.agreement - _margin(self.agreement, self.positions) >= self.cost

    def clearly_cannot_pay(self) -> bool:
        return self.agreement + _margin(self.agreement, self.positions) < self.cost


@dataclass
class SkipMemory:
    """What earlier runs on a model scored for one skip choice: every set scored, how many runs scored, and the time
    of a one-token target step the first of them measured (:class:`PromptTail`)."""

    sets: dict[tuple[int, ...], SetRecord] = field(default_factory=dict)
    runs: int = 0
    step_seconds: float | None = None

    def add(self, tail: PromptTail) -> None:
        """The sets ``tail`` scored, one run's worth."""
        self.runs += 1
        self.step_seconds = tail.step_seconds
        for skip, (score, positions) in tail.scored.items():
            self.sets.setdefault(skip, SetRecord()).add(score, positions, tail.draft_cost(skip))

    def settled(self) -> tuple[tuple[int, ...], bool] | None:
        """The set of highest pooled agreement and whether it pays, once that is clear: drafting pays when that set,
        scored on ``MIN_PROMPTS`` prompts, agrees clearly (two standard errors) more often than it costs; it does not
        once ``MIN_PROMPTS`` runs scored and every set scored agrees clearly less often. None while unclear."""
        if not self.sets:
            return None
        best = max(self.sets, key=lambda skip: self.sets[skip].agreement)
        if self.sets[best].prompts >= MIN_PROMPTS and self.sets[best].clearly_pays():
            return best, True
        if self.runs >= MIN_PROMPTS and all(record.clearly_cannot_pay() for record in self.sets.values()):
            return best, False
        return None


def remembered(model: LoadedModel, params: dict[str, Any], given: tuple[int, ...] | None, num_skip: int) -> SkipMemory:
    """What earlier runs on this model scored for this choice (the given set, or searched sets of ``num_skip``
    layers) under the same search settings; ``reset_search`` forgets it."""
    memories = hot_start.store("layer_skip")
    key = (model.name, model.num_layers, given, num_skip, *(params[name] for name in SEARCH_SETTINGS))
    if params["reset_search"] or key not in memories:
        memories[key] = SkipMemory()
    return memories[key]


def search_skip_layers(
    score: Callable[[tuple[int, ...]], float], total: int, num_skip: int, iterations: int
) -> SkipChoice:
    """The best-scoring set of ``num_skip`` of ``total`` layers among up to ``iterations`` distinct candidates
    (module docstring)."""
    if not 1 <= num_skip < total:
        raise ValueError(f"the skip set must hold between 1 and {total - 1} of the target's {total} layers, got {num_skip}")
    generator = torch.Generator().manual_seed(SEARCH_SEED)
    scores: dict[tuple[int, ...], float] = {}

    def scored(skip: tuple[int, ...]) -> float:
        if skip not in scores:
            scores[skip] = score(skip)
        return scores[skip]

    random_sets = [
        tuple(sorted(torch.randperm(total, generator=generator)[:num_skip].tolist())) for _ in range((iterations + 1) // 2)
    ]
    best = current = max(random_sets, key=scored)  # the first of the best on ties
    for _ in range(iterations // 2):
        candidate = _swap_one(current, total, generator)
        if scored(candidate) >= scored(current):
            current = candidate
            if scores[current] > scores[best]:
                best = current
    return SkipChoice(best, scores[best], len(scores))


def spread_layers(total: int, num_skip: int) -> tuple[int, ...]:
    """``num_skip`` layers spread evenly between the first and the last (both kept when they can be)."""
    inner = list(range(1, total - 1)) if num_skip <= total - 2 else list(range(total))
    return tuple(sorted({inner[(2 * i + 1) * len(inner) // (2 * num_skip)] for i in range(num_skip)}))


def affordable_sets(tail: PromptTail, max_new_tokens: int, share: float, skip_share: float) -> int:
    """How many skip sets scoring may cost: ``share`` of ``max_new_tokens`` one-token target steps, each set
    costing a forward over the tail through the kept share of the layers."""
    set_seconds = max(tail.tail_seconds * (1.0 - skip_share), 1e-9)
    return int(share * max_new_tokens * tail.step_seconds / set_seconds)


def _swap_one(skip: tuple[int, ...], total: int, generator: torch.Generator) -> tuple[int, ...]:
    """``skip`` with one random member replaced by a random layer outside it."""
    kept = [layer for layer in range(total) if layer not in skip]
    out = int(torch.randint(len(skip), (), generator=generator))
    into = kept[int(torch.randint(len(kept), (), generator=generator))]
    return tuple(sorted([*skip[:out], *skip[out + 1 :], into]))


def parse_layers(text: str, total: int) -> tuple[int, ...]:
    """``"3,5,7"`` as sorted distinct layer indices; ParamError unless every one lies in 0..total-1."""
    try:
        layers = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise ParamError(f"skip_layers must be comma-separated layer indices such as '3,5,7', got {text!r}") from None
    if any(not 0 <= layer < total for layer in layers) or len(layers) >= total:
        raise ParamError(f"skip_layers must name fewer than {total} distinct layers between 0 and {total - 1}, got {text!r}")
    return layers


def choose_skip(ctx: DecodeContext, tail: PromptTail, given: tuple[int, ...] | None, num_skip: int) -> SkipChoice:
    """The ``given`` set or the searched set of ``num_skip`` layers, scored on the prompt's ``tail``."""
    params = ctx.params
    total = ctx.model.num_layers
    # A single set is scored only to decide whether it drafts: the least agreement that pays is its kept share of
    # the layers (a drafted token's cost in target steps), and a set clearly below it is given up early.
    needed = (total - num_skip) / total if params["draft_length"] == "adaptive" else None
    if given:
        return SkipChoice(given, tail.agreement(given, needed), 1)
    iterations = params["search_iterations"]
    if params["search_budget"]:
        affordable = affordable_sets(tail, ctx.max_new_tokens, params["search_budget"], num_skip / total)
        iterations = min(iterations, affordable)
    if iterations < 2:  # nothing to compare: the spread set, scored
        skip = spread_layers(total, num_skip)
        return SkipChoice(skip, tail.agreement(skip, needed), 1)
    return search_skip_layers(tail.agreement, total, num_skip, iterations)


def skipped_count(skip_ratio: float, total: int) -> int:
    num_skip = round(skip_ratio * total)
    if not 1 <= num_skip < total:
        raise ParamError(f"skip_ratio={skip_ratio} skips {num_skip} of {total} layers; choose one that skips between 1 "
                         f"and {total - 1}")
    return num_skip


class SkipDrafter(DraftModelDrafter):
    """Drafts with the skip view in the target's cache (:class:`SharedSkipCache`), once the target holds every
    committed token but the newest; never unless ``drafting``."""

    def __init__(self, view: LoadedModel, target: PrefixCache, source: str, sampling: Sampling, num_draft_tokens: int,
                 stop_threshold: float, drafting: bool = True) -> None:
        super().__init__(view, source, sampling, num_draft_tokens, schedule="confidence",
                         confidence_threshold=stop_threshold, cache=SharedSkipCache(view, target))
        self.drafting = drafting

    def propose(self, context: list[int], max_depth: int) -> Draft:
        return super().propose(context, max_depth) if self.drafting else NO_DRAFT


@dataclass(frozen=True)
class SkipDecision:
    """The run's skip set, its draft cost (target steps per drafted token), whether it drafts, and where its score and
    cost came from (shown beside the metrics)."""

    choice: SkipChoice
    cost: float
    drafting: bool
    scored_on: str
    cost_from: str


def decide(ctx: DecodeContext, target: PrefixCache, given: tuple[int, ...] | None, num_skip: int) -> SkipDecision:
    """Score skip sets on the prompt's tail (its forward left in ``target``), or take the set earlier runs on this
    model settled, without scoring (module docstring)."""
    params = ctx.params
    adaptive = params["draft_length"] == "adaptive"
    memory = remembered(ctx.model, params, given, num_skip)
    settled = memory.settled() if adaptive else None
    if settled:
        skip, pays = settled
        record = memory.sets[skip]
        return SkipDecision(SkipChoice(skip, record.agreement, 0), record.cost, pays,
                            f"{record.positions} positions of {record.prompts} earlier prompts",
                            "its mean over earlier prompts")
    tail = PromptTail(target, ctx.prompt_ids, params["context_window"], memory.step_seconds)
    choice = choose_skip(ctx, tail, given, num_skip)
    tail.restore()
    memory.add(tail)
    cost = tail.draft_cost(choice.skip)
    # A drafted token costs ``cost`` target steps: a set that agrees less often than that cannot pay (cost-aware
    # runs then take plain steps; a fixed draft length drafts regardless, to show the drafts).
    part = choice.skip in tail.gave_up
    return SkipDecision(choice, cost, not adaptive or choice.score >= cost,
                        f"{tail.scored[choice.skip][1]} of the prompt's last {len(tail.tokens)} positions",
                        "the kept share of the layers (scored in part)" if part else
                        "the set's forward time over the prompt's tail / the target's")


def layer_skip(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    total = ctx.model.num_layers
    given = parse_layers(params["skip_layers"], total) if params["skip_layers"].strip() else None
    num_skip = len(given) if given else skipped_count(params["skip_ratio"], total)
    target = PrefixCache(ctx.model)
    decision = decide(ctx, target, given, num_skip)
    choice = decision.choice
    yield DecoderMetric("skip_agreement", choice.score, f"{choice.label}; {decision.scored_on}")
    yield DecoderMetric("skipped_layers", len(choice.skip), choice.label)
    yield DecoderMetric("skip_candidates_scored", choice.candidates, choice.label)
    yield DecoderMetric("skip_draft_cost", decision.cost, decision.cost_from)
    yield DecoderMetric("skip_drafting", float(decision.drafting), "drafts" if decision.drafting else
                        f"no drafts: agreement {choice.score:.2f} < draft cost {decision.cost:.2f}")
    sampling = Sampling.of(ctx)
    drafter = SkipDrafter(layer_skipped_model(ctx.model, choice.skip), target, f"layer_skip:{choice.label}", sampling,
                          params["num_draft_tokens"], params["stop_threshold"], decision.drafting)
    yield from speculative_rounds(ctx, drafter, sampling, target=target)


SPEC = register(
    DecoderSpec(
        name="layer_skip",
        family="speculative",
        summary="Self-speculation: the target with some layers skipped drafts, the full target verifies (SWIFT-style).",
        params=(
            Param("skip_layers", "str", "", "Layers to skip in the draft, e.g. '3,5,7' (0-based; empty = search on the prompt)."),
            Param("skip_ratio", "float", 0.45, "Search: the share of layers to skip.", 0.0, 1.0),
            Param("search_iterations", "int", 20, "Search: candidate skip sets to score (half random, half refinements).", 1, 1000),
            Param("search_budget", "float", 0.1, "Search: the most it may cost, as a share of the run's expected greedy "
                  "time (fewer sets when they cost more; under two: the evenly spread set); 0 = no limit.", 0.0, 100.0),
            Param("context_window", "int", 50, "Search: score agreement over the prompt's last N positions.", 1, 100_000),
            Param("reset_search", "bool", False, "Forget what earlier runs on this model scored (and the step time "
                  "they measured): score skip sets on this prompt."),
            Param("num_draft_tokens", "int", 10, "Most tokens per draft.", 1, 64, limit="draft_tokens"),
            Param("stop_threshold", "float", 0.8, "Stop drafting once the draft's p(token) is below this (SWIFT: 0.8).", 0.0, 1.0),
            *SAMPLING_PARAMS,
        ),
        run=layer_skip,
        lossless=True,
    )
)
