"""Self-speculation by layer skipping (Draft & Verify, Zhang et al. ACL 2024; SWIFT, Xia et al. ICLR 2025).

The draft is the target itself with a set of decoder layers skipped (identity residual), weights shared, with its
own KV cache (:mod:`engine.speculative.skip`). It drafts up to ``num_draft_tokens`` tokens and stops early once its
probability for the token it just drafted is below ``stop_threshold`` (SWIFT's top-1 confidence stop under greedy
decoding); the full model verifies the chain in one forward (speculative.md §0.1, §11).

The skip set is given, or found training-free on the prompt itself, SWIFT-style but small: a candidate set of
``round(skip_ratio * layers)`` layers scores the fraction of the prompt's last ``context_window`` positions where
the skipped model's greedy next token (teacher-forced, one forward per candidate) equals the full model's. Half of
the ``search_iterations`` candidates are random sets, the rest refine the best set so far by swapping one skipped
layer for a kept one (a move is kept unless it scores worse). The search draws from its own fixed-seed generator, so
the chosen set depends on the prompt only. Verification is standard: lossless.

The search is cost-aware: SWIFT amortises it over a whole task, while one run here pays it in full (20 prompt
forwards took 70-85 % of a 32-token run, BENCHMARKS.md). It may spend at most ``search_budget`` of the run's
expected greedy time (``max_new_tokens`` one-token target steps, one of them timed) at the measured cost of scoring
a set; a run that cannot afford two sets takes ``num_skip`` layers spread evenly over the depth (the first and the
last kept, as Draft & Verify found them the most needed) and only scores that set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError
from engine.speculative.drafts import DraftModelDrafter
from engine.speculative.rounds import SAMPLING_PARAMS, Sampling, speculative_rounds
from engine.speculative.skip import layer_skipped_model

SEARCH_SEED = 0


@dataclass(frozen=True)
class SkipChoice:
    """A skip set (ascending layer indices), its agreement score, and how many candidate sets were scored."""

    skip: tuple[int, ...]
    score: float
    candidates: int

    @property
    def label(self) -> str:
        return ",".join(map(str, self.skip))


def greedy_predictions(model: LoadedModel, prompt_ids: list[int], context_window: int) -> torch.Tensor:
    """The model's argmax next token at each of the prompt's last ``context_window`` positions (teacher-forced)."""
    logits = model.forward(torch.tensor([prompt_ids])).logits[0]
    return logits[-min(context_window, len(prompt_ids)) :].argmax(-1)


def skip_agreement(
    model: LoadedModel, prompt_ids: list[int], skip: tuple[int, ...], context_window: int, full: torch.Tensor | None = None
) -> float:
    """The fraction of the last ``context_window`` prompt positions where ``model`` minus ``skip`` agrees with ``model``.

    ``full`` are the full model's :func:`greedy_predictions`, computed here when not given.
    """
    if full is None:
        full = greedy_predictions(model, prompt_ids, context_window)
    skipped = greedy_predictions(layer_skipped_model(model, skip), prompt_ids, context_window)
    return float((skipped == full).double().mean())


def search_skip_layers(
    model: LoadedModel, prompt_ids: list[int], num_skip: int, iterations: int, context_window: int,
    full: torch.Tensor | None = None,
) -> SkipChoice:
    """The best-agreeing set of ``num_skip`` layers among up to ``iterations`` distinct candidates (module docstring);
    ``full`` are the full model's :func:`greedy_predictions` when already computed."""
    total = model.num_layers
    if not 1 <= num_skip < total:
        raise ValueError(f"the skip set must hold between 1 and {total - 1} of the target's {total} layers, got {num_skip}")
    generator = torch.Generator().manual_seed(SEARCH_SEED)
    full = greedy_predictions(model, prompt_ids, context_window) if full is None else full
    scores: dict[tuple[int, ...], float] = {}

    def score(skip: tuple[int, ...]) -> float:
        if skip not in scores:
            scores[skip] = skip_agreement(model, prompt_ids, skip, context_window, full)
        return scores[skip]

    random_sets = [
        tuple(sorted(torch.randperm(total, generator=generator)[:num_skip].tolist())) for _ in range((iterations + 1) // 2)
    ]
    best = current = max(random_sets, key=score)  # the first of the best on ties
    for _ in range(iterations // 2):
        candidate = _swap_one(current, total, generator)
        if score(candidate) >= score(current):
            current = candidate
            if scores[current] > scores[best]:
                best = current
    return SkipChoice(best, scores[best], len(scores))


def spread_layers(total: int, num_skip: int) -> tuple[int, ...]:
    """``num_skip`` layers spread evenly between the first and the last (both kept when they can be)."""
    inner = list(range(1, total - 1)) if num_skip <= total - 2 else list(range(total))
    return tuple(sorted({inner[(2 * i + 1) * len(inner) // (2 * num_skip)] for i in range(num_skip)}))


def affordable_sets(model: LoadedModel, prompt_ids: list[int], prompt_seconds: float, max_new_tokens: int,
                    share: float, skip_share: float) -> int:
    """How many skip sets scoring may cost: ``share`` of ``max_new_tokens`` one-token target steps (one is timed
    here), each set costing a prompt forward (``prompt_seconds``) through the kept share of the layers."""
    start = time.perf_counter()
    model.forward(torch.tensor([prompt_ids[-1:]]))
    step_seconds = time.perf_counter() - start
    set_seconds = max(prompt_seconds * (1.0 - skip_share), 1e-9)
    return int(share * max_new_tokens * step_seconds / set_seconds)


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


def choose_skip(ctx: DecodeContext) -> SkipChoice:
    """The given ``skip_layers`` (scored on the prompt), or the searched set."""
    params = ctx.params
    total = ctx.model.num_layers
    window = params["context_window"]
    if params["skip_layers"].strip():
        skip = parse_layers(params["skip_layers"], total)
        return SkipChoice(skip, skip_agreement(ctx.model, ctx.prompt_ids, skip, window), 1)
    num_skip = round(params["skip_ratio"] * total)
    if not 1 <= num_skip < total:
        raise ParamError(
            f"skip_ratio={params['skip_ratio']} skips {num_skip} of {total} layers; choose one that skips between 1 and {total - 1}"
        )
    start = time.perf_counter()
    full = greedy_predictions(ctx.model, ctx.prompt_ids, window)
    iterations = params["search_iterations"]
    if params["search_budget"]:
        affordable = affordable_sets(ctx.model, ctx.prompt_ids, time.perf_counter() - start, ctx.max_new_tokens,
                                     params["search_budget"], num_skip / total)
        iterations = min(iterations, affordable)
    if iterations < 2:  # nothing to compare: the spread set, scored
        skip = spread_layers(total, num_skip)
        return SkipChoice(skip, skip_agreement(ctx.model, ctx.prompt_ids, skip, window, full), 1)
    return search_skip_layers(ctx.model, ctx.prompt_ids, num_skip, iterations, window, full)


def layer_skip(ctx: DecodeContext) -> Iterator[Event]:
    choice = choose_skip(ctx)
    yield DecoderMetric("skip_agreement", choice.score, choice.label)
    yield DecoderMetric("skipped_layers", len(choice.skip), choice.label)
    yield DecoderMetric("skip_candidates_scored", choice.candidates, choice.label)
    sampling = Sampling.of(ctx)
    draft = layer_skipped_model(ctx.model, choice.skip)
    drafter = DraftModelDrafter(
        draft,
        f"layer_skip:{choice.label}",
        sampling,
        ctx.params["num_draft_tokens"],
        schedule="confidence",
        confidence_threshold=ctx.params["stop_threshold"],
    )
    yield from speculative_rounds(ctx, drafter, sampling)


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
            Param("num_draft_tokens", "int", 10, "Most tokens per draft.", 1, 64, limit="draft_tokens"),
            Param("stop_threshold", "float", 0.8, "Stop drafting once the draft's p(token) is below this (SWIFT: 0.8).", 0.0, 1.0),
            *SAMPLING_PARAMS,
        ),
        run=layer_skip,
        lossless=True,
    )
)
