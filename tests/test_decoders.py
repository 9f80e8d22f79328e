"""Token-level decoders against independent computations (transformers' generate and processors)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from engine import Run, RunSettings, load_model, record
from engine.attention import AttentionCapture
from engine.decoders import all_decoders
from engine.event_arrays import attention_array
from engine.events import AttentionMap, BeamStep, Output, TokenStep
from engine.params import ParamError

PROMPTS = ["The quick brown fox", "Entropy is", "1 2 3 4"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def _generate(model, prompt_ids, **kwargs):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        return model.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def test_registry_has_the_issue_decoders():
    names = {spec.name for spec in all_decoders()}
    assert {"greedy", "sample", "top_k", "top_p", "min_p", "typical", "top_h", "beam", "forced"} <= names


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_generate(tiny, prompt):
    trace = record(tiny, "greedy", prompt, settings=RunSettings(max_new_tokens=24, ignore_eos=True))
    expected = _generate(tiny, trace.prompt_token_ids, do_sample=False, max_new_tokens=24, min_new_tokens=24)
    assert trace.output_token_ids == expected[0, len(trace.prompt_token_ids) :].tolist()
    assert trace.status == "finished"
    assert trace.metrics["model_calls"] == 24 and trace.metrics["new_tokens"] == 24


def test_token_step_contents(tiny):
    trace = record(tiny, "top_k", "Hello", {"top_k": 5, "temperature": 0.7}, RunSettings(max_new_tokens=4, record_top_k=8))
    steps = [e for e in trace.events if isinstance(e, TokenStep)]
    assert len(steps) == 4
    for s in steps:
        assert len(s.candidates) == 8
        raw = [c.raw_prob for c in s.candidates]
        assert raw == sorted(raw, reverse=True)
        assert [st.name for st in s.stages] == ["temperature", "top_k"]
        assert s.stages[-1].kept == 5
        # the chosen token survived every stage, and only five candidates have processed mass
        assert sum(c.prob > 0 for c in s.candidates) == 5
        assert s.rank >= 1 and s.logprob <= 0 and s.entropy <= s.entropy_raw + 1e-5


def test_sample_is_reproducible_and_seed_dependent(tiny):
    def tokens(seed):
        return record(tiny, "top_p", "Once upon", {"top_p": 0.95}, RunSettings(max_new_tokens=16, seed=seed)).output_token_ids

    assert tokens(7) == tokens(7)
    assert len({tuple(tokens(s)) for s in range(4)}) > 1


def test_first_sampled_token_follows_processed_distribution(tiny):
    """Chi-square of many seeded first tokens against transformers' own warpers on the same logits."""
    params = {"temperature": 0.8, "top_k": 30, "top_p": 0.9, "min_p": 0.02}
    prompt_ids = tiny.encode("Entropy is")
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt_ids])).logits[:, -1, :].float()
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(30), TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)])
    expected = torch.softmax(warpers(torch.tensor([prompt_ids]), logits.clone()), dim=-1)[0].double().numpy()

    draws = 2000
    counts = Counter(
        record(tiny, "sample", "Entropy is", params, RunSettings(max_new_tokens=1, seed=seed)).output_token_ids[0]
        for seed in range(draws)
    )
    support = np.flatnonzero(expected > 0)
    assert set(counts) <= set(support.tolist())
    observed = np.array([counts.get(int(t), 0) for t in support], dtype=float)
    exp = expected[support] * draws
    big = exp >= 5  # merge sparse cells so the chi-square approximation holds
    obs_cells = np.append(observed[big], observed[~big].sum())
    exp_cells = np.append(exp[big], exp[~big].sum())
    keep = exp_cells > 0
    exp_cells = exp_cells * obs_cells[keep].sum() / exp_cells[keep].sum()  # float rounding of the total
    assert chisquare(obs_cells[keep], exp_cells[keep]).pvalue > 1e-3


