"""Adaptive draft lengths: the speculative schedules, SpecDec++ and PEARL are lossless and follow their rules."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from engine import RunSettings, record
from engine.events import r7
from tests.helpers import (
    PROMPTS,
    assert_follows,
    greedy_ids,
    rounds_of,
    run_ignoring_eos,
)

# Adversarial settings: a one-layer draft (mostly rejected), the whole target as its draft (all accepted) with
# drafts growing past the budget, long drafts, and PEARL with one-token rounds.
SETTINGS = [
    ("speculative", {"schedule": "heuristic", "draft_layers": 1}),
    ("speculative", {"schedule": "heuristic", "draft_layers": 2, "num_draft_tokens": 1}),
    ("speculative", {"schedule": "confidence", "draft_layers": 1, "num_draft_tokens": 8, "confidence_threshold": 0.1}),
    ("speculative", {"schedule": "confidence", "draft_layers": 2, "num_draft_tokens": 8, "confidence_threshold": 0.1}),
    ("specdec_pp", {"draft_layers": 1}),
    ("specdec_pp", {"draft_layers": 2, "stop_threshold": 0.999, "min_draft": 1, "max_draft": 12}),
    ("pearl", {"draft_layers": 1}),
    ("pearl", {"draft_layers": 2, "gamma": 6}),
    ("pearl", {"draft_layers": 1, "gamma": 1}),
]
SAMPLED = {"temperature": 0.9, "top_k": 6}
FIXED = {"draft_length": "fixed"}  # the drafter's own length rule, not capped by the cost-aware draft length


_greedy = greedy_ids


def _assert_greedy_equal(model, decoder, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(model, decoder, prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == _greedy(model, prompt, max_new_tokens)
    return trace


# ---------------------------------------------------------------- losslessness (greedy, float32)


@pytest.mark.parametrize("decoder,params", SETTINGS)
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[0], 45), (PROMPTS[1], 23)])  # 23: ends inside drafts
def test_greedy_equals_greedy_llama(llama, decoder, params, prompt, max_new_tokens):
    _assert_greedy_equal(llama, decoder, params, prompt, max_new_tokens)


@pytest.mark.parametrize("decoder,params", SETTINGS)
def test_greedy_equals_greedy_gemma3(gemma, decoder, params):
    """70 tokens cross Gemma's sliding window (32) while both caches roll back."""
    _assert_greedy_equal(gemma, decoder, params, PROMPTS[1], 70)


# ---------------------------------------------------------------- the draft-length rules


def _assert_heuristic_schedule(rounds, k: int, max_new_tokens: int) -> list[int]:
    """Each round drafts k (or what the budget allows); all accepted -> k + 2, else max(1, k - 1). Returns the ks."""
    generated = 0
    lengths = []
    for r in rounds:
        assert len(r.nodes) == min(k, max_new_tokens - generated - 1)
        lengths.append(len(r.nodes))
        if r.nodes:
            k = k + 2 if len(r.accepted_path) == len(r.nodes) else max(1, k - 1)
        generated += len(r.committed)
    return lengths


def test_heuristic_schedule_grows_while_everything_is_accepted(llama):
    params = {"schedule": "heuristic", "draft_layers": 2, "num_draft_tokens": 1, **FIXED}
    rounds = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[0], params, max_new_tokens=45))
    assert all(len(r.accepted_path) == len(r.nodes) for r in rounds)
    lengths = _assert_heuristic_schedule(rounds, 1, 45)
    assert lengths[:5] == [1, 3, 5, 7, 9]


def test_heuristic_schedule_shrinks_to_one_while_everything_is_rejected(llama):
    params = {"schedule": "heuristic", "draft_model": "tiny-random-llama:seed=1", "num_draft_tokens": 5, **FIXED}
    rounds = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[1], params, max_new_tokens=12))
    assert all(not r.accepted_path for r in rounds)
    assert _assert_heuristic_schedule(rounds, 5, 12)[:7] == [5, 4, 3, 2, 1, 1, 1]


