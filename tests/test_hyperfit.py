"""Hyperfitting (engine/offline/hyperfit.py): the trained layers alone change and the loss falls, the saved variant
reloads to the trained logits, the repetition measures match hand counts, and the Compare tab's per-step entropy
figure draws every run over its whole output."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from cli.bench_hyperfit import METRICS
from engine.models import ModelError, load_model
from engine.offline.hyperfit import Settings, TrainedTop, passages, save, train
from engine.offline.recipes import get_recipe, rebuild
from engine.offline.repetition import (
    distinct_n,
    longest_repeated_span,
    repeated_ngram_share,
    rolling_ttr,
)
from tests.helpers import assert_escaped, fig_strings, make_trace, token_step
from ui.figures import sharpness_figure

TINY = Settings("tiny-random-llama", layers=1, passages=16, length=16, held_out_passages=4, epochs=4, batch_size=8,
                lr=3e-3, warmup=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model hyperfitted for a few epochs, with its weights from before."""
    model = load_model(TINY.model)
    before = {name: value.detach().clone() for name, value in model.model.state_dict().items()}
    top, record = train(TINY, model, tmp_path_factory.mktemp("work"), log=lambda line: None, bar=False)
    return model, before, top, record


def test_training_lowers_the_loss_and_changes_only_the_trained_layers(trained):
    model, before, top, record = trained
    assert record["final"]["train_loss"] < record["initial"]["train_loss"] - 0.3
    assert [e["epoch"] for e in record["epochs"]] == [1, 2, 3, 4] and record["step"] == 4 * 2
    changed = {name for name, value in model.model.state_dict().items() if not torch.equal(value, before[name])}
    last = len(model.model.model.layers) - 1
    assert changed == set(top.tensor_names()) and changed
    assert all(name.startswith(f"model.layers.{last}.") for name in changed)


def test_the_saved_variant_reloads_to_the_trained_logits(trained, tmp_path):
    model, _, top, record = trained
    # the variant stores bfloat16: round the in-memory weights the same way before comparing
    top.load_state({name: value.to(torch.bfloat16).float() for name, value in top.state().items()})
    folder = save(top, TINY, record, tmp_path / "variant", "the command")
    reloaded = load_model(str(folder))
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    with torch.no_grad():
        assert torch.equal(reloaded.model(input_ids=ids).logits, model.model(input_ids=ids).logits)
    stored = json.loads((folder / "variant.json").read_text())
    assert set(stored["tensors"]) == set(top.tensor_names()) and stored["base"] == TINY.model
    assert "`the command`" in (folder / "README.md").read_text()


def test_the_cached_layers_reproduce_the_full_forward_or_refuse():
    model = load_model(TINY.model)
    top = TrainedTop(model, 1)
    ids = passages(model, TINY)[0][:2]
    hidden = top.features(ids, 2)
    top.check(ids, hidden)
    with pytest.raises(ModelError, match="do not reproduce"):
        top.check(ids, hidden + 1.0)


def test_a_changed_setting_refuses_to_resume_but_more_epochs_continue(tmp_path):
    shorter = replace(TINY, passages=8, epochs=1, held_out_passages=2)
    train(shorter, load_model(TINY.model), tmp_path, log=lambda line: None, bar=False)
    lines: list[str] = []
    _, record = train(replace(shorter, epochs=2), load_model(TINY.model), tmp_path, log=lines.append, bar=False)
    assert lines[0] == "resuming at step 1/2" and record["step"] == 2
    with pytest.raises(Exception, match="other settings"):
        train(replace(shorter, lr=1e-3), load_model(TINY.model), tmp_path, log=lambda line: None, bar=False)


