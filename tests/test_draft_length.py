"""The cost-aware draft length of the shared round loop: it drafts only as deep as pays, probes again while it does
not draft, never changes what lossless decoders commit; and every speculative run records its memory."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine.events import DraftNode, DraftRound
from engine.speculative.draft_length import (
    FIRST_DEPTH,
    PROBE_BUDGET,
    DraftLengthController,
    LinearCost,
    PayoffSwitch,
    ProbeBudget,
    VerifyCost,
)
from engine.speculative.rounds import Draft, subdraft
from tests.helpers import PROMPTS, assert_cut_trees_stay_lossless, greedy_ids, rounds_of, run_ignoring_eos

DRAFTER_DEPTH = 6  # what the simulated drafter drafts when uncapped
BASELINE_ROUNDS = 2  # plain steps the controller times after the first round, before weighing any draft


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
    controller = controller or DraftLengthController(FakeClock())
    clock = controller.clock
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
    assert limits[: 1 + BASELINE_ROUNDS] == [FIRST_DEPTH] + [0] * BASELINE_ROUNDS  # one level, then timed plain steps
    assert all(limit is None for limit in limits[1 + BASELINE_ROUNDS :])  # then the drafter's own full length


def test_partial_acceptance_caps_the_depth_where_it_stops_paying():
    """Depth 1-2 nearly always accepted, deeper never: drafting pays, but not past depth 2 or 3."""
    _, limits = simulate(lambda _: 2, rounds=30)
    assert all(limit is not None and 1 <= limit <= 3 for limit in limits[5:])


def test_probes_within_the_time_budget_and_resumes_once_drafts_pay():
    """A rejected one-level probe loses the verify cost of one more token (0.01 s or 0.05 s against plain steps):
    the probes' losses stay within ``PROBE_BUDGET`` of the plain rounds' time, the dearer probe comes less often;
    once drafts are accepted the drafter drafts its own length again."""
    probes_per_round = {}
    for slope in (0.01, 0.05):
        def forward_seconds(n: int, slope: float = slope) -> float:
            return 0.1 + slope * n

        controller, limits = simulate(lambda _: 0, rounds=400, forward_seconds=forward_seconds)
        stopped = limits.index(0, 1 + BASELINE_ROUNDS)
        later = limits[stopped:]
        assert set(later) == {0, 1}  # plain steps and one-level probes
        probes, plain_seconds = later.count(1), later.count(0) * forward_seconds(1)
        loss = forward_seconds(2) - forward_seconds(1)
        assert probes * loss <= PROBE_BUDGET * plain_seconds + loss
        assert probes * loss >= 0.5 * PROBE_BUDGET * plain_seconds  # and it does probe
        probes_per_round[slope] = probes / len(later)
        _, limits = simulate(lambda _: DRAFTER_DEPTH, rounds=400, controller=controller, forward_seconds=forward_seconds)
        assert limits[-1] is None or limits[-1] > 1  # the probes were accepted: drafting again, as deep as pays
    assert probes_per_round[0.05] < probes_per_round[0.01] / 2


def test_ppds_tries_are_priced_in_full():
    """A PPD-like drafter: its prompt tokens ride along a round allowed to draft (0.25 s against a 0.15 s plain step)
    and guess the next round's 5-node tree (0.4 s, rejected here). Its first tree comes in the round after the
    prompt's, before any plain step was timed; every later try is an empty round and a tree. Each try must count its
    whole loss (0.25 s, then 0.35 s) when the next probe is weighed: priced at once, at a step cost guessed from the
    tree's own time, the first had counted 0.08 s (and, averaged with the controller's guess, the next probe came
    three times too early), and the empty round had counted as a plain step."""
    clock = FakeClock()
    controller = DraftLengthController(clock)
    seconds = {"plain": 0.15, "riders": 0.25, "tree": 0.4}
    limits, kinds, guesses = [], [], False
    for index in range(300):
        limit = controller.limit(budget=100)
        kind = "plain" if limit == 0 else "tree" if guesses else "riders"
        nodes = [DraftNode(id=i, parent=-1, token_id=i, depth=1, draft_prob=0.2, accepted=False)
                 for i in range(5 if kind == "tree" else 0)]
        started = clock.now
        clock.now += seconds[kind]
        controller.observe(DraftRound(step=index, nodes=nodes, accepted_path=[], committed=[0]), started, limit)
        limits.append(limit)
        kinds.append(kind)
        guesses = limit != 0  # the prompt tokens rode along: the next round has guesses
    assert kinds[:3] == ["riders", "tree", "plain"]  # the prompt's round, the first tree, then timed plain steps
    tries = [i for i in range(2, len(kinds)) if kinds[i] != "plain" and kinds[i - 1] == "plain"]
    assert len(tries) >= 2 and all(kinds[i:i + 2] == ["riders", "tree"] for i in tries)
    first_gap, last_gap = tries[0] - 2, tries[-1] - tries[-2] - 2
    assert first_gap * seconds["plain"] * PROBE_BUDGET >= seconds["tree"] - seconds["plain"]
    pair_loss = seconds["riders"] + seconds["tree"] - 2 * seconds["plain"]
    # nearly the pair's loss (the decayed mean still remembers the first try's) where the tree's alone is 0.71 of it
    assert last_gap * seconds["plain"] * PROBE_BUDGET >= 0.9 * pair_loss


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


@pytest.mark.parametrize("decoder,params", [
    ("speculative", {"draft_layers": 1, "num_draft_tokens": 6}),
    ("dyspec", {"draft_layers": 1}),
    ("rsd", {"draft_layers": 1}),
    ("token_recycling", {}),
])
def test_drafts_verified_in_part_stay_lossless(llama, decoder, params, monkeypatch):
    """Greedy verification reads no draft distribution, so a draft model's sampled-kind drafts may be cut too; Token
    Recycling's nodes carry the probabilities its matrix stored."""
    monkeypatch.setattr(VerifyCost, "__call__", lambda self, n: 1.0 + 0.1 * n)  # 10 % of a forward per token
    assert_cut_trees_stay_lossless(llama, decoder, params, PROMPTS[2])


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
    warm = PayoffSwitch.WARM_ROUNDS
    assert chosen[: warm + 1] == [True] * warm + [False]  # the method's own rounds, then one timed plain step
    later = chosen[10:]
    assert all(later) if speculates else not any(later)  # a probe would lose 0.2 s: not due within 4 s of steps


