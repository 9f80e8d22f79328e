"""Learn2PD: the filter's commit set, end-of-text prediction, the data labels and the filter's training script."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.decoders import (
    get_decoder,  # before engine.diffusion: unmask.py imports engine.decoders.base
)
from engine.diffusion import learn2pd
from engine.diffusion.unmask import StepView, predictor_for
from engine.events import DiffusionStep
from engine.models import load_model
from engine.models.handle import LoadedModel
from engine.offline import learn2pd_train
from engine.offline import train_dllm as waitline_train
from engine.offline.waitline_tokenizer import build_tokenizer
from engine.params import ParamError
from engine.run import Run, RunSettings
from tests.helpers import tiny_waitline_model

NEVER = -100.0  # a filter logit whose sigmoid is ~0
PROMPT = "You are managing a waiting line"


def tiny_mdlm() -> LoadedModel:
    """A random bidirectional Llama on the waitline tokenizer."""
    return tiny_waitline_model()


def boost_eos_from(model: LoadedModel, first: int, gen_length: int) -> None:
    """Make end of text the sure proposal at generated positions ``first``.. (surest at ``first``), through a
    fixed bias on the output logits; earlier positions keep the random model's proposals."""
    prompt_length = len(model.encode(PROMPT))
    bias = torch.zeros(prompt_length + gen_length, model.vocab_size)
    # 12 down to 2: end of text wins everywhere there, with probabilities unsaturated so the order is strict
    bias[prompt_length + first:, model.tokenizer.eos_token_id] = 12.0 - torch.arange(gen_length - first)
    model.model.lm_head.register_forward_hook(lambda _module, _inputs, logits: logits + bias[: logits.shape[1]])


def hand_filter(block_length: int, bias: list[float], flag_weight: list[float] | None = None
                ) -> learn2pd.Learn2PDFilter:
    """Logit i = ``bias[i] + flag_weight[i] x (position i still masked)``."""
    model = learn2pd.Learn2PDFilter(block_length, hidden=block_length)
    first, second = model.layers[0], model.layers[2]
    first.weight.data.zero_()
    first.bias.data.zero_()
    first.weight.data[:, block_length:] = torch.eye(block_length)  # hidden i = relu(still-masked flag i)
    second.weight.data = torch.diag(torch.tensor(flag_weight or [0.0] * block_length))
    second.bias.data = torch.tensor(bias)
    return model.eval()


def view(scores: list[float], block: tuple[int, int], quota: int) -> StepView:
    confidence = torch.tensor(scores)
    masked = torch.isfinite(confidence)
    return StepView(step=0, block=block, step_in_block=0, quota=quota, proposals=torch.arange(len(scores)),
                    probs=torch.zeros(len(scores), 5), confidence=confidence, masked=masked,
                    canvas=torch.zeros(len(scores), dtype=torch.long))


def committed(rule, step_view: StepView) -> list[int]:
    return rule(step_view).nonzero().flatten().tolist()


def test_block_features_are_confidences_then_still_masked_flags_padded_to_the_filter_block():
    inf = math.inf
    scores = torch.tensor([-inf, -inf, -inf, -inf, 0.9, -inf, 0.25])  # second block (4, 7) is a short last block
    features = learn2pd.block_features(scores, (4, 7), block_length=4)
    assert torch.equal(features, torch.tensor([0.9, 0.0, 0.25, 0.0, 1.0, 0.0, 1.0, 0.0]))
    with pytest.raises(ParamError, match="longer than the filter's 2"):
        learn2pd.block_features(scores, (4, 7), block_length=2)


def test_filter_commits_what_it_accepts_plus_the_step_quota():
    inf = math.inf
    # Block (4, 8) of 8 generated positions; the filter accepts block position 3 (= position 7) when it is masked.
    model = hand_filter(4, [NEVER] * 4, flag_weight=[0.0, 0.0, 0.0, 200.0])  # masked position 3: logit +100
    rule = learn2pd.filter_rule(model, threshold=0.96)
    scores = [-inf, -inf, -inf, -inf, 0.9, 0.6, -inf, 0.3]
    assert committed(rule, view(scores, (4, 8), quota=1)) == [4, 7]  # quota's top-1 (4) + the filter's (7)
    assert committed(rule, view(scores, (4, 8), quota=2)) == [4, 5, 7]
    scores[7] = -inf  # already committed: the filter's yes does not matter any more
    assert committed(rule, view(scores, (4, 8), quota=1)) == [4]
    # A threshold above the filter's probability leaves only the quota (plain LLaDA).
    strict = learn2pd.filter_rule(model, threshold=1.0)
    assert committed(strict, view([-inf, -inf, -inf, -inf, 0.9, 0.6, -inf, 0.3], (4, 8), quota=1)) == [4]
    # Confidences outside the active block are never eligible, whatever the filter says.
    accept_all = learn2pd.filter_rule(hand_filter(4, [100.0] * 4), threshold=0.96)
    assert committed(accept_all, view([0.5, -inf, 0.2, 0.1, 0.3, 0.4, 0.1, 0.2], (0, 4), quota=1)) == [0, 2, 3]


