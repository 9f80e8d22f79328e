"""Fast-dLLM, LocalLeap and dKV-Cache: exact commit sets of the rules, and the KV caches against full forwards."""

from __future__ import annotations

import math

import pytest
import torch

from engine.decoders.base import DecodeContext
from engine.decoders.diffusion.dkv_cache import RandomOrder
from engine.decoders.diffusion.fast_dllm import factor_rule, threshold_rule
from engine.decoders.diffusion.localleap import local_leap_rule
from engine.diffusion.cache import (
    DelayedCacheDenoiser,
    DualCacheDenoiser,
    PrefixCacheDenoiser,
    WindowCacheDenoiser,
    nearest_masked,
)
from engine.diffusion.unmask import StepView, UnmaskSettings, predictor_for, unmask
from engine.events import DiffusionStep
from engine.run import (  # first: importing the engine's decoders before unmask avoids a cycle
    Run,
    RunSettings,
)
from tests.helpers import tiny_waitline_model

INF = math.inf
PROMPT = 5  # prompt length of the hand-built canvases


@pytest.fixture(scope="module")
def tiny():
    return tiny_waitline_model()


def view(confidence: list[float], block: tuple[int, int] | None = None) -> StepView:
    """A step over len(confidence) positions; -inf marks positions the rule may not commit."""
    scores = torch.tensor(confidence, dtype=torch.float32)
    n = len(confidence)
    return StepView(step=0, block=block or (0, n), step_in_block=0, quota=1, proposals=torch.zeros(n, dtype=torch.long),
                    probs=torch.full((n, 4), 0.25), confidence=scores, masked=torch.isfinite(scores),
                    canvas=torch.full((n,), 3))


def committed(chosen: torch.Tensor) -> set[int]:
    return set(chosen.nonzero().flatten().tolist())


# --- commit rules on hand-made confidence tables ---------------------------------------------------------------


def test_threshold_commits_every_eligible_position_at_or_above_tau():
    table = view([0.5, 0.95, -INF, 0.9, 0.89, 0.2])
    assert committed(threshold_rule(0.9)(table)) == {1, 3}


def test_threshold_with_nothing_above_tau_commits_only_the_top_one():
    assert committed(threshold_rule(0.9)(view([0.3, 0.6, -INF, 0.5]))) == {1}
    assert committed(threshold_rule(1.0)(view([0.99, 0.999, 0.98]))) == {1}


def test_factor_rule_accepts_exactly_the_ranks_below_the_bound():
    # ranks: 0.95 -> 2 * 0.05 = 0.1, 0.8 -> 3 * 0.2 = 0.6, 0.76 -> 4 * 0.24 = 0.96 (< 1), 0.7 -> 5 * 0.3 = 1.5
    table = view([0.7, 0.95, -INF, 0.76, 0.8, 0.1])
    assert committed(factor_rule(1.0)(table)) == {1, 3, 4}
    assert committed(factor_rule(0.5)(table)) == {1}  # 0.6 >= 0.5 stops at rank 2
    assert committed(factor_rule(1.0)(view([0.3, 0.2]))) == {0}  # 2 * 0.7 = 1.4 fails, rank 1 always


def test_localleap_relaxes_only_around_anchors_inside_the_block():
    # Block 0..7 of 12; anchor at the block's last position 7, radius 4: 3..11 are near, 8..11 outside the block.
    confidence = [0.1, 0.2, 0.8, 0.76, 0.8, 0.74, 0.3, 0.95] + [-INF] * 4
    chosen = local_leap_rule(0.9, 0.75, 4)(view(confidence, block=(0, 8)))
    assert committed(chosen) == {3, 4, 7}  # 2 (0.8) is 5 away: stays masked; 5 (0.74) is below the relaxed bound


def test_localleap_overlapping_neighbourhoods_and_no_anchor():
    confidence = [0.5] * 16
    confidence[5], confidence[9] = 0.92, 0.91  # neighbourhoods 1..9 and 5..13
    confidence[0], confidence[1], confidence[7], confidence[13], confidence[14] = 0.8, 0.76, 0.74, 0.8, 0.85
    assert committed(local_leap_rule(0.9, 0.75, 4)(view(confidence))) == {1, 5, 9, 13}
    assert committed(local_leap_rule(0.9, 0.75, 4)(view([0.8, 0.85, 0.7]))) == {1}  # no anchor: plain threshold


