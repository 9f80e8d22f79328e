"""EvoPress (Sieberling et al. 2024, "EvoPress: Towards Optimal Dynamic Model Compression via Evolutionary Search",
arXiv 2410.14649): which sparsity each decoder layer gets, under a fixed budget, found by evolution.

- The **level database** holds every decoder layer pruned at every level (0.0, 0.1, ..., 0.9 by default), each
  pruned once (when a profile first asks for it) by ``engine.models.prune.prune_weight``, wanda or magnitude, as
  ``models derive --layer-profile`` prunes. It keeps the dense weights and one packed bit mask per linear and level,
  and swaps a layer to another level in the one working model by masking the dense weights: no second model.
- The **budget** is the parameter-weighted mean sparsity of the profile (a layer with more weights in its linears
  counts for more), fixed at the target. The search starts from the uniform profile.
- **Level switch** mutation: raise one layer's level by one step and lower another's by one, both chosen among layers
  of the same parameter count, so the weighted budget stays exact; 1 to 3 switches per offspring, fewer more likely.
- **(1 + λ) evolution with multi-step selection**: the λ offspring are ranked on a few calibration tokens, the best
  survive to a stage with more tokens, and the last survivors meet the parent on the whole calibration set; the
  parent stays unless one is strictly better.
- **Fitness**: the mean per-token KL(base || candidate) of the next-token distributions on calibration chunks.

Unlike the reference code, whose last stage draws a fresh random minibatch each generation, the last stage here is
always the whole calibration set: each profile's fitness there is exact and cached, the parent is never re-scored,
and the best fitness can only go down from one generation to the next.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from engine.events import DecoderMetric, RunStarted, SearchGeneration
from engine.models.handle import LoadedModel
from engine.models.prune import METHODS as PRUNE_METHODS
from engine.models.prune import prune_weight
from engine.models.variants import (
    calibration_texts,
    decoder_linears,
    input_norms,
)
from engine.params import ParamError
from engine.processing import kl_divergence
from engine.recorder import Recorder, TraceSink, run_ending
from engine.run import software_versions
from engine.trace import RunInfo, Trace, new_run_id

Profile = tuple[int, ...]  # per decoder layer, the index of its level
Evaluate = Callable[[Profile, Sequence[int]], float]  # fitness of a profile on some calibration rows

DEFAULT_LEVELS = tuple(i / 10 for i in range(10))  # sparsity 0.0 .. 0.9


@dataclass(frozen=True)
class SelectionStage:
    """A selection stage before the last: rank the candidates on ``tokens`` calibration tokens, keep ``survivors``."""

    survivors: int
    tokens: int


DEFAULT_STAGES = (SelectionStage(survivors=4, tokens=256), SelectionStage(survivors=2, tokens=1024))


# ---------------------------------------------------------------- budget and mutation


def weighted_level(profile: Sequence[int], sizes: Sequence[int]) -> float:
    """The parameter-weighted mean level index of a profile (the budget, in level steps)."""
    return sum(level * size for level, size in zip(profile, sizes)) / sum(sizes)


def mean_sparsity(profile: Sequence[int], sizes: Sequence[int], levels: Sequence[float]) -> float:
    """The parameter-weighted mean sparsity of the layers' linears under ``profile``."""
    return sum(levels[level] * size for level, size in zip(profile, sizes)) / sum(sizes)


def uniform_profile(target: float, layers: int, levels: Sequence[float]) -> Profile:
    """Every layer at the level equal to ``target``; the target must be one of the levels."""
    for index, level in enumerate(levels):
        if math.isclose(level, target, abs_tol=1e-9):
            return (index,) * layers
    raise ParamError(f"target sparsity {target} is not one of the levels {list(levels)}")


def size_groups(sizes: Sequence[int]) -> list[list[int]]:
    """Layers grouped by parameter count: a level switch inside a group keeps the weighted budget exact."""
    groups: dict[int, list[int]] = {}
    for layer, size in enumerate(sizes):
        groups.setdefault(size, []).append(layer)
    return [layers for layers in groups.values() if len(layers) > 1]


