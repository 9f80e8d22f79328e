"""The cost-aware draft length of the shared round loop: it drafts only as deep as pays, probes again while it does
not draft, never changes what lossless decoders commit; and every speculative run records its memory."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.events import DraftNode, DraftRound
from engine.speculative.draft_length import (
    PROBE_EVERY,
    DraftLengthController,
    LinearCost,
    PayoffSwitch,
)
from tests.helpers import PROMPTS, greedy_ids, rounds_of, run_ignoring_eos

DRAFTER_DEPTH = 6  # what the simulated drafter drafts when uncapped


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def chain_round(depth: int, accepted: int) -> DraftRound:
    """A chain of ``depth`` drafts whose first ``accepted`` the verifier accepted (it tried one more, if any)."""
    nodes = [
        DraftNode(id=i, parent=i - 1, token_id=i, depth=i + 1, draft_prob=1.0,
                  accepted=(i < accepted) if i <= accepted else None)
        for i in range(depth)
    ]
    return DraftRound(step=0, nodes=nodes, accepted_path=list(range(accepted)), committed=[0] * (accepted + 1))


def simulate(acceptance_depth, rounds: int, forward_seconds=lambda n: 0.1 + 0.01 * n, controller=None):
    """Rounds of a chain drafter under the controller; ``acceptance_depth(round)`` drafts are accepted each round
    and a round costs ``forward_seconds(1 + drafted)``. Returns the controller and each round's limit."""
    clock = FakeClock()
    controller = controller or DraftLengthController(clock)
    limits = []
    for index in range(rounds):
        limit = controller.limit(budget=100)
        limits.append(limit)
        depth = DRAFTER_DEPTH if limit is None else min(limit, DRAFTER_DEPTH)
        started = clock.now
        clock.now += forward_seconds(1 + depth)
        controller.observe(chain_round(depth, min(acceptance_depth(index), depth)), started, limit)
    return controller, limits


def test_the_cost_model_recovers_a_linear_forward_time():
    cost = LinearCost()
    for n in (1, 1, 5, 9, 9, 17):
        cost.add(n, 0.08 + 0.004 * n)
    a, b = cost.coefficients()
    assert a == pytest.approx(0.08, rel=0.05) and b == pytest.approx(0.004, rel=0.1)


def test_one_size_seen_gives_the_prior_slope():
    cost = LinearCost()
    cost.add(1, 0.1)
    a, b = cost.coefficients()
    assert a + b == pytest.approx(0.1) and b == pytest.approx(0.05 * a)


def test_no_draft_when_nothing_is_accepted_and_verifying_costs_more():
    _, limits = simulate(lambda _: 0, rounds=40)
    later = limits[10:]
    assert later.count(0) >= 0.75 * len(later)
    assert set(later) <= {0, 1}  # no draft, or a one-level probe


def test_deep_drafts_when_they_are_accepted():
    _, limits = simulate(lambda _: DRAFTER_DEPTH, rounds=30)
    assert all(limit is None for limit in limits)  # the drafter's own full length every round


def test_partial_acceptance_caps_the_depth_where_it_stops_paying():
    """Depth 1-2 nearly always accepted, deeper never: drafting pays, but not past depth 2 or 3."""
    _, limits = simulate(lambda _: 2, rounds=30)
    assert all(limit is not None and 1 <= limit <= 3 for limit in limits[5:])


def test_probes_again_ever_less_often_and_resumes_once_drafts_pay():
    controller, limits = simulate(lambda _: 0, rounds=30)
    stopped = limits.index(0)
    probes = [index for index, limit in enumerate(limits) if index > stopped and limit]
    # one level drafted after PROBE_EVERY rounds without, then after twice as many, ...
    assert probes[:2] == [stopped + PROBE_EVERY - 1, stopped + 3 * PROBE_EVERY - 1]
    assert all(limits[index] == 1 for index in probes)
    _, limits = simulate(lambda _: DRAFTER_DEPTH, rounds=80, controller=controller)
    assert limits[-1] is None  # the probes were accepted: back to the drafter's own length


def test_a_slow_drafter_drafts_less():
    """Same acceptance, but each drafted level costs as much as a forward: drafting no longer pays."""
    def run(draft_seconds_per_level: float) -> list[int | None]:
        clock = FakeClock()
        controller = DraftLengthController(clock)
        limits = []
        for _ in range(30):
            limit = controller.limit(budget=100)
            limits.append(limit)
            depth = DRAFTER_DEPTH if limit is None else min(limit, DRAFTER_DEPTH)
            started = clock.now
            clock.now += 0.1 + 0.01 * (1 + depth) + draft_seconds_per_level * depth
            rnd = replace(chain_round(depth, min(1, depth)), draft_seconds=draft_seconds_per_level * depth)
            controller.observe(rnd, started, limit)
        return limits[10:]

    assert run(0.0).count(1) == 20  # one level always accepted, the rest never: draft one level
    assert run(0.15).count(0) >= 15


