"""Answer selection: self-certainty best-of-N and exact-extract, against teacher-forced forwards and brute force."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from engine import RunSettings, record
from engine.decoders.token.self_certainty import answer_key, borda_votes, choose
from engine.event_arrays import span_nll
from engine.events import Output, Rerank, SpanScores
from engine.trace import dumps, loads
from ui.figures.spans import spans_figure

QA = "Context: the cat sat on the mat by the door. Question: where did the cat sit?"


def _rerank(trace) -> Rerank:
    return next(e for e in trace.events if isinstance(e, Rerank))


def _spans(trace) -> SpanScores:
    return next(e for e in trace.events if isinstance(e, SpanScores))


# ---------------------------------------------------------------- self-certainty


def test_self_certainty_matches_a_teacher_forced_forward(llama):
    params = {"n": 3, "temperature": 0.9, "top_k": 20}
    trace = record(llama, "self_certainty", "Entropy is", params, RunSettings(max_new_tokens=6, ignore_eos=True))
    event = _rerank(trace)
    assert len(event.candidates) == 3 and event.baseline == 0 and event.model_calls == 6
    prompt = trace.prompt_token_ids
    for c in event.candidates:
        assert len(c.tokens) == 6
        with torch.inference_mode():
            logits = llama.model(torch.tensor([prompt + c.tokens])).logits[0].double()
        logprobs = logits.log_softmax(-1)[len(prompt) - 1 : -1]  # the distributions that produced the sample
        kl = -math.log(llama.model.config.vocab_size) - logprobs.mean(-1)
        assert c.token_scores == pytest.approx(kl.tolist(), abs=2e-5)
        assert c.score == pytest.approx(kl.mean().item(), abs=2e-5) and c.parts[0] == c.score
    scores = [c.score for c in event.candidates]
    assert event.chosen == int(np.argmax(scores))
    output = next(e for e in trace.events if isinstance(e, Output))
    assert output.token_ids == event.candidates[event.chosen].tokens == trace.output_token_ids


def test_samples_follow_the_processed_distribution(llama):
    """Every sample's first token is an independent draw from the processed law (chi-square over 10 x 60 draws)."""
    params = {"n": 60, "temperature": 0.9, "top_k": 6}
    firsts = Counter()
    for seed in range(10):
        trace = record(llama, "self_certainty", "Entropy is", params, RunSettings(max_new_tokens=1, seed=seed))
        firsts.update(c.token_id for c in _rerank(trace).candidates)
    with torch.inference_mode():
        logits = llama.model(torch.tensor([trace.prompt_token_ids])).logits[0, -1].double() / 0.9
    top = logits.topk(6)
    assert set(firsts) <= set(top.indices.tolist())
    observed = [firsts[t] for t in top.indices.tolist()]
    expected = torch.softmax(top.values, -1).numpy() * sum(observed)
    assert chisquare(observed, expected).pvalue > 1e-3


def test_answer_classes_and_votes():
    assert answer_key("  The  Answer\n is X ", "text") == "the answer is x"
    assert answer_key("so 1,234 apples, then 12.5 and -3", "last_number") == "-3"
    assert answer_key("no digits here", "last_number") is None
    certainty = [0.5, 2.0, 1.0, 1.5]
    votes = borda_votes(certainty, 0.5)  # ranks 4, 1, 3, 2 -> (N - r + 1)^0.5
    assert votes == pytest.approx([1.0, 2.0, math.sqrt(2), math.sqrt(3)])
    keys = ["a", "b", "a", "a"]
    chosen, class_votes = choose(certainty, keys, votes, "borda")
    assert chosen == 3  # class a (1 + sqrt 2 + sqrt 3 > 2), its most certain sample
    assert class_votes == pytest.approx([1 + math.sqrt(2) + math.sqrt(3), 2.0, *[1 + math.sqrt(2) + math.sqrt(3)] * 2])
    assert choose(certainty, keys, votes, "best")[0] == 1
    assert choose(certainty, ["a", "b", "b", "a"], borda_votes(certainty, 5.0), "borda")[0] == 1  # b: 4^5 + 2^5
    # samples without an extractable answer lose unless none has one
    assert choose(certainty, [None, None, "7", None], votes, "best")[0] == 2
    assert choose(certainty, [None] * 4, votes, "borda")[0] == 1


def test_borda_selection_in_a_run(llama):
    params = {"n": 6, "selection": "borda", "borda_power": 0.0}  # p = 0: a majority vote
    trace = record(llama, "self_certainty", "1 2 3 4", params, RunSettings(max_new_tokens=1, seed=3))
    event = _rerank(trace)
    counts = Counter(c.label for c in event.candidates)
    winners = [label for label, n in counts.items() if n == max(counts.values())]
    assert event.candidates[event.chosen].label in winners
    assert all(c.parts[2] == counts[c.label] for c in event.candidates)
    assert event.part_names == ["self-certainty", "borda vote", "class votes"] and event.label == "borda"


# ---------------------------------------------------------------- exact-extract


def _brute_force(model, prompt: list[int], passage: range, length: int, stop: list[int]) -> np.ndarray:
    """NLL of every span from separate full forwards over prompt + span (inf where the span leaves the passage)."""
    tokens = [prompt[p] for p in passage]
    nll = np.full((len(tokens), length), np.inf)
    for i in range(len(tokens)):
        for n in range(1, min(length, len(tokens) - i) + 1):
            span = tokens[i : i + n]
            with torch.inference_mode():
                logprobs = model.model(torch.tensor([prompt + span])).logits[0].double().log_softmax(-1)
            steps = logprobs[len(prompt) - 1 :]
            nll[i, n - 1] = -sum(steps[j, t].item() for j, t in enumerate(span)) - steps[n, stop].logsumexp(-1).item()
    return nll


