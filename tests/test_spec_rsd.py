"""Recursive speculative decoding (`rsd`): the without-replacement verification rule against exact enumeration,
greedy equality with plain greedy decoding, the sampling law end to end, and what a round records."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from engine import load_model
from engine.decoders.speculative.rsd import gumbel_with_maximum
from engine.speculative import verify
from tests.helpers import (
    PROMPTS,
    assert_follows,
    first_token_law,
    rounds_of,
    run_ignoring_eos,
)

REJECT = math.nextafter(1.0, 0.0)  # the largest uniform draw: rejects every child whose ratio is below 1


# ---------------------------------------------------------------- the without-replacement rule, exactly


class _ScriptedVerifier:
    """Runs verify_tree on one root with the children ``order``, its uniform draws taken from a script.

    The verifier accepts a child iff its draw < ratio, so the chance of accepting child j once reached is the
    threshold where the outcome flips, found by bisection on the draw: exact to 2^-45 without reading the ratio.
    """

    def __init__(self, monkeypatch, p: torch.Tensor, q: torch.Tensor, order: tuple[int, ...]) -> None:
        self.target = torch.stack([p] + [p] * len(order)).log()  # float64: the rule's arithmetic is not rounded
        self.draft = torch.stack([q] + [q] * len(order)).log()
        self.order = order
        self.script: list[float] = []
        self.residual: torch.Tensor | None = None
        monkeypatch.setattr(verify.torch, "rand", lambda *a, **k: torch.tensor(self.script.pop(0), dtype=torch.float64))
        monkeypatch.setattr(verify, "sample", self._capture)

    def _capture(self, logprobs, generator):
        self.residual = logprobs.exp()
        return torch.tensor(0)

    def run(self, draws: list[float]) -> verify.Verdict:
        self.script = list(draws)
        parents = [-1] * len(self.order)
        return verify.verify_tree(parents, list(self.order), self.target, self.draft, torch.Generator(), 5, True)

    def accepted(self, j: int, draw: float) -> bool:
        later = [REJECT] * (len(self.order) - j - 1)  # consumed only when child j is rejected
        return self.run([REJECT] * j + [draw] + later).accepted_path == [j]

    def acceptance(self, j: int) -> float:
        if not self.accepted(j, 0.0):
            return 0.0
        if self.accepted(j, REJECT):
            return 1.0
        low, high = 0.0, 1.0  # accepted at low, rejected at high
        for _ in range(45):
            mid = (low + high) / 2
            low, high = (mid, high) if self.accepted(j, mid) else (low, mid)
        return high


def _ordered_draws(q: torch.Tensor, k: int):
    """Every ordered draw of k distinct tokens without replacement from q (fewer if q has fewer), with its probability."""
    k = min(k, int((q > 0).sum()))
    for order in itertools.permutations(range(len(q)), k):
        prob, left = 1.0, 1.0
        for token in order:
            prob *= float(q[token]) / left
            left -= float(q[token])
        if prob > 0:
            yield order, prob


def _first_token_law(monkeypatch, p: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    law = torch.zeros_like(p)
    for order, prob in _ordered_draws(q, k):
        verifier = _ScriptedVerifier(monkeypatch, p, q, order)
        reach = 1.0  # the chance that every child before j was rejected
        for j, token in enumerate(order):
            accept = verifier.acceptance(j)
            law[token] += prob * reach * accept
            reach *= 1 - accept
        if reach > 0:
            verifier.run([REJECT] * len(order))  # every child rejected: the correction is drawn from the residual
            law += prob * reach * verifier.residual
    return law


def _distribution(values: list[float]) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    return t / t.sum()


RULE_CASES = {
    "random": ([0.1, 0.35, 0.05, 0.3, 0.2], [0.3, 0.1, 0.25, 0.15, 0.2]),
    "q_peaked": ([0.25, 0.25, 0.2, 0.2, 0.1], [0.9, 0.04, 0.03, 0.02, 0.01]),
    "disjoint_support": ([0.0, 0.0, 0.5, 0.3, 0.2], [0.6, 0.4, 0.0, 0.0, 0.0]),
    "overlapping_support": ([0.4, 0.0, 0.3, 0.3, 0.0], [0.1, 0.5, 0.2, 0.0, 0.2]),
    "p_equals_q": ([0.1, 0.2, 0.3, 0.4, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]),
}


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("case", RULE_CASES)
def test_without_replacement_rule_emits_p_exactly(monkeypatch, case, k):
    """Root with k children drawn without replacement from q, every ordered draw and every accept/reject outcome
    enumerated: the first emitted token's law is p to 1e-9."""
    p, q = (_distribution(values) for values in RULE_CASES[case])
    law = _first_token_law(monkeypatch, p, q, k)
    torch.testing.assert_close(law, p, atol=1e-9, rtol=0)


def test_with_replacement_rule_would_not_emit_p_for_draws_without_replacement(monkeypatch):
    """The enumeration can tell the rules apart: without updating q, draws made without replacement drift off p."""
    p, q = (_distribution(values) for values in RULE_CASES["random"])
    monkeypatch.setattr(verify, "verify_tree", _with_replacement(verify.verify_tree))
    assert (_first_token_law(monkeypatch, p, q, 3) - p).abs().max() > 1e-3


def _with_replacement(verify_tree):
    return lambda *args: verify_tree(*args[:-1], False)


# ---------------------------------------------------------------- losslessness (greedy, float32)

