"""Self-speculation by layer skipping (`layer_skip`): the skip view, the skip-set search, greedy equality with plain
greedy decoding, the sampling law, and what a run records."""

from __future__ import annotations

import pytest
import torch

from engine import hot_start, load_model
from engine.decoders.speculative.layer_skip import (
    MIN_PROMPTS,
    QUICK_POSITIONS as QUICK,
    SPEC,
    PromptTail,
    SetRecord,
    SkipDrafter,
    SkipMemory,
    remembered,
    search_skip_layers,
    spread_layers,
)
from engine.events import DecoderMetric
from engine.speculative.cache import PrefixCache, crop_cache
from engine.speculative.drafts import DraftModelDrafter
from engine.speculative.rounds import NO_DRAFT, Sampling, verify_round
from engine.speculative.skip import SharedSkipCache, layer_skipped_model
from engine.speculative.truncated import truncated_model
from tests.helpers import (
    PROMPTS,
    assert_follows,
    first_token_law,
    rounds_of,
    run_ignoring_eos,
)

# ---------------------------------------------------------------- the skip view


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_skip_view_shares_weights_and_keeps_the_target_whole(name):
    model = load_model(name)
    ids = torch.tensor([model.encode("Hello world, hello again")])
    before = model.forward(ids).logits
    view = layer_skipped_model(model, [0])
    assert view.num_layers == 1 and len(view.new_cache().layers) == 1
    kept = view.model.model.layers[0]
    assert kept is not model.model.model.layers[1] and kept.self_attn.layer_idx == 0  # renumbered copy ...
    assert kept.mlp is model.model.model.layers[1].mlp  # ... of the same weights
    assert kept.self_attn.q_proj.weight.data_ptr() == model.model.model.layers[1].self_attn.q_proj.weight.data_ptr()
    assert view.model.lm_head.weight.data_ptr() == model.model.lm_head.weight.data_ptr()
    types = getattr(model.model.config, "layer_types", None)
    assert getattr(view.model.config, "layer_types", None) == (types[1:] if types else None)
    cache = PrefixCache(view)  # the view runs with its own cache, chunk by chunk as a drafter does
    cache.forward(ids[0, :3].tolist())
    torch.testing.assert_close(cache.forward(ids[0, 3:].tolist()).logits[0], view.forward(ids).logits[0, 3:], atol=1e-4, rtol=0)
    assert not torch.allclose(view.forward(ids).logits, before)
    # the target is untouched: its layers, their cache indices, its config and its output
    assert [layer.self_attn.layer_idx for layer in model.model.model.layers] == [0, 1] and model.num_layers == 2
    torch.testing.assert_close(model.forward(ids).logits, before)
    torch.testing.assert_close(layer_skipped_model(model, [1]).forward(ids).logits, truncated_model(model, 1).forward(ids).logits)
    torch.testing.assert_close(layer_skipped_model(model, []).forward(ids).logits, before)
    with pytest.raises(ValueError, match="cannot skip all 2 layers"):
        layer_skipped_model(model, [0, 1])
    with pytest.raises(ValueError, match="between 0 and 1"):
        layer_skipped_model(model, [2])


# ---------------------------------------------------------------- the search


def cache_state(cache: PrefixCache) -> list[torch.Tensor]:
    """Copies of every cache layer's keys and values, to compare bitwise."""
    return [t.clone() for layer in cache.cache.layers for t in (layer.keys, layer.values)]


