"""The `eagle` drafter: its feature head, its training from cached feature shards, and its losslessness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.offline.drafter_data import DrafterShards
from engine.offline.drafter_losses import ttt_visible
from engine.offline.train_drafter import Settings, train
from engine.params import ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.draft_length import VerifyCost
from engine.speculative.feature_head import FeatureHead, load_head, save_head
from engine.speculative.tree import tree_forward
from tests.helpers import (
    PROMPTS,
    TRAIN_PROMPTS,
    assert_cut_trees_stay_lossless,
    assert_first_two_tokens_follow_target,
    first_token_inside_a_draft,
    greedy_ids,
    hidden_states,
    rounds_of,
    run_ignoring_eos,
    train_tiny_head,
    write_shards,
)


def train_head(llama, tmp: Path, steps: int, out: str = "out", **options):
    return train_tiny_head("eagle", llama, tmp, steps, 3e-3, out, **options)


@pytest.fixture(scope="module")
def data(llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eagle") / "data"
    folder.mkdir()
    return write_shards(llama, folder)


@pytest.fixture(scope="module")
def trained(llama, data) -> tuple[Path, dict]:
    """A head trained long enough for deep drafts to be accepted, saved as a folder."""
    head, run = train_head(llama, data.parent, steps=300)
    save_head(head, data.parent / "head", {}, "# tiny head")
    return data.parent / "head", run


@pytest.fixture(scope="module")
def small_vocab(llama, data) -> Path:
    head, _ = train_head(llama, data.parent, steps=150, out="out-small", draft_vocab=60, seed=1)
    folder = data.parent / "small-vocab"
    save_head(head, folder, {}, "# tiny head, 60 draft tokens")
    return folder


# ---------------------------------------------------------------- training


def test_the_shards_read_back_as_written(llama, data):
    shards = DrafterShards(data)
    assert len(shards) == len(TRAIN_PROMPTS)
    seq = shards[5]
    torch.testing.assert_close(seq.hidden_last.float(), hidden_states(llama, seq.input_ids.tolist())[-1][0], atol=2e-2, rtol=1e-2)


def test_training_lowers_the_loss_and_accepts_most_next_tokens(trained):
    _, run = trained
    curve = run["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert curve[-1]["accuracy"] > curve[0]["accuracy"] + 0.2
    assert run["step"] == 300 and run["held_out_sequences"] == 1


def test_an_interrupted_run_resumes_to_the_same_head(llama, data, tmp_path):
    (tmp_path / "data").symlink_to(data)
    whole, _ = train_head(llama, tmp_path, steps=12, checkpoint_every=4)
    (tmp_path / "out" / "checkpoint.pt").unlink()

    def crash_at_step_8(line: str) -> None:
        if line.startswith("step 8/"):
            raise KeyboardInterrupt

    settings = Settings("eagle", str(tmp_path / "data"), steps=12, minutes=0, batch_size=4, lr=3e-3, warmup=5,
                        held_out=0.1, log_every=4, checkpoint_every=4)
    with pytest.raises(KeyboardInterrupt):
        train(settings, DrafterShards(data), llama, tmp_path / "out", log=crash_at_step_8)
    resumed, run = train(settings, DrafterShards(data), llama, tmp_path / "out", log=lambda _: None)
    assert run["step"] == 12
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_a_saved_head_loads_with_the_same_weights_and_shares_the_targets_tensors(llama, trained):
    folder, _ = trained
    head = load_head(folder, llama)
    assert set(json.loads((folder / "config.json").read_text())) >= {"model", "hidden_size", "vocab_size"}
    assert not any(name.startswith("_frozen") for name in head.state_dict())  # the target's tensors are not saved
    assert head._frozen[1].weight.data_ptr() == llama.model.get_output_embeddings().weight.data_ptr()
    again = load_head(folder, llama)
    for name, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)


def test_a_missing_or_foreign_head_is_a_param_error(llama, trained, tmp_path):
    for params in ({}, {"drafter": str(tmp_path)}):  # nothing shipped for the tiny model; an empty folder
        trace = record(llama, "eagle", "Hello", params, RunSettings(max_new_tokens=4))
        assert trace.status == "failed" and trace.reason.startswith("ParamError: ")
        assert "python -m engine.offline.train_drafter --head eagle" in trace.reason
    with pytest.raises(ParamError, match="trained for"):
        load_head(trained[0], load_model("tiny-random-gemma3"))


# ---------------------------------------------------------------- the reduced draft vocabulary


def test_a_reduced_vocabulary_maps_its_logits_back_to_target_ids(llama):
    vocab = torch.tensor([7, 3, 120, 55])
    head = FeatureHead(llama, vocab)
    features = torch.randn(2, llama.model.config.hidden_size)
    full = llama.model.get_output_embeddings()(features)
    torch.testing.assert_close(head.logits(features), full[:, vocab])
    assert head.target_ids(torch.tensor([0, 2, 3])).tolist() == [7, 120, 55]
    assert head.draft_indices(torch.tensor([120, 3, 4])).tolist() == [2, 1, -1]


def test_a_reduced_vocabulary_head_drafts_only_its_tokens_and_stays_lossless(llama, small_vocab):
    vocab = set(load_head(small_vocab, llama).draft_vocab.tolist())
    assert len(vocab) == 60
    for prompt in PROMPTS:
        trace = run_ignoring_eos(llama, "eagle", prompt, {"drafter": str(small_vocab)}, max_new_tokens=30)
        assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=30).output_token_ids
        assert {node.token_id for r in rounds_of(trace) for node in r.nodes} <= vocab


# ---------------------------------------------------------------- the verify forward's hidden states


def test_the_tree_forward_returns_each_nodes_hidden_state(llama):
    target = PrefixCache(llama)
    target.record_hidden = True
    context, parents, tokens = llama.encode("The quick brown fox"), [-1, -1, 0, 2], [11, 12, 13, 14]
    tree_forward(target, context, parents, tokens)
    hidden = target.last_hidden
    assert hidden.shape == (len(context) + 4, llama.model.config.hidden_size)
    torch.testing.assert_close(hidden[: len(context)], hidden_states(llama, context)[-1][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(hidden[-1], hidden_states(llama, context + [11, 13, 14])[-1][0, -1], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- losslessness (greedy, float32)

FIXED = {"draft_length": "fixed"}  # every round drafts as deep as its settings say
SETTINGS = [
    {"tree_size": 1, "depth": 1, "branching": 1, **FIXED},
    {"tree_size": 8, "branching": 1, **FIXED},  # a chain
    {},  # the defaults, with the adaptive draft length
    {"tree_size": 32, "depth": 8, "branching": 4, **FIXED},
    {"tree_size": 64, "depth": 3, "branching": 8, **FIXED},
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside deep trees
def test_greedy_eagle_equals_greedy(llama, trained, params, prompt, max_new_tokens):
    params = {**params, "drafter": str(trained[0])}
    trace = run_ignoring_eos(llama, "eagle", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(llama, prompt, max_new_tokens)


def test_a_trained_head_gets_deep_drafts_accepted(llama, trained):
    trace = run_ignoring_eos(llama, "eagle", PROMPTS[0], {"drafter": str(trained[0]), **FIXED}, max_new_tokens=45)
    rounds = rounds_of(trace)
    assert trace.metrics["mean_accepted_tokens"] > 1.5
    assert max(len(r.accepted_path) for r in rounds) >= 3
    assert not rounds[0].nodes  # the prompt's forward: no feature to draft from yet
    for r in rounds[1:-1]:  # the last round has one token left to commit: nothing is drafted
        assert r.nodes and len(r.nodes) <= 24 and max(n.depth for n in r.nodes) <= 6
        scores = [n.score for n in r.nodes]
        assert all(scores[n.parent] >= n.score for n in r.nodes if n.parent >= 0)  # EAGLE-2: a subtree by score


@pytest.mark.parametrize("prompt", PROMPTS)
def test_trees_cut_to_the_nodes_that_pay_stay_lossless(llama, trained, prompt, monkeypatch):
    monkeypatch.setattr(VerifyCost, "__call__", lambda self, n: 1.0 + 0.1 * n)  # 10 % of a forward per token
    assert_cut_trees_stay_lossless(llama, "eagle", {"drafter": str(trained[0])}, prompt)


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_eos_inside_a_draft_stops_like_greedy(trained, prompt):
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    params = {"drafter": str(trained[0]), **FIXED}
    eos = first_token_inside_a_draft(run_ignoring_eos(model, "eagle", prompt, params, max_new_tokens=45))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=45))
    trace = record(model, "eagle", prompt, params, RunSettings(max_new_tokens=45))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)


# ---------------------------------------------------------------- sampling law


@pytest.mark.slow  # a sampling law over many draws
def test_the_first_two_sampled_tokens_follow_the_processed_target(llama, trained):
    """The first token comes from the prefill, the second from the first verified tree: their joint law over many
    seeds is the processed target's p(t1) p(t2 | t1) (temperature 0.9, top-k 6)."""
    assert_first_two_tokens_follow_target(llama, "eagle", {"drafter": str(trained[0]), **FIXED}, PROMPTS[0],
                                          max_new_tokens=6)


