"""Cross-passage attention (REFRAG's block-diagonal premise): the passages found in a marked prompt, the shares
read from the recorded attention maps against an independent eager forward, a stored trace's replay, and the
figure's escaping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.attention import AttentionCapture
from engine.events import PromptPassages
from engine.models.tiny import build_tiny
from engine.prompt_spans import prompt_passages
from engine.run import RunSettings, record
from storage import TraceStore
from ui.figures.passages import (
    PARTS,
    has_passage_attention,
    passage_attention,
    passages_figure,
)

PASSAGES = ("Passage 1: The fox lives in the old mill by the river.\n"
            "Passage 2: Paris is the capital of France and sits on the Seine.\n"
            "Passage 3: Water boils at one hundred degrees.\n")
PROMPT = PASSAGES + "Question: where does the fox live?"
TOKENS = 3


def _run(model, prompt: str = PROMPT, chat: bool = False, **capture):
    settings = RunSettings(max_new_tokens=TOKENS, chat=chat, attention=AttentionCapture(layers="all", **capture))
    return record(model, "greedy", prompt, settings=settings)


@pytest.fixture(scope="module")
def marked(llama):
    return _run(llama)


@pytest.mark.parametrize("chat", [False, True])
def test_the_passages_and_the_question_are_found_at_their_markers(llama, chat):
    ids = llama.encode("Read every Passage below.\n" + PROMPT, chat=chat)  # "Passage" inside a line marks nothing
    found = prompt_passages(llama, ids, "Passage", "Question:")
    texts = [llama.tokenizer.decode(ids[a:b]) for a, b in found.passages]
    assert texts == [line + "\n" for line in PASSAGES.splitlines()]
    assert llama.tokenizer.decode(ids[slice(*found.question)]) == "Question: where does the fox live?"
    assert prompt_passages(llama, ids, "", "Question:") is None  # an empty marker turns it off


def test_a_prompt_without_marks_records_no_passages_and_says_how_to_mark_them(llama):
    trace = _run(llama, prompt="Tell me about the fox and the mill.")
    assert not any(isinstance(e, PromptPassages) for e in trace.events)
    assert not has_passage_attention(trace) and passage_attention(trace) is None
    message = passages_figure(trace, 0).layout.annotations[0].text
    assert "no marked passages" in message and "Question:" in message


def test_shares_equal_a_direct_computation_from_eager_attention(marked):
    data = passage_attention(marked)
    event = next(e for e in marked.events if isinstance(e, PromptPassages))
    assert event.passages == data.passages.passages and len(event.passages) == 3
    eager, _ = build_tiny("tiny-random-llama", attn_implementation="eager")  # same seed, same weights
    ids = marked.prompt_token_ids + marked.output_token_ids[: TOKENS - 1]
    with torch.inference_mode():
        attentions = eager(torch.tensor([ids]), output_attentions=True).attentions
    weights = torch.stack([a[0].mean(dim=0) for a in attentions]).double().numpy()  # [layers, queries, keys]
    n = len(marked.prompt_token_ids)
    spans = [slice(a, b) for a, b in event.passages]
    question = slice(*event.question)
    assert data.steps == list(range(TOKENS)) and data.layers == list(range(weights.shape[0]))
    for step in range(TOKENS):
        for layer in range(weights.shape[0]):
            row = weights[layer, n - 1 + step, : n + step]  # the query that chose output `step`
            on = np.array([row[s].sum() for s in spans])
            top = int(on.argmax())
            rest = row[:n].sum() - on.sum() - row[question].sum()
            expected = [on[top], on.sum() - on[top], row[question].sum(), rest, row[n:].sum()]
            np.testing.assert_allclose(data.parts[step, layer], expected, atol=3e-3)
            assert data.top[step, layer] == top
            assert data.within[step, layer] == pytest.approx(on[top] / on.sum(), abs=5e-3)
    for layer in range(weights.shape[0]):
        for i, own in enumerate(spans):
            shares = np.array([[weights[layer, t, s].sum() for s in spans] for t in range(own.start, own.stop)])
            shares /= shares.sum(axis=1, keepdims=True)
            np.testing.assert_allclose(data.block[layer, i], shares.mean(axis=0), atol=3e-3)
        later = [weights[layer, t, spans[i]].sum() / sum(weights[layer, t, s].sum() for s in spans)
                 for i in (1, 2) for t in range(spans[i].start, spans[i].stop)]
        assert data.within_prefill[layer] == pytest.approx(np.mean(later), abs=3e-3)


def test_shares_sum_to_one_and_the_uniform_baseline_counts_visible_tokens(marked):
    data = passage_attention(marked)
    np.testing.assert_allclose(data.parts.sum(axis=-1), 1, atol=1e-5)
    np.testing.assert_allclose(data.block.sum(axis=-1), 1, atol=1e-5)
    assert np.all(data.block[:, 0, 1:] == 0)  # causal: the first passage sees no other
    assert np.all(np.triu(data.block[:, :, :], k=1) == 0)
    (a1, b1), (a2, b2), (a3, b3) = data.passages.passages
    uniform = [k / (b1 - a1 + k) for k in range(1, b2 - a2 + 1)] + [k / (b1 - a1 + b2 - a2 + k)
                                                                     for k in range(1, b3 - a3 + 1)]
    assert data.uniform_prefill == pytest.approx(np.mean(uniform))


def test_a_stored_trace_replays_the_same_figure(marked, tmp_path):
    store = TraceStore(f"sqlite:///{tmp_path / 'runs.db'}")
    replayed = store.load(store.save(marked))
    for step in range(TOKENS):
        assert passages_figure(replayed, step).to_dict() == passages_figure(marked, step).to_dict()
    bars = [t for t in passages_figure(replayed, 1).data if t.type == "bar"]
    assert [t.name for t in bars] == list(PARTS)
    with pytest.raises(ValueError, match="out of range"):  # the tiny model keeps layers 0 and 1
        passages_figure(replayed, 0, layer_index=2)


def test_the_figure_escapes_passage_text(llama):
    hostile = "Passage 1: <img src=x onerror=alert(1)> & co.\nPassage 2: plain.\nQuestion: what?"
    figure = json.dumps(passages_figure(_run(llama, prompt=hostile), 0).to_dict())
    assert "<img" not in figure and "&lt;img src=x onerror=alert(1)&gt; &amp; co." in figure


def test_the_token_views_show_it_only_for_marked_prompts(llama, marked):
    from ui.views import view_values

    extra = 5  # the full-width panel below the attention map
    assert view_values(marked, 1, "probability")[extra]["visible"] is True
    plain = _run(llama, prompt="Tell me about the fox and the mill.")
    assert view_values(plain, 1, "probability")[extra]["visible"] is False


RAG_PROMPT = """Answer the question using the passages.
Passage 1: The red fox is a small carnivore found across the Northern Hemisphere. It lives in forests, grasslands and \
towns, and it eats rodents, birds, fruit and insects. Foxes dig dens in the ground, where they raise their cubs in spring.
Passage 2: Paris is the capital of France. It sits on the Seine river and is known for the Eiffel Tower, the Louvre \
museum and its cafes. About two million people live in the city itself.
Passage 3: Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water \
boils at a lower temperature, which makes cooking pasta take longer in the mountains.
Question: Where do red foxes raise their cubs?"""


@pytest.mark.real_model
def test_a_real_model_keeps_passage_attention_block_diagonal(real_model):
    """REFRAG's premise on SmolLM2: a later passage's tokens keep far more of their passage attention in their own
    passage than uniform attention would (measured 64% over layers against 23%, printed for BENCHMARKS-style notes)."""
    settings = RunSettings(max_new_tokens=1, chat=True, attention=AttentionCapture(layers="all"))
    data = passage_attention(record(real_model, "greedy", RAG_PROMPT, settings=settings))
    assert len(data.passages.passages) == 3 and data.block.shape[0] == real_model.num_layers
    within = float(np.mean(data.within_prefill))
    print(f"prefill own-passage share {within:.3f} (layers averaged), uniform {data.uniform_prefill:.3f}")
    assert within > 2 * data.uniform_prefill