def assert_same_state(before: list[torch.Tensor], cache: PrefixCache) -> None:
    after = cache_state(cache)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_the_tail_scores_on_the_target_cache_and_leaves_it_holding_the_head(name):
    """Skipping the last layer, the kept layers' KV of the head is what the view would compute itself: the score
    equals a direct forward of the view over the whole prompt. Scoring leaves the target's cache as it was, and
    the tail's KV goes back in."""
    model = load_model(name)
    ids = model.encode(PROMPTS[1])
    target = PrefixCache(model)
    tail = PromptTail(target, ids, 16)
    assert target.tokens == ids[:-16] and target.cache.get_seq_length() == len(ids) - 16 and tail.tokens == ids[-16:]
    full = model.forward(torch.tensor([ids])).logits[0, -16:].argmax(-1)
    assert torch.equal(tail.full, full)
    before = cache_state(target)
    last = (model.num_layers - 1,)
    direct = layer_skipped_model(model, last).forward(torch.tensor([ids])).logits[0, -16:].argmax(-1)
    assert tail.agreement(last) == float((direct == full).double().mean())
    assert_same_state(before, target)
    with pytest.raises(ValueError, match="cannot set aside"):
        target.set_aside(len(target.tokens) + 1)
    tail.restore()  # the tail's KV back, as the same forwards leave it
    again = PrefixCache(model)
    for chunk in (ids[:-1], ids[-1:]):
        again.forward(chunk)
    for cache in (target, again):
        crop_cache(cache.cache, len(ids))  # sliding-window layers back to their window
    assert target.tokens == again.tokens == ids
    assert_same_state(cache_state(again), target)
    assert torch.equal(target.logits_after(ids), again.ahead)  # the timed step's logits came back with its KV
    assert PromptTail(PrefixCache(model), ids[:5], 16).tokens == ids[:5]  # a prompt shorter than the window
    one = PromptTail(PrefixCache(model), ids, 1)  # a one-token window: the rest of the prompt still runs first
    assert torch.equal(one.full, full[-1:])
    one.restore()
    assert one.target.tokens == ids and one.target.cache.get_seq_length() <= len(ids)


def test_a_set_that_clearly_cannot_pay_is_given_up_after_its_first_positions(llama, monkeypatch):
    """Weighed against the agreement that pays, a set is scored on 16 positions first: the rest of the tail runs
    only if that agreement could still reach it, and then the score is the whole tail's, as without a threshold."""
    ids = llama.encode(" ".join(PROMPTS))
    tail = PromptTail(PrefixCache(llama), ids, 40)
    whole = tail.agreement((1,))
    runs = []
    real = SharedSkipCache.forward
    monkeypatch.setattr(SharedSkipCache, "forward", lambda self, tokens, keep=0: runs.append(len(tokens)) or real(
        self, tokens, keep))
    # (a forward in two chunks rounds unlike one: a near-tie of the random model may flip one position)
    assert tail.agreement((1,), give_up_below=0.0) == pytest.approx(whole, abs=1.5 / 40) and runs == [16, 24]
    assert (1,) not in tail.gave_up  # scored in full: its cost is its measured time, not a threshold
    runs.clear()
    first = llama.forward(torch.tensor([ids])).logits[0, -40:-24].argmax(-1)
    quick = float((layer_skipped_model(llama, (1,)).forward(torch.tensor([ids[:-24]])).logits[0, -16:].argmax(-1)
                   == first).double().mean())
    assert tail.agreement((1,), give_up_below=1.5) == pytest.approx(quick, abs=1.5 / 16) and runs == [16]  # 1.5: out of reach
    assert tail.draft_cost((1,)) == 1.5  # what it was weighed against: its forward covered part of the tail


def test_the_first_round_reads_the_prompt_tails_last_logits_instead_of_running_its_token_again(llama, monkeypatch):
    """After the tail is restored the target holds the whole prompt and the logits after it: the first (plain)
    round commits their greedy token with no forward. A cache that lost them (any crop) runs the token again."""
    ids = llama.encode(PROMPTS[1])
    target = PrefixCache(llama)
    PromptTail(target, ids, 16).restore()
    sampling = Sampling((), None)  # greedy
    forwards = []
    real = llama.forward
    monkeypatch.setattr(llama, "forward", lambda *a, **k: forwards.append(1) or real(*a, **k))
    outcome, _ = verify_round(target, ids, NO_DRAFT, sampling)
    assert forwards == [] and outcome.committed == [int(llama.forward(torch.tensor([ids])).logits[0, -1].argmax())]
    forwards.clear()
    target.sync(ids[:-1] + [ids[-1] + 1])  # a crop: the logits after the prompt are gone
    assert target.logits_after(ids) is None
    assert verify_round(target, ids, NO_DRAFT, sampling)[0].committed == outcome.committed and forwards == [1]


def test_with_a_remembered_step_time_the_tail_runs_the_prompt_in_one_forward(llama, monkeypatch):
    ids = llama.encode(PROMPTS[1])
    timed = PromptTail(PrefixCache(llama), ids, 16)
    forwards = []
    real = llama.forward
    monkeypatch.setattr(llama, "forward", lambda x, *a, **k: forwards.append(x.shape[-1]) or real(x, *a, **k))
    remembered = PromptTail(PrefixCache(llama), ids, 16, step_seconds=0.5)
    assert forwards == [len(ids)] and torch.equal(remembered.full, timed.full)
    assert remembered.step_seconds == 0.5 and remembered.tail_seconds > 0.5
    assert remembered.aside.tokens == timed.aside.tokens == ids[-16:]
    remembered.restore()
    torch.testing.assert_close(remembered.target.logits_after(ids), real(torch.tensor([ids])).logits[0, -1])


