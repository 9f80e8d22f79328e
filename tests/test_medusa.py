"""The `medusa` drafters: Medusa heads, their training from cached feature shards, the static tree, losslessness of
greedy acceptance and the rule of the (lossy) typical acceptance."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.decoders.base import get_decoder
from engine.decoders.speculative.medusa import (
    MEDUSA_CHOICES,
    static_tree,
    typical_verdict,
)
from engine.offline.drafter_data import DrafterSequence
from engine.offline.drafter_losses import medusa_targets
from engine.offline.train_drafter import main
from engine.params import ParamError
from engine.speculative.draft_length import VerifyCost
from engine.speculative.feature_head import FeatureHead, load_head, save_head
from engine.speculative.medusa_heads import MedusaHeads
from engine.speculative.rounds import Sampling
from tests.helpers import (
    PROMPTS,
    assert_cut_trees_stay_lossless,
    assert_first_two_tokens_follow_target,
    first_token_inside_a_draft,
    rounds_of,
    run_ignoring_eos,
    train_tiny_head,
    write_shards,
)

FIXED = {"draft_length": "fixed"}  # every round drafts the whole static tree its settings allow


def train_heads(llama, tmp: Path, steps: int, out: str = "out", **options):
    return train_tiny_head("medusa", llama, tmp, steps, 1e-2, out, **options)


@pytest.fixture(scope="module")
def data(llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("medusa") / "data"
    folder.mkdir()
    return write_shards(llama, folder)


@pytest.fixture(scope="module")
def trained(llama, data) -> tuple[Path, dict]:
    """Heads trained long enough for deep drafts to be accepted, saved as a folder."""
    heads, run = train_heads(llama, data.parent, steps=300)
    save_head(heads, data.parent / "heads", {}, "# tiny Medusa heads")
    return data.parent / "heads", run


# ---------------------------------------------------------------- heads and training


def test_head_k_is_trained_on_the_token_k_plus_one_places_ahead():
    sequence = DrafterSequence(torch.arange(10, 18), 4, *[torch.arange(8.0)[:, None].expand(8, 3)] * 3)
    features, labels = medusa_targets([sequence], heads=3)
    # positions t = 3..5: the first whose next token (x_4) is an answer token, the last with a token 2 ahead
    assert features[:, 0].tolist() == [3.0, 4.0, 5.0]
    assert labels.tolist() == [[15, 16, 17], [16, 17, -1], [17, -1, -1]]


def test_untrained_heads_propose_the_targets_own_next_token(llama):
    heads = MedusaHeads(llama, heads=3)
    features = torch.randn(5, llama.model.config.hidden_size)
    out = heads(features)
    assert out.shape == (3, 5, llama.model.config.hidden_size)
    for k in range(3):  # W = 0, b = 0: each residual block is the identity
        assert torch.equal(heads.logits(out[k]), llama.model.get_output_embeddings()(features))


def test_training_lowers_the_loss_and_every_head_learns(trained):
    _, run = trained
    first, last = run["curve"][0], run["curve"][-1]
    assert last["loss"] < 0.5 * first["loss"]
    for k in (1, 2, 3, 4):
        assert last[f"accuracy{k}"] > first[f"accuracy{k}"] + 0.2, k
    assert run["step"] == 300 and set(run["held_out"]) >= {"loss", "accuracy1"}


def test_the_command_line_trains_saves_and_measures_heads(data, tmp_path):
    main(["--head", "medusa", "--heads", "2", "--data", str(data), "--out", str(tmp_path), "--steps", "3",
          "--minutes", "0", "--batch-size", "2", "--eval", "1", "--eval-tokens", "8"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["head"] == "medusa" and config["heads"] == 2 and config["record"]["step"] == 3
    assert config["acceptance"]["prompts"] == 1 and "--head medusa --data" in config["command"]
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("# medusa drafter for tiny-random-llama") and "0.8^(k-1)" in card


def test_saved_heads_load_with_the_same_weights_and_a_wrong_kind_is_refused(llama, trained, tmp_path):
    folder, _ = trained
    heads = load_head(folder, llama, MedusaHeads)
    config = json.loads((folder / "config.json").read_text())
    assert config["head"] == "medusa" and config["heads"] == heads.heads == 4
    assert not any(name.startswith("_frozen") for name in heads.state_dict())
    again = load_head(folder, llama, MedusaHeads)
    for name, value in heads.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)
    with pytest.raises(ParamError, match="holds a medusa head, not a EAGLE one"):
        load_head(folder, llama, FeatureHead)
    save_head(FeatureHead(llama), tmp_path, {}, "# eagle")
    with pytest.raises(ParamError, match="--head medusa"):
        load_head(tmp_path, llama, MedusaHeads)


def test_a_reduced_vocabulary_is_saved_and_drafts_only_its_tokens(llama, tmp_path):
    vocab = torch.tensor(sorted({*range(3, 60), *llama.eos_token_ids}))
    torch.manual_seed(0)
    heads = MedusaHeads(llama, vocab, heads=2)
    for block in heads.blocks:
        torch.nn.init.normal_(block.weight, std=0.3)
    save_head(heads, tmp_path, {}, "# two heads, a small vocabulary")
    trace = run_ignoring_eos(llama, "medusa", PROMPTS[0], {"drafter": str(tmp_path), **FIXED}, max_new_tokens=20)
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=20).output_token_ids
    nodes = [node for r in rounds_of(trace) for node in r.nodes]
    assert nodes and {node.token_id for node in nodes} <= set(vocab.tolist()) and max(n.depth for n in nodes) == 2


def test_a_missing_head_names_the_training_command(llama, tmp_path):
    trace = record(llama, "medusa", "Hello", {"drafter": str(tmp_path)}, RunSettings(max_new_tokens=4))
    assert trace.status == "failed" and "python -m engine.offline.train_drafter --head medusa" in trace.reason


# ---------------------------------------------------------------- the static tree


def test_every_prefix_of_the_choices_is_a_tree_cut_to_the_depth():
    assert len(set(MEDUSA_CHOICES)) == len(MEDUSA_CHOICES)
    for i, path in enumerate(MEDUSA_CHOICES):
        assert len(path) == 1 or path[:-1] in MEDUSA_CHOICES[:i]
    assert static_tree(5, 4) == list(MEDUSA_CHOICES[:5])
    assert static_tree(6, 1) == [(0,), (1,), (2,), (3,), (4,), (5,)]


def test_the_tree_holds_each_heads_top_tokens(llama, trained):
    trace = run_ignoring_eos(llama, "medusa", PROMPTS[1], {"drafter": str(trained[0]), "tree_size": 6, **FIXED},
                             max_new_tokens=12)
    rounds = rounds_of(trace)
    assert not rounds[0].nodes  # the prompt's forward: no feature to draft from yet
    for r in rounds[1:-1]:
        assert [(n.parent, n.depth) for n in r.nodes] == [(-1, 1), (0, 2), (-1, 1), (1, 3), (0, 2), (-1, 1)]
        assert r.nodes[0].draft_prob >= r.nodes[2].draft_prob >= r.nodes[5].draft_prob


# ---------------------------------------------------------------- losslessness (greedy, float32)

SETTINGS = [{"tree_size": 1, **FIXED}, {"tree_size": 4, **FIXED}, {}, {"tree_size": 32, **FIXED}]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside deep trees
def test_greedy_medusa_equals_greedy(llama, trained, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(llama, "medusa", prompt, {**params, "drafter": str(trained[0])}, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids


def test_trained_heads_get_deep_drafts_accepted(llama, trained):
    trace = run_ignoring_eos(llama, "medusa", PROMPTS[0], {"drafter": str(trained[0]), **FIXED}, max_new_tokens=45)
    assert trace.metrics["mean_accepted_tokens"] > 1.5
    assert max(len(r.accepted_path) for r in rounds_of(trace)) >= 3


@pytest.mark.parametrize("prompt", PROMPTS)
def test_trees_cut_to_the_nodes_that_pay_stay_lossless(llama, trained, prompt, monkeypatch):
    monkeypatch.setattr(VerifyCost, "__call__", lambda self, n: 1.0 + 0.1 * n)  # 10 % of a forward per token
    assert_cut_trees_stay_lossless(llama, "medusa", {"drafter": str(trained[0])}, prompt)


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_eos_inside_a_draft_stops_like_greedy(trained, prompt):
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    params = {"drafter": str(trained[0]), **FIXED}
    eos = first_token_inside_a_draft(run_ignoring_eos(model, "medusa", prompt, params, max_new_tokens=45))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=45))
    trace = record(model, "medusa", prompt, params, RunSettings(max_new_tokens=45))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)


# ---------------------------------------------------------------- typical acceptance (lossy)


def _rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_typical_acceptance_keeps_what_the_formula_says():
    """Root children: tokens 0 (p .5) and 2 (p .1); node 0's child token 1 (p .3 there); node 2's child token 3."""
    parents, tokens = [-1, -1, 0, 1], [0, 2, 1, 3]
    target = _rows([0.5, 0.3, 0.1, 0.1],  # after the root: H = 1.168, delta e^-H = 0.0933 < epsilon 0.2
                   [0.05, 0.3, 0.05, 0.6],  # after node 0: H = 0.898, threshold 0.122: token 1 (0.3) kept
                   [0.25, 0.25, 0.25, 0.25],  # after node 1: threshold min(0.2, 0.3/4) = 0.075: token 3 kept
                   [0.97, 0.01, 0.01, 0.01],  # after node 2 (path 0 -> 1): the next token
                   [0.1, 0.1, 0.1, 0.7])
    for row in target:
        p = row.exp()
        assert math.isclose(float(p.sum()), 1.0)
    verdict = typical_verdict(parents, tokens, target, 0.2, 0.3, Sampling((), None))
    # nodes 2 (depth 2 via node 0, log-likelihood ln .5 + ln .3) and 3 (depth 2 via node 1, ln .1 + ln .25) tie
    # on depth; the likelier path wins
    assert verdict.accepted_path == [0, 2]
    assert {n: c.accepted for n, c in verdict.checks.items()} == {0: True, 1: False, 2: True, 3: False}
    assert [round(c.target_prob, 3) for c in verdict.checks.values()] == [0.5, 0.1, 0.3, 0.25]
    assert verdict.next_token == 0 and not verdict.is_correction
    # a higher threshold: min(0.6, 1.0 e^-H) = 0.311 at the root keeps node 0 only, 0.380 after it rejects node 2
    strict = typical_verdict(parents, tokens, target, 0.6, 1.0, Sampling((), None))
    assert strict.accepted_path == [0] and 3 not in strict.checks  # node 3's parent was rejected: never looked at
    assert [c.accepted for c in strict.checks.values()] == [True, False, False]
    assert strict.next_token == 3 and strict.is_correction  # row 1 with the tokens under 0.380 removed


def test_a_sampled_typical_correction_never_draws_a_token_under_the_threshold():
    target = _rows([0.6, 0.3, 0.06, 0.04])  # H = 0.97: threshold min(0.09, 0.3 * 0.379) = 0.09
    tokens = Counter(typical_verdict([], [], target, 0.09, 0.3, Sampling((), torch.Generator().manual_seed(s))).next_token
                     for s in range(300))
    assert set(tokens) == {0, 1} and tokens[0] > tokens[1]


def test_typical_medusa_is_declared_lossy_and_commits_only_typical_tokens(llama, trained):
    """Greedy typical Medusa: every output token is the target's argmax (a bonus or correction) or an accepted draft
    above min(epsilon, delta e^-H) of the target (checked on one plain forward over the output)."""
    assert get_decoder("medusa").lossless and not get_decoder("medusa_typical").lossless
    prompt = llama.encode(PROMPTS[0])
    trace = run_ignoring_eos(llama, "medusa_typical", PROMPTS[0], {"drafter": str(trained[0]), **FIXED},
                             max_new_tokens=30)
    assert trace.status == "finished" and sum(len(r.accepted_path) for r in rounds_of(trace)) > 0
    with torch.inference_mode():
        logprobs = llama.model(torch.tensor([prompt + trace.output_token_ids])).logits[0].log_softmax(-1)
    p = logprobs.exp()
    threshold = torch.clamp(0.3 * torch.exp((p * logprobs).sum(-1)), max=0.09)
    for i, token in enumerate(trace.output_token_ids):
        row = len(prompt) + i - 1
        assert token == int(p[row].argmax()) or p[row, token] > 0.99 * threshold[row], i


# ---------------------------------------------------------------- sampling law


@pytest.mark.slow  # a sampling law over many draws
def test_the_first_two_sampled_tokens_follow_the_processed_target(llama, trained):
    """The first token comes from the prefill, the second from the first verified tree: their joint law over many
    seeds is the processed target's p(t1) p(t2 | t1) (temperature 0.9, top-k 6)."""
    assert_first_two_tokens_follow_target(llama, "medusa", {"drafter": str(trained[0]), **FIXED}, PROMPTS[0],
                                          max_new_tokens=3)
