"""The method-specific views: which figures a run's own events call for, at the step the slider is on.

Token-level runs (GIFT, AdaDec, momentum, KV-cache compression, a model variant beside its base) walk their output
positions; superposed decoding and constrained sampling walk their own steps; best-of-N and exact-extract have one
decision per run.
"""

from __future__ import annotations

import plotly.graph_objects as go

from engine.events import ConstraintStep, SearchGeneration, SuperposedStep
from engine.trace import Trace
from ui.figures.cache import cache_kl_figure, eviction_map_figure
from ui.figures.constraint import checks_figure, particle_count, tries_figure, weights_figure
from ui.figures.parallelism import goal_figure, parallelism_figure
from ui.figures.rerank import rerank_figure, rerank_timeline_figure
from ui.figures.search import fitness_figure, profile_figure
from ui.figures.spans import spans_figure
from ui.figures.steering import saliency_figure, steering_figure
from ui.figures.superposed import candidates_figure, drafts_figure
from ui.figures.variants import variant_entropy_figure, variant_kl_figure

Figures = tuple[go.Figure | None, go.Figure | None]


def method_step_count(trace: Trace) -> int:
    """Steps of the runs whose slider walks their own events (superposed drafts, constrained particles, search
    generations)."""
    superposed = sum(isinstance(e, SuperposedStep) for e in trace.events)
    constrained = len({e.step for e in trace.events if isinstance(e, ConstraintStep)})
    generations = sum(isinstance(e, SearchGeneration) for e in trace.events)
    return superposed + constrained + generations


def method_figures(trace: Trace, position: int) -> Figures:
    """(main, side) figures for the run's method events at slider ``position``; (None, None) if it has none."""
    kinds = {event.kind for event in trace.events}
    if "bench_point" in kinds:
        return parallelism_figure(trace), goal_figure(trace)
    if "search_generation" in kinds:
        return fitness_figure(trace, position), profile_figure(trace, position)
    if "steering" in kinds:
        return saliency_figure(trace), steering_figure(trace, position)
    if "cache" in kinds:
        return eviction_map_figure(trace, position), cache_kl_figure(trace, position)
    if "variant" in kinds:
        return variant_kl_figure(trace, position), variant_entropy_figure(trace, position)
    if "superposed" in kinds:
        return drafts_figure(trace), candidates_figure(trace, position)
    if "constraint" in kinds:
        main = tries_figure(trace, particle=0, window=(max(0, position - 8), position + 9))  # rows that fit 560 px
        return main, weights_figure(trace) if "resample" in kinds or particle_count(trace) > 1 else checks_figure(trace)
    if "spans" in kinds:
        return spans_figure(trace), None
    if "rerank" in kinds:
        return rerank_figure(trace, position), rerank_timeline_figure(trace, position)
    return None, None
