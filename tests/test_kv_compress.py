"""KV-cache compression (decoder kv_compress): no-op settings equal greedy, masks against explicit attention masks,
each policy's selection or rewrite against a direct computation, and the figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import RunSettings, record
from engine.events import CacheStep, DecoderMetric, TokenStep
from engine.kv_compress import (
    EMS,
    H2O,
    CacheShape,
    SnapKV,
    gear_compress,
    magnitude_prune,
)
from engine.models.handle import LoadedModel
from engine.processing import kl_divergence
from tests.helpers import eager_attention
from ui.figures.cache import cache_kl_figure, eviction_map_figure

PROMPT = "The quick brown fox jumps over the lazy dog"  # with 30 new tokens longer than gemma3's sliding window (32)
NO_OP = {
    "h2o": [{"budget": 0}, {"budget": 200}],
    "snapkv": [{"budget": 200}],
    "streaming": [{"budget": 200}],
    "mustafar": [{"sparsity": 0.0, "residual": 0}],
    "gear": [{"bits": 16, "buffer": 1}],  # 16-bit groups: not bit-exact, KL ~1e-8
    "ems": [{"budget": 200}],
}
SMALL = {
    "h2o": {"budget": 12},
    "snapkv": {"budget": 12, "window": 4},
    "streaming": {"budget": 12, "sinks": 2},
    "mustafar": {"sparsity": 0.7, "residual": 4},
    "gear": {"bits": 2, "buffer": 4},
    "ems": {"budget": 12, "window": 4},
}


def _run(model, policy: str, tokens: int = 30, prompt: str = PROMPT, **params):
    settings = RunSettings(max_new_tokens=tokens, ignore_eos=True)
    return record(model, "kv_compress", prompt, {"policy": policy, **params}, settings)


def _steps(trace) -> list[CacheStep]:
    return [e for e in trace.events if isinstance(e, CacheStep)]


def _shares(event: CacheStep) -> np.ndarray:
    return np.frombuffer(event.evicted, dtype=np.float16).astype(np.float32)


@pytest.mark.parametrize("name", ["llama", "gemma"])
@pytest.mark.parametrize("policy", list(NO_OP))
def test_no_op_settings_equal_full_cache_greedy(name, policy, request):
    model = request.getfixturevalue(name)
    greedy = record(model, "greedy", PROMPT, settings=RunSettings(max_new_tokens=30, ignore_eos=True))
    assert len(greedy.prompt_token_ids) + 30 > 32  # gemma3's sliding-window layers are past their window
    for params in NO_OP[policy]:
        trace = _run(model, policy, **params)
        assert trace.status == "finished", trace.reason
        assert trace.output_token_ids == greedy.output_token_ids
        steps = _steps(trace)
        assert len(steps) == 30 and all(s.top1_agree for s in steps)
        assert max(s.kl for s in steps) <= 1e-5
        assert trace.metrics["cache_first_divergence"] == -1 and trace.metrics["cache_top1_agreement"] == 1.0


@pytest.mark.parametrize("name", ["llama", "gemma"])
@pytest.mark.parametrize("policy", list(SMALL))
def test_small_budget_changes_the_distribution(name, policy, request):
    model = request.getfixturevalue(name)
    trace = _run(model, policy, **SMALL[policy])
    steps = _steps(trace)
    kls = np.array([s.kl for s in steps])
    assert np.isfinite(kls).all() and (kls >= 0).all()
    assert kls[0] == 0.0  # the prefill forward is never compressed
    assert kls.max() > 1e-6
    assert min(s.kept_fraction for s in steps) < 1.0
    assert trace.metrics["cache_mean_kl"] == pytest.approx(kls.mean(), rel=1e-5)
    if policy in ("mustafar", "gear"):
        assert 0 < steps[-1].error < 1


# ---------------------------------------------------------------- independent recomputation of the KL


def _eager(model: LoadedModel) -> None:
    model.model.set_attn_implementation("eager")


def _full_logits(model: LoadedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(torch.tensor([ids])).logits[0, -1].float()


def _masked_run_kls(model: LoadedModel, sequence: list[int], prompt_len: int, hidden_for_step) -> list[float]:
    """KL(full || masked) per step, the masked run fed token by token with an explicit attention mask.

    ``hidden_for_step(step, length)`` -> the mask argument for that forward (2-D keep mask or 4-D additive mask).
    """
    _eager(model)
    try:
        cache = model.new_cache()
        kls = []
        with torch.inference_mode():
            out = model.model(torch.tensor([sequence[:prompt_len]]), past_key_values=cache, use_cache=True)
            kls.append(kl_divergence(_full_logits(model, sequence[:prompt_len]), out.logits[0, -1]))
            for step in range(1, len(sequence) - prompt_len + 1):
                length = prompt_len + step
                out = model.model(
                    torch.tensor([[sequence[length - 1]]]), past_key_values=cache, use_cache=True,
                    attention_mask=hidden_for_step(step, length), position_ids=torch.tensor([[length - 1]]),
                    output_attentions=True,
                )
                kls.append(kl_divergence(_full_logits(model, sequence[:length]), out.logits[0, -1]))
        return kls
    finally:
        model.use_explorer_attention()


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_streaming_kl_matches_explicit_attention_mask(name, request):
    model = request.getfixturevalue(name)
    budget, sinks = 10, 2
    trace = _run(model, "streaming", tokens=24, budget=budget, sinks=sinks)
    prompt_len = len(trace.prompt_token_ids)
    sequence = trace.prompt_token_ids + trace.output_token_ids

    def keep_mask(step: int, length: int) -> torch.Tensor:
        keep = torch.ones(1, length, dtype=torch.long)
        previous = length - 1  # the eviction decided after the previous forward
        if previous > budget:
            keep[0, sinks : previous - (budget - sinks)] = 0
        return keep

    expected = _masked_run_kls(model, sequence[:-1], prompt_len, keep_mask)
    recorded = [s.kl for s in _steps(trace)]
    assert recorded == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert max(recorded) > 1e-4
    # the recorded evicted map is the same window, in every layer and head
    for step, event in enumerate(_steps(trace)):
        keep = keep_mask(step, prompt_len + step)[0].numpy() if step else np.ones(prompt_len)
        assert _shares(event).tolist() == (1.0 - keep).tolist()


@pytest.fixture(scope="module")
def one_layer(llama):
    """A 1-layer multi-head Llama: a 4-D mask can then express H2O's per-head eviction exactly."""
    cfg = LlamaConfig(vocab_size=llama.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(3)
    return LoadedModel("tiny-1-layer", LlamaForCausalLM(cfg).eval(), llama.tokenizer, "random")


def test_h2o_kl_matches_an_independent_h2o(one_layer):
    """H2O written again over eager attention weights (output_attentions) with a per-head 4-D additive mask."""
    budget, heavy = 8, 4
    trace = _run(one_layer, "h2o", tokens=20, budget=budget, heavy_ratio=0.5)
    prompt_len = len(trace.prompt_token_ids)
    sequence = trace.prompt_token_ids + trace.output_token_ids
    heads = 4
    _eager(one_layer)
    with torch.inference_mode():
        prefill = one_layer.model(torch.tensor([sequence[:prompt_len]]), output_attentions=True)
    one_layer.use_explorer_attention()
    scores = prefill.attentions[0][0].double().sum(1).numpy()  # [heads, prompt]
    hidden = np.zeros((heads, prompt_len), dtype=bool)

    def evict(length: int) -> None:
        nonlocal hidden
        hidden = np.pad(hidden, ((0, 0), (0, length - hidden.shape[1])))
        if length <= budget:
            return
        for h in range(heads):
            candidates = [j for j in range(length - (budget - heavy)) if not hidden[h, j]]
            top = sorted(candidates, key=lambda j: -scores[h, j])[:heavy]
            for j in candidates:
                hidden[h, j] = j not in top

    evict(prompt_len)

    def mask(step: int, length: int) -> torch.Tensor:
        padded = np.pad(hidden, ((0, 0), (0, length - hidden.shape[1])))
        return torch.where(torch.tensor(padded), torch.finfo(torch.float32).min, 0.0)[None, :, None, :]

    # the run above: feed the same tokens, updating scores and evictions from each step's weights
    _eager(one_layer)
    cache = one_layer.new_cache()
    expected = []
    with torch.inference_mode():
        out = one_layer.model(torch.tensor([sequence[:prompt_len]]), past_key_values=cache, use_cache=True)
        expected.append(kl_divergence(_full_logits(one_layer, sequence[:prompt_len]), out.logits[0, -1]))
        for step in range(1, len(trace.output_token_ids)):
            length = prompt_len + step
            out = one_layer.model(
                torch.tensor([[sequence[length - 1]]]), past_key_values=cache, use_cache=True,
                attention_mask=mask(step, length), position_ids=torch.tensor([[length - 1]]), output_attentions=True,
            )
            weights = out.attentions[0][0, :, 0].double().numpy()
            scores = np.pad(scores, ((0, 0), (0, length - scores.shape[1]))) + weights
            expected.append(kl_divergence(_full_logits(one_layer, sequence[:length]), out.logits[0, -1]))
            evict(length)
    one_layer.use_explorer_attention()
    recorded = [s.kl for s in _steps(trace)]
    assert recorded == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert max(recorded) > 1e-4


# ---------------------------------------------------------------- each policy's selection / rewrite


def test_h2o_keeps_top_heavy_and_recent_hand_checked():
    policy = H2O(CacheShape(layers=1, heads=1, kv_heads=1), budget=4, heavy_ratio=0.5)
    prefill = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.4])  # column sums of a made-up prefill
    hooks = policy.hooks(6)
    assert hooks.key_mask(0, 6) is None
    hooks.observe(0, torch.diag(prefill)[None, None])
    policy.update(None, 6)
    # recent = {4, 5}; heavy = top-2 of {0: .9, 1: .1, 2: .5, 3: .3} = {0, 2}
    assert policy.hidden[0][0].tolist() == [False, True, False, True, False, False]
    hooks = policy.hooks(7)
    assert hooks.key_mask(0, 7)[0, 0, 0].tolist() == [False, True, False, True, False, False, False]
    hooks.observe(0, torch.tensor([0.1, 0.0, 0.6, 0.0, 0.1, 0.1, 0.1])[None, None, None])
    policy.update(None, 7)
    # scores now 0: 1.0, 2: 1.1, 4: 0.3; recent = {5, 6}; position 4 leaves the window and loses to 0 and 2
    assert policy.hidden[0][0].tolist() == [False, True, False, True, True, False, False]
    assert policy.evicted(7).tolist() == [0, 1, 0, 1, 1, 0, 0]


