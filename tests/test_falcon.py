"""The `falcon` drafter: its semi-autoregressive head, CSGD training, the block-structured tree, and losslessness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.offline.drafter_losses import block_visible, glancing_mask
from engine.params import ParamError
from engine.speculative.falcon_head import FalconHead
from engine.speculative.feature_head import FeatureHead, load_head, save_head
from tests.helpers import (
    PROMPTS,
    assert_first_two_tokens_follow_target,
    first_token_inside_a_draft,
    rounds_of,
    run_ignoring_eos,
    train_tiny_head,
    write_shards,
)

FIXED = {"draft_length": "fixed"}  # every round drafts as deep as its settings say


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory) -> tuple[Path, dict]:
    """A head (k = 2) trained on the tiny model's own greedy answers, saved as a folder."""
    root = tmp_path_factory.mktemp("falcon")
    (root / "data").mkdir()
    write_shards(llama, root / "data")
    head, run = train_tiny_head("falcon", llama, root, 300, 3e-3)
    save_head(head, root / "head", {}, "# tiny Falcon head")
    return root / "head", run


# ---------------------------------------------------------------- CSGD


def test_the_last_layer_sees_its_whole_block():
    visible = block_visible(7, 3, 1)  # blocks [0], [1 2 3], [4 5 6]
    ends = [0, 3, 3, 3, 6, 6, 6]
    assert visible.tolist() == [[s <= ends[t] for s in range(7)] for t in range(7)]


def test_the_glancing_mask_glances_block_prefixes_in_proportion_to_the_wrong_tokens():
    n, block, ratio = 40, 3, 0.5
    generator = torch.Generator().manual_seed(0)
    wrong = torch.rand(4, n, generator=generator) < 0.6
    scored = torch.zeros(4, n, dtype=torch.bool)
    for row, (start, end) in enumerate([(2, 40), (10, 31), (0, 40), (35, 40)]):
        scored[row, start:end] = True
    offsets = [0, 1, 2, 1]
    glanced = glancing_mask(wrong, scored, offsets, block, ratio, generator)
    for row, offset in enumerate(offsets):
        whole_blocks = [s for s in range(offset, n - block + 1, block) if all(scored[row, s: s + block])]
        budget = int(ratio * sum(bool(w and s) for w, s in zip(wrong[row], scored[row])))
        assert int(glanced[row].sum()) == min(budget, len(whole_blocks) * (block - 1))
        runs = [s for s in whole_blocks if glanced[row, s]]  # each glanced run is a prefix of one whole block
        for s in range(n):
            if glanced[row, s]:
                start = s - (s - offset) % block
                assert start in runs and all(glanced[row, start: s + 1]) and (s - offset) % block < block - 1
    assert not glancing_mask(wrong, scored, offsets, 1, ratio, generator).any()  # k = 1: nothing to glance for


def test_training_lowers_the_loss_and_learns_both_places_of_a_block(trained):
    _, run = trained
    curve = run["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    for place in (1, 2):
        assert curve[-1][f"accuracy{place}"] > curve[0][f"accuracy{place}"] + 0.2
    assert curve[-1]["glanced"] < curve[0]["glanced"] < 0.5  # glances happen, fewer as the head learns
    assert run["step"] == 300 and "glanced" in run["held_out"] and run["held_out"]["glanced"] == 0


# ---------------------------------------------------------------- the saved head


def test_a_saved_head_keeps_its_block_and_layers(llama, trained, tmp_path):
    folder, _ = trained
    config = json.loads((folder / "config.json").read_text())
    assert (config["head"], config["block"], config["layers"]) == ("falcon", 2, 2)
    head = load_head(folder, llama, FalconHead)
    assert head.block == 2 and len(head.layers) == 2
    again = load_head(folder, llama, FalconHead)
    for name, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)
    save_head(FalconHead(llama, block=3, layers=1), tmp_path, {}, "# k = 3")
    assert load_head(tmp_path, llama, FalconHead).block == 3
    with pytest.raises(ParamError, match="not a EAGLE one"):
        load_head(folder, llama, FeatureHead)


def test_a_missing_head_is_a_param_error(llama, tmp_path):
    for params in ({}, {"drafter": str(tmp_path)}):
        trace = record(llama, "falcon", "Hello", params, RunSettings(max_new_tokens=4))
        assert trace.status == "failed" and "python -m engine.offline.train_drafter --head falcon" in trace.reason


# ---------------------------------------------------------------- the tree of block forwards


def test_each_node_records_its_block_and_a_block_shares_its_later_levels(llama, trained):
    params = {"drafter": str(trained[0]), "tree_size": 256, "blocks": 3, "branching": 3, **FIXED}
    trace = run_ignoring_eos(llama, "falcon", PROMPTS[0], params, max_new_tokens=30)
    rounds = rounds_of(trace)
    assert not rounds[0].nodes  # the prompt's forward: no feature to draft from yet
    for r in rounds[1:]:
        deepest = max((n.depth for n in r.nodes), default=0)  # 6, or less where the budget ends
        assert {(n.depth, n.block) for n in r.nodes} == {(d, (d + 1) // 2) for d in range(1, deepest + 1)}
        assert r.draft_calls == (deepest + 1) // 2  # one head forward per block
        if deepest < 2:
            continue
        # block 1's second level: every expanded first-level node gets the same candidates (one SAR forward)
        children = {}
        for n in r.nodes:
            if n.depth == 2:
                children.setdefault(n.parent, []).append(n.token_id)
        assert len(children) == 3 and len({tuple(c) for c in children.values()}) == 1
    assert trace.metrics["mean_accepted_tokens"] > 1.5
    assert max(len(r.accepted_path) for r in rounds) >= 3  # past the first block


def test_a_trace_without_blocks_still_loads(llama, trained):
    from engine.events import DraftRound, event_from_dict, event_to_dict

    trace = run_ignoring_eos(llama, "falcon", PROMPTS[0], {"drafter": str(trained[0]), **FIXED}, max_new_tokens=8)
    stored = event_to_dict(rounds_of(trace)[1])
    for node in stored["nodes"]:
        del node["block"]
    event = event_from_dict(stored)
    assert isinstance(event, DraftRound) and all(n.block is None for n in event.nodes)


# ---------------------------------------------------------------- losslessness (greedy, float32)

SETTINGS = [
    {"tree_size": 1, "blocks": 1, "branching": 1, **FIXED},
    {"tree_size": 8, "branching": 1, **FIXED},  # a chain of block forwards
    {},  # the defaults, with the adaptive draft length
    {"tree_size": 40, "blocks": 4, "branching": 4, **FIXED},
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [40, 23])  # 23: the budget ends inside deep trees
def test_greedy_falcon_equals_greedy(llama, trained, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(llama, "falcon", prompt, {**params, "drafter": str(trained[0])},
                             max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", prompt,
                                                      max_new_tokens=max_new_tokens).output_token_ids


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_eos_inside_a_draft_stops_like_greedy(trained, prompt):
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    params = {"drafter": str(trained[0]), **FIXED}
    eos = first_token_inside_a_draft(run_ignoring_eos(model, "falcon", prompt, params, max_new_tokens=40))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=40))
    trace = record(model, "falcon", prompt, params, RunSettings(max_new_tokens=40))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)


@pytest.mark.slow  # a sampling law over many draws
def test_the_first_two_sampled_tokens_follow_the_processed_target(llama, trained):
    assert_first_two_tokens_follow_target(llama, "falcon", {"drafter": str(trained[0]), **FIXED}, PROMPTS[0],
                                          max_new_tokens=6)
