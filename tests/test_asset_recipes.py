"""Every shipped asset's recipe (engine/offline/recipes.py): its stage chain holds together, its card names the one
rebuild command, and a few steps of every stage run and leave outputs the app loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main as cli
from engine.diffusion.learn2pd import load_filter
from engine.models import load_model
from engine.offline.recipes import ADAPT_STEPS, RECIPES, ROOT, WAITLINE_STEPS, WORK, get_recipe, rebuild
from engine.offline.sample_traces import read_recipes, record_samples
from engine.trace import read_file
from storage import TraceStore

OUT = Path("/rebuilt")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_each_stage_continues_from_an_earlier_stage_and_the_last_one_writes_the_output(recipe):
    written: list[Path] = []
    for stage in recipe.stages:
        assert set(stage.inputs(OUT)) <= set(written), stage.command(OUT)
        assert "--minutes" not in stage.args or stage.args[stage.args.index("--minutes") + 1] == "0"
        written.append(stage.output_path(OUT))
    assert written[-1] == OUT
    assert all(path.parent == OUT / WORK for path in written[:-1])
    assert len(set(written)) == len(written)


def test_the_dllm_recipe_runs_the_ar_twins_first_run_then_adapts_its_weights():
    ar, mdlm = get_recipe("waitline-ar").stages, get_recipe("waitline-mdlm").stages
    (first, long_lists, *from_long, averaged, pieces), (twin, adapted, refined, rainbow, final) = ar, mdlm
    assert not first.inputs(OUT) and "--minutes" not in first.args
    assert twin == first  # the dLLM is adapted from the AR twin's first run, not its long-list run
    assert long_lists.inputs(OUT) == [first.output_path(OUT)]
    assert all(run.inputs(OUT) == [long_lists.output_path(OUT)] for run in from_long) and len(from_long) == 3
    # the long-list run and the three runs from it are averaged (a model soup); the shipped twin continues from that
    assert averaged.tool == "engine.offline.soup"
    assert averaged.inputs(OUT) == [run.output_path(OUT) for run in (long_lists, *from_long)]
    assert pieces.inputs(OUT) == [averaged.output_path(OUT)] and pieces.output_path(OUT) == OUT
    assert adapted.inputs(OUT) == [twin.output_path(OUT)] and refined.inputs(OUT) == [adapted.output_path(OUT)]
    assert rainbow.inputs(OUT) == [refined.output_path(OUT)] and final.inputs(OUT) == [rainbow.output_path(OUT)]
    assert final.output_path(OUT) == OUT
    assert "--width-group" in refined.args and "--width-group" not in adapted.args

    def option(stage, name: str) -> str:
        return stage.args[stage.args.index(name) + 1]

    assert {option(stage, "--model") for stage in ar} == {"ar"} and {option(stage, "--model") for stage in mdlm[1:]} \
        == {"mdlm"}
    assert int(option(first, "--steps")) == WAITLINE_STEPS
    assert {option(stage, "--long-share") for stage in (long_lists, *from_long, pieces)} == {"0.5"}
    assert "--long-share" not in first.args
    for name in ("--hidden", "--layers", "--heads", "--ffn", "--batch-size"):
        assert len({option(stage, name) for stage in (*ar, *mdlm) if stage != averaged}) == 1, name
    # the last two runs each draw a fresh data stream, weighted towards the target tasks, with Rainbow Padding; so does
    # every AR run after the first
    assert [option(stage, "--seed") for stage in (refined, rainbow, final)] == ["0", "3", "4"]
    assert [option(stage, "--seed") for stage in (long_lists, *from_long, pieces)] == ["5", "7", "8", "9", "10"]
    assert "--piece-rate" in pieces.args and not any("--piece-rate" in stage.args for stage in (*ar[:-1], *mdlm))
    assert "--task-weight" in final.args and "--task-weight" not in refined.args
    assert option(rainbow, "--rainbow-pads") == option(final, "--rainbow-pads") == "7"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: recipe.name)
def test_the_card_names_the_rebuild_command(recipe):
    card = (ROOT / recipe.target / "README.md").read_text()
    assert f"`{recipe.command}`" in card


def test_the_cli_lists_every_recipe_and_refuses_in_one_line(capsys, tmp_path):
    assert cli(["assets", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(recipe.command in listed for recipe in RECIPES)
    assert f"--model ar --steps {WAITLINE_STEPS}" in listed and f"--model mdlm --steps {ADAPT_STEPS}" in listed
    assert cli(["assets", "rebuild", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no recipe 'nope'")
    assert cli(["assets", "rebuild", "learn2pd-filter", "--smoke"]) == 2  # never a few-steps asset where it ships
    assert cli(["assets", "rebuild", "learn2pd-filter", "--smoke", "--out", "assets/models/learn2pd-filter"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.startswith("error: --smoke")


@pytest.mark.parametrize("name", ["waitline-ar", "waitline-mdlm"])
def test_a_few_steps_of_every_dllm_run_leave_a_model_that_loads(tmp_path, name):
    lines: list[str] = []
    out = rebuild(get_recipe(name), tmp_path / name, smoke=True, log=lines.append)
    model = load_model(str(out))
    assert getattr(model.model.config, "is_causal", True) == (name == "waitline-ar")
    log = json.loads((out / "training_log.json").read_text())
    assert log["finished"] and log["steps_done"] == 3
    assert "continued_from" in log  # the dLLM starts from the AR twin's weights, the twin's last run from a soup
    assert model.prompt_format is not None and model.prompt_format.name == "parallelbench-waiting-line"
    card = (out / "README.md").read_text()
    assert "`decoding-explorer assets rebuild " + name + "`" in card
    assert "from scratch" not in card and "people first" not in card  # each card names the run it continues from
    assert "people from the start, where the earlier run ended" in card
    assert not (out / WORK).exists() and not out.with_name(out.name + ".work").exists()  # checkpoints removed
    stages = get_recipe(name).stages
    assert lines[0].startswith(f"[1/{len(stages)}] python -m engine.offline.train_dllm --model ar ")
    trained = [line for line in lines[:-1] if "engine.offline.soup" not in line]
    soups = sum(stage.tool == "engine.offline.soup" for stage in stages)
    assert len(lines) == len(stages) + 1 and len(trained) == len(stages) - soups
    assert all("--steps 3" in line for line in trained)


def test_a_few_examples_of_the_learn2pd_recipe_leave_a_filter_that_loads(tmp_path):
    out = rebuild(get_recipe("learn2pd-filter"), tmp_path / "filter", smoke=True, log=lambda line: None)
    assert load_filter(out).block_length == 8
    assert "`decoding-explorer assets rebuild learn2pd-filter`" in (out / "README.md").read_text()


@pytest.mark.real_model
def test_a_short_text_of_the_adadec_recipe_gives_the_model_a_threshold(tmp_path):
    out = rebuild(get_recipe("adadec-thresholds"), tmp_path / "adadec", smoke=True, log=lambda line: None)
    entry = json.loads((out / "thresholds.json").read_text())["smollm2-135m-instruct"]
    assert entry["threshold"] > 0 and "400 characters" in entry["data"]


def test_the_sample_recipes_are_the_shipped_samples_settings():
    recipes = read_recipes()
    shipped = {path.name.removesuffix(".json.gz") for path in (ROOT / "assets" / "samples").glob("*.json.gz")}
    assert set(recipes) == shipped
    trace = read_file(ROOT / "assets" / "samples" / "diffusion-llada.json.gz")
    assert (recipes["diffusion-llada"]["params"], recipes["diffusion-llada"]["prompt"]) == (trace.info.params,
                                                                                            trace.info.prompt)


def test_every_sample_recorded_for_a_few_tokens_imports_and_opens_in_the_figures(smollm2, tmp_path):
    from ui.views import view_values

    loaded: list[str] = []

    def load(name: str):
        loaded.append(name)
        return smollm2 if name == "smollm2-135m-instruct" else load_model(name)

    paths = record_samples(read_recipes(), tmp_path, max_new_tokens=3, load=load, log=lambda line: None)
    assert len(paths) == len(read_recipes()) and sorted(loaded) == sorted(set(loaded))  # each model loaded once
    store = TraceStore("sqlite://")
    for path in paths:
        trace = store.load(store.import_file(path))
        assert 1 <= len(trace.output_token_ids) <= 3, path
        assert list(view_values(trace, 0, "probability")), path


@pytest.mark.real_model
@pytest.mark.parametrize("name,head", [("eagle-smollm2", "FeatureHead"), ("fspad-smollm2", "FspadHead"),
                                       ("falcon-smollm2", "FalconHead"), ("medusa-smollm2", "MedusaHeads"),
                                       ("ppd-smollm2", "PromptTokens")])
def test_a_few_steps_of_the_drafter_recipes_leave_a_head_the_decoder_loads(tmp_path, name, head):
    from engine.speculative.falcon_head import FalconHead
    from engine.speculative.feature_head import FeatureHead, load_head
    from engine.speculative.fspad_head import FspadHead
    from engine.speculative.medusa_heads import MedusaHeads
    from engine.speculative.ppd_prompts import PromptTokens

    out = rebuild(get_recipe(name), tmp_path / name, smoke=True, log=lambda line: None)
    kind = {kind.__name__: kind for kind in (FeatureHead, FspadHead, FalconHead, MedusaHeads, PromptTokens)}[head]
    assert isinstance(load_head(out, load_model("smollm2-135m-instruct"), kind), kind)
    assert f"`decoding-explorer assets rebuild {name}`" in (out / "README.md").read_text()
    assert not (out / WORK).exists()
