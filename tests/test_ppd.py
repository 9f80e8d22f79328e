"""The `ppd` decoder: trained prompt tokens riding along the verify forward, their training, the sparse tree, and
losslessness against plain greedy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.decoders.speculative.ppd import sparse_tree
from engine.params import ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.feature_head import load_head, save_head
from engine.speculative.medusa_heads import MedusaHeads
from engine.speculative.ppd_prompts import PromptTokens
from engine.speculative.rounds import Draft, Sampling, verify_round
from engine.speculative.tree import Riders
from tests.helpers import (
    PROMPTS,
    assert_first_two_tokens_follow_target,
    first_token_inside_a_draft,
    greedy_ids,
    rounds_of,
    run_ignoring_eos,
    train_tiny_head,
    write_shards,
)

FIXED = {"draft_length": "fixed"}


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory) -> tuple[Path, dict]:
    """Prompt tokens trained on the tiny model's own greedy answers, saved as a folder."""
    tmp = tmp_path_factory.mktemp("ppd")
    (tmp / "data").mkdir()
    write_shards(llama, tmp / "data")
    prompts, run = train_tiny_head("ppd", llama, tmp, 300, 1e-1, heads=3)
    save_head(prompts, tmp / "prompts", {}, "# tiny PPD prompt tokens")
    return tmp / "prompts", run


# ---------------------------------------------------------------- prompt tokens and training


def test_training_lowers_the_loss_and_trains_only_the_embeddings(llama, trained):
    folder, run = trained
    first, last = run["curve"][0], run["curve"][-1]
    assert last["loss"] < 0.95 * first["loss"] and last["kl1"] < first["kl1"]
    assert run["parameters"] == 3 * llama.model.config.hidden_size
    assert set(load_head(folder, llama, PromptTokens).state_dict()) == {"embeddings"}


def test_saved_prompt_tokens_load_with_the_same_weights_and_a_wrong_kind_is_refused(llama, trained, tmp_path):
    folder, _ = trained
    prompts = load_head(folder, llama, PromptTokens)
    config = json.loads((folder / "config.json").read_text())
    assert config["head"] == "ppd" and config["prompt_tokens"] == 3 and config["ensemble"] == 1
    assert torch.equal(load_head(folder, llama, PromptTokens).embeddings, prompts.embeddings)
    with pytest.raises(ParamError, match="holds a ppd head, not a Medusa one"):
        load_head(folder, llama, MedusaHeads)
    torch.manual_seed(1)
    save_head(PromptTokens(llama, prompt_tokens=2, ensemble=2), tmp_path, {}, "# ensemble")
    assert load_head(tmp_path, llama, PromptTokens).embeddings.shape == (2, 2, llama.model.config.hidden_size)


def test_the_sparse_tree_holds_the_most_probable_paths_parents_first():
    logprobs = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1]]).log()
    tokens, parents, ranks, scores = sparse_tree(logprobs, 4)
    # paths by probability: (0) .6, (1) .3, (0, 0) .3, (0, 1) .24; ties keep the shallower path's push order
    assert sorted(zip(tokens, parents, [round(float(torch.tensor(s).exp()), 2) for s in scores])) == sorted(
        [(0, -1, 0.6), (1, -1, 0.3), (0, 0, 0.3), (1, 0, 0.24)])
    assert all(p < node for node, p in enumerate(parents)) and ranks.count(0) == 2


# ---------------------------------------------------------------- riders in the verify forward


def test_riders_change_neither_the_verified_logits_nor_the_cache(llama):
    torch.manual_seed(0)
    prompts = PromptTokens(llama, prompt_tokens=3, ensemble=2)
    context = llama.encode(PROMPTS[0])
    draft = Draft([5, 9, 7, 11], [1.0] * 4, parents=[-1, -1, 0, 2])
    chains = prompts.embeddings.detach().repeat(3, 1, 1)
    riders = Draft(draft.tokens, draft.probs, parents=draft.parents, riders=Riders([-1, -1, 0, 0, 2, 2], chains))
    results = []
    for candidate in (draft, riders):
        target = PrefixCache(llama)
        outcome, slots = verify_round(target, context, candidate, Sampling((), None))
        results.append((outcome, slots, target))
    (plain, plain_slots, plain_cache), (ridden, ridden_slots, ridden_cache) = results
    assert torch.allclose(plain.target_logits, ridden.target_logits, atol=1e-5)
    assert plain.verdict == ridden.verdict and plain_slots == ridden_slots
    assert plain_cache.tokens == ridden_cache.tokens
    assert plain_cache.cache.get_seq_length() == ridden_cache.cache.get_seq_length()
    for a, b in zip(plain_cache.cache.layers, ridden_cache.cache.layers):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.allclose(a.values, b.values, atol=1e-5)
    assert plain.rider_logits is None and ridden.rider_logits.shape == (6, 3, llama.vocab_size)