def _prefill_with(model: LoadedModel, policy, ids: list[int]):
    from engine.attention import attention_hooks

    model.use_explorer_attention()
    cache = model.new_cache()
    with attention_hooks(policy.hooks(len(ids))):
        model.forward(torch.tensor([ids]), cache)
    return cache


def test_snapkv_selection_equals_pooled_votes(llama):
    ids = llama.encode(PROMPT)
    shape = CacheShape.of(llama)
    budget, window, kernel = 14, 4, 5
    policy = SnapKV(shape, budget, window, kernel)
    cache = _prefill_with(llama, policy, ids)
    policy.update(cache, len(ids))
    n = len(ids)
    for layer, attention in enumerate((a.numpy() for a in eager_attention(llama, ids))):
        grouped = attention.reshape(shape.kv_heads, shape.groups, n, n).mean(1)
        votes = grouped[:, -window:, : n - window].sum(1)
        for head in range(shape.kv_heads):
            pooled = np.convolve(np.pad(votes[head], kernel // 2), np.ones(kernel) / kernel, mode="valid")
            kept = set(np.argsort(-pooled)[: budget - window].tolist()) | set(range(n - window, n))
            hidden = policy.hidden[layer][head].tolist()
            assert {j for j in range(n) if not hidden[j]} == kept and len(kept) == budget < n


def test_ems_merges_evicted_into_the_most_similar_kept_key(llama):
    ids = llama.encode(PROMPT)
    n, budget, window = len(ids), 12, 4
    policy = EMS(CacheShape.of(llama), budget, window)
    cache = _prefill_with(llama, policy, ids)
    original = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    policy.update(cache, n)
    for layer, (keys, values) in enumerate(original):
        for head in range(keys.shape[1]):
            hidden = policy.hidden[layer][head]
            assert int((~hidden).sum()) == budget and not hidden[n - window :].any()
            k, v = keys[0, head].double(), values[0, head].double()
            kept = torch.nonzero(~hidden)[:, 0]
            weight = policy.scores[layer][head].double()
            for i in kept.tolist():
                sources = [i] + [j for j in torch.nonzero(hidden)[:, 0].tolist()
                                 if kept[torch.argmax(torch.nn.functional.cosine_similarity(k[j][None], k[kept]))] == i]
                w = weight[sources].clamp(min=1e-9)
                expected_k = (w[:, None] * k[sources]).sum(0) / w.sum()
                expected_v = (w[:, None] * v[sources]).sum(0) / w.sum()
                assert torch.allclose(cache.layers[layer].keys[0, head, i].double(), expected_k, atol=1e-5)
                assert torch.allclose(cache.layers[layer].values[0, head, i].double(), expected_v, atol=1e-5)


@pytest.mark.parametrize("sparsity, kept", [(0.5, 8), (0.7, 4), (0.0, 16), (0.99, 1)])
def test_mustafar_keeps_exactly_the_largest_magnitudes(sparsity, kept):
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    pruned = magnitude_prune(x, sparsity)
    for vector, original in zip(pruned.reshape(-1, 16), x.reshape(-1, 16)):
        nonzero = vector != 0
        assert int(nonzero.sum()) == kept
        assert torch.equal(vector[nonzero], original[nonzero])
        order = original.abs().argsort(descending=True)
        assert set(order[:kept].tolist()) == set(torch.nonzero(nonzero)[:, 0].tolist())


def test_gear_error_falls_with_more_bits_and_higher_rank():
    g = torch.Generator().manual_seed(0)
    structure = torch.randn(1, 2, 64, 4, generator=g) @ torch.randn(1, 2, 4, 64, generator=g)
    x = structure + 0.3 * torch.randn(1, 2, 64, 64, generator=g)

    def error(bits: int, rank: int) -> float:
        approx = gear_compress(x, bits, rank, 0.02, 64, torch.Generator().manual_seed(0))
        return float((x - approx).norm() / x.norm())

    by_bits = [error(b, 0) for b in (2, 3, 4, 8)]
    by_rank = [error(2, r) for r in (0, 1, 2, 4)]
    assert by_bits == sorted(by_bits, reverse=True) and by_bits[-1] < 0.01
    assert by_rank == sorted(by_rank, reverse=True) and by_rank[-1] < by_rank[0] * 0.9
    # the outliers are kept exactly: the largest entry of every token survives 2-bit quantisation
    approx = gear_compress(x, 2, 0, 0.02, 64, torch.Generator().manual_seed(0))
    tokens, back = x.permute(0, 2, 1, 3).reshape(64, 128), approx.permute(0, 2, 1, 3).reshape(64, 128)
    top = tokens.argmax(-1)
    assert torch.equal(back.gather(1, top[:, None]), tokens.gather(1, top[:, None]))


# ---------------------------------------------------------------- the decoder's events


def test_events_are_consistent(llama):
    trace = _run(llama, "mustafar", tokens=12, sparsity=0.5, residual=3)
    prompt_len = len(trace.prompt_token_ids)
    steps, tokens = _steps(trace), [e for e in trace.events if isinstance(e, TokenStep)]
    assert len(steps) == len(tokens) == len(trace.output_token_ids) == 12
    # each step: the compressed forward on its TokenStep, the reference forward on its CacheStep
    assert trace.metrics["model_calls"] == 24 and all(t.model_calls == 1 for t in tokens + steps)
    for step, event in enumerate(steps):
        shares = _shares(event)
        assert len(shares) == prompt_len + step
        # positions older than the dense window lost half their elements, in every layer and head
        pruned = max(0, prompt_len + step - 1 - 3) if step else 0
        assert shares.tolist() == [0.5] * pruned + [0.0] * (len(shares) - pruned)
        assert event.kept_fraction == pytest.approx(1 - shares.mean(), abs=1e-6)
    metrics = {e.name: e.value for e in trace.events if isinstance(e, DecoderMetric)}
    assert metrics["cache_top1_agreement"] == pytest.approx(np.mean([s.top1_agree for s in steps]), abs=1e-6)
    first = next((i for i, (s, t) in enumerate(zip(steps, tokens)) if not s.top1_agree), -1)
    assert metrics["cache_first_divergence"] == first  # greedy: the chosen token is the compressed top-1


def test_sampling_base_without_compression_equals_sample(llama):
    settings = RunSettings(max_new_tokens=16, ignore_eos=True, seed=5)
    plain = record(llama, "sample", "Once upon", {"temperature": 0.8}, settings)
    compressed = record(llama, "kv_compress", "Once upon", {"base": "sample", "temperature": 0.8, "budget": 0}, settings)
    assert compressed.output_token_ids == plain.output_token_ids


@pytest.mark.parametrize("params, message", [
    ({"policy": "snapkv", "budget": 8, "window": 8}, "budget > window"),
    ({"policy": "snapkv", "budget": 20, "window": 4, "kernel": 4}, "odd"),
    ({"policy": "streaming", "budget": 4, "sinks": 4}, "budget > sinks"),
])
def test_inconsistent_settings_fail_clearly(llama, params, message):
    trace = record(llama, "kv_compress", PROMPT, params, RunSettings(max_new_tokens=2))
    assert trace.status == "failed" and "ParamError" in trace.reason and message in trace.reason


# ---------------------------------------------------------------- figures


def test_figures(llama):
    trace = _run(llama, "streaming", tokens=10, budget=8, sinks=2)
    trace.vocab[trace.prompt_token_ids[0]] = "<b>x</b>"
    fig = eviction_map_figure(trace, step=4)
    heatmap = fig.data[0]
    prompt_len = len(trace.prompt_token_ids)
    assert heatmap.z.shape == (prompt_len + 9, 10)
    assert math.isnan(heatmap.z[-1][0])  # the last position did not exist at step 0
    assert heatmap.z[2][9] == 1.0 and heatmap.z[0][9] == 0.0  # past the sinks: evicted; a sink: kept
    assert "&lt;b&gt;x&lt;/b&gt;" in fig.layout.yaxis.ticktext[0] and "<b>x" not in str(fig.layout.yaxis.ticktext)
    kl = cache_kl_figure(trace, selected_step=3)
    assert list(kl.data[0].y) == [s.kl for s in _steps(trace)]
    assert len(kl.data[1].x) == sum(not s.top1_agree for s in _steps(trace))
    empty = record(llama, "greedy", "Hi", settings=RunSettings(max_new_tokens=2))
    assert "kv_compress" in eviction_map_figure(empty).layout.annotations[0].text


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
@pytest.mark.parametrize("policy, params", [
    ("h2o", {"budget": 16}),
    ("snapkv", {"budget": 12, "window": 4}),
    ("mustafar", {"sparsity": 0.7, "residual": 4}),
])
def test_real_model_compression_changes_the_distribution(smollm2, policy, params):
    prompt = "Explain in two sentences why the sky is blue during the day and red at sunset."
    trace = _run(smollm2, policy, tokens=10, prompt=prompt, **params)
    assert trace.status == "finished", trace.reason
    steps = _steps(trace)
    assert len(steps) == len(trace.output_token_ids) == 10
    kls = [s.kl for s in steps]
    assert all(math.isfinite(k) and k >= 0 for k in kls) and kls[0] == 0.0 and max(kls) > 1e-3
    assert all(len(_shares(s)) == len(trace.prompt_token_ids) + i for i, s in enumerate(steps))
    assert trace.metrics["model_calls"] == 20
    assert trace.metrics["cache_mean_kl"] == pytest.approx(np.mean(kls), rel=1e-5)