@pytest.mark.parametrize("spec_seconds", [0.15, 0.3, 1.0])
def test_losing_speculation_is_probed_within_its_time_budget(spec_seconds):
    """Plain steps commit one token in 0.1 s, speculative rounds one in ``spec_seconds``: the probes' losses stay
    within ``PROBE_BUDGET`` of the plain rounds' time, and the cheaper a probe, the more often it comes."""
    switch = PayoffSwitch()
    chosen = []
    for _ in range(3000):
        speculate = switch.speculate()
        chosen.append(speculate)
        switch.observe(speculate, 1, spec_seconds if speculate else 0.1)
    probes = chosen[PayoffSwitch.WARM_ROUNDS + 1 :].count(True)
    plain_seconds = 0.1 * chosen.count(False)
    loss = spec_seconds - 0.1
    assert probes * loss <= PROBE_BUDGET * plain_seconds
    # and it probes about as often as it may (a probe waits for the first whole plain round past its due time)
    assert probes >= 0.9 * PROBE_BUDGET * plain_seconds / loss


def test_a_probe_that_found_nothing_to_draft_is_tried_again_next_round():
    """PPD guesses only after a round that carried its prompt tokens: its first probe drafts nothing."""
    controller, limits = simulate(lambda _: 0, rounds=30)
    assert 0 in limits[-5:]  # not drafting
    clock = controller.clock
    probe = controller.limit(budget=100)
    for _ in range(100):  # plain steps until a probe is due
        if probe:
            break
        controller.observe(chain_round(0, 0), clock.now, probe)
        clock.now += 0.11
        probe = controller.limit(budget=100)
    assert probe == 1
    controller.observe(chain_round(0, 0), clock.now, probe)  # the drafter had no guesses yet
    clock.now += 0.11
    assert controller.limit(budget=100) == 1  # so the probe comes again at once, with them
    controller.observe(chain_round(1, 0), clock.now, 1)
    clock.now += 0.12
    assert controller.limit(budget=100) == 0