def test_nearest_masked_neighbours_prefer_the_closest_then_the_left():
    masked = torch.ones(11, dtype=torch.bool)
    masked[4] = False
    centre = torch.zeros(11, dtype=torch.bool)
    centre[5] = True
    assert committed(nearest_masked(centre, masked, 2)) == {3, 6}
    assert committed(nearest_masked(centre, masked, 3)) == {3, 6, 7}


# --- caches: a cached forward equals the full forward when the cache came from the same canvas -----------------


def canvas_with_block(tokens: int = 16, committed_count: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    canvas = torch.randint(4, 200, (PROMPT + tokens,), generator=generator)
    canvas[PROMPT + committed_count:] = 3
    canvas[PROMPT + 2] = 3  # a hole: the delayed cache then feeds positions that are not contiguous
    return canvas


def upcoming_fixed(masked: torch.Tensor, block: tuple[int, int], step: int) -> torch.Tensor:
    chosen = torch.zeros_like(masked)
    chosen[block[0]] = True
    return chosen


CACHES = {
    "prefix": (PrefixCacheDenoiser, range(8, 16)),
    "dual": (DualCacheDenoiser, range(8, 12)),
    "delayed": (lambda p: DelayedCacheDenoiser(p, reload_every=8), (2, *range(8, 16))),
    "window": (lambda p: WindowCacheDenoiser(p, upcoming_fixed, reload_every=8, window=2), (8, 9, 10)),
}


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("kind", list(CACHES))
def test_cached_forward_equals_full_forward_on_the_same_canvas(tiny, kind, shift):
    make, rows = CACHES[kind]
    predictor = predictor_for(tiny, shift=shift)
    denoiser, canvas, block = make(predictor), canvas_with_block(), (8, 12)
    nothing = torch.zeros(16, dtype=torch.bool)
    full = denoiser(canvas, PROMPT, block, nothing)
    cached = denoiser(canvas, PROMPT, block, nothing)
    assert full.cache == "" and cached.cache == ("delayed" if kind == "window" else kind)
    assert full.calls == cached.calls == 1
    reference = predictor.logits(canvas)[PROMPT:]
    rows = list(rows)
    torch.testing.assert_close(full.logits, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached.logits[rows], reference[rows], atol=1e-4, rtol=0)
    assert torch.isneginf(cached.logits[:, predictor.mask_id]).all()


@pytest.mark.parametrize("kind", ["prefix", "dual"])
def test_block_caches_reuse_the_prefix_computed_at_the_block_start(tiny, kind):
    """A prefix token changed after the block's full forward is not seen: its cached K/V are used."""
    predictor = predictor_for(tiny)
    make, rows = CACHES[kind]
    denoiser, canvas, block = make(predictor), canvas_with_block(), (8, 12)
    nothing = torch.zeros(16, dtype=torch.bool)
    denoiser(canvas, PROMPT, block, nothing)
    changed = canvas.clone()
    changed[PROMPT + 4] = 7
    cached = denoiser(changed, PROMPT, block, nothing).logits[list(rows)]
    torch.testing.assert_close(cached, predictor.logits(canvas)[PROMPT:][list(rows)], atol=1e-4, rtol=0)
    assert not torch.allclose(cached, predictor.logits(changed)[PROMPT:][list(rows)], atol=1e-4)


def spy_on_feeds(denoiser) -> list[list[int]]:
    """The canvas positions each cached step recomputes."""
    fed: list[list[int]] = []
    logits_at = denoiser.kv.logits_at
    denoiser.kv.logits_at = lambda canvas, needed: fed.append(needed) or logits_at(canvas, needed)
    return fed


def test_delayed_cache_takes_a_decoded_token_in_one_step_later(tiny):
    denoiser, canvas = DelayedCacheDenoiser(predictor_for(tiny), reload_every=8), canvas_with_block()
    fed = spy_on_feeds(denoiser)
    nothing = torch.zeros(16, dtype=torch.bool)
    denoiser(canvas, PROMPT, (8, 16), nothing)  # full forward: the prompt and the decoded tokens are settled
    canvas[PROMPT + 8] = 9  # decoded at that step
    denoiser(canvas, PROMPT, (8, 16), nothing)  # fed once more, with its K/V computed now
    denoiser(canvas, PROMPT, (8, 16), nothing)  # then cached
    masked = [PROMPT + 2, *range(PROMPT + 9, PROMPT + 16)]
    assert fed == [sorted(masked + [PROMPT + 8]), masked]
    assert sorted(denoiser.kv.held[: -len(masked)]) == sorted(set(range(PROMPT + 16)) - set(masked))


# --- whole runs -------------------------------------------------------------------------------------------------


def diffusion_steps(trace) -> list[DiffusionStep]:
    return [event for event in trace.events if isinstance(event, DiffusionStep)]


def run(model, decoder: str, params: dict, tokens: int = 12):
    trace = Run(model, decoder, "Ann Lee", params, RunSettings(max_new_tokens=tokens)).to_end()
    assert trace.status == "finished", trace.reason
    steps = diffusion_steps(trace)
    assert steps and all(step.model_calls == 1 for step in steps)
    assert steps[-1].mask_id not in steps[-1].canvas  # every position was committed
    return trace, steps


def steps_in_block(steps: list[DiffusionStep]) -> list[int]:
    counts, previous = [], None
    for step in steps:
        counts.append(counts[-1] + 1 if step.block == previous else 0)
        previous = step.block
    return counts


@pytest.mark.parametrize("decoder", ["fast_dllm", "localleap"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_block_cache_runs_record_the_reuse(tiny, decoder, cache):
    relaxed = {"relaxed_threshold": 0.3} if decoder == "localleap" else {}
    _, steps = run(tiny, decoder, {"cache": cache, "block_length": 4, "threshold": 0.5, **relaxed})
    expected = ["" if cache == "none" or first == 0 else cache for first in steps_in_block(steps)]
    assert [step.cache for step in steps] == expected
    assert {tuple(step.block) for step in steps} == {(0, 4), (4, 8), (8, 12)}


@pytest.mark.parametrize("variant", ["decode", "greedy"])
def test_dkv_cache_runs_reload_every_few_steps(tiny, variant):
    params = {"variant": variant, "remasking": "random" if variant == "greedy" else "low_confidence",
              "cache_reloading_step": 3, "block_length": 6, "steps": 12, "window_size": 1}
    _, steps = run(tiny, "dkv_cache", params)
    assert [step.cache for step in steps] == ["" if s % 3 == 0 else "delayed" for s in steps_in_block(steps)]
    assert all(len(step.committed_positions) == 1 for step in steps)  # LLaDA's schedule: 12 tokens, 12 steps


def test_dkv_greedy_recomputes_every_position_it_commits(tiny):
    """The cache and the rule share the random order: each cached step fed the positions the rule committed."""
    predictor = predictor_for(tiny)
    generator = torch.Generator().manual_seed(0)
    order = RandomOrder(torch.rand(12, generator=generator), steps_per_block=3)
    denoiser = WindowCacheDenoiser(predictor, order.upcoming, reload_every=4, window=0)
    fed = spy_on_feeds(denoiser)
    ctx = DecodeContext(tiny, tiny.encode("Ann Lee"), {}, 12, {2}, generator)
    settings = UnmaskSettings(gen_length=12, block_length=6, steps=6, confidence="random")
    steps = [e for e in unmask(ctx, predictor, order.rule, settings, denoiser) if isinstance(e, DiffusionStep)]
    cached = [step for step in steps if step.cache]
    assert len(cached) == len(fed) == 4 and all(len(step.committed_positions) == 2 for step in steps)
    prompt = len(ctx.prompt_ids)
    for step, needed in zip(cached, fed):
        assert {p + prompt for p in step.committed_positions} <= set(needed)


def test_greedy_needs_random_remasking(tiny):
    trace = Run(tiny, "dkv_cache", "Ann", {"variant": "greedy"}, RunSettings(max_new_tokens=4)).to_end()
    assert trace.status == "failed" and "ParamError" in trace.reason and "remasking=random" in trace.reason


def test_fast_dllm_at_tau_one_is_llada_one_token_per_step(tiny):
    """Only the top-1 passes tau = 1, as LLaDA's low-confidence remasking with steps = gen_length commits."""
    fast, fast_steps = run(tiny, "fast_dllm", {"threshold": 1.0, "block_length": 4})
    llada, llada_steps = run(tiny, "llada", {"block_length": 4})
    assert fast.output_token_ids == llada.output_token_ids
    assert [s.committed_positions for s in fast_steps] == [s.committed_positions for s in llada_steps]
    assert all(len(s.committed_positions) == 1 for s in fast_steps)


def test_cached_run_differs_only_by_approximation(tiny):
    """Caches are approximate: outputs may differ from the full forward, but each run commits every position
    and the first step of each block (a full forward in both) proposes the same tokens."""
    _, full = run(tiny, "fast_dllm", {"cache": "none", "block_length": 12, "threshold": 0.5})
    _, dual = run(tiny, "fast_dllm", {"cache": "dual", "block_length": 12, "threshold": 0.5})
    assert full[0].committed_positions == dual[0].committed_positions and full[0].canvas == dual[0].canvas