SETTINGS = [
    {"draft_layers": 1},  # tree "3,2,1", mostly rejected
    {"draft_layers": 1, "branching": "1,1,1,1,1,1,1,1"},  # a deep chain
    {"draft_layers": 1, "branching": "8,4"},  # wide
    {"draft_layers": 2, "branching": "2,2,2,2,2"},  # the whole target as its draft: every round accepted
    {"draft_layers": 1, "tree": "beam", "beam_width": 4, "beam_depth": 4},
    {"draft_layers": 1, "tree": "beam", "beam_width": 2, "beam_depth": 8},  # deep beams
    {"draft_layers": 2, "tree": "beam", "beam_width": 6, "beam_depth": 3},
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[0], 23), (PROMPTS[2], 40)])  # 23: budget inside a draft
def test_greedy_rsd_equals_greedy_llama(llama, params, prompt, max_new_tokens):
    expected = run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(llama, "rsd", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize(
    "params", [{"draft_layers": 1, "branching": "4,2,2"}, {"draft_layers": 2, "tree": "beam", "beam_width": 3, "beam_depth": 5}]
)
def test_greedy_rsd_equals_greedy_gemma3(params):
    """70 tokens cross Gemma's sliding window (32) in both the draft's tree forwards and the target's."""
    gemma = load_model("tiny-random-gemma3")
    expected = run_ignoring_eos(gemma, "greedy", PROMPTS[1], max_new_tokens=70).output_token_ids
    trace = run_ignoring_eos(gemma, "rsd", PROMPTS[1], params, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize("params", [{"branching": "3,2,2"}, {"tree": "beam", "beam_width": 1, "beam_depth": 3}])
def test_the_target_as_its_own_draft_accepts_every_level(llama, params):
    """Greedy drafts always hold the target's argmax path when the draft is the target (a beam of width 1 is it)."""
    params = {**params, "draft_layers": 2, "draft_length": "fixed"}  # the whole tree every round
    rounds = rounds_of(run_ignoring_eos(llama, "rsd", PROMPTS[0], params, max_new_tokens=32))
    assert [len(r.accepted_path) for r in rounds] == [3] * 8 and not any(r.bonus_is_correction for r in rounds)


def test_a_one_layer_draft_is_mostly_rejected_and_still_exact(llama):
    trace = run_ignoring_eos(llama, "rsd", PROMPTS[0], {"draft_layers": 1, "branching": "2,2"}, max_new_tokens=30)
    assert sum(not r.accepted_path for r in rounds_of(trace)) > len(rounds_of(trace)) / 2  # the adversarial case holds
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=30).output_token_ids


# ---------------------------------------------------------------- the sampling law end to end


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize(
    "params", [{"branching": "3,2"}, {"tree": "beam", "beam_width": 3, "beam_depth": 2}], ids=["gumbel", "beam"]
)
def test_first_sampled_token_follows_processed_target(llama, params):
    """A one-layer draft differs from the target; the first token over many seeds follows the target after
    temperature and top-k (3 children at the root, drawn without replacement from the draft's top 6)."""
    assert_follows(*first_token_law(llama, "rsd", {**params, "draft_layers": 1}, "Entropy is", max_new_tokens=3))


def test_gumbel_with_maximum_peaks_at_the_given_maximum():
    generator = torch.Generator().manual_seed(0)
    locations = torch.tensor([[0.0, -1.0, -2.0, float("-inf")], [-3.0, -0.5, -0.7, -9.0]], dtype=torch.float64)
    maximum = torch.tensor([-0.3, -4.0], dtype=torch.float64)
    g = gumbel_with_maximum(locations, maximum, generator)
    torch.testing.assert_close(g.max(-1).values, maximum, atol=1e-12, rtol=0)
    assert g[0, 3] == float("-inf") and g[:, :3].isfinite().all()


# ---------------------------------------------------------------- what a round records


@pytest.mark.parametrize(
    "params,max_nodes",
    [
        ({"branching": "3,2,1", "temperature": 0.8}, 3 + 6 + 6),
        ({"branching": "3,2,1"}, 3 + 6 + 6),
        ({"tree": "beam", "beam_width": 4, "beam_depth": 3, "temperature": 0.8}, 12),
    ],
)
def test_draft_round_contents(llama, params, max_nodes):
    trace = run_ignoring_eos(llama, "rsd", PROMPTS[2], {**params, "draft_layers": 1, "draft_length": "fixed"}, max_new_tokens=30)
    rounds = rounds_of(trace)
    source = f"rsd-{params.get('tree', 'gumbel')}:draft_layers:1"
    generated = 0
    for r in rounds:
        full_depth = 30 - generated - 1 >= 3  # else the budget cuts the tree short
        generated += len(r.committed)
        if not full_depth:
            continue
        assert 0 < len(r.nodes) <= max_nodes and r.draft_calls == 3 and r.model_calls == 1
        siblings: dict[int, list[float]] = {}
        for node in r.nodes:
            assert node.source == source and 0 < node.draft_prob <= 1 and node.score is not None
            siblings.setdefault(node.parent, []).append(node.score)
        # siblings are listed in their sampling order: decreasing Gumbel key (greedy: decreasing log q)
        assert all(scores == sorted(scores, reverse=True) for scores in siblings.values())
        assert len({(n.parent, n.token_id) for n in r.nodes}) == len(r.nodes)  # without replacement: no duplicates
        if params.get("tree") != "beam":
            assert len(r.nodes) == max_nodes  # a one-layer draft's q has full support
    assert sum(len(r.committed) for r in rounds) == len(trace.output_token_ids) == 30


def test_bad_branching_fails_the_run_clearly(llama):
    trace = run_ignoring_eos(llama, "rsd", "Hi", {"branching": "3,x"})
    assert trace.status == "failed" and "branching must list children per depth" in trace.reason