def level_switch(profile: Profile, groups: Sequence[Sequence[int]], top: int, rng: random.Random) -> Profile:
    """One level switch: in a group (picked in proportion to its layer count), one layer goes a level up and
    another a level down; ``profile`` unchanged if no group has a layer that can rise and another that can fall."""
    levels = list(profile)
    movable = [g for g in groups if any(levels[i] < top for i in g) and any(levels[i] > 0 for i in g)]
    if not movable:
        return profile
    group = rng.choices(movable, weights=[len(g) for g in movable])[0]
    up = rng.choice([i for i in group if levels[i] < top])
    down_choices = [i for i in group if levels[i] > 0 and i != up]
    if not down_choices:
        return profile
    down = rng.choice(down_choices)
    levels[up] += 1
    levels[down] -= 1
    return tuple(levels)


def mutate(profile: Profile, groups: Sequence[Sequence[int]], top: int, rng: random.Random) -> Profile:
    """An offspring: 1 to 3 level switches, fewer more likely (the smaller of two uniform draws, as in the paper)."""
    for _ in range(min(rng.randint(1, 3), rng.randint(1, 3))):
        profile = level_switch(profile, groups, top, rng)
    return profile


# ---------------------------------------------------------------- the search


@dataclass
class SearchResult:
    best: Profile
    best_fitness: float
    start_fitness: float  # the uniform profile's fitness on the whole calibration set
    generations: list[SearchGeneration]


def evolve(
    start: Profile,
    evaluate: Evaluate,
    rows: int,
    row_tokens: int,
    sizes: Sequence[int],
    levels: Sequence[float],
    *,
    generations: int,
    offspring: int,
    stages: Sequence[SelectionStage] = DEFAULT_STAGES,
    seed: int = 0,
) -> Iterator[SearchGeneration]:
    """(1 + λ) evolution from ``start``: yields generation 0 (the start, scored) and then one event per generation.

    ``evaluate(profile, row_indices)`` scores a profile on those calibration rows of ``row_tokens`` tokens each
    (lower is better); the last stage uses all ``rows``. The last event's profile is the best found.
    """
    if generations < 0 or offspring < 1:
        raise ParamError("generations must be >= 0 and offspring >= 1")
    if any(s.survivors < 1 or s.tokens < 1 for s in stages):
        raise ParamError("every selection stage needs at least 1 survivor and 1 token")
    rng = random.Random(seed)
    groups, top = size_groups(sizes), len(levels) - 1
    everything = list(range(rows))
    exact: dict[Profile, float] = {}  # fitness on the whole calibration set, per profile

    def full(profile: Profile) -> float:
        if profile not in exact:
            exact[profile] = evaluate(profile, everything)
        return exact[profile]

    def event(generation: int, parent: Profile, stage_tokens: list[int], stage_fitnesses: list[list[float]],
              accepted: bool, started: float) -> SearchGeneration:
        return SearchGeneration(
            generation=generation, best_fitness=exact[parent], profile=[levels[i] for i in parent],
            mean_sparsity=mean_sparsity(parent, sizes, levels), stage_tokens=stage_tokens,
            stage_fitnesses=stage_fitnesses, accepted=accepted, seconds=time.perf_counter() - started)

    started = time.perf_counter()
    parent = start
    full(parent)
    yield event(0, parent, [rows * row_tokens], [[exact[parent]]], False, started)
    for generation in range(1, generations + 1):
        started = time.perf_counter()
        candidates = _offspring(parent, groups, top, offspring, rng)
        stage_tokens, stage_fitnesses = [], []
        for stage in stages:
            if len(candidates) <= 1:
                break
            chosen = sorted(rng.sample(everything, min(rows, max(1, math.ceil(stage.tokens / row_tokens)))))
            scores = [evaluate(c, chosen) for c in candidates]
            stage_tokens.append(len(chosen) * row_tokens)
            stage_fitnesses.append(scores)
            order = sorted(range(len(candidates)), key=scores.__getitem__)[: stage.survivors]
            candidates = [candidates[i] for i in order]
        finals = [full(c) for c in candidates]
        stage_tokens.append(rows * row_tokens)
        stage_fitnesses.append(finals)
        best = min(range(len(candidates)), key=finals.__getitem__, default=None)
        accepted = best is not None and finals[best] < exact[parent]
        if accepted:
            parent = candidates[best]
        yield event(generation, parent, stage_tokens, stage_fitnesses, accepted, started)


