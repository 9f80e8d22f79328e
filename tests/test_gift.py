"""GIFT on text: the gaze-shift saliency, the attention amplification, and alpha = 0 equal to greedy."""

from __future__ import annotations

import numpy as np
import pytest

from engine import RunSettings, record
from engine.attention import AttentionCapture
from engine.decoders.token.gift import STOPWORDS, default_layers
from engine.event_arrays import attention_array
from engine.events import AttentionMap, DecoderMetric, Steering
from engine.prompt_spans import marked_spans
from tests.helpers import eager_attention

PROMPT = "Context: The red fox lives in the old mill by the river. Question: Where does the fox live?"


def _gift(model, alpha: float, tokens: int = 12, **params):
    return record(model, "gift", PROMPT, {"alpha": alpha, **params}, RunSettings(max_new_tokens=tokens, ignore_eos=True))


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_alpha_zero_reproduces_greedy(name, request):
    model = request.getfixturevalue(name)
    greedy = record(model, "greedy", PROMPT, settings=RunSettings(max_new_tokens=40, ignore_eos=True))
    steered = _gift(model, 0.0, tokens=40)
    assert steered.output_token_ids == greedy.output_token_ids
    steps = [e for e in steered.events if isinstance(e, Steering)]
    assert all(r == pytest.approx(1.0, abs=1e-6) for s in steps for r in s.ratios)
    assert all(s.plain_token_id == t for s, t in zip(steps, steered.output_token_ids))


def test_saliency_and_scaling_match_direct_computation(llama):
    alpha = 5.0
    trace = _gift(llama, alpha, tokens=3)
    ids = trace.prompt_token_ids
    spans = marked_spans(llama, ids, "Context:", "Question:")
    saliency_layers, enhance_layers = default_layers(llama.num_layers)
    attention = [a.numpy() for a in eager_attention(llama, ids)]
    saliency_map = next(e for e in trace.events if isinstance(e, AttentionMap) and e.name == "saliency")
    query = saliency_map.query_positions[1:]
    words = [llama.token_text(ids[q]).strip().lower() for q in query]
    assert query and all(w not in STOPWORDS for w in words)

    # Δ = ReLU(A[i] - A[i-1]) on the context, the half of the heads with the largest total per layer, averaged
    context = np.arange(spans.context.start, spans.context.stop)
    kept = []
    for layer in saliency_layers:
        a = attention[layer]
        delta = np.maximum(a[:, query][:, :, context] - a[:, np.array(query) - 1][:, :, context], 0)
        order = np.argsort(-delta.sum(axis=(1, 2)))[: max(1, a.shape[0] // 2)]
        kept.append(delta[order])
    shift = np.concatenate(kept).mean(axis=(0, 1))
    mu, sigma = shift.mean(), shift.std()
    shift = np.clip(shift, mu - 3 * sigma, mu + 3 * sigma)
    expected = (shift - shift.min()) / (shift.max() - shift.min())
    recorded = attention_array(saliency_map)[0, 0]
    np.testing.assert_allclose(recorded[context], expected, atol=2e-3)
    assert np.all(recorded[: spans.context.start] == 0) and np.all(recorded[spans.context.stop:] == 0)

    # The first enhanced layer's prefill row is still the plain one: its heads and ratio follow from it directly.
    layer = enhance_layers[0]
    row = attention[layer][:, -1, :]
    half = max(1, row.shape[0] // 2)
    scale = np.exp(alpha * expected)
    heads = np.argsort(-row[:, context].sum(-1))[:half]
    ratio = (row[heads][:, context] * scale).sum() / row[heads][:, context].sum()
    query_heads = np.argsort(-row[:, spans.query.start:spans.query.stop].sum(-1))[:half]
    first = next(e for e in trace.events if isinstance(e, Steering))
    assert first.layers == enhance_layers
    assert first.context_heads[0] == sorted(heads.tolist())
    assert first.query_heads[0] == sorted(query_heads.tolist())
    assert first.ratios[0] == pytest.approx(ratio, rel=2e-3)
    assert first.ratios[0] > 1
    assert first.context_mass_after[0] > first.context_mass_before[0]


def test_amplification_changes_the_distribution(llama):
    trace = _gift(llama, 8.0, tokens=6)
    steps = [e for e in trace.events if isinstance(e, Steering)]
    assert len(steps) == 6 and all(s.kl_from_plain > 0 for s in steps)
    metric = [e for e in trace.events if isinstance(e, DecoderMetric) and e.name == "first_divergence_from_plain"]
    assert metric and trace.metrics["first_divergence_from_plain"] == metric[-1].value
    assert trace.metrics["model_calls"] == 12  # the steered forward and the plain reference, per step


def test_attention_capture_rides_along(llama):
    capture = AttentionCapture(layers="all")
    trace = record(llama, "gift", PROMPT, {"alpha": 3.0}, RunSettings(max_new_tokens=3, ignore_eos=True, attention=capture))
    maps = [e for e in trace.events if isinstance(e, AttentionMap) and e.name == "attention"]
    assert [m.step for m in maps] == [0, 1, 2]
    assert maps[1].shape == [llama.num_layers, 1, len(trace.prompt_token_ids) + 1]


def test_prompt_spans_and_errors(llama):
    ids = llama.encode(PROMPT)
    spans = marked_spans(llama, ids, "Context:", "Question:")
    assert llama.decode(ids[spans.context.start:spans.context.stop]).strip() == "The red fox lives in the old mill by the river."
    assert llama.decode(ids[spans.query.start:spans.query.stop]).strip() == "Question: Where does the fox live?"
    chat = llama.encode(PROMPT, chat=True)
    spans = marked_spans(llama, chat, "", "Question:")
    assert llama.decode(chat[spans.query.start:spans.query.stop]).strip().startswith("Question:")
    assert "</s>" not in llama.decode(chat[spans.query.start:spans.query.stop], skip_special_tokens=False)
    failed = record(llama, "gift", "No question here.", {}, RunSettings(max_new_tokens=2))
    assert failed.status == "failed" and "query marker" in failed.reason
    failed = record(llama, "gift", PROMPT, {"enhance_layers": "7-9"}, RunSettings(max_new_tokens=2))
    assert failed.status == "failed" and "past the model's last one" in failed.reason


@pytest.mark.real_model
def test_real_model_gift(smollm2):
    prompt = ("Context: The museum opens at nine on weekdays and at ten on Sundays. Tickets cost twelve euros. "
              "Question: When does the museum open on Sundays?")
    trace = record(smollm2, "gift", prompt, {}, RunSettings(max_new_tokens=12, chat=True))
    assert trace.status == "finished" and trace.output_text.strip()
    steps = [e for e in trace.events if isinstance(e, Steering)]
    assert steps and all(r >= 1.0 for s in steps for r in s.ratios)
    saliency = attention_array(next(e for e in trace.events if isinstance(e, AttentionMap)))[0, 0]
    assert saliency.max() == pytest.approx(1.0, abs=1e-3)
