"""Speculative decoding on the real offline model (SmolLM2-135M-Instruct, float32): lossless against greedy."""

from __future__ import annotations

import pytest
import torch

from engine import RunSettings, record

pytestmark = pytest.mark.real_model

SUMMARY = (
    "Summarize: The city council met on Tuesday to discuss the new park. The new park will have a playground, a pond "
    "and a running track. Council members said the new park will open next spring, and the playground will be built first."
)
PROMPTS = ["Explain entropy in one sentence.", SUMMARY]


@pytest.fixture(scope="module")
def model(smollm2):
    torch.set_num_threads(2)  # a real model: both cores help here, unlike the tiny ones
    yield smollm2
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    "decoder,params",
    [("prompt_lookup", {}), ("speculative", {"draft_layers": 12, "num_draft_tokens": 3})],
)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculation_equals_greedy(model, decoder, params, prompt):
    settings = RunSettings(max_new_tokens=48, chat=True)
    expected = record(model, "greedy", prompt, settings=settings).output_token_ids
    trace = record(model, decoder, prompt, params, settings)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


def test_prompt_lookup_drafts_from_the_document(model):
    trace = record(model, "prompt_lookup", SUMMARY, settings=RunSettings(max_new_tokens=48, chat=True))
    assert trace.metrics["mean_accepted_tokens"] > 2
