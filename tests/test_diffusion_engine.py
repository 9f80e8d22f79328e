"""The shared diffusion canvas engine and its decoders (llada, dream, mask_predict) on tiny random models.

Reference loops and formulas here are written independently of engine/diffusion/unmask.py: plain model calls,
direct softmax/sort arithmetic, sign-matrix Kendall tau.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

from engine.decoders.base import DecodeContext
from engine.decoders.diffusion.dream import ALG_CONFIDENCE, EPS, dream_rule
from engine.decoders.diffusion.mask_predict import MaskPredict
from engine.diffusion.unmask import (
    Denoised,
    FullForward,
    MaskPredictor,
    StepView,
    UnmaskSettings,
    confidence,
    kendall_tau,
    predictor_for,
    propose,
    top_k_rule,
    transfer_counts,
    unmask,
)
from engine.events import DiffusionStep
from engine.models.handle import LoadedModel, ModelError
from engine.models.loading import load_model
from engine.models.waitline_prompt import format_list, render_prompt
from engine.offline.waitline_tokenizer import build_tokenizer
from engine.params import ParamError
from engine.run import Run, RunSettings
from tests.helpers import tiny_waitline_model

MASK, EOS = 3, 2
CHI2_DF4_P001 = 18.467  # chi-square critical value, 4 degrees of freedom, p = 0.001


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def tiny_llama(tokenizer, causal: bool = False) -> LoadedModel:
    return tiny_waitline_model(causal)


@pytest.fixture(scope="module")
def mdlm(tokenizer):
    return tiny_llama(tokenizer)


def diffusion_steps(trace) -> list[DiffusionStep]:
    return [e for e in trace.events if isinstance(e, DiffusionStep)]


def run(model, decoder, params, max_new_tokens=16, prompt="Alice Smith joins the line"):
    runner = Run(model, decoder, prompt, params, RunSettings(max_new_tokens=max_new_tokens))
    return runner, runner.to_end()


# --- llada against a plain reference loop --------------------------------------------------------------------


@torch.inference_mode()
def reference_llada(model, prompt_ids, gen_length, block_length, steps):
    """LLaDA generate.py written out: argmax, softmax confidence, top-k of the linear schedule per block."""
    x = torch.tensor(prompt_ids + [MASK] * gen_length)
    start = len(prompt_ids)
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    order = []
    for b in range(num_blocks):
        lo, hi = start + b * block_length, start + (b + 1) * block_length
        masked = int((x[lo:hi] == MASK).sum())
        counts = [masked // per_block + (1 if i < masked % per_block else 0) for i in range(per_block)]
        for count in counts:
            logits = model(input_ids=x[None]).logits[0].float()
            logits[:, MASK] = -math.inf
            probs = torch.softmax(logits, dim=-1)
            x0 = probs.argmax(-1)
            conf = probs[torch.arange(len(x)), x0]
            allowed = torch.zeros(len(x), dtype=torch.bool)
            allowed[lo:hi] = x[lo:hi] == MASK
            conf[~allowed] = -math.inf
            chosen = conf.topk(count).indices
            x[chosen] = x0[chosen]
            order.append(sorted((chosen - start).tolist()))
    return x[start:].tolist(), order


@pytest.mark.parametrize("block_length,steps", [(16, 16), (4, 16), (16, 6), (4, 8)])
def test_llada_matches_reference_loop(mdlm, block_length, steps):
    runner, trace = run(mdlm, "llada", {"gen_length": 16, "block_length": block_length, "steps": steps})
    canvas, order = reference_llada(mdlm.model, runner.prompt_ids, 16, block_length, steps)
    events = diffusion_steps(trace)
    assert [sorted(e.committed_positions) for e in events] == order
    assert events[-1].canvas == canvas
    assert all(e.block == [e.block[0], min(e.block[0] + block_length, 16)] for e in events)


# --- commit rules on hand-made confidence tables -------------------------------------------------------------


def hand_view(scores, step_in_block=0, block_steps=1, quota=1, block=None) -> StepView:
    conf = torch.tensor(scores, dtype=torch.float32)
    masked = torch.isfinite(conf)
    n = len(scores)
    return StepView(step=step_in_block, block=block or (0, n), step_in_block=step_in_block, quota=quota,
                    proposals=torch.arange(n), probs=torch.full((n, 4), 0.25), confidence=conf, masked=masked,
                    canvas=torch.where(masked, MASK, 7), block_steps=block_steps)


def positions(chosen: torch.Tensor) -> set[int]:
    return set(chosen.nonzero().flatten().tolist())


INF = -math.inf
TABLE = [0.1, INF, 0.9, 0.5, INF, 0.7, 0.3, 0.6]  # eligible: 0, 2, 3, 5, 6, 7


def test_top_k_rule_commits_the_quota_most_confident():
    assert positions(top_k_rule(hand_view(TABLE, quota=2))) == {2, 5}
    assert positions(top_k_rule(hand_view(TABLE, quota=3))) == {2, 5, 7}
    assert positions(top_k_rule(hand_view(TABLE, quota=50))) == {0, 2, 3, 5, 6, 7}  # never an ineligible one


def dream_count(eligible: int, step: int, steps: int) -> int:
    times = np.linspace(1, EPS, steps + 1, dtype=np.float32)
    return eligible if step == steps - 1 else int(np.float32(eligible) * (np.float32(1) - times[step + 1] / times[step]))


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_algorithms_commit_the_floored_top_n(alg):
    rule = dream_rule(alg, 0.0, torch.Generator().manual_seed(0))
    # 6 eligible over 2 steps: times 1, .5005, .001 -> int(6 * .4995) = 2, then all that is left
    assert dream_count(6, 0, 2) == 2
    assert positions(rule(hand_view(TABLE, 0, 2))) == {2, 5}
    assert positions(rule(hand_view(TABLE, 1, 2))) == {0, 2, 3, 5, 6, 7}
    # 6 eligible over 10 steps: the floor commits nothing at first (int(6 * 0.0999) = 0), as Dream does
    assert dream_count(6, 0, 10) == 0
    assert positions(rule(hand_view(TABLE, 0, 10))) == set()
    for step in range(10):
        count = dream_count(6, step, 10)
        ranked = sorted((i for i, c in enumerate(TABLE) if c > INF), key=lambda i: -TABLE[i])
        assert positions(rule(hand_view(TABLE, step, 10))) == set(ranked[:count])
    # entropy ranks negative entropies (all <= 0): the least uncertain first
    assert positions(rule(hand_view([-2.0, -0.1, INF, -1.5], 0, 2))) == {1}
    assert dream_count(3, 0, 2) == 1


def test_dream_maps_each_algorithm_to_its_confidence_kind():
    assert ALG_CONFIDENCE == {"origin": "probability", "maskgit_plus": "probability", "topk_margin": "margin",
                              "entropy": "entropy"}


def test_dream_origin_unmasks_each_position_with_probability_one_minus_s_over_t():
    generator = torch.Generator().manual_seed(1)
    rule = dream_rule("origin", 0.0, generator)
    table = [0.5] * 6 + [INF] * 2
    trials, hits = 2000, torch.zeros(8)
    for _ in range(trials):
        chosen = rule(hand_view(table, 1, 4))
        hits += chosen.float()
    times = torch.linspace(1, EPS, 5)
    p = float(1 - times[2] / times[1])
    assert hits[6:].sum() == 0  # never an ineligible position
    sd = math.sqrt(p * (1 - p) / trials)
    assert all(abs(float(h) / trials - p) < 5 * sd for h in hits[:6])
    assert positions(rule(hand_view(table, 3, 4))) == set(range(6))  # last step: everything left


def test_dream_alg_temp_draws_a_valid_set_following_softmax_of_confidence():
    generator = torch.Generator().manual_seed(2)
    table = [0.1, INF, 0.9, 0.5, INF, 0.7]
    rule = dream_rule("maskgit_plus", 0.5, generator)
    for _ in range(50):  # 6 eligible, first of 2 steps: 2 positions drawn, never an ineligible one
        chosen = positions(rule(hand_view(TABLE, 0, 2)))
        assert len(chosen) == dream_count(6, 0, 2) == 2 and chosen <= {0, 2, 3, 5, 6, 7}
    assert dream_count(4, 0, 2) == 1
    counts = torch.zeros(6)
    trials = 4000
    for _ in range(trials):
        chosen = rule(hand_view(table, 0, 2))
        assert int(chosen.sum()) == 1
        counts += chosen.float()
    eligible = [0, 2, 3, 5]
    expected = torch.softmax(torch.tensor([table[i] for i in eligible]) / 0.5, dim=0) * trials
    chi2 = float((((counts[eligible] - expected) ** 2) / expected).sum())
    assert chi2 < 16.266  # 3 degrees of freedom, p = 0.001
    assert counts[2] > counts[5] > counts[3] > counts[0]  # more confident, drawn more often


def test_mask_predict_remasks_the_least_probable_keeping_old_probabilities():
    method = MaskPredict(6)
    first = hand_view([0.9, 0.2, 0.5, 0.7, 0.1, 0.6], 0, 3)
    assert positions(method.commit(first)) == set(range(6))
    assert positions(method.remask(first)) == {1, 2, 4, 5}  # int(6 * (3 - 1) / 3) = 4 lowest
    second = hand_view([INF, 0.95, 0.3, INF, 0.8, 0.05], 1, 3)
    assert positions(method.commit(second)) == {1, 2, 4, 5}
    # kept tokens 0 and 3 still count 0.9 and 0.7; int(6 * 1 / 3) = 2 lowest of all six
    assert positions(method.remask(second)) == {2, 5}
    third = hand_view([INF, INF, 0.01, INF, INF, 0.02], 2, 3)
    assert positions(method.commit(third)) == {2, 5}
    assert positions(method.remask(third)) == set()


def test_mask_predict_remasks_only_inside_the_active_block():
    method = MaskPredict(6)
    view = hand_view([INF, INF, 0.4, 0.3, 0.2, 0.1], 0, 2, block=(2, 6))
    method.commit(view)
    method.token_probs[0] = 0.0  # an earlier block's token, however improbable, is never revisited
    assert positions(method.remask(view)) == {4, 5}


def test_mask_predict_runs_T_iterations_revising_committed_tokens(mdlm):
    _, trace = run(mdlm, "mask_predict", {"gen_length": 8, "iterations": 4}, max_new_tokens=8)
    events = diffusion_steps(trace)
    assert len(events) == 4
    assert [len(e.remasked_positions) for e in events] == [8 * (4 - t) // 4 for t in range(1, 5)]
    assert sorted(events[0].committed_positions) == list(range(8))
    for before, after in zip(events, events[1:]):
        assert sorted(after.committed_positions) == sorted(before.remasked_positions)
    assert MASK not in events[-1].canvas


# --- Dream end to end ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_decoder_follows_its_schedule(mdlm, alg):
    _, trace = run(mdlm, "dream", {"gen_length": 8, "steps": 5, "alg": alg}, max_new_tokens=8)
    events = diffusion_steps(trace)
    assert len(events) == 5
    masked = 8
    for step, event in enumerate(events):
        assert len(event.committed_positions) == dream_count(masked, step, 5)
        committed = set(event.committed_positions)
        if committed:
            low = min(event.confidence[p] for p in committed)
            others = [c for p, c in enumerate(event.confidence) if p not in committed and c > INF]
            assert all(c <= low for c in others)
        if alg == "topk_margin":
            for p in committed:
                top = event.proposals[p]
                assert event.confidence[p] == pytest.approx(top[0].prob - top[1].prob, abs=1e-6)
        masked -= len(event.committed_positions)
    assert masked == 0 and MASK not in events[-1].canvas


def test_dream_steps_that_commit_nothing_still_end(mdlm):
    _, trace = run(mdlm, "dream", {"gen_length": 4, "steps": 20}, max_new_tokens=4)
    events = diffusion_steps(trace)
    assert len(events) == 20 and any(not e.committed_positions for e in events)
    assert MASK not in events[-1].canvas and trace.status == "finished"


def test_dream_shift_param_overrides_the_config(mdlm):
    assert predictor_for(mdlm).shift is False
    assert predictor_for(mdlm, True).shift is True
    _, shifted = run(mdlm, "dream", {"gen_length": 8, "shift": "on"}, max_new_tokens=8)
    _, plain = run(mdlm, "dream", {"gen_length": 8, "shift": "off"}, max_new_tokens=8)
    assert diffusion_steps(shifted)[0].confidence != diffusion_steps(plain)[0].confidence


# --- engine primitives ---------------------------------------------------------------------------------------


def test_propose_samples_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0])
    temperature, draws = 0.7, 20000
    generator = torch.Generator().manual_seed(3)
    samples = propose(logits.expand(draws, 5), temperature, generator)
    counts = torch.bincount(samples, minlength=5).double()
    expected = torch.softmax(logits.double() / temperature, dim=0) * draws
    assert float(((counts - expected) ** 2 / expected).sum()) < CHI2_DF4_P001
    assert propose(logits[None], 0.0, generator).tolist() == [3]


def test_confidence_kinds_match_their_formulas():
    torch.manual_seed(4)
    probs = torch.softmax(torch.randn(6, 10), dim=-1)
    x0 = torch.randint(0, 10, (6,))
    for i in range(6):
        row = sorted(probs[i].tolist(), reverse=True)
        assert float(confidence(probs, x0, "probability")[i]) == pytest.approx(float(probs[i, x0[i]]))
        assert float(confidence(probs, x0, "margin")[i]) == pytest.approx(row[0] - row[1], abs=1e-6)
        assert float(confidence(probs, x0, "entropy")[i]) == pytest.approx(sum(p * math.log(p) for p in row), abs=1e-5)
    with pytest.raises(ParamError, match="probability"):
        confidence(probs, x0, "surprise")


def test_transfer_counts_spread_the_remainder_over_the_first_steps():
    for masked, steps in [(16, 16), (16, 6), (7, 3), (2, 5)]:
        counts = transfer_counts(masked, steps)
        assert len(counts) == steps and sum(counts) == masked
        assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def sign_matrix_tau_b(order: list[int]) -> float:
    """Kendall tau-b as the correlation of pairwise sign matrices (ties give 0 signs)."""
    o = torch.tensor(order, dtype=torch.float64)
    pos = torch.arange(len(order), dtype=torch.float64)
    a = torch.sign(pos[:, None] - pos[None, :])
    b = torch.sign(o[:, None] - o[None, :])
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))


def test_kendall_tau_with_ties_matches_sign_matrices():
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        order = torch.randint(0, 5, (9,), generator=generator).tolist()
        if len(set(order)) > 1:
            assert kendall_tau(order) == pytest.approx(sign_matrix_tau_b(order))
    assert kendall_tau([0, 1, 2, 3]) == 1.0 and kendall_tau([3, 2, 1, 0]) == -1.0
    assert kendall_tau([0, 0, 1, 1]) == pytest.approx(sign_matrix_tau_b([0, 0, 1, 1]))


def context(model, prompt_ids, gen_length=8) -> DecodeContext:
    return DecodeContext(model=model, prompt_ids=prompt_ids, params={}, max_new_tokens=gen_length,
                         eos_token_ids={EOS}, generator=torch.Generator().manual_seed(0))


def test_end_at_eos_fills_the_tail_without_model_calls(mdlm):
    vocab = mdlm.vocab_size
    calls = []

    def eos_at_two(canvas, prompt_length, block, fresh):
        calls.append(1)
        logits = torch.zeros(8, vocab)
        logits[:, 10] = 1.0
        logits[2, EOS] = 20.0  # position 2 is by far the most confident, and proposes end of text
        return Denoised(logits)

    predictor = MaskPredictor(mdlm, MASK, EOS)
    settings = UnmaskSettings(gen_length=8, block_length=8, steps=8, end_at_eos=True)
    events = [e for e in unmask(context(mdlm, [1, 5]), predictor, top_k_rule, settings, eos_at_two)
              if isinstance(e, DiffusionStep)]
    assert sorted(events[0].committed_positions) == [2, 3, 4, 5, 6, 7]
    assert events[0].canvas[2:] == [EOS] * 6
    assert len(calls) == len(events) == 3  # then positions 0 and 1, one per step


@pytest.mark.parametrize("stop", [False, True])
def test_stop_when_settled_ends_once_nothing_before_the_first_eos_is_masked(mdlm, stop):
    """End of text at 2, then its two left neighbours, then the padding: settled after three calls, when the answer
    can no longer change; the padding's five calls are saved and the answer is the same."""
    vocab = mdlm.vocab_size
    calls = []

    def eos_at_two(canvas, prompt_length, block, fresh):
        calls.append(1)
        logits = torch.zeros(8, vocab)
        logits[:, 11] = 1.0  # the padding: the least confident proposals
        logits[:2, 10] = torch.tensor([6.0, 5.0])
        logits[2, EOS] = 20.0
        return Denoised(logits)

    settings = UnmaskSettings(gen_length=8, block_length=8, steps=8, stop_when_settled=stop)
    events = list(unmask(context(mdlm, [1, 5]), MaskPredictor(mdlm, MASK, EOS), top_k_rule, settings, eos_at_two))
    steps = [e for e in events if isinstance(e, DiffusionStep)]
    assert [sorted(e.committed_positions) for e in steps[:3]] == [[2], [0], [1]]
    assert len(calls) == len(steps) == (3 if stop else 8)
    assert events[-1].token_ids == [10, 10, EOS]