def test_confidence_schedule_stops_after_the_first_unconfident_draft(llama):
    threshold, k, budget = 0.1, 8, 45
    rounds = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[0], {**SETTINGS[3][1], "confidence_threshold": threshold, **FIXED}, max_new_tokens=budget))
    generated = 0
    for r in rounds:
        probs = [n.draft_prob for n in r.nodes]
        assert all(p >= threshold for p in probs[:-1])
        assert probs[-1] < threshold or len(probs) == min(k, budget - generated - 1)
        generated += len(r.committed)
    assert {len(r.nodes) for r in rounds} - {1, k} and min(len(r.nodes) for r in rounds) < k  # rounds of many lengths


@pytest.mark.parametrize(
    "params,min_draft,max_draft,threshold",
    [
        ({"draft_layers": 1}, 2, 20, 0.3),  # the defaults
        ({"draft_layers": 2, "stop_threshold": 0.999, "min_draft": 1, "max_draft": 12}, 1, 12, 0.999),
    ],
)
def test_specdec_pp_lengths_follow_the_stop_rule(llama, params, min_draft, max_draft, threshold):
    """Recomputed from the recorded draft probs: never stop before min_draft or while 1 - cum <= threshold."""
    budget = 45
    rounds = rounds_of(run_ignoring_eos(llama, "specdec_pp", PROMPTS[0], {**params, **FIXED}, max_new_tokens=budget))
    generated = 0
    for r in rounds:
        probs = [n.draft_prob for n in r.nodes]
        cum = [math.prod(probs[1 : i + 1]) for i in range(len(probs))]  # the first draft's estimate is 1
        assert [n.score for n in r.nodes] == [r7(c) for c in cum]
        limit = min(max_draft, budget - generated - 1)
        assert min(min_draft, limit) <= len(probs) <= limit
        assert all(i + 1 < min_draft or 1 - c <= threshold for i, c in enumerate(cum[:-1]))
        assert 1 - cum[-1] > threshold or len(probs) == limit
        generated += len(r.committed)
    if threshold > 0.9:  # drafts long and short: the rule, not the bounds, ended them
        assert len({len(r.nodes) for r in rounds[:-1]}) > 1


def test_specdec_pp_refuses_min_above_max(llama):
    trace = run_ignoring_eos(llama, "specdec_pp", "Hi", {"min_draft": 5, "max_draft": 3})
    assert trace.status == "failed" and "min_draft=5 must not exceed max_draft=3" in trace.reason


@pytest.mark.parametrize("params,prompt", [({"draft_layers": 1}, PROMPTS[0]), ({"draft_layers": 2, "gamma": 3}, PROMPTS[1])])
def test_pearl_rounds_alternate_as_the_algorithm_says(llama, params, prompt):
    gamma, budget = params.get("gamma", 4), 40
    trace = _assert_greedy_equal(llama, "pearl", {**params, "draft_length": "fixed"}, prompt, budget)
    rounds = rounds_of(trace)
    generated, mode = 0, "pre-verify"
    for r in rounds:
        all_accepted = len(r.accepted_path) == len(r.nodes)
        assert r.mode == mode
        assert len(r.nodes) == min(1 if mode == "pre-verify" else gamma, budget - generated)
        assert r.draft_calls <= gamma and (mode == "post-verify" or r.draft_calls == min(gamma, budget - generated))
        if all_accepted:  # PEARL has no bonus token: the new drafts after the checked one come next
            assert r.committed == [n.token_id for n in r.nodes] and r.bonus_token is None
        else:
            assert r.committed == [r.nodes[i].token_id for i in r.accepted_path] + [r.bonus_token] and r.bonus_is_correction
        assert r.simulated_seconds == pytest.approx(max(r.draft_seconds, r.seconds - r.draft_seconds), abs=1e-6)
        mode = "post-verify" if all_accepted else "pre-verify"
        generated += len(r.committed)
    assert {r.mode for r in rounds} == {"pre-verify", "post-verify"}
    simulated = sum(r.simulated_seconds for r in rounds)
    assert trace.metrics["simulated_seconds"] == pytest.approx(simulated, abs=1e-5)
    ratio = simulated / sum(r.seconds for r in rounds)
    assert trace.metrics["simulated_to_measured"] == pytest.approx(ratio, rel=1e-4) and ratio <= 1