def _offspring(parent: Profile, groups: Sequence[Sequence[int]], top: int, count: int,
               rng: random.Random) -> list[Profile]:
    """Up to ``count`` distinct offspring unlike the parent (fewer where the neighbourhood is smaller)."""
    found: list[Profile] = []
    for _ in range(count * 20):
        child = mutate(parent, groups, top, rng)
        if child != parent and child not in found:
            found.append(child)
            if len(found) == count:
                break
    return found


# ---------------------------------------------------------------- the level database

Prune = Callable[[str, torch.Tensor, float], torch.Tensor]  # (linear key, [out, in] weight, sparsity) -> pruned


class LevelDatabase:
    """Every decoder layer's linears pruned at every level, swapped in and out of one working model.

    A layer is pruned at a level the first time a profile asks for it (a search from 50% rarely visits 0% or 90%),
    and kept: one packed bit mask (the kept weights) per linear, beside a reference to the dense weight. A swap masks
    the dense weight instead of pruning again, which gives exactly what pruning gave (a pruned weight is the dense
    one with zeros where pruned). Memory: one bit per weight and visited level, plus the working copies of the
    layers not dense.
    """

    def __init__(self, layers: Sequence[Mapping[str, nn.Module]], levels: Sequence[float], prune: Prune) -> None:
        if not layers or any(not layer for layer in layers):
            raise ParamError("every decoder layer needs at least one linear to prune")
        self.levels = tuple(levels)
        self._prune = prune
        self._names = [list(layer) for layer in layers]
        self._modules = [list(layer.values()) for layer in layers]
        self._dense = [[module.weight.data for module in modules] for modules in self._modules]
        self.sizes = [sum(w.numel() for w in dense) for dense in self._dense]
        self._masks: dict[tuple[int, int], list[np.ndarray | None]] = {}  # (layer, level) -> per linear
        self._loaded: list[int | None] = [None] * len(layers)  # None: the dense weights

    @property
    def pruned_levels(self) -> int:
        """(layer, level) pairs pruned so far."""
        return len(self._masks)

    def _layer_masks(self, layer: int, level: int) -> list[np.ndarray | None]:
        if (layer, level) not in self._masks:
            masks = []
            for name, module, dense in zip(self._names[layer], self._modules[layer], self._dense[layer]):
                conv = isinstance(module, Conv1D)  # stores [in, out]; pruning reads [out, in]
                pruned = self._prune(f"{layer}.{name}", dense.T if conv else dense, self.levels[level])
                kept = pruned.T != 0 if conv else pruned != 0
                # None where pruning changed nothing (all kept, or only zeros dropped)
                masks.append(None if bool((kept | (dense == 0)).all()) else np.packbits(kept.flatten().cpu().numpy()))
            self._masks[layer, level] = masks
        return self._masks[layer, level]

    def weight(self, layer: int, linear: int, level: int) -> torch.Tensor:
        """The linear's weight (in the module's layout) at a level, as pruning it gave it."""
        dense, packed = self._dense[layer][linear], self._layer_masks(layer, level)[linear]
        if packed is None:
            return dense
        kept = torch.from_numpy(np.unpackbits(packed, count=dense.numel()).astype(bool)).view(dense.shape)
        return torch.where(kept.to(dense.device), dense, torch.zeros((), dtype=dense.dtype, device=dense.device))

    def apply(self, profile: Sequence[int]) -> None:
        """Put every layer at its profile's level (only the layers whose level changed are swapped)."""
        if len(profile) != len(self._modules):
            raise ParamError(f"the profile has {len(profile)} levels; the model has {len(self._modules)} layers")
        for layer, level in enumerate(profile):
            if self._loaded[layer] != level:
                for linear, module in enumerate(self._modules[layer]):
                    module.weight.data = self.weight(layer, linear, level)
                self._loaded[layer] = level

    def restore(self) -> None:
        """The dense weights back in every layer."""
        for modules, dense in zip(self._modules, self._dense):
            for module, weight in zip(modules, dense):
                module.weight.data = weight
        self._loaded = [None] * len(self._modules)


