"""EasySpec (`easyspec`): the layer-parallel view's arithmetic, greedy equality with plain greedy decoding, the
sampling law, the exact calibration of accepted tokens, and the measured and parallel draft times."""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.events import DecoderMetric
from engine.speculative.fuzzy import fuzzy_view, layer_groups
from tests.helpers import PROMPTS, assert_follows, first_token_law, greedy_ids, rounds_of, run_ignoring_eos


def test_groups_are_consecutive_and_never_mix_attention_types():
    assert layer_groups(["full"] * 5, 2) == [[0, 1], [2, 3], [4]]
    assert layer_groups(["sliding", "sliding", "full", "sliding"], 3) == [[0, 1], [2], [3]]
    assert layer_groups(["full"] * 3, 1) == [[0], [1], [2]]


def test_a_group_sums_the_residual_updates_of_its_layers_on_a_shared_input():
    model = load_model("tiny-random-llama")
    ids = torch.tensor([model.encode("Hello world, hello again")])
    fuzzy, clock = fuzzy_view(model, 2)
    # by hand: both layers read the embeddings; h' = h + (layer0(h) - h) + (layer1(h) - h)
    base = model.model.model
    captured = {}
    hooks = [layer.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, (args[0], out)))
             for i, layer in enumerate(base.layers)]
    try:
        fuzzy_logits = fuzzy.forward(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    (h0, out0), (h1, out1) = captured[0], captured[1]
    torch.testing.assert_close(h0, h1)  # the shared input
    expected = model.model.lm_head(base.norm(h0 + (out0 - h0) + (out1 - h1))).float()
    torch.testing.assert_close(fuzzy_logits, expected, atol=1e-4, rtol=0)
    assert clock.parallel < clock.sequential
    torch.testing.assert_close(fuzzy_view(model, 1)[0].forward(ids).logits, model.forward(ids).logits)
    assert not torch.allclose(fuzzy_logits, model.forward(ids).logits)
    assert [layer.self_attn.layer_idx for layer in base.layers] == [0, 1]  # the target keeps its layers


@pytest.mark.parametrize("params", [{}, {"num_draft_tokens": 7}, {"parallel_layers": 1, "num_draft_tokens": 3}])
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[0], 23), (PROMPTS[2], 40)])
def test_greedy_easyspec_equals_greedy(llama, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(llama, "easyspec", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(llama, prompt, max_new_tokens)


def test_gemma3s_sliding_and_full_layers_stay_in_groups_of_their_own():
    gemma = load_model("tiny-random-gemma3")  # layer types: sliding, full
    ids = torch.tensor([gemma.encode("Hello world, hello again")])
    torch.testing.assert_close(fuzzy_view(gemma, 2)[0].forward(ids).logits, gemma.forward(ids).logits)


def test_greedy_easyspec_equals_greedy_across_gemma3s_sliding_window():
    gemma = load_model("tiny-random-gemma3")
    trace = run_ignoring_eos(gemma, "easyspec", PROMPTS[1], {"num_draft_tokens": 5}, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == run_ignoring_eos(gemma, "greedy", PROMPTS[1], max_new_tokens=70).output_token_ids


def test_groups_of_one_draft_exactly_what_the_draft_model_drafts(llama):
    """parallel_layers=1 makes every forward exact: the rounds are those of `speculative` on the same draft."""
    params = {"num_draft_tokens": 4, "draft_length": "fixed"}
    ours = rounds_of(run_ignoring_eos(llama, "easyspec", PROMPTS[2], {**params, "parallel_layers": 1}, max_new_tokens=30))
    theirs = rounds_of(run_ignoring_eos(llama, "speculative", PROMPTS[2], params, max_new_tokens=30))
    assert [[n.token_id for n in r.nodes] for r in ours] == [[n.token_id for n in r.nodes] for r in theirs]


def test_sampling_follows_the_target(llama):
    counts, p = first_token_law(llama, "easyspec", {"num_draft_tokens": 3}, PROMPTS[0])
    assert_follows(counts, p)


def test_the_run_records_measured_and_parallel_draft_times(llama):
    # whole drafts: the cost-aware length may keep drafts at one token, which no fuzzy forward makes
    trace = run_ignoring_eos(llama, "easyspec", PROMPTS[2], {"num_draft_tokens": 4, "draft_length": "fixed"},
                             max_new_tokens=24)
    metrics = {e.name: e.value for e in trace.events if isinstance(e, DecoderMetric)}
    assert 0 < metrics["draft_seconds_parallel"] < metrics["draft_seconds_measured"]
    assert metrics["parallel_draft_speedup"] == pytest.approx(
        metrics["draft_seconds_measured"] / metrics["draft_seconds_parallel"], rel=1e-3)
    drafted = [r for r in rounds_of(trace) if r.nodes]
    assert drafted and all("ms with parallel layers" in r.mode for r in drafted)