def test_search_returns_a_set_of_the_right_size_with_a_recomputable_score(llama):
    tail = PromptTail(PrefixCache(llama), llama.encode(PROMPTS[1]), 16)
    choice = search_skip_layers(tail.agreement, llama.num_layers, 1, iterations=6)
    assert len(choice.skip) == 1 and choice.candidates == 2  # a 2-layer model has two one-layer sets
    scores = {skip: tail.agreement((skip,)) for skip in (0, 1)}
    assert choice.score == scores[choice.skip[0]] == max(scores.values())


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_a_shared_cache_draft_equals_the_views_own_and_leaves_the_target_cache_alone(name):
    """With the last layer skipped the target's KV is the view's own: the same draft as a drafter with its own cache."""
    model = load_model(name)
    ids = model.encode(PROMPTS[0])
    last = layer_skipped_model(model, (model.num_layers - 1,))
    target = PrefixCache(model)
    target.forward(ids[:-1])
    before = cache_state(target)
    shared = SkipDrafter(last, target, "layer_skip", Sampling((), None), 6, stop_threshold=0.0).propose(ids, 6)
    own = DraftModelDrafter(last, "own", Sampling((), None), 6).propose(ids, 6)
    assert len(shared.tokens) == 6 and shared.tokens == own.tokens
    assert_same_state(before, target)
    assert target.tokens == ids[:-1]
    assert SkipDrafter(last, PrefixCache(model), "layer_skip", Sampling((), None), 6, 0.0).propose(ids, 6).tokens == []


@pytest.mark.real_model
def test_search_on_a_real_model():
    model = load_model("smollm2-135m-instruct")
    ids = model.encode("Describe a vivid and unique character, using strong imagery and creative language.", chat=True)
    tail = PromptTail(PrefixCache(model), ids, 20)
    choice = search_skip_layers(tail.agreement, model.num_layers, 13, iterations=6)
    assert len(choice.skip) == len(set(choice.skip)) == 13 and all(0 <= layer < 30 for layer in choice.skip)
    assert choice.candidates <= 6 and choice.score == tail.agreement(choice.skip)
    assert 0 <= choice.score <= 1


@pytest.mark.parametrize("params", [{}, {"skip_layers": "1"}])
def test_the_run_records_the_skip_set_and_its_score(llama, params):
    trace = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {**params, "draft_length": "fixed"}, max_new_tokens=8)
    metrics = {e.name: e for e in trace.events if isinstance(e, DecoderMetric)}
    skip = metrics["skipped_layers"].detail
    assert metrics["skipped_layers"].value == 1 and skip in ("0", "1") and (not params or skip == params["skip_layers"])
    tail = PromptTail(PrefixCache(llama), trace.prompt_token_ids, 50)
    assert trace.metrics["skip_agreement"] == tail.agreement((int(skip),))
    assert 0 < trace.metrics["skip_draft_cost"] and trace.metrics["skip_drafting"] == 1.0  # fixed: drafts regardless
    assert {n.source for r in rounds_of(trace) for n in r.nodes} == {f"layer_skip:{skip}"}


@pytest.mark.parametrize("cost,drafts", [(0.0, True), (1.01, False)])
def test_a_cost_aware_run_drafts_only_with_a_set_that_agrees_as_often_as_a_draft_costs(llama, monkeypatch, cost, drafts):
    monkeypatch.setattr(PromptTail, "draft_cost", lambda self, skip: cost)
    trace = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {"skip_layers": "1"}, max_new_tokens=12)
    assert trace.metrics["skip_drafting"] == float(drafts) and trace.metrics["skip_draft_cost"] == cost
    assert any(r.nodes for r in rounds_of(trace)) == drafts
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=12).output_token_ids


# ---------------------------------------------------------------- the hot start