@pytest.mark.parametrize(
    "num_beams,length_penalty,early_stopping",
    [(4, 1.0, "false"), (3, 0.0, "never"), (5, 2.0, "true"), (2, -1.0, "false")],
)
def test_beam_equals_transformers(tiny, num_beams, length_penalty, early_stopping):
    params = {"num_beams": num_beams, "length_penalty": length_penalty, "early_stopping": early_stopping}
    trace = record(tiny, "beam", "The quick brown fox", params, RunSettings(max_new_tokens=12))
    flag = {"true": True, "false": False, "never": "never"}[early_stopping]
    out = _generate(
        tiny,
        trace.prompt_token_ids,
        num_beams=num_beams,
        length_penalty=length_penalty,
        early_stopping=flag,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    expected = out.sequences[0, len(trace.prompt_token_ids) :].tolist()
    pad = tiny.tokenizer.pad_token_id
    while expected and expected[-1] == pad and len(expected) > len(trace.output_token_ids):
        expected.pop()
    assert trace.output_token_ids == expected
    final = [e for e in trace.events if isinstance(e, Output)][-1]
    assert final.score == pytest.approx(float(out.sequences_scores[0]), abs=1e-4)


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [(3, 1.0, "false"), (4, 0.5, "true"), (3, 1.5, "never")])
def test_beam_equals_transformers_when_beams_finish_often(num_beams, length_penalty, early_stopping):
    """Two frequent tokens declared end-of-sequence: hypotheses finish at many steps and lengths."""
    model = load_model("tiny-random-llama")  # a private copy: its generation config is changed below
    greedy = record(model, "greedy", "The quick brown fox", settings=RunSettings(max_new_tokens=6, ignore_eos=True))
    frequent = list(dict.fromkeys(greedy.output_token_ids))[1:3]
    model.model.generation_config.eos_token_id = frequent + [model.tokenizer.eos_token_id]
    assert model.eos_token_ids == set(model.model.generation_config.eos_token_id)
    test_beam_equals_transformers(model, num_beams, length_penalty, early_stopping)
    trace = record(model, "beam", "The quick brown fox", {"num_beams": num_beams}, RunSettings(max_new_tokens=12))
    assert any(n.status == "finished" and n.token_id in frequent for e in trace.events if isinstance(e, BeamStep) for n in e.nodes)


def test_beam_records_tree(tiny):
    trace = record(tiny, "beam", "Hello", {"num_beams": 3}, RunSettings(max_new_tokens=5))
    steps = [e for e in trace.events if isinstance(e, BeamStep)]
    assert steps
    ids = {n.id for s in steps for n in s.nodes}
    for s in steps:
        assert sum(n.status == "live" for n in s.nodes) <= 3
        assert any(n.status == "pruned" for n in s.nodes)
        for n in s.nodes:
            assert n.parent == -1 or n.parent in ids
    assert all(n.parent == -1 for n in steps[0].nodes)


def test_forced_matches_teacher_forced_forward(tiny):
    trace = record(tiny, "forced", "The cat", {"continuation": " sat on the mat"})
    target = tiny.tokenizer(" sat on the mat", add_special_tokens=False)["input_ids"]
    assert trace.output_token_ids == target
    ids = torch.tensor([trace.prompt_token_ids + target])
    with torch.inference_mode():
        logprobs = torch.log_softmax(tiny.model(ids).logits[0].float(), dim=-1)
    steps = [e for e in trace.events if isinstance(e, TokenStep)]
    start = len(trace.prompt_token_ids) - 1
    for i, step in enumerate(steps):
        assert step.forced
        assert step.logprob == pytest.approx(float(logprobs[start + i, target[i]]), abs=1e-5)
    assert trace.metrics["model_calls"] == 1


def test_attention_capture_matches_eager_output_attentions(tiny):
    capture = AttentionCapture(layers="all", heads="mean")
    trace = record(tiny, "greedy", "Attention please", settings=RunSettings(max_new_tokens=3, attention=capture))
    maps = [e for e in trace.events if isinstance(e, AttentionMap)]
    assert len(maps) == 3
    prompt = trace.prompt_token_ids
    ids = torch.tensor([prompt + trace.output_token_ids[:2]])
    with torch.inference_mode():
        att = tiny.model(ids, output_attentions=True).attentions
    reference = torch.stack([a[0].mean(dim=0) for a in att]).numpy()  # [layers, q, k]
    first = attention_array(maps[0])
    assert first.shape == (tiny.num_layers, len(prompt), len(prompt))
    np.testing.assert_allclose(first, reference[:, : len(prompt), : len(prompt)], atol=2e-3)
    last = attention_array(maps[2])
    np.testing.assert_allclose(last[:, 0, :], reference[:, -1, :], atol=2e-3)