PEOPLE = ["James Smith", "Mary Jones", "Robert Brown"]
SETTLING_DECODERS = (("llada", {}), ("fast_dllm", {"threshold": 0.9}), ("localleap", {}), ("learn2pd", {}),
                     ("dkv_cache", {}), ("dream", {}))


def test_the_builtin_dllm_settles_before_its_padding_and_stopping_there_changes_no_answer():
    """Stopping once settled changes no answer of the built-in dLLM, for every decoder that offers it, and saves the
    calls that would fill the padding when the answer settles first."""
    model = load_model("waitline-mdlm")
    prompt = render_prompt("copy", PEOPLE)
    calls = {}
    for decoder, params in SETTLING_DECODERS:
        full, settled = (Run(model, decoder, prompt, {**params, "gen_length": 32, "stop_when_settled": stop},
                             RunSettings(max_new_tokens=32, chat=True)).to_end() for stop in (False, True))
        assert settled.status == full.status == "finished", (decoder, settled.reason)
        assert settled.output_token_ids == full.output_token_ids, decoder
        calls[decoder] = (settled.metrics["model_calls"], full.metrics["model_calls"])
        assert calls[decoder][0] <= calls[decoder][1], decoder
    assert model.decode(full.output_token_ids, skip_special_tokens=True) == format_list(PEOPLE)
    # Fast-dLLM commits the answer and its end of text in its first call; the padding's calls are the saving
    assert calls["fast_dllm"][0] < calls["fast_dllm"][1]


