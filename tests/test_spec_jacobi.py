"""Jacobi, lookahead and speculative Jacobi decoding: losslessness, the one-forward lookahead step, the n-gram pool."""

from __future__ import annotations


from collections import Counter

import numpy as np
import pytest
import torch

from engine import RunSettings, load_model, record
from engine.decoders.speculative.lookahead import LookaheadWindow, NgramPool, ngram_trie
from engine.params import ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.tree import keep_path, tree_forward
from tests.helpers import (
    PROMPTS,
    assert_follows,
    greedy_ids,
    rounds_of,
    run_ignoring_eos,
)

# Window 1, windows longer than the 23/45-token budgets, every init; lookahead with the smallest window and n-gram,
# the Spec-Bench setting, a small pool, and a pool seeded from the prompt (long accepted n-grams from round one).
SETTINGS = [
    ("jacobi", {"window": 1}),
    ("jacobi", {"window": 4, "init": "pad"}),
    ("jacobi", {"window": 60, "init": "copy"}),
    ("spec_jacobi", {"window": 1}),
    ("spec_jacobi", {}),
    ("spec_jacobi", {"window": 60, "init": "copy"}),
    ("lookahead", {"window": 1, "ngram": 2}),
    ("lookahead", {}),
    ("lookahead", {"window": 3, "ngram": 8, "pool_size": 2, "pool_from_prompt": True}),
    ("lookahead", {"window": 60, "ngram": 3, "pool_from_prompt": True}),
    ("lookahead", {"window": 3, "ngram": 3, "pool_from_prompt": True, "draft_length": "fixed"}),
]


_greedy = greedy_ids