def test_labels_say_whether_each_proposal_already_equals_the_final_token():
    final = torch.tensor([5, 6, 7, 8, 9, 10])  # canvas 6, blocks (0, 4) and (4, 6), filter block 4
    features = torch.zeros(8)
    step = learn2pd_train.StepRecord
    records = [
        step((0, 4), features, torch.tensor([5, 0, 7, 0]), torch.tensor([True, True, True, True])),
        step((0, 4), features, torch.tensor([5, 6, 7, 1]), torch.tensor([False, True, True, True])),
        step((4, 6), features, torch.tensor([9, 3]), torch.tensor([True, True])),
    ]
    labels, counted = learn2pd_train.step_labels(records, final, block_length=4)
    assert labels.tolist() == [[1, 0, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]]
    assert counted.tolist() == [[True, True, True, True], [False, True, True, True], [True, True, False, False]]


def test_reference_decode_is_llada_one_token_per_step():
    model = tiny_mdlm()
    predictor = predictor_for(model)
    prompt = model.encode(PROMPT)
    records, final = learn2pd_train.reference_decode(predictor, prompt, gen_length=12, block_length=8)
    assert len(records) == 12 and [r.block for r in records] == [(0, 8)] * 8 + [(8, 12)] * 4
    assert [int(r.masked.sum()) for r in records] == [8, 7, 6, 5, 4, 3, 2, 1, 4, 3, 2, 1]
    steps = learn2pd.one_token_per_step(12, 8)
    trace = Run(model, "llada", PROMPT, {"gen_length": 12, "block_length": 8, "steps": steps},
                RunSettings(max_new_tokens=12)).to_end()
    llada_steps = [e for e in trace.events if isinstance(e, DiffusionStep)]
    assert final.tolist() == llada_steps[-1].canvas and len(llada_steps) == 12


def run_learn2pd(model: LoadedModel, params: dict) -> tuple[list[DiffusionStep], object]:
    trace = Run(model, "learn2pd", PROMPT, params, RunSettings(max_new_tokens=params["gen_length"])).to_end()
    return [e for e in trace.events if isinstance(e, DiffusionStep)], trace


def test_decoder_is_registered_with_the_papers_defaults():
    params = {p.name: p.default for p in get_decoder("learn2pd").params}
    assert params["block_length"] == 32 and params["accept_threshold"] == 0.96 and params["eot_prediction"] is True


def test_end_of_text_prediction_fills_after_eos_and_saves_model_calls(tmp_path):
    learn2pd.save_filter(hand_filter(8, [NEVER] * 8), tmp_path, {}, "# test")  # accepts nothing: quota only
    model = tiny_mdlm()
    boost_eos_from(model, first=5, gen_length=16)
    eos = model.tokenizer.eos_token_id
    params = {"gen_length": 16, "block_length": 8, "filter": str(tmp_path)}
    without, _ = run_learn2pd(model, {**params, "eot_prediction": False})
    with_eotp, trace = run_learn2pd(model, params)
    assert len(without) == 16 and without[-1].canvas[5:] == [eos] * 11  # one commit per call, EOS decoded too
    # (the tokens before EOS may differ: with EoTP the model sees EOS instead of masks after position 5)
    assert trace.status == "finished" and with_eotp[-1].canvas[5:] == [eos] * 11
    # The surest proposal (EOS at 5) comes first and fills 6..15 in the same call; then 0..4 one call each.
    assert with_eotp[0].committed_positions == list(range(5, 16))
    later = [s.committed_positions for s in with_eotp[1:]]
    assert sorted(later) == [[0], [1], [2], [3], [4]]  # 6 model calls instead of 16


def test_an_accepting_filter_fills_a_block_per_call_and_errors_are_param_errors(tmp_path):
    learn2pd.save_filter(hand_filter(8, [100.0] * 8), tmp_path, {}, "# test")
    model = tiny_mdlm()
    params = {"gen_length": 16, "block_length": 8, "filter": str(tmp_path), "eot_prediction": False}
    steps, _ = run_learn2pd(model, params)
    assert [s.block for s in steps] == [[0, 8], [8, 16]]  # one call fills each block
    _, missing = run_learn2pd(model, {**params, "filter": str(tmp_path / "absent")})
    assert missing.status == "failed"
    assert "decoding-explorer assets rebuild learn2pd-filter --out" in missing.reason
    _, too_long = run_learn2pd(model, {**params, "block_length": 16})
    assert too_long.status == "failed" and "block_length 16 is longer than the filter's 8" in too_long.reason


def test_training_script_runs_end_to_end_and_the_decoder_loads_its_output(tmp_path, capsys):
    folder, out = tmp_path / "mdlm", tmp_path / "filter"
    tokenizer = build_tokenizer()
    shape = waitline_train.Shape(hidden=32, layers=1, heads=2, ffn=64)
    waitline_train.save(waitline_train.build_model("mdlm", tokenizer, shape, seed=0).eval(), tokenizer, folder, "#")
    learn2pd_train.main(["--model", str(folder), "--examples", "3", "--gen-length", "12", "--block-length", "8",
                         "--epochs", "2", "--log-every", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "decoded 3/3 examples" in printed and f"saved {out}" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["block_length"] == 8 and config["held_out_examples"] == 1 and config["train_steps"] == 2 * 12
    assert set(config["held_out"]) >= {"precision", "recall", "positive_rate"}
    assert "--examples 3" in (out / "README.md").read_text()
    steps, trace = run_learn2pd(load_model(str(folder)), {"gen_length": 12, "block_length": 8, "filter": str(out)})
    assert trace.status == "finished" and 1 <= len(steps) <= 12
