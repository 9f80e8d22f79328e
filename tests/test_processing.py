"""engine.processing against transformers' logits processors: same kept sets, same distributions."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopHLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.events import StageReport
from engine.processing import OFF_VALUES, PIPELINE_ORDER, STAGE_PARAMS, Stage, build_pipeline, entropy, process, sample, stage_reports

NEG_INF = float("-inf")

HF = {
    "repetition_penalty": RepetitionPenaltyLogitsProcessor,
    "temperature": TemperatureLogitsWarper,
    "top_h": TopHLogitsWarper,
    "top_k": lambda v: TopKLogitsWarper(int(v)),
    "top_p": TopPLogitsWarper,
    "min_p": MinPLogitsWarper,
    "typical": TypicalLogitsWarper,
    "epsilon": EpsilonLogitsWarper,
    "eta": EtaLogitsWarper,
}

VALUES = {
    "repetition_penalty": [0.5, 1.3, 5.0],
    "temperature": [0.1, 0.7, 2.5],
    "top_h": [0.01, 0.4, 0.9, 1.0],
    "top_k": [1, 2, 7, 50, 2000],
    "top_p": [1e-6, 0.0, 0.3, 0.9, 0.99],
    "min_p": [0.01, 0.1, 0.5, 1.0],
    "typical": [0.01, 0.2, 0.9, 0.999],
    "epsilon": [1e-4, 3e-3, 0.05, 0.5],
    "eta": [1e-4, 3e-3, 0.05, 0.9],
}


def _random(shape: tuple[int, ...], scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _with_neg_inf(x: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    for row in x:
        row[torch.randperm(x.shape[-1], generator=g)[:count]] = NEG_INF
    return x


def _peaked_one_token(batch: int, vocab: int) -> torch.Tensor:
    x = torch.zeros(batch, vocab)
    x[:, 3] = 200.0  # every other token underflows to probability exactly 0
    return x


LOGITS = {
    "randn-1x50": _random((1, 50), 1.0, 0),
    "randn-3x50": _random((3, 50), 3.0, 1),
    "randn-4x1000": _random((4, 1000), 2.0, 2),
    "randn-2x1000-flat": _random((2, 1000), 0.3, 3),
    "ties": torch.randint(0, 4, (3, 50), generator=torch.Generator().manual_seed(4)).float(),
    "ties-1000": torch.randint(-3, 3, (2, 1000), generator=torch.Generator().manual_seed(5)).float() * 0.5,
    "one-token": _peaked_one_token(2, 50),
    "one-token-finite": torch.tensor([[12.0] + [0.0] * 49, [0.0] * 49 + [30.0]]),
    "neg-inf": _with_neg_inf(_random((3, 50), 2.0, 6), 10, 7),
    "neg-inf-1000": _with_neg_inf(_random((2, 1000), 2.0, 8), 400, 9),
    "only-one-finite": _with_neg_inf(_random((2, 50), 1.0, 10), 49, 11),
    "very-peaked": _random((3, 1000), 40.0, 12),
    "uniform-50": torch.zeros(2, 50),
    "uniform-1000": torch.zeros(2, 1000),
}

CONTEXT = torch.tensor([[3, 3, 7, 0, 49, 12, 5], [1, 2, 2, 2, 40, 41, 1500]])  # 1500: outside the vocabulary


def _context(batch: int) -> torch.Tensor:
    return CONTEXT[torch.arange(batch) % 2]


def _hf(processors: list, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return LogitsProcessorList(processors)(context, logits.clone())


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Same surviving entries and the same distribution."""
    assert torch.equal(ours > NEG_INF, theirs > NEG_INF), "kept sets differ"
    torch.testing.assert_close(ours.softmax(-1), theirs.softmax(-1), atol=1e-6, rtol=0)


CASES = [(name, value, key) for name in PIPELINE_ORDER for value in VALUES[name] for key in LOGITS]


@pytest.mark.parametrize("name,value,key", CASES)
def test_stage_matches_transformers(name: str, value: float, key: str) -> None:
    logits = LOGITS[key]
    context = _context(logits.shape[0])
    processed = process(logits, [Stage(name, value)], context_ids=context)
    expected = _hf([HF[name](value)], logits, context)
    _assert_same(processed.logprobs, expected)
    # The logits themselves come out identical: the same arithmetic, not merely the same result.
    assert torch.equal(Stage(name, value).apply(logits, context)[0], expected)


@pytest.mark.parametrize("name", PIPELINE_ORDER)
def test_a_stage_at_its_off_value_passes_the_logits_through(name: str) -> None:
    """As generate() leaves such a warper out (transformers' own TopP at 1.0 would still drop zero-probability
    tokens, and top_k=0 or top_h=0 would not be the identity at all)."""
    logits = LOGITS["one-token"]
    out, threshold = Stage(name, OFF_VALUES[STAGE_PARAMS[name]]).apply(logits, _context(2))
    assert torch.equal(out, logits) and threshold is None