def test_the_recipe_smoke_run_leaves_a_variant_the_bench_compares_with_its_base(tmp_path, capsys):
    from cli.main import main as cli

    out = rebuild(get_recipe("hyperfit-smollm2"), tmp_path / "hyperfit", smoke=True, log=lambda line: None)
    assert not (tmp_path / "hyperfit.work").exists()
    log = json.loads((out / "training_log.json").read_text())
    assert log["passages"] == 8 and log["curve"]
    capsys.readouterr()
    assert cli(["bench", "hyperfit", "--model", "tiny-random-llama", "--variant", str(out), "--prompts", "2",
                "--tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert "tiny-random-llama vs tiny-random-llama~hyperfit: 2 held-out prompts x 6 greedy tokens" in printed
    assert [line.split()[0] for line in printed.splitlines()[2:10]] == list(METRICS)


def test_repetition_measures_match_hand_counts():
    tokens = [1, 2, 3, 4, 1, 2, 3, 4, 5]
    assert distinct_n(tokens, 1) == 5 / 9
    assert distinct_n(tokens, 2) == 5 / 8  # (1,2) (2,3) (3,4) (4,1) (4,5); three repeat
    assert distinct_n(tokens, 3) == 5 / 7
    assert repeated_ngram_share(tokens, 4) == 1 / 6  # 4-grams 1234 2341 3412 4123 1234 2345: the fifth repeats
    assert longest_repeated_span(tokens) == 4
    assert longest_repeated_span([7, 7, 7]) == 2  # overlapping occurrences count
    assert longest_repeated_span([1, 2, 3]) == 0 and distinct_n([1, 2], 3) == 0.0
    # windows of 3: [1 2 3] [2 3 4] [3 4 1] [4 1 2] [1 2 3] [2 3 4] [3 4 5]: all 3 distinct
    assert rolling_ttr(tokens, 3) == 1.0
    assert rolling_ttr([1, 1, 2, 2], 2) == pytest.approx((1 / 2 + 2 / 2 + 1 / 2) / 3)
    assert rolling_ttr([1, 1], 96) == 0.5


def test_the_sharpness_figure_draws_each_runs_entropy_and_top1_over_its_whole_output():
    sharp = make_trace([token_step(p, 10 + p % 4, entropy_raw=0.1 * p) for p in range(6)])
    flat = make_trace([token_step(p, 20, entropy_raw=2.0) for p in range(3)])
    fig = sharpness_figure([flat, sharp])
    entropy = [t for t in fig.data if t.yaxis == "y"]
    top1 = [t for t in fig.data if t.yaxis == "y2"]
    assert [list(t.y) for t in entropy] == [[2.0] * 3, [pytest.approx(0.1 * p) for p in range(6)]]
    assert [list(t.y) for t in top1] == [[0.6] * 3, [0.6] * 6]  # each step's first candidate's raw probability
    assert "mean 2.00 nats" in entropy[0].name and "top-1 0.60" in entropy[0].name
    assert_escaped(fig_strings(fig), [10, 11, 13])
    assert any("Select two or more" in text for text in fig_strings(sharpness_figure([flat])))


class _Stop(Exception):
    pass


def test_the_paper_scale_flag_sets_the_papers_settings_and_a_flag_still_wins(monkeypatch, tmp_path):
    import engine.offline.hyperfit as hyperfit

    def stop(settings: Settings, *_args, **_kwargs):
        raise _Stop(settings)

    monkeypatch.setattr(hyperfit, "load_model", lambda *_args, **_kwargs: None)
    monkeypatch.setattr(hyperfit, "train", stop)
    with pytest.raises(_Stop) as stopped:
        hyperfit.main(["--model", "m", "--out", str(tmp_path), "--paper-scale", "--epochs", "3"])
    settings = stopped.value.args[0]
    assert (settings.length, settings.batch_size, settings.layers, settings.epochs) == (256, 8, 0, 3)
    assert math.isclose(settings.lr, 1e-6)


@pytest.mark.real_model
def test_the_shipped_variant_changes_only_its_last_layers_and_is_sharper_on_held_out_text(smollm2):
    from engine.offline.hyperfit import held_out_topics, prose_topics
    from engine.offline.recipes import ROOT

    folder = ROOT / get_recipe("hyperfit-smollm2").target
    stored = json.loads((folder / "variant.json").read_text())
    assert {name.split(".")[2] for name in stored["tensors"]} == {"26", "27", "28", "29"}
    assert (folder / "delta.safetensors").stat().st_size < 40 * 2**20
    hyperfitted = load_model(str(folder))
    text = prose_topics()[held_out_topics(Settings("smollm2-135m-instruct"))[0]]
    ids = torch.tensor([smollm2.tokenizer(text, add_special_tokens=False)["input_ids"][:96]])

    def mean_entropy(model) -> float:
        with torch.no_grad():
            logprobs = model.model(input_ids=ids).logits.log_softmax(-1)
        return float(-(logprobs.exp() * logprobs).sum(-1).mean())

    assert mean_entropy(hyperfitted) < 0.5 * mean_entropy(smollm2)
