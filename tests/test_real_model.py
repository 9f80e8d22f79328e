"""End-to-end checks on the real offline model (SmolLM2-135M-Instruct, float32)."""

from __future__ import annotations

import pytest
import torch

from engine import RunSettings, record
from engine.events import Output

pytestmark = pytest.mark.real_model

PROMPTS = ["Explain entropy in one sentence.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def model(real_model):
    return real_model


def _generate(model, prompt_ids, **kwargs):
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        return model.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_generate_token_for_token(model, prompt):
    trace = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=40, chat=True))
    expected = _generate(model, trace.prompt_token_ids, do_sample=False, max_new_tokens=40)
    assert trace.output_token_ids == expected
    assert trace.output_text.strip()


def test_beam_equals_transformers(model):
    params = {"num_beams": 3, "length_penalty": 1.0, "early_stopping": "false"}
    trace = record(model, "beam", PROMPTS[0], params, RunSettings(max_new_tokens=16, chat=True))
    expected = _generate(model, trace.prompt_token_ids, num_beams=3, length_penalty=1.0, early_stopping=False, do_sample=False, max_new_tokens=16)
    assert trace.output_token_ids == expected[: len(trace.output_token_ids)]
    assert set(expected[len(trace.output_token_ids) :]) <= {model.tokenizer.pad_token_id}
    assert [e for e in trace.events if isinstance(e, Output)]


def test_top_p_sampling_is_reproducible_and_stops_at_end_of_turn(model):
    settings = RunSettings(max_new_tokens=64, seed=7, chat=True)
    params = {"top_p": 0.9, "temperature": 0.8}
    first = record(model, "top_p", PROMPTS[0], params, settings)
    second = record(model, "top_p", PROMPTS[0], params, settings)
    assert first.output_token_ids == second.output_token_ids
    assert first.status == "finished"
    if first.reason == "end of sequence":
        assert first.output_token_ids[-1] in model.eos_token_ids


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_row_kernels_give_f_linears_logits_and_tokens(model, rows):
    """Layers routed by row count (engine.models.cpu_linear; here every count forced onto W @ x^T, padded) compute
    F.linear's products to float32 rounding: the logits of a ``rows``-token forward agree and greedy's tokens
    stay the same."""
    from engine.models.cpu_linear import ROW_COUNTS, RowKernelLinear, plain_linear, use_row_kernels

    assert any(isinstance(layer, RowKernelLinear) for layer in model.model.modules())
    settings = RunSettings(max_new_tokens=24, chat=True)
    ids = torch.tensor([model.encode(PROMPTS[1], chat=True)[:rows]])
    table = model.details["row_kernels"]
    with torch.inference_mode(), plain_linear(model.model):
        plain_logits = model.model(ids).logits
        plain_tokens = record(model, "greedy", PROMPTS[1], settings=settings).output_token_ids
    try:
        use_row_kernels(model.model, {count: max(count, 2) for count in ROW_COUNTS})
        with torch.inference_mode():
            routed_logits = model.model(ids).logits
        routed_tokens = record(model, "greedy", PROMPTS[1], settings=settings).output_token_ids
    finally:
        use_row_kernels(model.model, table)
    torch.testing.assert_close(routed_logits, plain_logits, rtol=1e-4, atol=2e-4)
    assert routed_tokens == plain_tokens