@pytest.mark.parametrize("decoder,params", SETTINGS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside long windows and n-grams
def test_greedy_equals_greedy_llama(llama, decoder, params, max_new_tokens):
    for prompt in PROMPTS:
        trace = run_ignoring_eos(llama, decoder, prompt, params, max_new_tokens=max_new_tokens)
        assert trace.status == "finished", trace.reason
        assert trace.output_token_ids == _greedy(llama, prompt, max_new_tokens)


@pytest.mark.parametrize("decoder,params", SETTINGS)
def test_greedy_equals_greedy_gemma3(gemma, decoder, params):
    """70 tokens cross Gemma's 32-token sliding window; its tiny model repeats, so lookahead accepts long n-grams."""
    for prompt in PROMPTS[1:]:
        trace = run_ignoring_eos(gemma, decoder, prompt, params, max_new_tokens=70)
        assert trace.status == "finished", trace.reason
        assert trace.output_token_ids == _greedy(gemma, prompt, 70)


def test_runs_accept_drafts(llama, gemma):
    """The equality tests above are not vacuous: lookahead accepts long n-grams on Gemma's model (which copies its
    last token), and Jacobi guesses are accepted on Llama's. (On a copying model Jacobi never gets past one token
    per round: each refined guess was computed after the rejected guess before it, which never matches.)"""
    fixed = {"draft_length": "fixed"}  # the window every step, whatever it costs on this machine
    assert run_ignoring_eos(gemma, "lookahead", PROMPTS[2], fixed, max_new_tokens=70).metrics["mean_accepted_tokens"] > 1.5
    for decoder in ("jacobi", "spec_jacobi"):  # the whole window every round: guesses refine only when verified
        params = {"window": 8, "draft_length": "fixed"}
        assert any(r.accepted_path for r in rounds_of(run_ignoring_eos(llama, decoder, PROMPTS[1], params)))


# ---------------------------------------------------------------- the lookahead step's pieces


def _logits_after(model, ids: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_lookahead_forward_equals_sequential_forwards(name):
    """One forward over a candidate trie and a 3x4 window, past Gemma's sliding window: each candidate node's
    logits equal a plain forward over context + its path, each window token's a plain forward over context +
    level 0 up to its column + its column's levels above (atol 1e-4, float32); then the cache keeps the path."""
    model = load_model(name)
    generator = torch.Generator().manual_seed(0)
    target = PrefixCache(model)
    context = torch.randint(3, model.vocab_size, (40,), generator=generator).tolist()
    for _ in range(2):
        ngrams = [tuple(torch.randint(3, model.vocab_size, (4,), generator=generator).tolist()) for _ in range(3)]
        ngrams.append(ngrams[0][:2] + (5, 6))  # shares a two-token prefix with the first
        parents, tokens = ngram_trie(ngrams, 4)
        assert len(tokens) == 14
        window = LookaheadWindow(torch.randint(3, model.vocab_size, (4,), generator=generator).tolist(), ngram=4)
        window.levels += [torch.randint(3, model.vocab_size, (4,), generator=generator).tolist() for _ in range(2)]
        branch = window.branch(len(context), len(tokens))
        logits = tree_forward(target, context, parents, tokens, branch)
        assert logits.shape[0] == 1 + len(tokens) + 12
        torch.testing.assert_close(logits[0], _logits_after(model, context), atol=1e-4, rtol=0)
        for node in range(len(tokens)):
            path = _path_tokens(parents, tokens, node)
            torch.testing.assert_close(logits[1 + node], _logits_after(model, context + path), atol=1e-4, rtol=0)
        for level in range(3):
            for column in range(4):
                seen = window.levels[0][: column + 1] + [window.levels[up][column] for up in range(1, level + 1)]
                row = logits[1 + len(tokens) + level * 4 + column]
                torch.testing.assert_close(row, _logits_after(model, context + seen), atol=1e-4, rtol=0)
        keep_path(target, tokens + branch.tokens, [0, 1])
        context = context + tokens[:2] + [int(logits[2].argmax())]
        after = target.forward(target.sync(context)).logits[0, -1]
        torch.testing.assert_close(after, _logits_after(model, context), atol=1e-4, rtol=0)


def _path_tokens(parents: list[int], tokens: list[int], node: int) -> list[int]:
    path: list[int] = []
    while node >= 0:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


def test_ngram_trie_merges_common_prefixes_and_respects_the_depth():
    parents, tokens = ngram_trie([(1, 2, 3), (1, 2, 4), (1, 5, 6), (7, 8, 9)], 2)
    assert tokens == [1, 2, 5, 7, 8] and parents == [-1, 0, 0, -1, 3]
    assert ngram_trie([(1, 2)], 0) == ([], [])


def test_window_warms_up_then_files_ngrams_and_shifts():
    pool = NgramPool(size=2)
    window = LookaheadWindow([10, 11], ngram=4)  # 3 levels when full
    window.advance([20, 21], pool)
    window.advance([30, 31], pool)
    assert window.levels == [[10, 11], [20, 21], [30, 31]] and len(pool) == 0  # warm-up only grows the window
    window.advance([40, 41], pool)
    assert pool.candidates(10) == [(20, 30, 40)] and pool.candidates(11) == [(21, 31, 41)]
    assert window.levels == [[20, 21], [30, 31], [40, 41]]
    pool.add(10, (1, 2, 3))
    pool.add(10, (20, 30, 40))  # produced again: now the most recent
    pool.add(10, (4, 5, 6))  # over the size: the least recent, (1, 2, 3), goes
    assert pool.candidates(10) == [(4, 5, 6), (20, 30, 40)] and len(pool) == 3


def test_window_branch_visibility():
    branch = LookaheadWindow([1, 2, 3], ngram=3).branch(context_length=10, tree_size=2)
    assert branch.positions == [10, 11, 12] and branch.visible.shape == (3, 5)
    window = LookaheadWindow([1, 2], ngram=3)
    window.levels.append([3, 4])
    branch = window.branch(context_length=10, tree_size=1)
    assert branch.positions == [10, 11, 11, 12]
    assert branch.visible.int().tolist() == [[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 0], [0, 1, 1, 0, 1]]


# ---------------------------------------------------------------- records


def test_lookahead_rounds_show_candidates_and_the_window(llama):
    params = {"window": 3, "ngram": 3, "pool_from_prompt": True, "draft_length": "fixed"}
    trace = run_ignoring_eos(llama, "lookahead", PROMPTS[1], params, max_new_tokens=30)
    rounds = rounds_of(trace)
    assert trace.metrics["model_calls"] == len(rounds) and trace.metrics["ngram_pool_size"] > 0
    assert any(r.accepted_path for r in rounds)
    for r in rounds:
        window = [n for n in r.nodes if n.source == "lookahead"]
        candidates = [n for n in r.nodes if n.source == "ngram_pool"]
        assert len(window) in (3, 6) and all(n.accepted is None and n.target_prob is None for n in window)
        assert r.nodes == candidates + window and all(n.draft_prob == 1.0 for n in candidates)
        assert set(r.accepted_path) <= {n.id for n in candidates} and r.model_calls == 1
        assert f"{len(candidates)} candidate nodes" in r.mode and f"window {len(window) // 3}x3" in r.mode


@pytest.mark.parametrize("decoder,params", [("jacobi", {"window": 5}), ("spec_jacobi", {"window": 5, "temperature": 0.8})])
def test_jacobi_rounds_say_which_guesses_were_refined(gemma, decoder, params):
    rounds = rounds_of(run_ignoring_eos(gemma, decoder, PROMPTS[1], params, max_new_tokens=40))
    source = "jacobi" if decoder == "jacobi" else "sjd"
    assert all(n.source == f"{source}:random" for n in rounds[0].nodes)
    for before, r in zip(rounds, rounds[1:]):
        refined = [n.source == f"{source}:refined" for n in r.nodes]
        expected = min(len(before.nodes) - len(before.accepted_path), len(r.nodes))
        assert refined == [True] * expected + [False] * (len(r.nodes) - expected)
        assert r.mode.startswith(f"{expected} refined + {len(r.nodes) - expected} fresh (random)")
        assert all(0 < n.draft_prob <= 1 for n in r.nodes)


def test_sjd_guesses_keep_the_distribution_they_were_sampled_from(llama):
    """A refined guess's draft prob is q(x): the previous forward's processed p at its position (after that round's
    context and guesses); the verifier's ratio is p(x)/q(x), and p(x) alone for a fresh (one-hot) guess."""
    trace = run_ignoring_eos(llama, "spec_jacobi", PROMPTS[0], {"window": 4, "temperature": 0.9, "top_k": 6, "draft_length": "fixed"},
                             max_new_tokens=20)  # every round refines its guesses: the cost-aware cap would cut them
    rounds = rounds_of(trace)
    context = list(trace.prompt_token_ids)
    refined_checked = 0
    for before, r in zip(rounds, rounds[1:]):
        guesses = [n.token_id for n in before.nodes]
        first_unaccepted = len(before.accepted_path)
        for i, node in enumerate(r.nodes):
            if node.source != "sjd:refined":
                continue
            q = _processed_target(llama, context + guesses[: first_unaccepted + 1 + i])
            assert node.draft_prob == pytest.approx(float(q[node.token_id]), rel=1e-4)
            if node.ratio is not None:
                refined_checked += 1
                assert node.ratio == pytest.approx(node.target_prob / node.draft_prob, rel=1e-3)
        fresh = [n for n in r.nodes if n.source == "sjd:random" and n.ratio is not None]
        assert all(n.draft_prob == 1.0 and n.ratio == pytest.approx(n.target_prob, abs=1e-6) for n in fresh)
        context += before.committed
    assert refined_checked > 0


def test_bad_parameters_are_rejected_clearly(llama):
    with pytest.raises(ParamError, match="window=0 is below the minimum 1"):
        run_ignoring_eos(llama, "jacobi", "Hi", {"window": 0})
    with pytest.raises(ParamError, match="ngram=1 is below the minimum 2"):
        run_ignoring_eos(llama, "lookahead", "Hi", {"ngram": 1})


# ---------------------------------------------------------------- sampling law


def _processed_target(model, ids: list[int]) -> torch.Tensor:
    logits = _logits_after(model, ids).double() / 0.9
    top = logits.topk(6)
    expected = torch.zeros(model.vocab_size, dtype=torch.float64)
    expected[top.indices] = torch.softmax(top.values, -1)
    return expected


def _counts(tokens: list[int], vocab: int) -> np.ndarray:
    observed = np.zeros(vocab)
    for token, n in Counter(tokens).items():
        observed[token] = n
    return observed


SAMPLED = [
    ("jacobi", {"window": 4}),
    ("spec_jacobi", {"window": 4}),
    ("lookahead", {"window": 2, "ngram": 3, "pool_from_prompt": True}),  # the prompt's n-grams are drafted at once
]


@pytest.mark.parametrize("decoder,params", SAMPLED)
def test_first_two_sampled_tokens_follow_processed_target(llama, decoder, params):
    """Over many seeds the first token follows the processed target (temperature 0.9, top-k 6), and so does the
    second one after the most frequent first token: SJD drafts it from the first round's p, not the target's."""
    prompt = PROMPTS[2]
    ids = llama.encode(prompt)
    params = {**params, "temperature": 0.9, "top_k": 6}
    outputs = [
        record(llama, decoder, prompt, params, RunSettings(max_new_tokens=2, seed=seed, ignore_eos=True)).output_token_ids
        for seed in range(600)
    ]
    assert_follows(_counts([o[0] for o in outputs], llama.vocab_size), _processed_target(llama, ids))
    first = Counter(o[0] for o in outputs).most_common(1)[0][0]
    seconds = [o[1] for o in outputs if o[0] == first]
    assert len(seconds) > 120
    assert_follows(_counts(seconds, llama.vocab_size), _processed_target(llama, ids + [first]))


def test_a_paused_lookahead_runs_plain_steps_and_probes_its_window(llama, monkeypatch):
    """With the window costing more than it gives, the switch pauses it: plain one-token rounds (no nodes), the
    window probed again once the plain rounds' time pays for a probe; the output stays greedy's."""
    from engine.speculative import draft_length

    monkeypatch.setattr(draft_length.PayoffSwitch, "rate", lambda self, speculated: 0.0 if speculated else 1.0)
    monkeypatch.setattr(draft_length.ProbeBudget, "due", lambda self, token_seconds, prior_loss=None: self.waited >= 5)  # five rounds
    observe = draft_length.PayoffSwitch.observe  # every round timed at 1 s
    monkeypatch.setattr(draft_length.PayoffSwitch, "observe", lambda self, spec, tokens, _: observe(self, spec, tokens, 1.0))
    trace = run_ignoring_eos(llama, "lookahead", PROMPTS[2], {"window": 3, "ngram": 3}, max_new_tokens=40)
    windowed = [i for i, r in enumerate(rounds_of(trace)) if r.nodes]
    warm = draft_length.PayoffSwitch.WARM_ROUNDS
    expected = [*range(warm), warm + 5, warm + 11, warm + 17]  # a timed plain step at `warm`; probes after 5 s
    assert windowed[: len(expected)] == expected
    assert all("plain step" in r.mode for r in rounds_of(trace) if not r.nodes)
    assert trace.output_token_ids == _greedy(llama, PROMPTS[2], 40)