def test_cfg_doubles_calls_and_mixes_conditional_and_unconditional(mdlm):
    predictor = predictor_for(mdlm)
    canvas = torch.tensor([1, 40, 41, 42] + [MASK] * 6)
    weight = 1.5
    guided = FullForward(predictor, weight)(canvas, 4, (0, 6), torch.zeros(6, dtype=torch.bool))
    with torch.inference_mode():
        cond = mdlm.model(input_ids=canvas[None]).logits[0, 4:].float()
        blind = canvas.clone()
        blind[:4] = MASK
        un = mdlm.model(input_ids=blind[None]).logits[0, 4:].float()
    direct = un + (weight + 1) * (cond - un)
    keep = torch.arange(direct.shape[1]) != MASK
    assert guided.calls == 2
    torch.testing.assert_close(guided.logits[:, keep], direct[:, keep], rtol=1e-5, atol=1e-5)
    assert torch.isinf(guided.logits[:, MASK]).all()
    _, trace = run(mdlm, "llada", {"gen_length": 4, "cfg_scale": weight}, max_new_tokens=4)
    assert [e.model_calls for e in diffusion_steps(trace)] == [2] * 4


def test_shift_moves_logits_right_by_one(mdlm):
    canvas = torch.tensor([1, 40, 41, MASK, MASK])
    plain = MaskPredictor(mdlm, MASK, EOS).logits(canvas)
    shifted = MaskPredictor(mdlm, MASK, EOS, shift=True).logits(canvas)
    torch.testing.assert_close(shifted[1:], plain[:-1])
    torch.testing.assert_close(shifted[0], plain[0])


