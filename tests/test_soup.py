"""The weight average (model soup) of waiting-line runs continued from the same model: engine/offline/soup.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.models import load_model
from engine.offline import soup
from engine.offline import train_dllm as waitline_train

TINY = ["--batch-size", "4", "--warmup", "1", "--hidden", "32", "--layers", "1", "--heads", "2", "--ffn", "64",
        "--eval-per-task", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A first run and two runs continued from it on different seeds (one with another data setting)."""
    folder = tmp_path_factory.mktemp("runs")
    start, seed_a, seed_b = folder / "start", folder / "a", folder / "b"
    waitline_train.main(["--model", "ar", "--steps", "2", *TINY, "--out", str(start)])
    waitline_train.main(["--model", "ar", "--steps", "2", *TINY, "--init-from", str(start), "--seed", "1",
                         "--out", str(seed_a)])
    waitline_train.main(["--model", "ar", "--steps", "2", *TINY, "--init-from", str(start), "--seed", "2",
                         "--invented-rate", "0.3", "--out", str(seed_b)])
    return start, seed_a, seed_b


def test_the_soup_is_the_mean_of_the_runs_weights_and_loads_as_a_waitline_model(runs, tmp_path):
    _, seed_a, seed_b = runs
    out = tmp_path / "soup"
    soup.main(["--model", "ar", "--from", str(seed_a), "--from", str(seed_b), "--out", str(out),
               "--eval-per-task", "1"])
    a, b, mean = (load_file(folder / "model.safetensors") for folder in (seed_a, seed_b, out))
    assert a.keys() == mean.keys() and any(not torch.equal(a[name], b[name]) for name in a)
    for name in a:
        assert mean[name].dtype == torch.float16
        assert torch.allclose(mean[name].float(), (a[name].float() + b[name].float()) / 2, atol=1e-3), name
    model = load_model(str(out))
    assert model.prompt_format is not None and model.prompt_format.name == "parallelbench-waiting-line"
    card = (out / "README.md").read_text()
    commands = [json.loads((folder / "training_log.json").read_text())["command"] for folder in (seed_a, seed_b)]
    assert all(f"`{command}`" in card for command in commands) and "--invented-rate 0.3" in card
    assert card.startswith("# waitline-ar\n") and "model soup" in card and "## Held-out accuracy" in card
    assert "`decoding-explorer assets rebuild waitline-ar`" in card
    log = json.loads((out / "training_log.json").read_text())
    assert [run["command"] for run in log["soup_of"]] == commands
    assert log["command"] == f"python -m engine.offline.soup --model ar --from {seed_a} --from {seed_b} --out {out}"
    assert set(log["held_out"]) == {"copy", "reverse", "sort"}


def test_training_continues_from_a_soup_and_its_card_names_the_average_among_the_earlier_runs(runs, tmp_path):
    _, seed_a, seed_b = runs
    averaged, more = tmp_path / "soup", tmp_path / "more"
    soup.main(["--model", "ar", "--from", str(seed_a), "--from", str(seed_b), "--out", str(averaged),
               "--eval-per-task", "1"])
    waitline_train.main(["--model", "ar", "--steps", "1", *TINY, "--init-from", str(averaged), "--out", str(more)])
    earlier = (more / "README.md").read_text().split("**Earlier runs continued from**")[1].split("**Training**")[0]
    other = json.loads((seed_b / "training_log.json").read_text())["command"]
    assert f"python -m engine.offline.soup --model ar --from {seed_a} --from {seed_b}" in earlier
    assert f"the uniform average of the run before it and `{other}` (2 steps" in earlier  # the other run averaged


def test_runs_continued_from_a_soup_are_averaged_again_and_the_card_counts_every_run_once(runs, tmp_path):
    _, seed_a, seed_b = runs
    first = tmp_path / "soup"
    soup.main(["--model", "ar", "--from", str(seed_a), "--from", str(seed_b), "--out", str(first),
               "--eval-per-task", "1"])
    more = [tmp_path / f"more{seed}" for seed in (5, 6)]
    for seed, folder in zip((5, 6), more):
        waitline_train.main(["--model", "ar", "--steps", "1", *TINY, "--init-from", str(first), "--seed", str(seed),
                             "--out", str(folder)])
    second = tmp_path / "soup2"
    soup.main(["--model", "ar", "--from", str(more[0]), "--from", str(more[1]), "--out", str(second),
               "--eval-per-task", "1"])
    logs = [json.loads((folder / "training_log.json").read_text()) for folder in (*runs, *more)]
    expected = sum(log["seconds"] for log in logs)  # the start, both runs of the first soup and both runs after it
    assert soup.total_seconds(logs[3:]) == pytest.approx(expected, rel=1e-9)
    assert f"**Training time**: {expected:.0f} s on CPU in all" in (second / "README.md").read_text()


def test_only_runs_of_one_model_from_the_same_first_run_are_averaged(runs, tmp_path):
    start, seed_a, _ = runs
    other = tmp_path / "other"  # from scratch again: the same shape, but not continued from ``start``
    waitline_train.main(["--model", "ar", "--steps", "2", *TINY, "--seed", "3", "--out", str(other)])
    wider = tmp_path / "wider"
    waitline_train.main(["--model", "ar", "--steps", "1", *TINY, "--hidden", "64", "--out", str(wider)])
    out = tmp_path / "soup"
    cases = [([seed_a], "at least two runs"), ([seed_a, other], "not continue from the same first run"),
             ([start, wider], "differ in config.json"), ([seed_a, tmp_path], "no training_log.json")]
    for folders, message in cases:
        with pytest.raises(SystemExit, match=message):
            soup.main(["--model", "ar", *[arg for folder in folders for arg in ("--from", str(folder))],
                       "--out", str(out)])
    assert not out.exists()  # nothing written when the runs cannot be averaged
