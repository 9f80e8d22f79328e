"""Speculative decoding: losslessness against greedy, the verifier's sampling law, cache rollback, round records."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from engine import RunSettings, load_model, record
from engine.decoders.speculative.prompt_lookup import lookup_continuation
from engine.events import event_from_dict, event_to_dict
from engine.speculative.cache import PrefixCache
from engine.speculative.truncated import truncated_model
from engine.speculative.verify import verify_chain, verify_tree
from tests.helpers import (
    LONG_PROMPT,
    PROMPTS,
    assert_follows,
    assert_round_totals,
    first_token_inside_a_draft,
    first_token_law,
    rounds_of,
    run_ignoring_eos,
)

# Adversarial settings: one-token and long drafts, a one-layer draft (many rejections), the whole target as
# its own draft (every draft accepted), unigram lookup, and lookup copying long spans.
SETTINGS = [
    ("speculative", {"draft_layers": 1, "num_draft_tokens": 1}),
    ("speculative", {"draft_layers": 1, "num_draft_tokens": 8}),
    ("speculative", {"draft_layers": 2, "num_draft_tokens": 8}),
    ("speculative", {"draft_layers": 2, "num_draft_tokens": 3}),
    ("prompt_lookup", {}),
    ("prompt_lookup", {"max_ngram": 1, "num_draft_tokens": 1}),
    ("prompt_lookup", {"max_ngram": 2, "num_draft_tokens": 16}),
]


# ---------------------------------------------------------------- losslessness (greedy, float32)


@pytest.mark.parametrize("decoder,params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside most drafts
def test_greedy_speculation_equals_greedy_llama(llama, decoder, params, prompt, max_new_tokens):
    expected = run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(llama, decoder, prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize("decoder,params", SETTINGS)
def test_greedy_speculation_equals_greedy_gemma3(gemma, decoder, params):
    """Gemma 3 mixes sliding-window layers (window 32 here): 70 tokens cross the window, so rollback must handle it."""
    prompt = PROMPTS[1]
    expected = run_ignoring_eos(gemma, "greedy", prompt, max_new_tokens=70).output_token_ids
    trace = run_ignoring_eos(gemma, decoder, prompt, params, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


# Gemma's tiny random model repeats one token under greedy decoding; a Llama draft (same tokenizer) is rejected in
# most rounds, so its caches roll back again and again across the sliding window.
@pytest.mark.parametrize(
    "spec,draft",
    [
        ("tiny-random-llama", "tiny-random-llama:seed=1"),
        ("tiny-random-gemma3", "tiny-random-gemma3:seed=1"),
        ("tiny-random-gemma3", "tiny-random-llama"),
    ],
)
@pytest.mark.parametrize("num_draft_tokens", [1, 5])
def test_greedy_speculation_with_a_separate_draft_model_equals_greedy(spec, draft, num_draft_tokens):
    target = load_model(spec)
    params = {"draft_model": draft, "num_draft_tokens": num_draft_tokens}
    for prompt in PROMPTS[:2]:
        trace = run_ignoring_eos(target, "speculative", prompt, params, max_new_tokens=50)
        assert trace.status == "finished", trace.reason
        assert trace.output_token_ids == run_ignoring_eos(target, "greedy", prompt, max_new_tokens=50).output_token_ids
        assert {n.source for r in rounds_of(trace) for n in r.nodes} == {"draft_model"}


# Each case drafts a token past EOS in some round: ``first_token_inside_a_draft`` finds a token that a round accepted
# with more tokens after it, and becomes EOS; the seeds and prompts are ones where such a round exists.
EOS_INSIDE_A_DRAFT = [
    ("tiny-random-llama", "speculative", {"draft_layers": 2, "num_draft_tokens": 8}, PROMPTS[0], 60),
    ("tiny-random-llama", "speculative", {"draft_layers": 1, "num_draft_tokens": 4}, PROMPTS[2], 60),
    ("tiny-random-llama", "speculative", {"schedule": "heuristic", "draft_layers": 2, "num_draft_tokens": 2}, PROMPTS[0], 40),
    ("tiny-random-llama:seed=2", "prompt_lookup", {}, PROMPTS[1], 60),  # this seed copies a prompt span mid-output
    ("tiny-random-llama", "specdec_pp", {"draft_layers": 2}, PROMPTS[0], 40),
    ("tiny-random-llama", "pearl", {"draft_layers": 2}, PROMPTS[0], 40),
    ("tiny-random-llama", "easyspec", {"draft_layers": 2, "num_draft_tokens": 8}, PROMPTS[0], 60),
    ("tiny-random-llama", "rsd", {"draft_layers": 2, "branching": "2,2,2,2"}, PROMPTS[0], 40),
    ("tiny-random-llama", "rsd", {"draft_layers": 2, "tree": "beam"}, PROMPTS[0], 40),
    ("tiny-random-llama", "lookahead", {"window": 3, "ngram": 4, "pool_from_prompt": True}, PROMPTS[1], 60),
    ("tiny-random-llama", "lookahead", {}, PROMPTS[0], 60),
    ("tiny-random-llama", "jacobi", {"window": 8}, PROMPTS[1], 60),
    ("tiny-random-llama", "spec_jacobi", {"window": 8}, PROMPTS[1], 60),
    ("tiny-random-llama:seed=3", "token_recycling", {"tree_size": 20, "reset_matrix": True}, PROMPTS[1], 60),
    ("tiny-random-llama:seed=1", "aded", {"iterations": 50}, PROMPTS[1], 60),
    ("tiny-random-llama", "assisted_cross_tokenizer", {"draft_model": "tiny-random-llama", "num_draft_tokens": 6},
     "The quick brown fox jumps over the lazy dog", 40),
    ("tiny-random-llama", "rapid", {"chunk_tokens": 16, "retrieved_chunks": 100, "query_tokens": 8, "num_draft_tokens": 6},
     LONG_PROMPT, 40),
]


@pytest.mark.parametrize("spec,decoder,params,prompt,max_new_tokens", EOS_INSIDE_A_DRAFT,
                         ids=[f"{case[1]}-{i}" for i, case in enumerate(EOS_INSIDE_A_DRAFT)])
def test_eos_inside_a_draft_stops_like_greedy(spec, decoder, params, prompt, max_new_tokens):
    model = load_model(spec)  # a private copy: its generation config is changed below
    params = {**params, "draft_length": "fixed"}  # both runs draft alike: the cost-aware length depends on timing
    eos = first_token_inside_a_draft(run_ignoring_eos(model, decoder, prompt, params, max_new_tokens=max_new_tokens))
    model.model.generation_config.eos_token_id = [eos]
    expected = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=max_new_tokens))
    trace = record(model, decoder, prompt, params, RunSettings(max_new_tokens=max_new_tokens))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    # the round that reached EOS committed tokens past it; the runner cut them off
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)


# ---------------------------------------------------------------- the verifier's sampling law


def _random_distribution(generator: torch.Generator, vocab: int = 8, support: list[int] | None = None) -> torch.Tensor:
    probs = -torch.rand(vocab, generator=generator, dtype=torch.float64).log()  # Dirichlet(1) up to normalisation
    if support is not None:
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[support] = True
        probs = probs.masked_fill(~mask, 0)
    return probs / probs.sum()


def _first_token_counts(p: torch.Tensor, q: torch.Tensor | None, draft_token: int | None, draws: int) -> np.ndarray:
    """Frequencies of the first committed token over ``draws`` verifications of one draft (two target rows: p, p)."""
    generator = torch.Generator().manual_seed(1234)
    target = torch.stack([p, p]).log().float()
    counts = np.zeros(len(p))
    for _ in range(draws):
        token = draft_token if q is None else int(torch.multinomial(q, 1, generator=generator))
        draft_logprobs = None if q is None else q.log().float()[None]
        verdict = verify_chain([token], target, draft_logprobs, generator)
        counts[token if verdict.accepted else verdict.next_token] += 1
    return counts


CASES = {
    "random": (None, None),
    "disjoint": ([0, 1, 2, 3], [4, 5, 6, 7]),
    "overlapping": ([0, 1, 2, 3, 4], [3, 4, 5]),
}


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize("case", [*CASES, "p_equals_q"])
def test_stochastic_draft_rule_emits_p(case):
    generator = torch.Generator().manual_seed(7)
    if case == "p_equals_q":
        p = q = _random_distribution(generator)
    else:
        p_support, q_support = CASES[case]
        p = _random_distribution(generator, support=p_support)
        q = _random_distribution(generator, support=q_support)
    assert_follows(_first_token_counts(p, q, None, draws=6000), p)


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize("draft_token", [0, 3, 7])  # 7 lies outside p's support in the sparse case
@pytest.mark.parametrize("sparse", [False, True])
def test_deterministic_draft_rule_emits_p(draft_token, sparse):
    generator = torch.Generator().manual_seed(11)
    p = _random_distribution(generator, support=[0, 1, 2, 3, 4] if sparse else None)
    assert_follows(_first_token_counts(p, None, draft_token, draws=6000), p)


def test_deterministic_draft_of_a_certain_token_is_always_accepted():
    p = torch.zeros(8, dtype=torch.float64)
    p[5] = 1.0
    verdict = verify_chain([5, 5], torch.stack([p, p, p]).log().float(), None, torch.Generator().manual_seed(0))
    assert verdict.accepted == 2 and not verdict.is_correction and verdict.next_token == 5


def test_sampling_verdict_records_draws_ratios_and_residual():
    generator = torch.Generator().manual_seed(3)
    p = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # the draft token has p = 0: always rejected
    verdict = verify_chain([0, 1], torch.stack([p, p, p]).log().float(), torch.stack([q, q]).log().float(), generator)
    assert verdict.accepted == 0 and verdict.is_correction and verdict.next_token in (1, 2)
    assert list(verdict.checks) == [0]  # node 1 was never reached
    check = verdict.checks[0]
    assert check.ratio == 0.0 and check.target_prob == 0.0 and not check.accepted and 0 <= check.draw < 1
    assert sorted(c.token_id for c in verdict.residual_top) == [1, 2]
    assert all(c.prob == pytest.approx(0.5) for c in verdict.residual_top)


def test_greedy_verdict():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]]), -1)
    partial = verify_chain([1, 2], logprobs, None, None)
    assert (partial.accepted, partial.next_token, partial.is_correction) == (1, 0, True)
    assert [c.accepted for c in partial.checks.values()] == [True, False]
    assert all(c.draw is None and c.ratio is None for c in partial.checks.values())
    full = verify_chain([1, 0], logprobs, None, None)
    assert (full.accepted_path, full.next_token, full.is_correction) == ([0, 1], 2, False)
    assert verify_chain([], logprobs[:1], None, None).next_token == 1


def test_greedy_tree_follows_the_argmax_branch():
    #            root -> {0: tok 2, 1: tok 1}; node 1 -> {2: tok 0, 3: tok 2}; node 3 -> {4: tok 1}
    parents, tokens = [-1, -1, 1, 1, 3], [2, 1, 0, 2, 1]
    rows = torch.full((6, 3), -5.0)
    for row, best in enumerate([1, 0, 2, 0, 0, 0]):  # argmax after root, node 0, node 1, ...
        rows[row, best] = 5.0
    verdict = verify_tree(parents, tokens, rows.log_softmax(-1), None, None)
    assert verdict.accepted_path == [1, 3] and verdict.next_token == 0 and verdict.is_correction
    assert {n: c.accepted for n, c in verdict.checks.items()} == {0: False, 1: True, 2: False, 3: True, 4: False}


@pytest.mark.slow  # a sampling law over many draws
def test_tree_rules_emit_p_for_the_first_two_tokens():
    """Root with three i.i.d. children (with replacement), each with two i.i.d. children: the joint law of the
    first two committed tokens is p_root(x) p_x(y); and the same tree with fixed tokens (duplicates included)."""
    vocab = 4
    generator = torch.Generator().manual_seed(5)
    p_after = torch.stack([_random_distribution(generator, vocab) for _ in range(vocab + 1)])  # row vocab: the root
    q_after = torch.stack([_random_distribution(generator, vocab) for _ in range(vocab + 1)])
    expected = (p_after[vocab][:, None] * p_after[:vocab]).flatten()
    parents = [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    for stochastic in (True, False):
        counts = np.zeros(vocab * vocab)
        for _ in range(4000):
            tokens: list[int] = []
            for parent in parents:
                state = vocab if parent < 0 else tokens[parent]
                if stochastic:
                    tokens.append(int(torch.multinomial(q_after[state], 1, generator=generator)))
                else:  # fixed tokens 0/1: siblings repeat each other
                    tokens.append((parent + len(tokens)) % 2)
            states = [vocab] + tokens
            target = p_after[states].log().float()
            draft = q_after[states].log().float() if stochastic else None
            verdict = verify_tree(parents, tokens, target, draft, generator)
            emitted = [tokens[n] for n in verdict.accepted_path] + [verdict.next_token]
            if len(emitted) < 2:  # the correction came at depth 1: the second token is drawn after it
                emitted.append(int(torch.multinomial(p_after[emitted[0]], 1, generator=generator)))
            counts[emitted[0] * vocab + emitted[1]] += 1
        assert_follows(counts, expected)


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize(
    "decoder,params,prompt",
    [
        ("speculative", {"draft_layers": 1, "num_draft_tokens": 3}, "Entropy is"),
        ("prompt_lookup", {"num_draft_tokens": 3}, PROMPTS[2]),
        # several i.i.d. siblings per node: a one-layer draft differs from the target
        ("dyspec", {"draft_layers": 1, "tree_size": 8, "max_depth": 3}, "Entropy is"),
    ],
)
def test_first_sampled_token_follows_processed_target(llama, decoder, params, prompt):
    """End to end: the first emitted token over many seeds follows the target after temperature and top-k."""
    assert_follows(*first_token_law(llama, decoder, params, prompt, draws=600))


# ---------------------------------------------------------------- what a round records


@pytest.mark.parametrize(
    "decoder,params",
    [
        ("speculative", {"draft_layers": 1, "num_draft_tokens": 4}),
        ("speculative", {"draft_layers": 1, "num_draft_tokens": 4, "temperature": 0.8}),
        ("prompt_lookup", {}),
        ("prompt_lookup", {"temperature": 1.2, "top_p": 0.9}),
    ],
)
def test_draft_round_contents(llama, decoder, params):
    # whole drafts: the cost-aware length may verify only part of one (its own tests cover that)
    trace = run_ignoring_eos(llama, decoder, PROMPTS[2], {**params, "draft_length": "fixed"}, max_new_tokens=40)
    rounds = rounds_of(trace)
    sampling = params.get("temperature", 0) > 0
    source = "draft_layers:1" if decoder == "speculative" else "prompt_lookup"
    past = len(trace.prompt_token_ids)
    for r in rounds:
        n = len(r.accepted_path)
        assert r.accepted_path == list(range(n))
        assert r.committed == [r.nodes[i].token_id for i in r.accepted_path] + [r.bonus_token]
        assert r.bonus_is_correction == (n < len(r.nodes))
        assert r.cache_slots_kept == list(range(past, past + n))  # the accepted drafts' target-cache slots
        past += len(r.committed)
        assert r.model_calls == 1 and r.seconds >= r.draft_seconds >= 0
        assert r.draft_calls == (len(r.nodes) if decoder == "speculative" else 0)
        for i, node in enumerate(r.nodes):
            assert (node.id, node.parent, node.depth, node.source) == (i, i - 1, i + 1, source)
            verified = i <= n and i < len(r.nodes)
            assert node.accepted == ((i < n) if verified else None)
            assert (node.target_prob is not None) == verified
            assert (node.draw is not None) == (node.ratio is not None) == (verified and sampling)
            assert 0 < node.draft_prob <= 1
        if sampling and r.bonus_is_correction:
            residual = [c.prob for c in r.residual_top]
            assert residual == sorted(residual, reverse=True) and 0 < sum(residual) <= 1 + 1e-6
            assert r.bonus_token in {c.token_id for c in r.residual_top} or len(residual) == 20
        else:
            assert r.residual_top == []
        assert event_from_dict(event_to_dict(r)) == r
    assert_round_totals(trace, rounds, 40)
    # a chain tries depths 1..n+1 (the first rejection included, never past the draft) and accepts 1..n
    tried, accepted = Counter(), Counter()
    for r in rounds:
        n = len(r.accepted_path)
        for depth in range(1, min(n + 1, len(r.nodes)) + 1):
            tried[depth] += 1
            accepted[depth] += depth <= n
    for depth in tried:
        assert trace.metrics[f"acceptance_depth_{depth}"] == round(accepted[depth] / tried[depth], 4)
    if tried:
        assert trace.metrics["acceptance_rate"] == round(sum(accepted.values()) / sum(tried.values()), 4)


def test_rounds_accept_everything_when_the_draft_is_the_target(llama):
    params = {"draft_layers": 2, "num_draft_tokens": 5, "draft_length": "fixed"}  # drafting with the target never pays
    rounds = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[0], params, max_new_tokens=36))
    assert all(len(r.accepted_path) == len(r.nodes) == 5 and not r.bonus_is_correction for r in rounds)
    assert len(rounds) == 6


# ---------------------------------------------------------------- the pieces


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_prefix_cache_rollback_matches_a_fresh_forward(name):
    """Extend, roll back, extend differently, far past Gemma's sliding window: logits equal a cacheless forward."""
    model = load_model(name)
    generator = torch.Generator().manual_seed(0)
    cache = PrefixCache(model)
    context = torch.randint(3, model.vocab_size, (5,), generator=generator).tolist()
    for _ in range(20):
        proposal = torch.randint(3, model.vocab_size, (7,), generator=generator).tolist()
        out = cache.forward(cache.sync(context) + proposal)
        keep = int(torch.randint(0, 8, (), generator=generator))
        context = context + proposal[:keep] + [int(out.logits[0, -1].argmax())]
        fresh = model.forward(torch.tensor([context]))
        cached = cache.forward(cache.sync(context))
        assert cache.cache.get_seq_length() == len(context) == len(cache.tokens)
        torch.testing.assert_close(cached.logits[0, -1], fresh.logits[0, -1], atol=1e-4, rtol=1e-4)
    assert len(context) > 2 * 32


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_truncated_draft_shares_weights_and_keeps_the_target_whole(name):
    model = load_model(name)
    ids = torch.tensor([model.encode("Hello world")])
    whole = truncated_model(model, model.num_layers)
    one = truncated_model(model, 1)
    assert one.num_layers == 1 and model.num_layers == 2 and len(one.new_cache().layers) == 1
    assert one.model.lm_head.weight.data_ptr() == model.model.lm_head.weight.data_ptr()
    assert one.model.model.layers[0] is model.model.model.layers[0]
    torch.testing.assert_close(whole.forward(ids).logits, model.forward(ids).logits)
    assert not torch.allclose(one.forward(ids).logits, model.forward(ids).logits)
    with pytest.raises(ValueError, match="between 1 and 2"):
        truncated_model(model, 3)


def test_too_many_draft_layers_fails_the_run_clearly(llama):
    trace = run_ignoring_eos(llama, "speculative", "Hi", {"draft_layers": 5})
    assert trace.status == "failed" and "draft_layers must be between 1 and 2" in trace.reason


def test_lookup_continuation():
    assert lookup_continuation([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 3, 2) == [9, 1]  # leftmost of the longest n-gram
    assert lookup_continuation([5, 1, 2, 8, 2], 3, 4) == [8, 2]  # falls back to the unigram
    assert lookup_continuation([1, 2, 3, 4], 3, 5) == []  # the suffix itself is not a match
    assert lookup_continuation([4, 4], 2, 3) == [4]
    assert lookup_continuation([7], 3, 3) == []
    assert lookup_continuation([5, 1, 2, 8, 2], 3, 4, min_ngram=2) == []  # a one-token coincidence is no match
    assert lookup_continuation([1, 2, 8, 1, 2], 3, 4, min_ngram=2) == [8, 1, 2]