# ---------------------------------------------------------------- EAGLE-3: fused features, training-time test


def test_the_training_time_test_mask_is_each_draft_steps_view():
    """Step j's query at t sees the true context up to t - j and, at step i <= j, its own path's node at t - (j - i)."""
    n = 6
    for step in range(4):
        visible = ttt_visible(n, step)
        assert visible.shape == (n, (step + 1) * n)
        for t in range(n):
            for block in range(step + 1):
                for s in range(n):
                    seen = s <= t - step if block == 0 else s == t - (step - block)
                    assert bool(visible[t, block * n + s]) == seen, (step, t, block, s)


def test_a_forward_records_the_named_layers_side_by_side(llama):
    ids = llama.encode("The quick brown fox")
    out = llama.forward(torch.tensor([ids]), hidden=(1, 2))
    states = hidden_states(llama, ids)
    torch.testing.assert_close(out.hidden[0], torch.cat([states[1][0], states[2][0]], dim=-1), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def eagle3(llama, data) -> tuple[Path, dict]:
    head, run = train_tiny_head("eagle3", llama, data.parent, 300, 3e-3, "out-eagle3", ttt_steps=3)
    save_head(head, data.parent / "eagle3", {}, "# tiny EAGLE-3 head")
    return data.parent / "eagle3", run


def test_eagle3_training_teaches_every_unrolled_draft_step(eagle3):
    curve = eagle3[1]["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    for step in (1, 2, 3):  # the later steps read the head's own outputs, as drafting does
        assert curve[-1][f"accuracy{step}"] > curve[0][f"accuracy{step}"] + 0.2


def test_an_eagle3_head_saves_its_layers_and_drafts_from_the_fused_features(llama, eagle3):
    head = load_head(eagle3[0], llama)
    assert head.fused_layers == (1, 1, 2) and head.target_features == (1, 1, 2)
    assert json.loads((eagle3[0] / "config.json").read_text())["fused_layers"] == [1, 1, 2]
    trace = run_ignoring_eos(llama, "eagle", PROMPTS[0], {"drafter": str(eagle3[0]), **FIXED}, max_new_tokens=45)
    assert trace.metrics["mean_accepted_tokens"] > 1.5
    assert max(len(r.accepted_path) for r in rounds_of(trace)) >= 3


@pytest.mark.parametrize("params", [SETTINGS[1], SETTINGS[2], SETTINGS[4]])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_eagle3_equals_greedy(llama, eagle3, params, prompt):
    params = {**params, "drafter": str(eagle3[0])}
    trace = run_ignoring_eos(llama, "eagle", prompt, params, max_new_tokens=23)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=23).output_token_ids
