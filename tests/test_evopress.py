"""EvoPress: the level-switch mutation keeps the budget, the search never gets worse, beats the uniform profile on a
tiny model whose layers matter unequally, swaps layers exactly as pruning them would, and its trace stores, reloads
and draws."""

from __future__ import annotations

import random

import pytest

from engine.offline.evopress import (
    DEFAULT_LEVELS,
    SelectionStage,
    evolve,
    level_switch,
    mean_sparsity,
    mutate,
    size_groups,
    uniform_profile,
    weighted_level,
)
from engine.params import ParamError

LEVELS = DEFAULT_LEVELS


def test_level_switch_and_mutation_keep_the_weighted_budget():
    sizes = [10, 10, 10, 30, 30, 10, 30]  # two size groups: a switch across them would change the budget
    groups = size_groups(sizes)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 5], [3, 4, 6]]
    rng = random.Random(0)
    profile = uniform_profile(0.5, len(sizes), LEVELS)
    budget = weighted_level(profile, sizes)
    changed = 0
    for _ in range(2000):
        child = mutate(profile, groups, len(LEVELS) - 1, rng)
        assert weighted_level(child, sizes) == pytest.approx(budget, abs=1e-12)
        assert all(0 <= level < len(LEVELS) for level in child)
        changed += child != profile
        profile = child
    assert changed > 1500  # the walk moves: most mutations change something
    assert max(profile) - min(profile) >= 2  # and it leaves the uniform profile behind


def test_level_switch_moves_one_step_up_and_one_down_within_a_group():
    rng = random.Random(1)
    for _ in range(200):
        child = level_switch((5, 5, 5, 5), [[0, 1, 2, 3]], 9, rng)
        assert sorted(b - a for a, b in zip((5, 5, 5, 5), child)) == [-1, 0, 0, 1]
    # at the edges: only the layer that can rise rises, only the one that can fall falls
    assert level_switch((0, 9), [[0, 1]], 9, rng) in {(1, 8)}
    assert level_switch((0, 0), [[0, 1]], 9, rng) == (0, 0)  # nothing can fall: unchanged


def test_uniform_profile_needs_a_level():
    assert uniform_profile(0.3, 4, LEVELS) == (3, 3, 3, 3)
    with pytest.raises(ParamError, match="not one of the levels"):
        uniform_profile(0.35, 4, LEVELS)


def separable_cost(weights: list[float]):
    """A known landscape: layer i at sparsity s costs weights[i] * s**2 (plus row noise, so stages disagree)."""
    def evaluate(profile, rows):
        base = sum(w * LEVELS[level] ** 2 for w, level in zip(weights, profile))
        return base * (1 + 0.05 * (sum(rows) % 7) / 7)

    return evaluate


def test_best_fitness_never_rises_and_every_individual_keeps_the_budget():
    weights = [8.0, 1.0, 0.2, 4.0, 0.5, 2.0]
    sizes = [100] * len(weights)
    start = uniform_profile(0.5, len(weights), LEVELS)
    events = list(evolve(start, separable_cost(weights), rows=16, row_tokens=32, sizes=sizes, levels=LEVELS,
                         generations=40, offspring=6, stages=(SelectionStage(3, 64), SelectionStage(2, 256)), seed=3))
    assert [e.generation for e in events] == list(range(41))
    best = [e.best_fitness for e in events]
    assert all(later <= earlier for earlier, later in zip(best, best[1:]))
    assert best[-1] < 0.8 * best[0]  # it found better profiles, not only kept the start
    for event in events:
        assert event.mean_sparsity == pytest.approx(0.5)
        assert event.stage_tokens[-1] == 16 * 32  # the last stage is the whole set
    # the optimum of a separable quadratic under a budget puts less sparsity where the weight is larger
    final = events[-1].profile
    assert final[0] < final[2] and final[3] < final[4]


