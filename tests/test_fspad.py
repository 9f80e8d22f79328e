"""The `fspad` drafter: FSPAD's head (feature sampling, partial alignment), its training, and its losslessness."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from engine import RunSettings, load_model, record
from engine.offline.drafter_data import DrafterShards
from engine.offline.drafter_losses import eagle_loss, make_batch
from engine.params import ParamError
from engine.speculative.feature_head import FeatureHead, load_head, save_head
from engine.speculative.fspad_head import FspadHead
from tests.helpers import (
    PROMPTS,
    assert_first_two_tokens_follow_target,
    first_token_inside_a_draft,
    greedy_ids,
    random_eagle_head,
    rounds_of,
    run_ignoring_eos,
    train_tiny_head,
    write_shards,
)


@pytest.fixture(scope="module")
def data(llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fspad") / "data"
    folder.mkdir()
    return write_shards(llama, folder)


@pytest.fixture(scope="module")
def trained(llama, data) -> tuple[Path, dict]:
    """A head trained long enough for deep drafts to be accepted, saved as a folder."""
    head, run = train_tiny_head("fspad", llama, data.parent, 300, 3e-3)
    save_head(head, data.parent / "head", {}, "# tiny FSPAD head")
    return data.parent / "head", run


def random_head(llama) -> FspadHead:
    torch.manual_seed(0)
    return FspadHead(llama)


# ---------------------------------------------------------------- feature sampling, partial alignment


def test_the_head_samples_the_feature_with_the_token_and_ends_in_two_halves(llama):
    """Against a direct computation: the sampler by hand, each half as a plain Llama layer whose down projection is
    that half's rows of the head's widened one (the same attention, norms, gate and up projections)."""
    head, config = random_head(llama), llama.model.config
    size = config.hidden_size
    tokens, features, positions = torch.tensor([[5, 17, 3, 99, 42]]), torch.randn(1, 5, size), torch.arange(5)[None]
    out = head(tokens, features, positions)

    embedded = llama.model.get_input_embeddings()(tokens)
    x = head.fc(torch.cat([embedded, features], dim=-1))
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * head.sampler_norm.weight
    sampler = head.sampler
    sampled = x + F.linear(F.silu(F.linear(embedded, sampler.gate_proj.weight))
                           * F.linear(normed, sampler.up_proj.weight), sampler.down_proj.weight)
    causal = torch.full((5, 5), torch.finfo(torch.float32).min).triu(1)[None, None]
    layer_config = copy.deepcopy(config)
    layer_config._attn_implementation = "sdpa"
    wide_down = head.layer.mlp.mlp.down_proj.weight
    for half in range(2):
        plain = LlamaDecoderLayer(layer_config, layer_idx=0)
        state = {name.replace("mlp.mlp.", "mlp."): value for name, value in head.layer.state_dict().items()}
        state["mlp.down_proj.weight"] = wide_down[half * size: (half + 1) * size]
        plain.load_state_dict(state)
        expected = plain(sampled, attention_mask=causal, position_ids=positions,
                         position_embeddings=head.rotary(sampled, positions))
        torch.testing.assert_close(out[..., half * size: (half + 1) * size], expected, atol=1e-5, rtol=1e-4)

    torch.testing.assert_close(head.logits(out), llama.model.get_output_embeddings()(out[..., :size]))
    assert torch.equal(head.next_feature(out), out[..., size:])


def test_partial_alignment_regresses_the_feature_half_and_classifies_the_logit_half(llama, data):
    head, size = random_head(llama), llama.model.config.hidden_size
    shards = DrafterShards(data)
    batch = make_batch([shards[i] for i in range(3)])
    loss, parts = eagle_loss(head, batch, w_cls=0.1, noise=0.0, generator=None)

    positions = torch.arange(batch.tokens.shape[1])[None].expand(3, -1)
    out = head(batch.tokens, batch.features, positions)[batch.scored]
    regression = F.smooth_l1_loss(out[:, size:], batch.next_features[batch.scored])
    classification = F.cross_entropy(llama.model.get_output_embeddings()(out[:, :size]), batch.next_tokens[batch.scored])
    assert parts["regression"] == pytest.approx(regression.item(), rel=1e-5)
    assert parts["cls"] == pytest.approx(classification.item(), rel=1e-5)
    assert loss.item() == pytest.approx(regression.item() + 0.1 * classification.item(), rel=1e-5)

    def down_gradient(w_cls: float) -> torch.Tensor:
        head.zero_grad()
        eagle_loss(head, batch, w_cls, 0.0, None)[0].backward()
        return head.layer.mlp.mlp.down_proj.weight.grad.clone()

    regression_only, both = down_gradient(0.0), down_gradient(1.0)
    assert torch.all(regression_only[:size] == 0) and regression_only[size:].abs().sum() > 0  # no pull on the logits
    torch.testing.assert_close(both[size:], regression_only[size:])  # nor of the cross-entropy on the feature half
    assert (both[:size] - regression_only[:size]).abs().sum() > 0


# ---------------------------------------------------------------- training, saving


def test_training_lowers_the_loss_and_accepts_most_next_tokens(trained):
    _, run = trained
    curve = run["curve"]
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]
    assert curve[-1]["accuracy"] > curve[0]["accuracy"] + 0.2
    assert run["step"] == 300 and run["held_out_sequences"] == 1 and "regression" in run["held_out"]


def test_a_saved_head_loads_with_the_same_weights_and_refuses_the_wrong_kind(llama, trained):
    folder, _ = trained
    head = load_head(folder, llama, FspadHead)
    assert json.loads((folder / "config.json").read_text())["head"] == "fspad"
    assert not any(name.startswith("_frozen") for name in head.state_dict())
    again = load_head(folder, llama, FspadHead)
    for name, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)
    with pytest.raises(ParamError, match="holds a fspad head, not a EAGLE one"):
        load_head(folder, llama, FeatureHead)
    with pytest.raises(ParamError, match="holds a eagle head, not a FSPAD one.*--head fspad"):
        load_head(random_eagle_head(), llama, FspadHead)


def test_a_missing_head_is_a_param_error_naming_the_training_command(llama, tmp_path):
    for params in ({}, {"drafter": str(tmp_path)}):  # nothing shipped for the tiny model; an empty folder
        trace = record(llama, "fspad", "Hello", params, RunSettings(max_new_tokens=4))
        assert trace.status == "failed" and trace.reason.startswith("ParamError: ")
        assert "python -m engine.offline.train_drafter --head fspad" in trace.reason


# ---------------------------------------------------------------- losslessness (greedy, float32)

FIXED = {"draft_length": "fixed"}  # every round drafts as deep as its settings say
SETTINGS = [
    {"tree_size": 8, "branching": 1, **FIXED},  # a chain
    {},  # the defaults, with the adaptive draft length
    {"tree_size": 32, "depth": 8, "branching": 4, **FIXED},
    {"tree_size": 64, "depth": 3, "branching": 8, **FIXED},
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside deep trees
def test_greedy_fspad_equals_greedy(llama, trained, params, prompt, max_new_tokens):
    params = {**params, "drafter": str(trained[0])}
    trace = run_ignoring_eos(llama, "fspad", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(llama, prompt, max_new_tokens)


def test_a_trained_head_gets_deep_drafts_accepted(llama, trained):
    """Deep acceptance needs the drafted nodes' children to read the feature half."""
    trace = run_ignoring_eos(llama, "fspad", PROMPTS[0], {"drafter": str(trained[0]), **FIXED}, max_new_tokens=45)
    rounds = rounds_of(trace)
    assert trace.metrics["mean_accepted_tokens"] > 1.5
    assert max(len(r.accepted_path) for r in rounds) >= 3
    assert {node.source for r in rounds for node in r.nodes} == {"fspad"}


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2]])
def test_eos_inside_a_draft_stops_like_greedy(trained, prompt):
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    params = {"drafter": str(trained[0]), **FIXED}
    eos = first_token_inside_a_draft(run_ignoring_eos(model, "fspad", prompt, params, max_new_tokens=45))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=45))
    trace = record(model, "fspad", prompt, params, RunSettings(max_new_tokens=45))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)


@pytest.mark.slow  # a sampling law over many draws
def test_the_first_two_sampled_tokens_follow_the_processed_target(llama, trained):
    """The first token comes from the prefill, the second from the first verified tree: their joint law over many
    seeds is the processed target's p(t1) p(t2 | t1) (temperature 0.9, top-k 6)."""
    assert_first_two_tokens_follow_target(llama, "fspad", {"drafter": str(trained[0]), **FIXED}, PROMPTS[0],
                                          max_new_tokens=6)