def build_database(model: LoadedModel, method: str, levels: Sequence[float] = DEFAULT_LEVELS) -> LevelDatabase:
    """The level database of ``model``'s decoder layers, pruned as ``models derive --layer-profile`` prunes them
    (wanda's input norms from the same built-in calibration texts), so a searched profile derives the same model."""
    if method not in PRUNE_METHODS:
        raise ParamError(f"pruning method {method!r} is not one of {', '.join(PRUNE_METHODS)}")
    norms = input_norms(model, calibration_texts()) if method == "wanda" else {}

    def prune(key: str, matrix: torch.Tensor, level: float) -> torch.Tensor:
        return prune_weight(matrix, level, None, method, norms.get(key))

    return LevelDatabase(decoder_linears(model.model), levels, prune)


def profile_of(event: SearchGeneration, levels: Sequence[float]) -> Profile:
    """The level indices of an event's profile (its sparsities are stored rounded to 7 digits)."""
    return tuple(min(range(len(levels)), key=lambda i: abs(levels[i] - sparsity)) for sparsity in event.profile)


def profile_document(method: str, profile: Sequence[int], levels: Sequence[float]) -> dict[str, Any]:
    """A profile in the ``--layer-profile`` format of ``engine.models.variants``."""
    return {"method": method, "levels": {str(layer): levels[level] for layer, level in enumerate(profile)}}


# ---------------------------------------------------------------- calibration and fitness


@dataclass
class Calibration:
    """Rows of calibration tokens and the base model's next-token log-probs at every position."""

    ids: torch.Tensor  # [rows, row_tokens]
    base: torch.Tensor  # [rows, row_tokens, vocab], float32 log-probs

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def row_tokens(self) -> int:
        return int(self.ids.shape[1])


def token_rows(model: LoadedModel, text: str, row_tokens: int, max_rows: int | None = None) -> torch.Tensor:
    """The text's tokens cut into rows of ``row_tokens`` (a shorter tail is dropped)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = len(ids) // row_tokens if max_rows is None else min(max_rows, len(ids) // row_tokens)
    if rows < 1:
        raise ParamError(f"the calibration text has {len(ids)} tokens: too few for one row of {row_tokens}")
    return torch.tensor(ids[: rows * row_tokens]).view(rows, row_tokens)


def calibrate(model: LoadedModel, ids: torch.Tensor, batch_rows: int = 4) -> Calibration:
    """The base model's log-probs on every row (run before any layer is pruned)."""
    parts = [model.forward(ids[i: i + batch_rows]).logits.log_softmax(-1) for i in range(0, len(ids), batch_rows)]
    return Calibration(ids=ids, base=torch.cat(parts))


def mean_kl(model: LoadedModel, calibration: Calibration, rows: Sequence[int] | None = None,
            batch_rows: int = 4) -> float:
    """Mean per-token KL(base || model) in nats on the chosen calibration rows (all by default)."""
    chosen = list(range(calibration.rows)) if rows is None else list(rows)
    total = 0.0
    for start in range(0, len(chosen), batch_rows):
        index = torch.tensor(chosen[start: start + batch_rows])
        logits = model.forward(calibration.ids[index]).logits
        total += kl_divergence(calibration.base[index], logits)
    return total / (len(chosen) * calibration.row_tokens)


# ---------------------------------------------------------------- a recorded search