def test_a_paused_pearl_takes_plain_steps_but_never_with_drafts_pending(llama, monkeypatch):
    """Drafting losing to plain steps: after the warm-up PEARL rounds run only as probes (here after six plain
    rounds), a probe that ended in post-verify finishes its pending drafts first; the output stays greedy's."""
    from engine.speculative import draft_length

    monkeypatch.setattr(draft_length.PayoffSwitch, "rate", lambda self, speculated: 0.0 if speculated else 1.0)
    monkeypatch.setattr(draft_length.ProbeBudget, "due", lambda self, token_seconds, prior_loss=None: self.waited >= 6)  # six rounds
    observe = draft_length.PayoffSwitch.observe  # every round timed at 1 s
    monkeypatch.setattr(draft_length.PayoffSwitch, "observe", lambda self, spec, tokens, _: observe(self, spec, tokens, 1.0))
    trace = _assert_greedy_equal(llama, "pearl", {"draft_layers": 1, "gamma": 3}, PROMPTS[1], 40)
    rounds = rounds_of(trace)
    plain = [i for i, r in enumerate(rounds) if r.mode.startswith("plain step")]
    assert plain and all(not rounds[i].nodes and rounds[i].simulated_seconds == rounds[i].seconds for i in plain)
    fully_accepted = [i for i, r in enumerate(rounds) if r.nodes and len(r.accepted_path) == len(r.nodes)]
    assert not {i + 1 for i in fully_accepted} & set(plain)  # its pending drafts are checked first
    assert len(plain) > len(rounds) / 2


# ---------------------------------------------------------------- the sampling law


def _processed_target(model, ids: list[int]) -> torch.Tensor:
    """The target's next-token distribution after temperature 0.9 and top-k 6, as SAMPLED asks."""
    with torch.inference_mode():
        logits = model.model(torch.tensor([ids])).logits[0, -1].double() / SAMPLED["temperature"]
    top = logits.topk(SAMPLED["top_k"])
    return torch.zeros(model.vocab_size, dtype=torch.float64).index_put_((top.indices,), torch.softmax(top.values, -1))


def _counts(tokens: list[int], vocab: int) -> np.ndarray:
    observed = np.zeros(vocab)
    for token, n in Counter(tokens).items():
        observed[token] = n
    return observed


@pytest.mark.parametrize(
    "decoder,params",
    [
        ("specdec_pp", {"draft_layers": 1, "min_draft": 3}),
        # the second token from a pre-verify round, or (1 run in 10) a post-verify one checking a pending draft:
        # pending drafts checked against the wrong draft row fail this test
        ("pearl", {"draft_layers": 1, "gamma": 3}),
    ],
)
def test_first_two_sampled_tokens_follow_the_processed_target(llama, decoder, params):
    """The first token follows p; the second, given the most frequent first, follows p after it."""
    prompt = "Entropy is"
    ids = llama.encode(prompt)
    outputs = [
        record(llama, decoder, prompt, {**params, **SAMPLED}, RunSettings(max_new_tokens=2, seed=seed, ignore_eos=True)).output_token_ids
        for seed in range(400)
    ]
    assert_follows(_counts([out[0] for out in outputs], llama.vocab_size), _processed_target(llama, ids))
    first = Counter(out[0] for out in outputs).most_common(1)[0][0]
    seconds = [out[1] for out in outputs if out[0] == first]
    assert_follows(_counts(seconds, llama.vocab_size), _processed_target(llama, ids + [first]))