def test_predictor_for_refuses_an_autoregressive_model(tokenizer):
    with pytest.raises(ParamError, match="not a diffusion"):
        predictor_for(tiny_llama(tokenizer, causal=True))


def test_a_cancelled_run_keeps_its_steps(mdlm):
    runner = Run(mdlm, "llada", "Alice", {"gen_length": 8}, RunSettings(max_new_tokens=8))
    for event in runner:
        if isinstance(event, DiffusionStep):
            runner.cancel()
    trace = runner.trace
    assert trace.status == "cancelled"
    assert len(diffusion_steps(trace)) == 1


# --- Hub-style folders: a stock masked LM, and remote code ---------------------------------------------------


def test_modernbert_masked_lm_loads_and_decodes(tokenizer, tmp_path):
    cfg = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, global_attn_every_n_layers=1, pad_token_id=0, bos_token_id=1,
                           eos_token_id=EOS, cls_token_id=1, sep_token_id=EOS)
    torch.manual_seed(0)
    ModernBertForMaskedLM(cfg).save_pretrained(tmp_path)
    assert tokenizer.mask_token_id == MASK
    tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "ModernBertForMaskedLM"
    assert loaded.forward(torch.tensor([[1, 40, MASK]])).logits.shape == (1, 3, len(tokenizer))
    assert predictor_for(loaded).mask_id == MASK and predictor_for(loaded).shift is False
    _, trace = run(loaded, "llada", {"gen_length": 6}, max_new_tokens=6)
    assert trace.status == "finished" and len(diffusion_steps(trace)) == 6