@pytest.mark.parametrize(
    "params",
    [{"max_answer_tokens": 4}, {"max_answer_tokens": 3, "length_normalized": True, "terminator": "newline"}],
)
def test_exact_extract_equals_brute_force(llama, params):
    trace = record(llama, "exact_extract", QA, params, RunSettings(max_new_tokens=16))
    event = _spans(trace)
    prompt = trace.prompt_token_ids
    assert llama.decode(prompt[event.starts[0] : event.starts[-1] + 1]) == " the cat sat on the mat by the door. "
    stop = [llama.model.config.eos_token_id] if "terminator" not in params else llama.tokenizer.encode("\n", add_special_tokens=False)
    expected = _brute_force(llama, prompt, range(event.starts[0], event.starts[-1] + 1), params["max_answer_tokens"], stop)
    nll = span_nll(event)
    assert np.array_equal(np.isinf(nll), np.isinf(expected))
    finite = np.isfinite(expected)
    assert np.allclose(nll[finite], expected[finite], rtol=1e-5, atol=1e-4)
    values = expected / np.arange(2, expected.shape[1] + 2) if params.get("length_normalized") else expected
    i, j = np.unravel_index(np.argmin(values), values.shape)
    assert (event.best_start, event.best_length) == (event.starts[i], j + 1)
    assert trace.output_token_ids == prompt[event.starts[i] : event.starts[i] + j + 1]
    # the greedy answer: argmax tokens after the prompt until the terminator
    with torch.inference_mode():
        greedy = llama.model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=len(event.greedy_token_ids) + 1)
    assert greedy[0, len(prompt) : len(prompt) + len(event.greedy_token_ids)].tolist() == event.greedy_token_ids
    greedy_limit, greedy_length = 2 * params["max_answer_tokens"], len(event.greedy_token_ids)
    greedy_calls = greedy_length - (greedy_length == greedy_limit)  # the prefill gives the first token
    assert event.model_calls == 1 + greedy_calls + 1  # prefill, greedy, one chunk of starts


def test_exact_extract_in_a_chat_prompt_and_bad_markers(llama):
    trace = record(llama, "exact_extract", QA, {"max_answer_tokens": 2}, RunSettings(max_new_tokens=8, chat=True))
    event = _spans(trace)
    assert llama.decode(trace.prompt_token_ids[event.starts[0] : event.starts[-1] + 1]).strip() == "the cat sat on the mat by the door."
    missing = record(llama, "exact_extract", "the cat sat. Question: where?", {}, RunSettings(max_new_tokens=4))
    assert missing.status == "failed" and "no passage marker 'Context:'" in missing.reason
    no_question = record(llama, "exact_extract", "Context: the cat sat.", {}, RunSettings(max_new_tokens=4))
    assert no_question.status == "failed" and "query marker 'Question:'" in no_question.reason


def test_span_figure_marks_the_argmin_and_escapes(llama):
    trace = record(llama, "exact_extract", QA, {"max_answer_tokens": 3}, RunSettings(max_new_tokens=8))
    assert loads(dumps(trace)).events == trace.events  # inf cells survive the JSON form
    event = _spans(trace)
    trace.vocab[trace.prompt_token_ids[event.best_start]] = "<script>x</script>"
    fig = spans_figure(trace)
    text = fig.to_json()
    assert "<script>" not in text and "&lt;script&gt;" in text
    heat, marker = fig.data
    assert marker.x == (event.best_length,) and marker.y == (event.starts.index(event.best_start),)
    assert sum(v is None for row in heat.z for v in row) == 3 * 2 // 2  # the overrunning corner: 0 + 1 + 2 cells
    assert "greedy answer" in fig.layout.title.text


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_self_certainty_on_smollm2(smollm2):
    params = {"n": 3, "selection": "borda", "answer": "last_number"}
    trace = record(smollm2, "self_certainty", "What is 7 + 5? Answer with a number.", params,
                   RunSettings(max_new_tokens=12, chat=True))
    event = _rerank(trace)
    assert trace.status == "finished" and len(event.candidates) == 3
    assert all(c.score > 0 and len(c.token_scores) == len(c.tokens) for c in event.candidates)
    assert trace.output_token_ids == event.candidates[event.chosen].tokens[: len(trace.output_token_ids)]


@pytest.mark.real_model
def test_exact_extract_on_smollm2(smollm2):
    # A plain prompt ending in "Answer:": in-passage tokens carry their leading space, natural after "Answer:"
    # (after a chat template's assistant header SmolLM2 prefers " France." + EOS to " Paris").
    prompt = "Context: The Eiffel Tower stands in Paris, the capital of France. Question: In which city is the Eiffel Tower? Answer:"
    params = {"max_answer_tokens": 4, "terminator": "newline"}
    trace = record(smollm2, "exact_extract", prompt, params, RunSettings(max_new_tokens=16))
    event = _spans(trace)
    assert trace.status == "finished" and trace.output_text == " Paris"
    nll = span_nll(event)
    assert nll.shape == (len(event.starts), 4) and np.isinf(nll[-1, 1:]).all() and np.isfinite(nll[:-3]).all()
