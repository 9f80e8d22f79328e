"""Superposed decoding against an independent, cache-free re-implementation, greedy decoding, and n-gram counts."""

from __future__ import annotations

import math

import pytest
import torch

from engine import RunSettings, record
from engine.decoders.speculative.aded import corpus_table, trigram_table
from engine.events import DecoderMetric, Output, SuperposedStep
from engine.ngram import CORPUS, NgramModel, corpus_documents
from engine.trace import dumps, loads
from ui.figures.superposed import candidates_figure, drafts_figure

PROMPTS = ["The quick brown fox", "Entropy is", "1 2 3 4"]
WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)


def _steps(trace) -> list[SuperposedStep]:
    return [e for e in trace.events if isinstance(e, SuperposedStep)]


# ---------------------------------------------------------------- the n-gram model


def test_ngram_counts_on_a_toy_corpus():
    model = NgramModel([[1, 2, 3, 1, 2, 4], [5, 1, 2, 3]])
    assert model.prob(2, [9, 1], 2) == 1.0  # 1 -> 2 three times
    assert model.prob(3, [1, 2], 3) == pytest.approx(2 / 3) and model.prob(3, [1, 2], 4) == pytest.approx(1 / 3)
    assert model.prob(3, [1, 2], 7) == 0.0  # seen context, unseen continuation
    assert model.prob(3, [2, 2], 3) is None  # unseen context
    assert model.prob(4, [5, 1, 2], 3) == 1.0 and model.prob(6, [1, 2], 3) is None  # context too short
    assert model.prob(6, [2, 3, 1, 2, 4][:5], 4) is None and model.prob(5, [3, 1, 2, 4], 1) is None
    assert model.prob(5, [2, 3, 1, 2], 4) == 1.0  # the one 5-gram of the first document
    # after 2: 3, 4, 3; after 1 2: 3, 4, 3; after 3 1 2: 4 (once); no 5- or 6-gram context
    assert model.mixture([3, 1, 2], [3, 4], WEIGHTS) == pytest.approx([(0.01 + 0.04) * 2 / 3, (0.01 + 0.04) / 3 + 0.15])


def test_corpus_loader_is_shared_with_aded(llama):
    paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    documents = corpus_documents(llama.name, llama.vocab_size, llama.tokenizer)
    assert len(documents) == len(paragraphs) > 10
    assert documents[3] == llama.tokenizer.encode(paragraphs[3], add_special_tokens=False)
    assert corpus_table(llama.name, llama.vocab_size, llama.tokenizer) == trigram_table(documents)


# ---------------------------------------------------------------- against independent computations


@pytest.mark.parametrize("prompt", PROMPTS)
def test_one_draft_without_ngrams_is_greedy(llama, gemma, prompt):
    for model, length in ((llama, 12), (gemma, 40)):  # gemma: past its sliding window, through its scaled embedding
        settings = RunSettings(max_new_tokens=length, ignore_eos=True)
        greedy = record(model, "greedy", prompt, settings=settings)
        superposed = record(model, "superposed", prompt, {"n_drafts": 1, "alpha": 0.0}, settings)
        assert superposed.output_token_ids == greedy.output_token_ids
        assert superposed.metrics["model_calls"] == length


