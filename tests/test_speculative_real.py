"""Speculative decoding on the real offline model (SmolLM2-135M-Instruct, float32): lossless against greedy."""

from __future__ import annotations

import pytest

from engine import RunSettings, record

pytestmark = pytest.mark.real_model

SUMMARY = (
    "Summarize: The city council met on Tuesday to discuss the new park. The new park will have a playground, a pond "
    "and a running track. Council members said the new park will open next spring, and the playground will be built first."
)
PROMPTS = ["Explain entropy in one sentence.", SUMMARY]


@pytest.fixture(scope="module")
def model(real_model):
    return real_model


# Every lossless draft-then-verify decoder, with a drafter that fits the real model.
LOSSLESS = [
    ("prompt_lookup", {}),
    ("speculative", {"draft_layers": 12, "num_draft_tokens": 3}),
    ("speculative", {"draft_layers": 12, "schedule": "heuristic"}),
    ("specdec_pp", {"draft_layers": 12}),
    ("pearl", {"draft_layers": 12}),
    ("dyspec", {"draft_layers": 12, "tree_size": 6, "max_depth": 3}),
    ("rsd", {"draft_layers": 12, "tree": "beam"}),
    ("layer_skip", {"skip_ratio": 0.2, "search_iterations": 4, "draft_length": "fixed"}),  # drafts every round
    ("rapid", {"draft_layers": 12, "chunk_tokens": 16, "retrieved_chunks": 2}),
    ("token_recycling", {}),
    ("aded", {"iterations": 40}),
    ("jacobi", {}),
    ("spec_jacobi", {}),
    ("lookahead", {}),
    # the heads shipped for SmolLM2, drafting every round in full
    *((head, {"draft_length": "fixed"}) for head in ("eagle", "fspad", "falcon", "medusa", "ppd")),
]


@pytest.fixture(scope="module")
def greedy_outputs(model):
    """Plain greedy output per prompt, computed once for all decoders."""
    return {prompt: record(model, "greedy", prompt, settings=_settings(prompt)).output_token_ids for prompt in PROMPTS}


def _settings(prompt: str) -> RunSettings:
    return RunSettings(max_new_tokens=48 if prompt == SUMMARY else 24, chat=True)


# The long document prompt only for the model-free drafters (cheap); drafting models get the short prompt.
CASES = [(d, p, prompt) for d, p in LOSSLESS for prompt in PROMPTS if prompt != SUMMARY or "draft_layers" not in p]


@pytest.mark.parametrize("decoder,params,prompt", CASES, ids=[f"{d}-{i}" for i, (d, _, _) in enumerate(CASES)])
def test_greedy_speculation_equals_greedy(model, greedy_outputs, decoder, params, prompt):
    trace = record(model, decoder, prompt, params, _settings(prompt))
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_outputs[prompt]


def test_prompt_lookup_drafts_from_the_document(model):
    trace = record(model, "prompt_lookup", SUMMARY, settings=RunSettings(max_new_tokens=48, chat=True))
    assert trace.metrics["mean_accepted_tokens"] > 2