def test_search_is_seeded():
    weights = [3.0, 1.0, 0.3, 2.0]
    kwargs = dict(rows=8, row_tokens=16, sizes=[10] * 4, levels=LEVELS, generations=10, offspring=4)
    run = lambda seed: [e.profile for e in evolve((5,) * 4, separable_cost(weights), seed=seed, **kwargs)]  # noqa: E731
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_mean_sparsity_weights_layers_by_parameter_count():
    assert mean_sparsity((1, 5), [300, 100], LEVELS) == pytest.approx((0.1 * 300 + 0.5 * 100) / 400)


# ---------------------------------------------------------------- on a tiny model whose layers matter unequally

QUIET = (0, 2, 4)  # layers that write nothing to the residual stream: pruning them costs nothing


@pytest.fixture(scope="module")
def unequal():
    """A 6-layer tiny llama whose even layers write nothing to the residual stream (their output projections are
    zero): the uniform profile prunes the loud layers as much as the quiet ones, the best profile at the same budget
    puts 0.9 on the quiet layers and 0.1 on the loud ones, and a search that works moves sparsity that way."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.models.handle import LoadedModel
    from engine.models.tiny import INIT_STD, build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=INIT_STD, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for index in QUIET:
            layer = model.model.layers[index]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return LoadedModel("tiny-unequal-llama", model, tokenizer, "test")


def corpus_text() -> str:
    from engine.models.variants import calibration_texts

    return "\n\n".join(calibration_texts())


SETTINGS = dict(method="wanda", sparsity=0.5, generations=12, offspring=6, rows=6, row_tokens=32, heldout_rows=4,
                stages=(SelectionStage(3, 32), SelectionStage(2, 96)), seed=0)


@pytest.fixture(scope="module")
def searched(unequal, tmp_path_factory):
    from engine.offline.evopress import SearchSettings, record_search
    from storage import TraceStore

    store = TraceStore(f"sqlite:///{tmp_path_factory.mktemp('evopress') / 'runs.db'}")
    outcome = record_search(unequal, corpus_text(), SearchSettings(**SETTINGS), sinks=[store.sink()])
    yield outcome, store
    store.close()


def test_search_beats_the_uniform_profile_and_finds_the_quiet_layers(searched):
    outcome, _ = searched
    metrics = outcome.metrics
    assert metrics["best_kl"] < 0.6 * metrics["uniform_kl"]
    assert metrics["heldout_best_kl"] < 0.8 * metrics["heldout_uniform_kl"]  # on rows the search never scored
    levels = outcome.document["levels"]
    quiet = sum(levels[str(i)] for i in QUIET) / len(QUIET)
    loud = sum(levels[str(i)] for i in range(6) if i not in QUIET) / (6 - len(QUIET))
    assert quiet >= loud + 0.5
    assert sum(levels.values()) / 6 == pytest.approx(0.5)  # the same budget as the uniform profile


def test_the_recorded_generations_are_monotone_and_on_budget(searched):
    from engine.events import SearchGeneration

    outcome, _ = searched
    generations = [e for e in outcome.trace.events if isinstance(e, SearchGeneration)]
    assert len(generations) == SETTINGS["generations"] + 1
    best = [g.best_fitness for g in generations]
    assert all(later <= earlier for earlier, later in zip(best, best[1:]))
    assert all(g.mean_sparsity == pytest.approx(0.5) for g in generations)
    assert all(sum(g.profile) / 6 == pytest.approx(0.5) for g in generations)
    assert any(g.accepted for g in generations)
    assert generations[1].stage_tokens == [32, 96, 6 * 32]  # the stages' token counts, the whole set last


def test_database_swap_equals_pruning_and_the_derived_variant(unequal, searched):
    """The searched model (the database's swapped layers) is the model ``models derive --layer-profile`` makes."""
    import torch

    from engine.models.prune import prune_weight
    from engine.models.variant_spec import spec_from_profile
    from engine.models.variants import apply_variant, calibration_texts, input_norms
    from engine.offline.evopress import build_database

    outcome, _ = searched
    database = build_database(unequal, "wanda")
    norms = input_norms(unequal, calibration_texts())
    dense = {name: module.weight.detach().clone()
             for name, module in unequal.model.model.layers[1].named_modules() if isinstance(module, torch.nn.Linear)}
    for level in (0, 3, 9):
        for linear, (name, weight) in enumerate(dense.items()):
            direct = prune_weight(weight, DEFAULT_LEVELS[level], None, "wanda", norms[f"1.{name}"])
            assert torch.equal(database.weight(1, linear, level), direct)
    variant = apply_variant(unequal, spec_from_profile(outcome.document))
    database.apply(outcome.best)
    try:
        searched_weights = dict(unequal.model.named_parameters())
        for name, weight in variant.model.named_parameters():
            assert torch.equal(weight, searched_weights[name]), name
    finally:
        database.restore()
    for name, module in unequal.model.model.layers[1].named_modules():
        if name in dense:
            assert torch.equal(module.weight, dense[name])  # restored


def test_the_trace_stores_reloads_and_draws(searched):
    from engine.events import SearchGeneration
    from ui.figures.methods import method_figures, method_step_count
    from ui.figures.search import fitness_figure, profile_figure

    outcome, store = searched
    loaded = store.load(outcome.trace.run_id)
    assert loaded.info.decoder == "evopress" and loaded.status == "finished"
    assert [e for e in loaded.events if isinstance(e, SearchGeneration)] == [
        e for e in outcome.trace.events if isinstance(e, SearchGeneration)]
    assert loaded.metrics["best_kl"] == pytest.approx(outcome.metrics["best_kl"], rel=1e-6)
    fitness = fitness_figure(loaded, selected=3)
    best_line = next(t for t in fitness.data if t.name == "best (whole calibration set)")
    assert list(best_line.y) == [e.best_fitness for e in loaded.events if isinstance(e, SearchGeneration)]
    profile = profile_figure(loaded, selected=3)
    assert list(profile.data[0].y) == loaded.events[4].profile  # generation 3 (after RunStarted)
    assert len(profile.data[1].z) == SETTINGS["generations"] + 1
    assert method_step_count(loaded) == SETTINGS["generations"] + 1
    main, side = method_figures(loaded, 3)
    assert main is not None and side is not None


def test_the_library_views_show_the_search_and_escape_its_names(searched):
    from ui.views import view_values

    outcome, store = searched
    loaded = store.load(outcome.trace.run_id)
    loaded.info.model = "<script>alert(1)</script>"
    stream, slider, primary, secondary, *_ = view_values(loaded, 5, "probability")
    assert slider.maximum == SETTINGS["generations"] and slider.value == 5
    assert primary["visible"] and secondary["visible"]
    for figure in (primary["value"], secondary["value"]):
        assert "<script>" not in figure.layout.title.text and "&lt;script&gt;" in figure.layout.title.text


def test_command_writes_a_derivable_profile_and_stores_the_search(capsys, tmp_path):
    import json

    from cli.main import main
    from engine.models.variant_spec import spec_from_profile
    from storage import TraceStore

    db, out = f"sqlite:///{tmp_path / 'runs.db'}", tmp_path / "profile.json"
    argv = ["evopress", "tiny-random-llama", "--method", "magnitude", "--sparsity", "0.4", "--generations", "3",
            "--offspring", "3", "--rows", "4", "--row-tokens", "16", "--heldout-rows", "2", "--stages", "2:16",
            "--db", db, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    document = json.loads(out.read_text())
    assert document["method"] == "magnitude" and sum(document["levels"].values()) / 2 == pytest.approx(0.4)
    assert spec_from_profile(document).layer_profile == {0: document["levels"]["0"], 1: document["levels"]["1"]}
    assert "calibration" in printed and "held-out" in printed
    run_id = printed.split("run ")[-1].split()[0]
    with TraceStore(db) as store:
        trace = store.load(run_id)
    assert trace.info.decoder == "evopress" and trace.info.params["method"] == "magnitude"
    assert main(argv[:2] + ["--sparsity", "0.45", "--db", db]) == 2  # not a level: one clear error
    assert "not one of the levels" in capsys.readouterr().err