def _reference(model, prompt: list[int], documents: list[list[int]], k: int, m: int, alpha: float, temp: float,
               steps: int) -> list[tuple[list[tuple[int, float, float, float]], list[int]]]:
    """Superposed decoding recomputed: full forwards over [prompt embeddings | mixtures] (no cache), float64 scores,
    n-gram probabilities by scanning the documents. Per step: (token, score, LM log p, n-gram log p) draft-major,
    and the kept candidate indices."""
    embed = model.model.get_input_embeddings()

    def ngram_prob(context: list[int], n: int, token: int) -> float | None:
        key = context[len(context) - n + 1 :]
        if len(key) < n - 1:
            return None
        follows = [doc[i + n - 1] for doc in documents for i in range(len(doc) - n + 1) if doc[i : i + n - 1] == key]
        return follows.count(token) / len(follows) if follows else None

    drafts: list[tuple[list[int], float]] = [([], 0.0)]
    mixtures: list[torch.Tensor] = []
    result = []
    with torch.inference_mode():
        for _ in range(steps):
            inputs = torch.cat([embed(torch.tensor(prompt)), *mixtures])[None]
            p = torch.softmax(model.model(inputs_embeds=inputs).logits[0, -1].double() / temp, -1)
            top = p.topk(m)
            lm = (top.values / top.values.sum()).log().tolist()
            candidates = []
            for tokens, score in drafts:
                mixed = []
                for v in top.indices.tolist():
                    probs = [ngram_prob(prompt + tokens, n, v) for n in range(2, 7)]
                    mixed.append(sum(w * q for w, q in zip(WEIGHTS, probs) if q is not None))
                ng = [math.log(q) if q > 0 else -math.inf for q in mixed]
                supported = any(q > 0 for q in mixed)
                for v, a, b in zip(top.indices.tolist(), lm, ng):
                    s = (1 - alpha) * a + alpha * b if supported else (1 - alpha) * a - 200
                    candidates.append((v, score + s, a, b))
            finite = [i for i in range(len(candidates)) if candidates[i][1] > -math.inf]
            kept = sorted(finite, key=lambda i: -candidates[i][1])[:k]
            drafts = [(drafts[i // m][0] + [candidates[i][0]], candidates[i][1]) for i in kept]
            weights = torch.softmax(torch.tensor([s for _, s in drafts], dtype=torch.float64), 0)
            last = embed(torch.tensor([tokens[-1] for tokens, _ in drafts]))
            mixtures.append((weights.float()[:, None] * last).sum(0, keepdim=True))
            result.append((candidates, kept))
    return result


@pytest.mark.parametrize(
    "params,branch",
    [
        ({"n_token_sample": 5, "temperature": 0.5, "ngram_source": "corpus"}, "penalty"),
        ({"n_token_sample": 314, "temperature": 1.0, "ngram_source": "prompt"}, "interpolated"),  # 314 = the vocabulary
    ],
)
def test_candidate_scores_recomputed_directly(llama, params, branch):
    prompt = "the cat the cat the cat the"
    params = {"n_drafts": 2, "alpha": 0.54, **params}
    trace = record(llama, "superposed", prompt, params, RunSettings(max_new_tokens=3, ignore_eos=True))
    documents = [trace.prompt_token_ids]
    if params["ngram_source"] == "corpus":
        documents = corpus_documents(llama.name, llama.vocab_size, llama.tokenizer)
    expected = _reference(llama, trace.prompt_token_ids, documents, 2, params["n_token_sample"], 0.54,
                          params["temperature"], steps=3)
    steps = _steps(trace)
    assert len(steps) == 3
    branches = set()  # per draft: some kept token has n-gram support (interpolated), or none has (penalty)
    for step, (candidates, kept) in zip(steps, expected):
        assert [c.token_id for c in step.candidates] == [v for v, *_ in candidates]
        for c, (_, score, lm, ng) in zip(step.candidates, candidates):
            assert c.score == pytest.approx(score, rel=1e-5, abs=2e-3)
            assert c.parts[0] == pytest.approx(lm, rel=1e-5, abs=1e-4)
            assert c.parts[1] == pytest.approx(ng, rel=1e-5, abs=1e-5)
        assert step.kept == kept and step.finished == []
        assert sum(d.parts[0] for d in step.drafts) == pytest.approx(1.0, abs=1e-6)
        m = params["n_token_sample"]
        for d in range(len(step.drafts)):
            block = step.candidates[d * m : (d + 1) * m]
            branches.add("interpolated" if any(math.isfinite(c.parts[1]) for c in block) else "penalty")
    assert branch in branches
    # the answer is the best final draft, each final draft's score filed as a metric
    final = [(steps[-1].candidates[i].score, i) for i in steps[-1].kept]
    output = next(e for e in trace.events if isinstance(e, Output))
    assert output.score == max(final)[0] and len(output.token_ids) == 3
    assert [e.value for e in trace.events if isinstance(e, DecoderMetric)] == sorted((s for s, _ in final), reverse=True)


def test_eos_candidates_enter_the_finished_pool_and_end_the_search(llama):
    """With every token counted as EOS except a few, ended drafts go to the pool and the best one is the answer."""
    greedy = record(llama, "greedy", PROMPTS[0], settings=RunSettings(max_new_tokens=1, ignore_eos=True))
    eos = greedy.output_token_ids[0]
    llama.model.generation_config.eos_token_id = eos
    try:
        trace = record(llama, "superposed", PROMPTS[0], {"alpha": 0.0}, RunSettings(max_new_tokens=10))
    finally:
        llama.model.generation_config.eos_token_id = llama.tokenizer.eos_token_id
    first = _steps(trace)[0]
    assert [first.candidates[i].token_id for i in first.finished] == [eos]
    assert eos not in [first.candidates[i].token_id for i in first.kept] and len(first.kept) == 3
    # alpha = 0 and the most likely first token ends the answer: no live draft can score higher, so it stops there
    assert len(_steps(trace)) == 1 and trace.output_token_ids == [eos]


def test_bad_parameters_fail_clearly(llama):
    trace = record(llama, "superposed", "Hi", {"n_drafts": 4, "n_token_sample": 2}, RunSettings(max_new_tokens=2))
    assert trace.status == "failed" and "n_token_sample must be >= n_drafts" in trace.reason


def test_figures_escape_token_text(llama):
    trace = record(llama, "superposed", PROMPTS[1], {}, RunSettings(max_new_tokens=5, ignore_eos=True))
    assert loads(dumps(trace)).events == trace.events  # -inf n-gram parts survive the JSON form
    step = _steps(trace)[2]
    hostile = step.candidates[step.kept[0]].token_id
    trace.vocab[hostile] = "<img src=x onerror=alert(1)>"
    for fig in (drafts_figure(trace), candidates_figure(trace, 2)):
        text = fig.to_json()
        assert "<img" not in text and "&lt;img" in text
    heat = candidates_figure(trace, 2).data[0]
    assert len(heat.y) == len(step.drafts) and len(heat.x) == 9  # drafts x k^2 kept tokens
    assert "No superposed step 99" in candidates_figure(trace, 99).layout.annotations[0].text


@pytest.mark.real_model
def test_superposed_on_smollm2(smollm2):
    trace = record(smollm2, "superposed", "List three primary colors.", {}, RunSettings(max_new_tokens=12, chat=True))
    steps = _steps(trace)
    assert trace.status == "finished" and 1 <= len(steps) <= 12
    assert trace.metrics["model_calls"] == len(steps)
    final = {tuple(d.tokens) for d in steps[-1].drafts}
    assert len(final) == len(steps[-1].drafts)  # distinct drafts
    assert trace.output_text.strip()