def test_attention_budget_bounds_storage(tiny):
    capture = AttentionCapture(layers="last", heads="max", max_bytes=600)
    trace = record(tiny, "greedy", "One two three", settings=RunSettings(max_new_tokens=10, attention=capture))
    used = sum(len(e.data) for e in trace.events if isinstance(e, AttentionMap))
    assert 0 < used <= 600


def test_cancel_keeps_partial_trace(tiny):
    run = Run(tiny, "greedy", "Count:", settings=RunSettings(max_new_tokens=50, ignore_eos=True))
    for event in run:
        if isinstance(event, TokenStep) and event.position == 4:
            run.cancel()
    assert run.trace.status == "cancelled"
    assert len(run.trace.output_token_ids) == 5


def test_decoder_failure_is_recorded(tiny, monkeypatch):
    calls = {"n": 0}
    original = tiny.forward

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated device error")
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny, "forward", flaky)
    trace = record(tiny, "greedy", "Hi", settings=RunSettings(max_new_tokens=10, ignore_eos=True))
    assert trace.status == "failed" and "simulated device error" in trace.reason
    assert len(trace.output_token_ids) == 3


def test_stop_string_truncates_output(tiny):
    free = record(tiny, "greedy", "abc", settings=RunSettings(max_new_tokens=20, ignore_eos=True))
    text = free.output_text
    stop = text[3:5]
    assert stop.strip(), "the tiny model should produce printable text"
    trace = record(tiny, "greedy", "abc", settings=RunSettings(max_new_tokens=20, ignore_eos=True, stop=[stop]))
    assert trace.output_text.endswith(stop) or stop in trace.output_text
    assert len(trace.output_token_ids) < 20
    assert trace.output_token_ids == free.output_token_ids[: len(trace.output_token_ids)]


def test_eos_stops_the_run(tiny):
    eos = next(iter(tiny.eos_token_ids))
    trace = record(tiny, "forced", "x", {"continuation": "ab" + tiny.tokenizer.decode([eos], skip_special_tokens=False) + "cd"})
    assert trace.output_token_ids[-1] == eos and trace.reason == "end of sequence"


def test_bad_parameters_are_clear(tiny):
    with pytest.raises(ParamError, match="top_p=1.5 is above the maximum"):
        record(tiny, "top_p", "x", {"top_p": 1.5})
    with pytest.raises(ParamError, match="has no parameter 'topp'"):
        record(tiny, "top_p", "x", {"topp": 0.5})
    with pytest.raises(ParamError, match="unknown decoder 'nucleus'"):
        record(tiny, "nucleus", "x")


def test_entropy_in_nats(tiny):
    trace = record(tiny, "greedy", "x", settings=RunSettings(max_new_tokens=1))
    step = next(e for e in trace.events if isinstance(e, TokenStep))
    prompt_ids = trace.prompt_token_ids
    with torch.inference_mode():
        logits = tiny.model(torch.tensor([prompt_ids])).logits[0, -1].float()
    expected = torch.distributions.Categorical(logits=logits).entropy().item()
    assert step.entropy_raw == pytest.approx(expected, rel=1e-5)
    assert step.entropy_raw <= math.log(tiny.vocab_size)


def test_a_run_without_seed_records_the_seed_it_drew(tiny):
    first = record(tiny, "sample", "Once", settings=RunSettings(max_new_tokens=8, seed=None))
    assert isinstance(first.info.seed, int)
    again = record(tiny, "sample", "Once", settings=RunSettings(max_new_tokens=8, seed=first.info.seed))
    assert again.output_token_ids == first.output_token_ids