def test_a_stalled_round_does_not_move_the_cost_fit_much():
    steady, stalled = LinearCost(), LinearCost()
    for n, seconds in [(1, 0.1), (5, 0.14), (1, 0.1), (9, 0.18), (1, 0.1)]:
        steady.add(n, seconds)
        stalled.add(n, seconds)
    stalled.add(1, 2.0)  # 20x a one-token step: the machine was busy elsewhere
    steady.add(1, 0.1)
    assert stalled(1) < 1.5 * steady(1) and stalled(9) < 1.5 * steady(9)


def tree_controller(seconds_per_token: float) -> DraftLengthController:
    """A controller that has timed verify forwards costing 0.1 s + ``seconds_per_token`` per token."""
    controller = DraftLengthController(FakeClock())
    for n in (1, 2, 5, 9, 17, 25):
        controller.verify_cost.add(n, 0.1 + seconds_per_token * n)
    return controller


# A 6-node tree: a confident chain 0 -> 3 -> 5, unlikely siblings 1 and 2 at the root, 4 under 1.
TREE_PARENTS = [-1, -1, -1, 0, 1, 3]
TREE_PROBS = [0.9, 0.05, 0.04, 0.8, 0.5, 0.7]


def test_a_tree_is_cut_to_its_likely_nodes_when_verifying_costs():
    kept = tree_controller(0.02).nodes_that_pay(TREE_PARENTS, TREE_PROBS)
    assert kept == [0, 3, 5]  # the confident chain; the siblings' 5 % and 4 % do not pay a token's 20 % cost
    assert tree_controller(0.0).nodes_that_pay(TREE_PARENTS, TREE_PROBS) is None  # verifying is free: keep all


def test_a_kept_node_always_has_its_parent():
    kept = tree_controller(0.001).nodes_that_pay(TREE_PARENTS, TREE_PROBS)
    assert kept is not None and 1 in kept and 4 not in kept  # 4 (path 0.025) is below its parent 1 (0.05)
    assert all(TREE_PARENTS[node] in kept or TREE_PARENTS[node] < 0 for node in kept)


def test_before_any_timing_only_the_likeliest_node_is_verified_and_uninformative_trees_stay_whole():
    assert DraftLengthController(FakeClock()).nodes_that_pay(TREE_PARENTS, TREE_PROBS) == [0]  # the cheapest check
    assert DraftLengthController(FakeClock()).nodes_that_pay(TREE_PARENTS, [1.0] * 6) is None
    assert tree_controller(0.02).nodes_that_pay(TREE_PARENTS, [1.0] * 6) is None  # lookups: every node 1.0


def tree_round(accepted_path: list[int]) -> DraftRound:
    depths = [1, 1, 1, 2, 2, 3]
    nodes = [DraftNode(id=i, parent=p, token_id=i, depth=d, draft_prob=q)
             for i, (p, q, d) in enumerate(zip(TREE_PARENTS, TREE_PROBS, depths))]
    return DraftRound(step=0, nodes=nodes, accepted_path=accepted_path, committed=[0] * (len(accepted_path) + 1))


