"""A model variant decoded beside its base (decoder variant_compare): the base against itself, every per-step number
against a cache-free recomputation on two tiny models, greedy and sampling against the variant alone, the refusals,
the figures and their place in the views, and two free-running runs of different models side by side in Compare."""

from __future__ import annotations

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.events import DecoderMetric, VariantStep
from engine.models.tiny import build_tiny, build_tokenizer
from tests.helpers import (
    HOSTILE_TOKENS,
    assert_escaped,
    by_name,
    fig_strings,
    make_trace,
)
from ui.figures.compare import (
    aligned_tokens_html,
    cost_table,
    divergence_figure,
    run_labels,
)
from ui.figures.methods import method_figures
from ui.figures.variants import NO_VARIANT, variant_entropy_figure, variant_kl_figure

PROMPT = "The quick brown fox"
TOKENS = 10
VARIANT = "tiny-random-llama:seed=3"  # same tokenizer and shape as tiny-random-llama, other weights


def _run(model, variant: str, tokens: int = TOKENS, **params):
    settings = RunSettings(max_new_tokens=tokens, ignore_eos=True, seed=params.pop("seed", 0))
    return record(model, "variant_compare", PROMPT, {"variant": variant, **params}, settings)


def _steps(trace) -> list[VariantStep]:
    return [e for e in trace.events if isinstance(e, VariantStep)]


@pytest.fixture(scope="module")
def base():
    return load_model("tiny-random-llama")


@pytest.fixture(scope="module")
def compared(base):
    """A greedy run of the seed-3 variant beside the base."""
    trace = _run(base, VARIANT)
    assert trace.status == "finished", trace.reason
    return trace


def test_the_base_itself_has_kl_0_and_agrees_everywhere(base):
    trace = _run(base, "")
    plain = record(base, "greedy", PROMPT, settings=RunSettings(max_new_tokens=TOKENS, ignore_eos=True))
    steps = _steps(trace)
    assert trace.output_token_ids == plain.output_token_ids
    assert [s.step for s in steps] == list(range(TOKENS))
    assert all(s.kl == 0.0 and s.top1_agree and s.base_top_rank == 1 and s.token_base_rank == 1 for s in steps)
    assert all(s.base_entropy == s.variant_entropy and s.variant == base.name for s in steps)
    assert (trace.metrics["variant_mean_kl"], trace.metrics["variant_top1_agreement"]) == (0.0, 1.0)
    assert trace.metrics["variant_first_divergence"] == -1


def _rank(logits: torch.Tensor, token: int) -> int:
    """1-based position of ``token`` in the descending sort (random logits: no ties)."""
    return int((torch.argsort(logits, descending=True) == token).nonzero()) + 1