def test_the_memory_settles_only_when_clearly_above_or_below_the_cost_on_enough_prompts():
    def memory(runs: int, **sets: tuple[int, int, int]) -> SkipMemory:
        """Sets named by their layer as (agreeing positions, positions, prompts), each at a draft cost of 0.5."""
        return SkipMemory({(int(k[1:]),): SetRecord(a, n, p, 0.5 * p) for k, (a, n, p) in sets.items()}, runs)

    assert memory(MIN_PROMPTS - 1, s0=(0, 100, MIN_PROMPTS - 1)).settled() is None  # too few runs to say "never"
    assert memory(MIN_PROMPTS, s0=(10, 100, MIN_PROMPTS)).settled() == ((0,), False)
    assert memory(MIN_PROMPTS, s0=(90, 100, MIN_PROMPTS - 1)).settled() is None  # pays, but on too few prompts
    assert memory(MIN_PROMPTS, s0=(90, 100, MIN_PROMPTS), s1=(0, 100, 1)).settled() == ((0,), True)
    # 45 % over 100 positions against 0.5: within two standard errors (0.1), so unclear
    assert memory(MIN_PROMPTS, s0=(45, 100, MIN_PROMPTS)).settled() is None
    # one unclear set keeps the search going, even beside sets that clearly cannot pay
    assert memory(MIN_PROMPTS, s0=(0, 100, MIN_PROMPTS), s1=(7, 16, 1)).settled() is None
    assert memory(MIN_PROMPTS, s0=(0, 100, MIN_PROMPTS), s1=(1, 16, 1)).settled() == ((1,), False)


def test_scored_sets_are_pooled_for_later_runs_on_the_model(llama, monkeypatch):
    params = {"skip_layers": "1", "context_window": 40}
    first = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], params, max_new_tokens=4)
    forwards = []
    real = llama.forward
    monkeypatch.setattr(llama, "forward", lambda x, *a, **k: forwards.append(x.shape[-1]) or real(x, *a, **k))
    traces = [first, run_ignoring_eos(llama, "layer_skip", PROMPTS[1], params, max_new_tokens=4)]
    # the first run's step time serves the second: its prompt runs in one forward, no timed step
    assert forwards[0] == len(traces[1].prompt_token_ids)  # (timed: all but the last token first)
    [memory] = hot_start.store("layer_skip").values()
    record = memory.sets[(1,)]
    details = [{e.name: e.detail for e in trace.events if isinstance(e, DecoderMetric)} for trace in traces]
    lengths = [min(40, len(trace.prompt_token_ids)) for trace in traces]
    # a set given up on covers the tail's first positions only
    scored = [QUICK if "in part" in detail["skip_draft_cost"] else length for detail, length in zip(details, lengths)]
    assert [d["skip_agreement"] for d in details] == [f"1; {n} of the prompt's last {m} positions"
                                                      for n, m in zip(scored, lengths)]
    assert (memory.runs, record.prompts, record.positions) == (2, 2, sum(scored))
    assert record.agreeing == pytest.approx(sum(t.metrics["skip_agreement"] * n for t, n in zip(traces, scored)))
    assert record.costs == pytest.approx(sum(t.metrics["skip_draft_cost"] for t in traces))


@pytest.mark.parametrize("agreeing,drafts", [(0, False), (300, True)])
def test_a_settled_set_is_taken_without_scoring_and_the_prompt_runs_in_one_forward(llama, monkeypatch, agreeing, drafts):
    """Three earlier prompts that agreed at 0 % (or 100 %) against a cost of 0.5 settle it: the run takes the set
    and the decision, scores nothing, and runs the prompt as greedy does; ``reset_search`` scores again."""
    memory = remembered(llama, SPEC.validate({}), None, 1)  # the run's: the defaults skip 1 of 2 layers
    memory.sets[(0,)] = SetRecord(agreeing=agreeing, positions=300, prompts=3, costs=1.5)
    memory.runs = 3
    scoring = []
    real_agreement = PromptTail.agreement
    monkeypatch.setattr(PromptTail, "agreement", lambda self, skip, give_up_below=None: scoring.append(skip) or
                        real_agreement(self, skip, give_up_below))
    forwards = []
    real = llama.forward
    monkeypatch.setattr(llama, "forward", lambda ids, *a, **k: forwards.append(ids.shape[-1]) or real(ids, *a, **k))
    trace = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {}, max_new_tokens=12)
    assert scoring == [] and forwards[0] == len(trace.prompt_token_ids)  # the whole prompt in the first forward
    assert trace.metrics["skip_candidates_scored"] == 0 and trace.metrics["skip_drafting"] == float(drafts)
    assert trace.metrics["skip_agreement"] == agreeing / 300 and trace.metrics["skip_draft_cost"] == 0.5
    assert any(r.nodes for r in rounds_of(trace)) == drafts
    monkeypatch.setattr(llama, "forward", real)
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=12).output_token_ids
    other = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {"context_window": 20}, max_new_tokens=12)
    assert scoring and other.metrics["skip_candidates_scored"] >= 1  # other search settings: a memory of their own
    scoring.clear()
    again = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {"reset_search": True}, max_new_tokens=12)
    assert scoring and again.metrics["skip_candidates_scored"] >= 1