def test_a_rider_sees_its_anchors_path_at_the_position_after_it(llama):
    """Riders of node 2 (path 0 -> 2) give what a plain forward over context + path + the embeddings gives."""
    torch.manual_seed(0)
    prompts = PromptTokens(llama, prompt_tokens=2)
    context = llama.encode(PROMPTS[1])
    draft = Draft([5, 9, 7], [1.0] * 3, parents=[-1, -1, 0], riders=Riders([2], prompts.embeddings.detach()))
    outcome, _ = verify_round(PrefixCache(llama), context, draft, Sampling((), None))
    with torch.inference_mode():
        embedded = llama.model.get_input_embeddings()(torch.tensor([context + [5, 7]]))
        inputs = torch.cat([embedded, prompts.embeddings.detach()[0][None]], dim=1)
        expected = llama.model(inputs_embeds=inputs).logits[0, -2:].float()
    assert torch.allclose(outcome.rider_logits[0], expected, atol=1e-4)


# ---------------------------------------------------------------- the decoder: losslessness and its record


@pytest.mark.parametrize("params", [{"tree_size": 1, **FIXED}, {"tree_size": 6, "prompt_nodes": 2, **FIXED}, {}])
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [40, 17])  # 17: the budget ends inside a draft
def test_greedy_ppd_equals_greedy(llama, trained, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(llama, "ppd", prompt, {**params, "drafter": str(trained[0])}, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(llama, prompt, max_new_tokens)


def test_rounds_draft_from_the_prompt_tokens_without_a_draft_call(llama, trained):
    trace = run_ignoring_eos(llama, "ppd", PROMPTS[2], {"drafter": str(trained[0]), **FIXED}, max_new_tokens=30)
    rounds = rounds_of(trace)
    # the prompt's forward carries the first guesses; every node carries prompt tokens, so each later round drafts
    assert not rounds[0].nodes and all(r.nodes for r in rounds[1:-1])
    assert all(r.draft_calls == 0 for r in rounds) and trace.metrics["model_calls"] == len(rounds)
    nodes = [n for r in rounds for n in r.nodes]
    assert all(re.fullmatch(rf"ppd p{n.depth} #\d+", n.source) for n in nodes)
    assert {n.source for n in nodes if n.parent == -1} >= {"ppd p1 #1", "ppd p1 #2"}
    assert max(n.depth for n in nodes) <= 3  # three prompt tokens: three depths
    assert trace.metrics["mean_accepted_tokens"] > 1.0


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_eos_inside_a_draft_stops_like_greedy(trained, prompt):
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    params = {"drafter": str(trained[0]), **FIXED}
    eos = first_token_inside_a_draft(run_ignoring_eos(model, "ppd", prompt, params, max_new_tokens=40))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=40))
    trace = record(model, "ppd", prompt, params, RunSettings(max_new_tokens=40))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos


def test_a_missing_drafter_names_the_training_command(llama, tmp_path):
    trace = record(llama, "ppd", "Hello", {"drafter": str(tmp_path)}, RunSettings(max_new_tokens=4))
    assert trace.status == "failed" and "python -m engine.offline.train_drafter --head ppd" in trace.reason


@pytest.mark.slow  # a sampling law over many draws
def test_the_first_two_sampled_tokens_follow_the_processed_target(llama, trained):
    assert_first_two_tokens_follow_target(llama, "ppd", {"drafter": str(trained[0]), **FIXED}, PROMPTS[1],
                                          max_new_tokens=3)