SETTINGS = [
    ("prompt_lookup", {}),
    ("prompt_lookup", {"num_draft_tokens": 3}),
    ("token_recycling", {}),
    ("speculative", {"draft_layers": 1}),
    ("speculative", {"draft_layers": 2, "schedule": "heuristic"}),
]


@pytest.mark.parametrize("decoder,params", SETTINGS)
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[2], 40), (PROMPTS[1], 23)])
def test_adaptive_length_equals_greedy(llama, decoder, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(llama, decoder, prompt, {**params, "draft_length": "adaptive"}, max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(llama, prompt, max_new_tokens)


def test_adaptive_is_the_default_and_fixed_keeps_the_drafters_length(llama):
    adaptive = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[0], {"draft_layers": 1}, 30))
    fixed = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[0], {"draft_layers": 1, "draft_length": "fixed"}, 30))
    assert all(r.draft_depth_limit is None for r in fixed)
    generated = 0
    for r in fixed:  # the default num_draft_tokens, or what the budget allows
        assert len(r.nodes) == min(4, 30 - generated - 1)
        generated += len(r.committed)
    # a random one-layer draft is rarely accepted: the controller stops drafting in some rounds
    assert any(r.draft_depth_limit == 0 and not r.nodes for r in adaptive)
    assert all(len(r.nodes) <= r.draft_depth_limit for r in adaptive if r.draft_depth_limit is not None)


@pytest.mark.parametrize("decoder,params,draft_cache", [
    ("prompt_lookup", {}, False),
    ("speculative", {"draft_layers": 1}, True),
])
def test_memory_is_recorded_per_round_and_for_the_run(llama, decoder, params, draft_cache):
    trace = run_ignoring_eos(llama, decoder, PROMPTS[0], {**params, "draft_length": "fixed"}, 12)
    rounds = rounds_of(trace)
    config = llama.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # keys + values, fp32
    held = len(trace.prompt_token_ids) + len(trace.output_token_ids) - 1  # all but the last bonus token: not run yet
    # the target's cache alone, or with a draft model's beside it
    assert (rounds[-1].kv_cache_bytes > held * per_position) if draft_cache else rounds[-1].kv_cache_bytes == held * per_position
    assert trace.metrics["kv_cache_bytes_max"] == max(r.kv_cache_bytes for r in rounds)
    assert trace.metrics["peak_rss_mb"] > 50


@pytest.mark.parametrize(("spec_tokens", "spec_seconds", "speculates"), [(3, 0.2, True), (1, 0.3, False)])
def test_the_payoff_switch_runs_the_kind_of_round_that_commits_faster(spec_tokens, spec_seconds, speculates):
    """A speculative round commits ``spec_tokens`` in ``spec_seconds``; a plain one, one token in 0.1 s."""
    switch = PayoffSwitch()
    chosen = []
    for _ in range(40):
        speculate = switch.speculate()
        chosen.append(speculate)
        switch.observe(speculate, spec_tokens if speculate else 1, spec_seconds if speculate else 0.1)
    assert chosen[:4] == [True, True, True, False]  # the method's own rounds, then one timed plain step
    later = chosen[10:]
    assert all(later) if speculates else sum(later) <= 2  # losing speculation is only probed, ever less often


def test_a_probe_that_found_nothing_to_draft_is_tried_again_next_round():
    """PPD guesses only after a round that carried its prompt tokens: its first probe drafts nothing."""
    controller, limits = simulate(lambda _: 0, rounds=30)
    assert limits[-1] == 0
    clock = controller.clock
    probe = controller.limit(budget=100)
    while probe == 0:
        controller.observe(chain_round(0, 0), clock.now, probe)
        probe = controller.limit(budget=100)
    assert probe == 1
    controller.observe(chain_round(0, 0), clock.now, probe)  # the drafter had no guesses yet
    assert controller.limit(budget=100) == 1  # so the probe comes again at once, with them
    controller.observe(chain_round(1, 0), clock.now, 1)
    assert controller.limit(budget=100) == 0


def test_a_stalled_round_does_not_move_the_cost_fit_much():
    steady, stalled = LinearCost(), LinearCost()
    for n, seconds in [(1, 0.1), (5, 0.14), (1, 0.1), (9, 0.18), (1, 0.1)]:
        steady.add(n, seconds)
        stalled.add(n, seconds)
    stalled.add(1, 2.0)  # 20x a one-token step: the machine was busy elsewhere
    steady.add(1, 0.1)
    assert stalled(1) < 1.5 * steady(1) and stalled(9) < 1.5 * steady(9)