def test_an_overconfident_head_is_calibrated_down_and_verifies_less():
    controller = tree_controller(0.05)
    assert controller.calibration.expected(0.9) == pytest.approx(0.95)  # the prior: the bin's midpoint
    for _ in range(20):  # its 90 % node is never right
        controller.observe(tree_round([]), 0.0, None)
    assert controller.calibration.expected(0.9) < 0.2
    assert controller.nodes_that_pay(TREE_PARENTS, TREE_PROBS) == [0]  # one node at least: it was drafted
    for _ in range(40):  # and now it always is, down the chain
        controller.observe(tree_round([0, 3, 5]), 0.0, None)
    assert controller.calibration.expected(0.9) > 0.9
    assert controller.nodes_that_pay(TREE_PARENTS, TREE_PROBS) == [0, 3, 5]


def test_a_cut_draft_keeps_each_nodes_fields_and_says_so():
    draft = Draft(tokens=[10, 11, 12, 13, 14, 15], probs=TREE_PROBS, parents=TREE_PARENTS,
                  scores=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], blocks=[1, 1, 1, 2, 2, 3], mode="round 2")
    cut = subdraft(draft, [0, 1, 3, 4])
    assert cut.tokens == [10, 11, 13, 14] and cut.parents == [-1, -1, 0, 1]
    assert cut.probs == [0.9, 0.05, 0.8, 0.5] and cut.scores == [0.1, 0.2, 0.4, 0.5] and cut.blocks == [1, 1, 2, 2]
    assert cut.mode == "round 2; verified 4 of 6 drafted"
    assert subdraft(draft, None) is draft
    chain = subdraft(Draft([1, 2, 3], [0.9, 0.5, 0.2]), [0, 1])
    assert chain.is_chain and chain.tokens == [1, 2] and chain.mode == "verified 2 of 3 drafted"
    sampled = Draft([1, 2], [0.5, 0.5], logprobs=torch.arange(8.0).view(2, 4))
    with pytest.raises(ValueError, match="deterministic"):  # leaving out sampled nodes would bias the verifier
        subdraft(sampled, [0])
    assert subdraft(sampled, [0], verified_greedily=True).logprobs.tolist() == [[0.0, 1.0, 2.0, 3.0]]  # node 0's row
    tree = replace(draft, logprobs=torch.arange(7.0)[:, None])  # row u + 1: where node u's children came from
    assert subdraft(tree, [0, 1, 3, 4], verified_greedily=True).logprobs.flatten().tolist() == [0.0, 1.0, 2.0, 4.0, 5.0]


def test_the_verify_cost_follows_a_kernel_step_once_each_size_was_seen():
    """3 tokens cost about what 1 does, 4 or more half as much again (this CPU's GEMM kernels): no line fits."""
    def step(n: int) -> float:
        return 0.10 + 0.002 * n if n <= 3 else 0.15 + 0.002 * n

    cost = VerifyCost()
    for n in (1, 3, 5, 8) * 3:
        cost.add(n, step(n))
    for n in (1, 3, 5, 8):
        assert cost(n) == pytest.approx(step(n))
    assert cost(2) == pytest.approx(step(1) + cost.fit(2) - cost.fit(1))  # never seen: the fit's step from size 1
    assert cost(4) == pytest.approx(step(3) + cost.fit(4) - cost.fit(3))  # 3 and 5 equally near: the smaller
    assert cost(3.5) == pytest.approx((step(3) + cost(4)) / 2)  # a mean size: between its neighbours
    assert cost.fit(3) > step(3) + 0.005  # the line over all sizes overrates three tokens


def test_without_a_prior_no_probe_is_due_before_a_try_was_measured():
    budget = ProbeBudget()
    budget.plain(1000.0)
    assert not budget.due(0.1) and budget.due(0.1, prior_loss=0.5)  # a prior prices the first try
    budget.tried(0.3, 1)  # a try lost 0.2 s against a 0.1 s step
    budget.plain(0.2 / PROBE_BUDGET - 0.01)
    assert not budget.due(0.1)
    budget.plain(0.02)
    assert budget.due(0.1)