@pytest.mark.parametrize(
    "params,message",
    [
        ({"skip_layers": "0,1"}, "fewer than 2 distinct layers"),
        ({"skip_layers": "2"}, "between 0 and 1"),
        ({"skip_layers": "a"}, "comma-separated layer indices"),
        ({"skip_ratio": 0.1}, "skips 0 of 2 layers"),
    ],
)
def test_bad_skip_parameters_fail_the_run_clearly(llama, params, message):
    trace = run_ignoring_eos(llama, "layer_skip", "Hi", params)
    assert trace.status == "failed" and message in trace.reason


# ---------------------------------------------------------------- losslessness (greedy, float32)

SETTINGS = [  # whole drafts every round (draft_length fixed), but for the defaults' row
    {"skip_layers": "0", "stop_threshold": 0.0, "num_draft_tokens": 8, "draft_length": "fixed"},  # never stopped early
    {"skip_layers": "1", "stop_threshold": 0.0, "num_draft_tokens": 3, "draft_length": "fixed"},
    {"skip_layers": "1"},  # the confidence stop: a random model's drafts end after one token
    {"stop_threshold": 0.0, "num_draft_tokens": 5, "draft_length": "fixed"},  # searched
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[0], 23), (PROMPTS[2], 40)])
def test_greedy_layer_skip_equals_greedy_llama(llama, params, prompt, max_new_tokens):
    expected = run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(llama, "layer_skip", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize("params", [SETTINGS[0], SETTINGS[1], SETTINGS[3]])
def test_greedy_layer_skip_equals_greedy_gemma3(params):
    """70 tokens cross the sliding window (32): the shared cache, sliding layer kept or skipped, rolls back."""
    gemma = load_model("tiny-random-gemma3")
    expected = run_ignoring_eos(gemma, "greedy", PROMPTS[1], max_new_tokens=70).output_token_ids
    trace = run_ignoring_eos(gemma, "layer_skip", PROMPTS[1], params, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected
    assert sum(len(r.nodes) for r in rounds_of(trace)) > 20  # the drafts ran


def test_stop_threshold_ends_drafts_early(llama):
    params = {"skip_layers": "1", "num_draft_tokens": 8, "draft_length": "fixed"}  # the stop rule alone decides
    long = rounds_of(run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {**params, "stop_threshold": 0.0}, max_new_tokens=30))
    short = rounds_of(run_ignoring_eos(llama, "layer_skip", PROMPTS[0], {**params, "stop_threshold": 1.0}, max_new_tokens=30))
    assert max(len(r.nodes) for r in long) == 8 and max(len(r.nodes) for r in short) == 1


@pytest.mark.slow  # a sampling law over many draws
def test_first_sampled_token_follows_processed_target(llama):
    params = {"skip_layers": "0", "num_draft_tokens": 3, "stop_threshold": 0.0}
    assert_follows(*first_token_law(llama, "layer_skip", params, "Entropy is"))


def test_spread_layers_keep_the_first_and_last_and_hold_the_asked_count():
    for total in range(2, 33):
        for num_skip in range(1, total):
            spread = spread_layers(total, num_skip)
            assert len(spread) == len(set(spread)) == num_skip and spread == tuple(sorted(spread))
            if num_skip <= total - 2:
                assert 0 not in spread and total - 1 not in spread


@pytest.mark.parametrize(("budget", "scored"), [(1e-9, 1), (0.0, 2)])
def test_the_search_spends_at_most_its_share_of_the_run(llama, budget, scored):
    """A budget too small for two sets takes the spread set; no budget (0) searches as many sets as asked."""
    params = {"search_budget": budget, "search_iterations": 6}
    trace = run_ignoring_eos(llama, "layer_skip", PROMPTS[0], params, max_new_tokens=8)
    metrics = {e.name: e for e in trace.events if isinstance(e, DecoderMetric)}
    assert metrics["skip_candidates_scored"].value == scored  # a 2-layer model has two one-layer sets
    if scored == 1:
        assert metrics["skipped_layers"].detail == ",".join(map(str, spread_layers(2, 1)))
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=8).output_token_ids