def test_process_accepts_1d() -> None:
    logits = LOGITS["randn-1x50"][0]
    processed = process(logits, [Stage("top_k", 5), Stage("top_p", 0.8)])
    batched = process(logits[None], [Stage("top_k", 5), Stage("top_p", 0.8)])
    assert processed.logprobs.shape == processed.raw_logprobs.shape == (50,)
    assert torch.equal(processed.logprobs, batched.logprobs[0])
    for one, many in zip(processed.stages, batched.stages):
        assert one.keep.shape == (50,) and one.kept_mass.dim() == 0 and one.threshold.dim() == 0
        assert torch.equal(one.keep, many.keep[0]) and torch.equal(one.threshold, many.threshold[0])
    out, threshold = Stage("min_p", 0.1).apply(logits)
    assert out.shape == (50,) and threshold.dim() == 0


def test_repetition_penalty_context_shapes() -> None:
    logits = LOGITS["randn-3x50"]
    shared = torch.tensor([4, 9, 9, 60])
    expected = _hf([RepetitionPenaltyLogitsProcessor(1.5)], logits, shared.expand(3, -1))
    assert torch.equal(process(logits, [Stage("repetition_penalty", 1.5)], shared).logprobs, expected.log_softmax(-1))
    with pytest.raises(ValueError, match="context_ids"):
        process(logits, [Stage("repetition_penalty", 1.5)])


PIPELINES = [
    {"temperature": 0.7, "top_k": 40, "top_p": 0.9},
    {"repetition_penalty": 1.3, "temperature": 1.5, "min_p": 0.05},
    {"temperature": 2.0, "top_h": 0.4},
    {"top_h": 0.6, "top_k": 20, "top_p": 0.95, "min_p": 0.02, "typical_p": 0.9, "epsilon": 3e-4, "eta": 1e-3},
    {"repetition_penalty": 0.8, "temperature": 0.5, "typical_p": 0.5, "eta": 4e-3},
    {"top_k": 3, "epsilon": 0.2},
]


def _key(name: str) -> str:
    return "typical_p" if name == "typical" else name


@pytest.mark.parametrize("params", PIPELINES)
@pytest.mark.parametrize("key", ["randn-4x1000", "randn-3x50", "ties-1000", "neg-inf-1000", "very-peaked"])
def test_pipeline_matches_transformers(params: dict[str, float], key: str) -> None:
    logits = LOGITS[key]
    context = _context(logits.shape[0])
    names = [name for name in PIPELINE_ORDER if _key(name) in params]
    stages = build_pipeline(params)
    assert [s.name for s in stages] == names
    processed = process(logits, stages, context_ids=context)
    _assert_same(processed.logprobs, _hf([HF[name](params[_key(name)]) for name in names], logits, context))
    assert len(processed.stages) == len(stages)
    for before, after in zip(processed.stages, processed.stages[1:]):
        assert not (after.keep & ~before.keep).any(), "keep must be cumulative"


def test_build_pipeline_skips_off_values_and_unknown_keys() -> None:
    params = {
        "repetition_penalty": 1.0, "temperature": 1.0, "top_h": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
        "typical_p": 1.0, "epsilon": 0.0, "eta": 0.0, "max_new_tokens": 20, "seed": 3, "top_p_extra": None,
    }
    assert build_pipeline(params) == []
    assert build_pipeline({"top_k": 50, "temperature": 0.5}) == [Stage("temperature", 0.5), Stage("top_k", 50.0)]
    assert build_pipeline({"temperature": 1.2, "eta": None}) == [Stage("temperature", 1.2)]