@dataclass(frozen=True)
class SearchSettings:
    """What one search does. ``rows`` of ``row_tokens`` calibration tokens score the candidates; the next
    ``heldout_rows`` of the same text only score the result (KL on tokens the search never saw)."""

    method: str = "wanda"
    sparsity: float = 0.5
    generations: int = 20
    offspring: int = 8
    stages: tuple[SelectionStage, ...] = DEFAULT_STAGES
    rows: int = 8
    row_tokens: int = 128
    heldout_rows: int = 8
    levels: tuple[float, ...] = DEFAULT_LEVELS
    seed: int = 0

    def params(self) -> dict[str, Any]:
        """The settings as a trace's run parameters (plain JSON)."""
        return {"method": self.method, "sparsity": self.sparsity, "generations": self.generations,
                "offspring": self.offspring, "stages": [[s.survivors, s.tokens] for s in self.stages],
                "rows": self.rows, "row_tokens": self.row_tokens, "heldout_rows": self.heldout_rows,
                "levels": list(self.levels)}


@dataclass
class SearchOutcome:
    trace: Trace
    best: Profile
    uniform: Profile
    document: dict[str, Any]  # the best profile in the ``--layer-profile`` format
    metrics: dict[str, float]


def record_search(
    model: LoadedModel,
    text: str,
    settings: SearchSettings,
    sinks: Sequence[TraceSink] = (),
    on_generation: Callable[[SearchGeneration], None] | None = None,
    measures: Callable[[LoadedModel], dict[str, float]] | None = None,
) -> SearchOutcome:
    """Search ``model``'s per-layer sparsity on ``text`` and record the search as a trace (decoder "evopress").

    The trace holds one :class:`SearchGeneration` per generation and, as metrics, the KL of the uniform and the
    best profile on the calibration and the held-out rows, and ``measures`` (such as perplexity) of the dense, the
    uniform and the best model. The model's dense weights are back when it returns.
    """
    ids = token_rows(model, text, settings.row_tokens, settings.rows + settings.heldout_rows)
    if len(ids) < settings.rows + settings.heldout_rows:
        raise ParamError(f"the calibration text makes {len(ids)} rows of {settings.row_tokens} tokens; "
                         f"{settings.rows} calibration and {settings.heldout_rows} held-out rows need more")
    uniform = uniform_profile(settings.sparsity, model.num_layers, settings.levels)
    calibration = calibrate(model, ids[: settings.rows])
    heldout = calibrate(model, ids[settings.rows:]) if settings.heldout_rows else None
    dense_measures = measures(model) if measures else {}
    database = build_database(model, settings.method, settings.levels)
    prompt = (f"EvoPress: {settings.method} pruning of {model.name} at mean sparsity {settings.sparsity}, searched per "
              f"layer on {settings.rows * settings.row_tokens} calibration tokens")
    info = RunInfo(model=model.name, decoder="evopress", params=settings.params(), prompt=prompt, seed=settings.seed,
                   model_info=model.info(), versions=software_versions())
    trace = Trace(run_id=new_run_id(), info=info)
    recorder = Recorder(trace, model.token_text, sinks, decode=model.decode)
    recorder.record(RunStarted(prompt_token_ids=[]))

    def evaluate(profile: Profile, rows: Sequence[int]) -> float:
        database.apply(profile)
        return mean_kl(model, calibration, rows)

    best, metrics = uniform, {}
    with run_ending(recorder, "search finished"):
        try:
            for event in evolve(uniform, evaluate, calibration.rows, calibration.row_tokens, database.sizes,
                                settings.levels, generations=settings.generations, offspring=settings.offspring,
                                stages=settings.stages, seed=settings.seed):
                recorder.record(event)
                best = profile_of(event, settings.levels)
                metrics["uniform_kl" if event.generation == 0 else "best_kl"] = event.best_fitness
                if on_generation:
                    on_generation(event)
            metrics.setdefault("best_kl", metrics["uniform_kl"])
            metrics.update({f"dense_{name}": value for name, value in dense_measures.items()})
            for label, profile in (("uniform", uniform), ("best", best)):
                database.apply(profile)
                if heldout is not None:
                    metrics[f"heldout_{label}_kl"] = mean_kl(model, heldout)
                metrics.update({f"{label}_{name}": value for name, value in (measures(model) if measures else {}).items()})
            for name, value in metrics.items():
                recorder.record(DecoderMetric(name=name, value=value))
        finally:
            database.restore()
    return SearchOutcome(trace, best, uniform, profile_document(settings.method, best, settings.levels), metrics)