def test_every_step_equals_a_cache_free_recomputation(base, compared):
    variant = load_model(VARIANT)
    sequence = compared.prompt_token_ids + compared.output_token_ids
    start = len(compared.prompt_token_ids) - 1  # the logits that predict output position 0
    with torch.inference_mode():
        rows = {name: model.model(torch.tensor([sequence])).logits[0, start:-1].double()
                for name, model in (("base", base), ("variant", variant))}
    steps = _steps(compared)
    assert len(steps) == TOKENS
    kls, divergence = [], -1
    for i, step in enumerate(steps):
        b, v = rows["base"][i], rows["variant"][i]
        p, logp, logq = b.softmax(-1), b.log_softmax(-1), v.log_softmax(-1)
        kl = float((p * (logp - logq)).sum())
        token = compared.output_token_ids[i]
        kls.append(kl)
        assert step.kl == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert (step.base_top, step.variant_top) == (int(b.argmax()), int(v.argmax()))
        assert step.top1_agree == (step.base_top == step.variant_top)
        assert step.base_top_rank == _rank(v, int(b.argmax()))
        assert step.token_base_rank == _rank(b, token)
        assert step.token_base_logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert step.base_entropy == pytest.approx(float(-(p * logp).sum()), abs=1e-4)
        assert step.variant_entropy == pytest.approx(float(-(logq.exp() * logq).sum()), abs=1e-4)
        if divergence < 0 and int(b.argmax()) != token:
            divergence = i
    assert max(kls) > 0.1  # two unrelated random models: the comparison has something to measure
    metrics = compared.metrics
    assert metrics["variant_mean_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert metrics["variant_top1_agreement"] == pytest.approx(sum(s.top1_agree for s in steps) / TOKENS)
    assert metrics["variant_first_divergence"] == divergence
    assert {e.name for e in compared.events if isinstance(e, DecoderMetric)} >= {"variant_mean_kl"}
    assert compared.metrics["model_calls"] == 2 * TOKENS  # one variant and one base forward a step


def test_greedy_equals_plain_greedy_of_the_variant(compared):
    alone = record(load_model(VARIANT), "greedy", PROMPT, settings=RunSettings(max_new_tokens=TOKENS, ignore_eos=True))
    assert compared.output_token_ids == alone.output_token_ids


def test_sampling_draws_what_the_variant_alone_draws(base):
    settings = RunSettings(max_new_tokens=TOKENS, ignore_eos=True, seed=7)
    alone = record(load_model(VARIANT), "sample", PROMPT, {"temperature": 1.5}, settings)
    trace = _run(base, VARIANT, temperature=1.5, seed=7)
    assert trace.output_token_ids == alone.output_token_ids
    assert trace.output_token_ids != _run(base, VARIANT, temperature=1.5, seed=8).output_token_ids


def test_a_variant_of_another_vocabulary_is_refused(base):
    trace = _run(base, "tiny-random-llava")
    assert trace.status == "failed"
    assert "variant 'tiny-random-llava' has a vocabulary of 315" in trace.reason and "tokenizer" in trace.reason


def test_a_variant_with_another_tokenizer_of_the_same_size_is_refused(base, tmp_path):
    model, tokenizer = build_tiny("tiny-random-llama", seed=1)
    vocab = build_tokenizer().get_vocab()
    swapped = {token: len(vocab) + 2 - i if i >= 3 else i for token, i in vocab.items()}  # reversed after specials
    tokenizer.backend_tokenizer.model = type(tokenizer.backend_tokenizer.model)(vocab=swapped, merges=[])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert len(load_model(str(tmp_path)).tokenizer) == len(base.tokenizer)
    trace = _run(base, str(tmp_path))
    assert trace.status == "failed" and "has the target's vocabulary size but another tokenizer" in trace.reason


def test_an_unknown_variant_is_refused(base):
    trace = _run(base, "no-such-model-anywhere")
    assert trace.status == "failed" and "cannot load variant 'no-such-model-anywhere'" in trace.reason


# ---------------------------------------------------------------- figures and views


def test_figures_from_a_recorded_run(compared):
    fig = variant_kl_figure(compared, selected_step=2)
    kl = by_name(fig, "KL(base ‖ variant)")
    assert list(kl.x) == list(range(TOKENS)) and list(kl.y) == [s.kl for s in _steps(compared)]
    assert list(kl.customdata) == list(range(TOKENS))  # a click selects the step
    differ = by_name(fig, "top-1 tokens differ")
    assert list(differ.x) == [s.step for s in _steps(compared) if not s.top1_agree]
    ranks = by_name(fig, "rank of the base's top-1 under the variant")
    assert list(ranks.y) == [s.base_top_rank for s in _steps(compared)]
    shapes = {s.name: s.x0 for s in fig.layout.shapes}
    assert shapes == {"first divergence": compared.metrics["variant_first_divergence"], "selected": 2}
    assert f"variant {VARIANT} vs base tiny-random-llama" in fig.layout.title.text
    entropy = variant_entropy_figure(compared)
    assert list(by_name(entropy, "entropy base").y) == [s.base_entropy for s in _steps(compared)]
    main, side = method_figures(compared, 3)  # the view the Run and Library tabs show for this run
    assert "KL per step" in main.layout.title.text and "Entropy per step" in side.layout.title.text


def test_figures_escape_token_and_model_text():
    hostile = list(HOSTILE_TOKENS)
    events = [VariantStep(step=i, variant="<b>v</b>", kl=0.1 * i, top1_agree=i % 2 == 0, base_top=hostile[i],
                          variant_top=hostile[(i + 1) % 4], base_top_rank=1 + i, token_base_rank=2,
                          token_base_logprob=-1.0, base_entropy=1.0, variant_entropy=1.5) for i in range(4)]
    trace = make_trace(events)
    trace.output_token_ids = hostile
    for fig in (variant_kl_figure(trace), variant_entropy_figure(trace)):
        texts = fig_strings(fig)
        assert_escaped(texts, hostile)
        assert "<b>v</b>" not in "\n".join(texts) and "&lt;b&gt;v&lt;/b&gt;" in fig.layout.title.text
    assert NO_VARIANT in fig_strings(variant_kl_figure(make_trace([])))


# ---------------------------------------------------------------- free-running runs in Compare


def test_compare_shows_a_run_of_the_base_beside_a_run_of_the_variant(base):
    settings = RunSettings(max_new_tokens=TOKENS, ignore_eos=True)
    runs = [record(model, "greedy", PROMPT, settings=settings) for model in (base, load_model(VARIANT))]
    labels = run_labels(runs)
    assert labels[0].startswith("tiny-random-llama greedy") and labels[1].startswith(f"{VARIANT} greedy")
    assert [row["model"] for row in cost_table(runs)] == ["tiny-random-llama", VARIANT]
    html = aligned_tokens_html(runs)
    assert "first divergence at position" in html and "the prompts differ" not in html
    fig = divergence_figure(runs)
    assert len(fig.data) == 2 and all(len(t.x) for t in fig.data)