@pytest.mark.parametrize(
    "params,message",
    [
        ({"temperature": 0.0}, "temperature=0.0 is below the minimum 0.01"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"top_k": -5}, "top_k"),
        ({"top_k": 2.5}, "top_k expects int"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"typical_p": 0.0}, "typical_p"),
        ({"typical_p": 1.5}, "typical_p"),
        ({"top_h": 1.5}, "top_h"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"eta": -0.5}, "eta"),
        ({"top_k": "many"}, "top_k"),
    ],
)
def test_build_pipeline_rejects_invalid_values(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_pipeline(params)


def test_unknown_stage_name() -> None:
    with pytest.raises(ValueError, match="unknown processing stage"):
        Stage("top_q", 0.5)


def test_stage_reports_on_a_hand_made_example() -> None:
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]])
    stages = [Stage("temperature", 1.0), Stage("top_k", 4), Stage("top_p", 0.8)]
    processed = process(probs.log(), stages)
    # Row 0, top_k=4 drops token 4 (mass 0.95, 4th prob 0.1); top_p=0.8 on [.5,.2,.15,.1]/.95 drops token 3
    # (cumsum from below: 0.105 <= 0.2), leaving mass 0.85/0.95 and least kept prob 0.15/0.95.
    reports = stage_reports(processed, [0, 3, 2, 4])
    assert reports == [
        StageReport("temperature", 5, pytest.approx(1.0, abs=1e-6), 0b1111, None),
        StageReport("top_k", 4, pytest.approx(0.95, abs=1e-6), 0b0111, pytest.approx(0.1, abs=1e-6)),
        StageReport("top_p", 3, pytest.approx(0.85 / 0.95, abs=1e-6), 0b0101, pytest.approx(0.15 / 0.95, abs=1e-6)),
    ]
    # Row 1 is row 0 reversed; candidates listed from token 4 down, so the dropped tokens 0, 1 are bits 4, 3.
    assert [r.survivors for r in stage_reports(processed, [4, 3, 2, 1, 0], row=1)] == [0b11111, 0b01111, 0b00111]
    assert [r.kept for r in stage_reports(processed, [], row=1)] == [5, 4, 3]
    single = stage_reports(process(probs[0].log(), stages), [0, 3, 2, 4])
    assert single == reports


def test_thresholds_and_kept_mass() -> None:
    logits = LOGITS["randn-3x50"]
    p = logits.softmax(-1)
    h = torch.distributions.Categorical(logits=logits).entropy()
    top = logits.topk(50).values
    expected = {
        "top_k": (7, top[:, 6].sub(logits.logsumexp(-1)).exp()),
        "min_p": (0.1, 0.1 * p.amax(-1)),
        "epsilon": (0.01, torch.full((3,), 0.01)),
        "eta": (0.05, torch.minimum(torch.tensor(0.05), math.sqrt(0.05) * (-h).exp())),
        "top_h": (0.4, 0.4 * torch.distributions.Categorical(logits=top).entropy()),
    }
    for name, (value, threshold) in expected.items():
        (result,) = process(logits, [Stage(name, value)]).stages
        torch.testing.assert_close(result.threshold, threshold, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.kept_mass, (p * result.keep).sum(-1))
    (top_p,) = process(logits, [Stage("top_p", 0.7)]).stages
    torch.testing.assert_close(top_p.threshold, p.masked_fill(~top_p.keep, 1).amin(-1))
    assert ((top_p.kept_mass >= 0.7) & ((top_p.kept_mass - top_p.threshold) < 0.7)).all()  # smallest such set
    (typical,) = process(logits, [Stage("typical", 0.5)]).stages
    deviation = (-p.log() - h[:, None]).abs()
    torch.testing.assert_close(typical.threshold, deviation.masked_fill(~typical.keep, 0).amax(-1), atol=1e-5, rtol=0)
    assert (deviation.masked_fill(typical.keep, math.inf).amin(-1) > typical.threshold).all()


def test_entropy_matches_categorical() -> None:
    for key in ["randn-4x1000", "neg-inf", "only-one-finite", "one-token", "uniform-1000", "very-peaked"]:
        logits = LOGITS[key]
        expected = torch.distributions.Categorical(logits=logits).entropy()
        torch.testing.assert_close(entropy(logits), expected, atol=1e-6, rtol=1e-6)
        # Renormalising in float32 moves large-|logp| terms by an ulp: Categorical itself shifts ~3e-6 here.
        torch.testing.assert_close(entropy(logits.log_softmax(-1)), expected, atol=1e-6, rtol=1e-5)
    assert entropy(LOGITS["uniform-50"][0]).item() == pytest.approx(math.log(50), abs=1e-5)
    assert entropy(LOGITS["only-one-finite"]).tolist() == [0.0, 0.0]


def test_sample_repeats_with_a_seed() -> None:
    logprobs = process(LOGITS["randn-4x1000"], [Stage("top_p", 0.9)]).logprobs
    draws = [sample(logprobs, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0].shape == (4,) and torch.equal(draws[0], draws[1])
    single = sample(logprobs[0], torch.Generator().manual_seed(7))
    assert single.dim() == 0


def test_sample_frequencies_match_the_processed_distribution() -> None:
    stages = [Stage("temperature", 1.5), Stage("top_k", 30), Stage("min_p", 0.02)]
    logprobs = process(LOGITS["randn-3x50"][1], stages).logprobs
    n = 20_000
    draws = sample(logprobs.expand(n, -1), torch.Generator().manual_seed(123))
    assert (logprobs[draws] > NEG_INF).all(), "drew a removed token"
    observed = torch.bincount(draws, minlength=logprobs.shape[0]).double()
    expected = logprobs.double().exp() * n
    alive = torch.nonzero(logprobs > NEG_INF)[:, 0]
    observed, expected = observed[alive], expected[alive]
    # Merge cells with expected < 5 into one, so the chi-square approximation holds.
    small = expected < 5
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 0.001