REMOTE_CONFIG = """from transformers import LlamaConfig


class ToyDreamConfig(LlamaConfig):
    model_type = "dream"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_toy_dream import ToyDreamConfig


class ToyDreamModel(LlamaForCausalLM):
    config_class = ToyDreamConfig
"""


def test_remote_code_diffusion_lm_loads_through_its_auto_map_only_when_trusted(tokenizer, tmp_path, monkeypatch):
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "toy-dream"
    model = tiny_llama(tokenizer).model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "configuration_toy_dream.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_toy_dream.py").write_text(REMOTE_MODEL)
    config = (folder / "config.json").read_text()
    config = config.replace('"model_type": "llama"', '"model_type": "dream"').replace(
        '"architectures": [', '"auto_map": {"AutoConfig": "configuration_toy_dream.ToyDreamConfig", '
        '"AutoModel": "modeling_toy_dream.ToyDreamModel"},\n  "architectures": [')
    (folder / "config.json").write_text(config)
    with pytest.raises(ModelError, match="--trust-remote-code"):
        load_model(str(folder))
    loaded = load_model(str(folder), trust_remote_code=True)  # like Dream: only AutoModel is mapped
    assert type(loaded.model).__name__ == "ToyDreamModel"
    assert predictor_for(loaded).shift is True  # Dream's model type shifts by default
