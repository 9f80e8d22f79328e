"""LLM-KICK's measures (engine.offline.knowledge_eval) and ``bench variants`` on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cli import bench_variants
from engine.models import load_model
from engine.offline.drafter_data import greedy_answers
from engine.offline.knowledge_eval import (
    TEXT_PATH,
    _shared_prefix,
    exact_match,
    greedy_batch,
    is_correct,
    perplexity,
    prompt_ids,
    read_questions,
    words,
)

TEXT = TEXT_PATH.read_text(encoding="utf-8").split("\n\n")[0]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def _full_nll(model, ids: list[int]) -> torch.Tensor:
    """Per-token NLL of ids[1:] from one plain forward of the whole sequence."""
    with torch.no_grad():
        logits = model.model(input_ids=torch.tensor([ids])).logits[0].float()
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")


def test_perplexity_equals_a_plain_full_sequence_forward(tiny):
    ids = tiny.tokenizer(TEXT)["input_ids"]
    result = perplexity(tiny, TEXT)
    assert result.tokens == len(ids) - 1 and result.window == len(ids)
    assert result.ppl == pytest.approx(math.exp(_full_nll(tiny, ids).mean().item()), rel=1e-5)


def test_sliding_windows_score_every_token_once_with_their_window(tiny):
    ids = tiny.tokenizer(TEXT)["input_ids"][:100]
    text = tiny.decode(ids)
    ids = tiny.tokenizer(text)["input_ids"]
    window, stride = 64, 40  # two windows: tokens 1..63 from ids[:64], the rest from the last 64 tokens
    first = _full_nll(tiny, ids[:window]).sum()
    tail = ids[len(ids) - window:]
    second = _full_nll(tiny, tail)[window - 1 - (len(ids) - window):].sum()
    assert window < len(ids) <= window + stride
    result = perplexity(tiny, text, window=window, stride=stride)
    assert result.tokens == len(ids) - 1
    assert result.nll == pytest.approx(((first + second) / (len(ids) - 1)).item(), rel=1e-5)


@pytest.mark.parametrize(("output", "answers", "expected"), [
    (" Paris.", ["Paris"], True),
    ("PARIS! It is lovely", ["paris"], True),
    ("the Moon", ["Moon"], True),
    ("Colón", ["Colon"], True),
    ("Au (gold)", ["Au"], True),
    ("twenty-four hours", ["Twenty-four", "24"], True),
    ("twenty one", ["Twenty-four"], False),
    ("The capital of France is Paris.", ["Paris"], False),  # the first word decides
    ("", ["Paris"], False),
    ("...", ["Paris"], False),
])
def test_exact_match_normalisation(output, answers, expected):
    assert is_correct(output, answers) is expected


def test_the_question_file_is_valid():
    questions = read_questions()
    assert len(questions) >= 100
    assert len({q.question for q in questions}) == len(questions) == len({q.id for q in questions})
    for q in questions:
        assert q.question.endswith("?") and q.cloze.strip() == q.cloze != ""
        assert all(len(words(answer)) == 1 for answer in q.answers)
        assert is_correct(q.context.removeprefix(q.cloze), q.answers)  # the passage states the first answer
    assert len({q.category for q in questions}) >= 10


def test_batched_greedy_with_a_shared_prefix_equals_plain_greedy(tiny):
    prompts = [prompt_ids(tiny, q, open_book=i % 2 == 1) for i, q in enumerate(read_questions()[:6])]
    shared = _shared_prefix(tiny, prompts)
    assert 0 < len(shared.ids) < min(map(len, prompts))
    reference = [[t for t in row if t not in tiny.eos_token_ids] for row in greedy_answers(tiny, prompts, 5)]
    assert greedy_batch(tiny, shared, prompts, 5) == reference
    score = exact_match(tiny, read_questions()[:6], batch_size=4)
    assert len(score.outputs) == 6 and 0 <= score.accuracy <= 1


def test_variant_short_names():
    assert bench_variants.variant_spec("int4-g32").group_size == 32
    assert bench_variants.variant_spec("int8").quantize == "int8"
    assert bench_variants.variant_spec("wanda-2:4").pattern == "2:4"
    assert bench_variants.variant_spec("magnitude-25").sparsity == 0.25
    assert bench_variants.variant_spec("smollm2-135m-instruct~wanda-50") is None  # a saved variant's name


def test_bench_variants_end_to_end(tiny, capsys):
    rows = bench_variants.main(tiny, ["int8", "magnitude-2:4"], questions=read_questions()[:4], text=TEXT[:400])
    assert [row.name for row in rows] == ["tiny-random-llama", "tiny-random-llama~int8", "tiny-random-llama~magnitude-2of4"]
    base, int8, pruned = rows
    assert int8.ppl == pytest.approx(base.ppl, rel=0.05) and abs(pruned.ppl - base.ppl) > 1e-3 * base.ppl
    printed = capsys.readouterr().out
    assert "tiny-random-llama~magnitude-2of4" in printed and "kick" in printed
    assert bench_variants.kick(bench_variants.Row("v", 11.0, 0.4), bench_variants.Row("b", 10.0, 0.5)) == pytest.approx(2.0)
