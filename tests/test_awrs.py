"""AWRS / token masking / SMC against independent computations: constraint satisfaction, the exact constrained
distribution by enumeration, unbiased weights, resampling bookkeeping, errors, JSON shapes, and the figures."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import plotly.graph_objects as go
import pytest
import regex
import torch
from scipy.stats import chi2_contingency, chisquare

from engine import RunSettings, record
from engine.constraints import PredicateConstraint, build_constraint, json_shape_pattern
from engine.decoders import DecodeContext, get_decoder
from engine.decoders.token.awrs import awrs_draw, constrained_decode
from engine.event_arrays import effective_sample_size
from engine.events import ConstraintStep, DecoderMetric, Output, Resampling
from engine.params import ParamError
from engine.trace import RunInfo, Trace
from ui.figures.constraint import checks_figure, step_tries, tries_figure, weight_history, weights_figure

PROMPT = "Hello"
SMALL = "(ab|ba|aa|b|bbb)"  # a handful of complete strings, all spelt with the byte tokens "a" and "b"


def _context(model, params: dict, max_new_tokens: int, seed: int = 0, particles: int | None = None) -> DecodeContext:
    """A context for the decoder called directly; ``particles`` may exceed the UI's maximum (a test's sample size)."""
    params = get_decoder("awrs").validate(params)
    params["particles"] = particles or params["particles"]
    return DecodeContext(
        model=model, prompt_ids=model.encode(PROMPT), params=params,
        max_new_tokens=max_new_tokens, eos_token_ids=model.eos_token_ids, generator=torch.Generator().manual_seed(seed),
    )


def _particle_outputs(events) -> tuple[list[tuple[int, ...]], list[float]]:
    """Each particle's accepted tokens and final log-weight (runs without resampling)."""
    steps = [e for e in events if isinstance(e, ConstraintStep)]
    n = max(e.particle for e in steps) + 1
    tokens: list[list[int]] = [[] for _ in range(n)]
    log_w = [0.0] * n
    for e in steps:
        tokens[e.particle].append(e.accepted)
        log_w[e.particle] = e.log_weight
    return [tuple(t) for t in tokens], log_w


# ---------------------------------------------------------------- exact enumeration (independent of the decoder)


def _enumerate(model, pattern: str, temperature: float, max_len: int) -> dict[tuple[int, ...], tuple[float, float]]:
    """Every allowed token sequence ending in EOS -> (locally normalised probability, joint p(seq)).

    Full forwards through the HF model (no cache), softmax(logits / T), the regex applied to the decoded text."""
    compiled = regex.compile(pattern)
    eos = next(iter(model.eos_token_ids))
    special = set(model.tokenizer.all_special_ids)
    prompt = model.encode(PROMPT)
    results = {}

    def walk(prefix: list[int], local: float, joint: float) -> None:
        with torch.inference_mode():
            logits = model.model(torch.tensor([prompt + prefix])).logits[0, -1].double()
        p = (logits / temperature).softmax(-1)
        text = model.decode(prefix)
        allowed = {eos} if compiled.fullmatch(text) else set()
        if len(prefix) < max_len:
            for v in range(p.shape[0]):
                if v not in special and compiled.fullmatch(model.decode(prefix + [v]), partial=True):
                    allowed.add(v)
        z = float(sum(p[v] for v in allowed))
        for v in allowed:
            if v == eos:
                results[tuple(prefix + [v])] = (local * float(p[v]) / z, joint * float(p[v]))
            else:
                walk(prefix + [v], local * float(p[v]) / z, joint * float(p[v]))

    walk([], 1.0, 1.0)
    return results


@pytest.fixture(scope="module")
def exact(llama):
    return _enumerate(llama, SMALL, temperature=1.5, max_len=3)


@pytest.fixture(scope="module")
def many(llama):
    """1,000 independent AWRS particles (no resampling) and 300 masked ones on SMALL, one batched run each."""
    runs = {}
    for method, n in (("awrs", 1000), ("mask", 300)):
        ctx = _context(llama, {"constraint": SMALL, "method": method, "ess_threshold": 0.0, "temperature": 1.5},
                       max_new_tokens=4, seed=11, particles=n)
        runs[method] = list(constrained_decode(ctx, build_constraint("regex", SMALL)))
    return runs


def _chisquare(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    keys = sorted(expected)
    counts = Counter(samples)
    assert set(counts) <= set(keys), "a sample outside the allowed set"
    observed = np.array([counts[k] for k in keys], dtype=float)
    probs = np.array([expected[k] for k in keys])
    return chisquare(observed, probs / probs.sum() * observed.sum()).pvalue


def test_enumeration_is_a_real_test(exact):
    assert len(exact) == 5  # ab, ba, aa, b, bbb: each followed by EOS
    local = {k: v[0] for k, v in exact.items()}
    joint = {k: v[1] for k, v in exact.items()}
    assert math.isclose(sum(local.values()), 1.0, rel_tol=1e-9)
    # the locally normalised and the whole-sequence constrained distributions differ noticeably here
    total = sum(joint.values())
    assert max(abs(local[k] - joint[k] / total) for k in local) > 0.05


def test_awrs_samples_follow_the_exact_constrained_distribution(many, exact):
    samples, _ = _particle_outputs(many["awrs"])
    local = {k: v[0] for k, v in exact.items()}
    assert _chisquare(samples, local) > 1e-3
    # the same test rejects wrong rules: the whole-sequence distribution, and argmax of the allowed tokens
    joint = {k: v[1] for k, v in exact.items()}
    assert _chisquare(samples, joint) < 1e-6
    argmax = max(local, key=local.get)
    assert _chisquare([argmax] * len(samples), local) < 1e-6


def test_mask_matches_exact_and_awrs(many, exact):
    masked, log_w = _particle_outputs(many["mask"])
    local = {k: v[0] for k, v in exact.items()}
    assert _chisquare(masked, local) > 1e-3
    awrs_samples, _ = _particle_outputs(many["awrs"])
    keys = sorted(local)
    table = [[Counter(awrs_samples)[k] for k in keys], [Counter(masked)[k] for k in keys]]
    assert chi2_contingency(table).pvalue > 1e-3
    # masking's weight is the exact product of the allowed masses: joint / local, per sequence
    for seq, w in zip(masked, log_w):
        loc, joint = exact[seq]
        assert w == pytest.approx(math.log(joint / loc), abs=2e-5)


def test_awrs_weights_follow_the_recursive_formula(llama, many):
    """Every step's Ẑ, recomputed from the recorded order with the model's own p: Π_rejected (1 - q_i), times q_x
    when the next token in the order is rejected (q = p / mass not yet tried). Unbiasedness: test_z_hat_is_unbiased."""
    compiled, eos, prompt = regex.compile(SMALL), next(iter(llama.eos_token_ids)), llama.encode(PROMPT)
    special = set(llama.tokenizer.all_special_ids)
    probs: dict[tuple[int, ...], torch.Tensor] = {}
    outputs: dict[int, list[int]] = {}
    checked = 0
    for e in (e for e in many["awrs"] if isinstance(e, ConstraintStep)):
        prefix = outputs.setdefault(e.particle, [])
        if e.checks == len(e.proposals):  # every try recorded (the trace keeps 64 rejections)
            if tuple(prefix) not in probs:
                with torch.inference_mode():
                    probs[tuple(prefix)] = (llama.model(torch.tensor([prompt + prefix])).logits[0, -1].double() / 1.5).softmax(-1)
            p = probs[tuple(prefix)]
            split = e.proposals.index(e.accepted)
            z, tried = 1.0, 0.0
            for token in e.proposals[:split]:
                z *= 1 - float(p[token]) / (1 - tried)
                tried += float(p[token])
            q_x = float(p[e.accepted]) / (1 - tried)
            if split + 1 < len(e.proposals):
                y = e.proposals[split + 1]
                text = llama.decode(prefix + ([] if y == eos else [y]))
                y_ok = (bool(compiled.fullmatch(text)) if y == eos
                        else y not in special and bool(compiled.fullmatch(text, partial=True)))
                z *= 1.0 if y_ok else q_x
            assert e.log_weight_increment == pytest.approx(math.log(z), abs=1e-5)
            checked += 1
        prefix.append(e.accepted)
    assert checked > 500


def test_every_sample_satisfies_the_regex(llama):
    pattern = "[ab]{2,4}"
    for seed in range(24):
        method, particles = ("mask", 1) if seed % 6 == 5 else ("awrs", 1 + seed % 3)
        trace = record(llama, "awrs", PROMPT, {"constraint": pattern, "method": method, "particles": particles},
                       RunSettings(max_new_tokens=8, seed=seed))
        assert trace.status == "finished" and trace.reason == "end of sequence"
        assert regex.fullmatch(pattern, trace.output_text), trace.output_text
        assert trace.metrics["constraint_satisfied"] == 1.0
        steps = [e for e in trace.events if isinstance(e, ConstraintStep)]
        assert trace.metrics["constraint_checks"] == sum(e.checks for e in steps)
        assert trace.metrics["model_calls"] == len(steps)


def test_seed_reproduces_the_run(llama):
    def run(seed):
        trace = record(llama, "awrs", PROMPT, {"constraint": "[ab]{2,6}", "particles": 3, "ess_threshold": 0.9},
                       RunSettings(max_new_tokens=8, seed=seed))
        return [(e.step, e.particle, e.proposals, e.accepted, e.checks, e.log_weight) if isinstance(e, ConstraintStep)
                else e for e in trace.events if isinstance(e, (ConstraintStep, Resampling, Output))]

    assert run(5) == run(5)
    assert run(5) != run(6)


# ---------------------------------------------------------------- the estimator on a hand-made p and c


P = [0.45, 0.2, 0.15, 0.1, 0.06, 0.04]


def _exact_expectation(p: list[float], allowed: set[int]) -> float:
    """E[Ẑ] over every order of sampling without replacement, by the recursive AWRS formula."""
    total = 0.0
    for order in itertools.permutations(range(len(p))):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        z, left = 1.0, 1.0
        for k, i in enumerate(order):
            q = p[i] / left
            if i in allowed:
                nxt = order[k + 1] if k + 1 < len(order) else None
                z *= 1.0 if nxt is None or nxt in allowed else q
                break
            z *= 1 - q
            left -= p[i]
        else:
            z = 0.0
        total += prob * z
    return total


@pytest.mark.parametrize("allowed", [{1, 3}, {5}, {0}, {0, 1, 2, 3, 4, 5}, set()])
def test_z_hat_is_unbiased(allowed):
    z = sum(P[i] for i in allowed)
    assert _exact_expectation(P, allowed) == pytest.approx(z, abs=1e-12)  # the formula itself
    logp = torch.tensor(P, dtype=torch.float64).log()
    gen = torch.Generator().manual_seed(3)
    draws = [awrs_draw(logp, lambda t: t in allowed, gen) for _ in range(20000)]
    values = np.exp([d.log_z for d in draws])
    if not allowed:
        assert all(d.token == -1 for d in draws) and not values.any()
        return
    se = values.std() / math.sqrt(len(values))
    assert abs(values.mean() - z) < 4 * se + 1e-12 and se < 0.004
    counts = Counter(d.token for d in draws)
    assert set(counts) <= allowed
    if len(allowed) > 1:
        keys = sorted(allowed)
        assert chisquare([counts[k] for k in keys], [P[k] / z * len(draws) for k in keys]).pvalue > 1e-3
    # one check per rejection, the accepted token, and one more for the weight unless q_x = 1
    for d in draws[:200]:
        assert d.checks == len(d.shown) and d.token in d.shown


@pytest.mark.slow  # a sampling law over many draws
def test_max_rejects_gives_up():
    """With one try allowed, only the orders that start with the allowed token succeed: p(5) of the time."""
    logp = torch.tensor(P, dtype=torch.float64).log()
    gen = torch.Generator().manual_seed(0)
    draws = [awrs_draw(logp, lambda t: t == 5, gen, max_rejects=1) for _ in range(4000)]
    dead = [d for d in draws if d.token == -1]
    assert all(d.checks == 1 and d.log_z == -math.inf for d in dead)
    assert len(draws) - len(dead) == pytest.approx(P[5] * len(draws), abs=4 * math.sqrt(P[5] * len(draws)))


# ---------------------------------------------------------------- SMC bookkeeping


def test_smc_resampling_events_are_consistent(llama):
    seen = 0
    for seed in range(4):
        trace = record(llama, "awrs", PROMPT, {"constraint": "[ab]{2,6}", "particles": 6, "ess_threshold": 0.95},
                       RunSettings(max_new_tokens=8, seed=seed))
        assert trace.status == "finished", trace.reason
        steps, weights, ess = weight_history(trace)
        for event in (e for e in trace.events if isinstance(e, Resampling)):
            seen += 1
            assert len(event.ancestors) == 6 and all(0 <= a < 6 for a in event.ancestors)
            assert all(event.log_weights[a] > -math.inf for a in event.ancestors)
            w = np.exp(np.array(event.log_weights) - max(event.log_weights))
            assert event.ess == pytest.approx(w.sum() ** 2 / (w ** 2).sum(), rel=1e-5)
            assert event.ess < 0.95 * 6
            # the log-weights it resampled are the particles' weights after the step's ConstraintSteps
            i = steps.index(event.step)
            assert [row[i] for row in weights] == pytest.approx(event.log_weights, rel=1e-6)
            assert ess[i] == pytest.approx(event.ess, rel=1e-5)
        assert regex.fullmatch("[ab]{2,6}", trace.output_text)
        metrics = {e.name: e.value for e in trace.events if isinstance(e, DecoderMetric)}
        assert metrics["resamplings"] == sum(isinstance(e, Resampling) for e in trace.events)
    assert seen > 0


def test_effective_sample_size():
    assert effective_sample_size([0.0, 0.0, 0.0, 0.0]) == pytest.approx(4.0)
    assert effective_sample_size([0.0, -math.inf, -math.inf]) == pytest.approx(1.0)
    assert effective_sample_size([math.log(3), 0.0]) == pytest.approx(16 / 10)
    assert effective_sample_size([-math.inf, -math.inf]) == 0.0


# ---------------------------------------------------------------- errors, JSON shapes, predicates


def test_bad_pattern_is_a_clear_error(llama):
    with pytest.raises(ParamError, match="not a valid regular expression"):
        build_constraint("regex", "([ab")
    trace = record(llama, "awrs", PROMPT, {"constraint": "([ab"}, RunSettings(max_new_tokens=4))
    assert trace.status == "failed" and "ParamError" in trace.reason and "regular expression" in trace.reason
    with pytest.raises(ParamError, match="not one of"):
        get_decoder("awrs").validate({"method": "beam"})
    with pytest.raises(ParamError, match="type names"):
        build_constraint("json", '{"a": "str"}')
    with pytest.raises(ParamError, match="must be an object"):
        build_constraint("json", '["integer"]')
    with pytest.raises(ParamError, match="not valid JSON"):
        build_constraint("json", "{name: string}")


def test_json_shape_pattern():
    pattern = regex.compile(json_shape_pattern('{"name": "string", "age": "integer", "tags": ["string"], '
                                               '"pos": {"x": "number", "ok": "boolean"}, "none": "null"}'))
    good = {"name": "Ann \"A\" \\u00e9", "age": -31, "tags": ["a", "b"], "pos": {"x": 1.5e3, "ok": True}, "none": None}
    assert pattern.fullmatch(json.dumps(good))
    assert pattern.fullmatch(json.dumps(good, indent=1))
    assert not pattern.fullmatch(json.dumps({**good, "age": "31"}))
    assert not pattern.fullmatch(json.dumps({**good, "age": 3.5}))
    assert not pattern.fullmatch(json.dumps({"age": -31, **good}))  # keys in the given order
    assert pattern.fullmatch('{"name": "An', partial=True)


def test_json_shape_output_parses(llama):
    for seed in range(3):
        trace = record(llama, "awrs", PROMPT, {"constraint_type": "json", "constraint": '{"n": "integer", "ok": "boolean"}'},
                       RunSettings(max_new_tokens=120, seed=seed))
        assert trace.reason == "end of sequence", trace.output_text
        value = json.loads(trace.output_text)
        assert list(value) == ["n", "ok"]
        assert type(value["n"]) is int and type(value["ok"]) is bool


def test_python_predicate_through_the_api(llama):
    constraint = PredicateConstraint(prefix=lambda t: set(t) <= set("xyz") and len(t) <= 3,
                                     complete=lambda t: len(t) == 3)
    events = list(constrained_decode(_context(llama, {"particles": 2}, max_new_tokens=6, seed=2), constraint))
    output = next(e for e in events if isinstance(e, Output))
    text = llama.decode(output.token_ids)
    assert len(text) == 3 and set(text) <= set("xyz")


# ---------------------------------------------------------------- figures


def _hostile_trace() -> Trace:
    trace = Trace(run_id="x", info=RunInfo(model="m", decoder="awrs", params={}, prompt="p"))
    trace.vocab = {1: "<script>", 2: "ok", 3: "\n", 4: "</s>"}
    trace.events = [
        ConstraintStep(step=0, particle=0, method="awrs", proposals=[1, 3, 2, 1], accepted=2, checks=90,
                       log_weight_increment=-0.5, log_weight=-0.5),
        ConstraintStep(step=0, particle=1, method="awrs", proposals=[2, 3], accepted=2, checks=2,
                       log_weight_increment=0.0, log_weight=0.0),
        Resampling(step=0, ess=1.8, log_weights=[-0.5, 0.0], ancestors=[1, 1]),
        ConstraintStep(step=1, particle=0, method="awrs", proposals=[4], accepted=4, checks=1,
                       log_weight_increment=0.0, log_weight=-0.2),
        ConstraintStep(step=1, particle=1, method="awrs", proposals=[1, 1], accepted=-1, checks=5,
                       log_weight_increment=-math.inf, log_weight=-math.inf),
    ]
    return trace


def test_figures():
    trace = _hostile_trace()
    tries = tries_figure(trace, particle=0)
    assert isinstance(tries, go.Figure)
    text = json.dumps(tries.to_plotly_json(), default=str)
    assert "<script>" not in text and "&lt;script&gt;" in text
    # the traced rejections in order, one cell for the 86 the trace did not keep, the accepted, the weight check
    assert [s for _, s in step_tries(trace.events[0])] == [0, 0, 3, 1, 2]
    assert "+86" in text
    steps, weights, ess = weight_history(trace)
    assert steps == [0, 1]
    assert weights[0] == pytest.approx([-0.5, -0.2]) and weights[1][1] == -math.inf
    assert weights[1][0] == 0.0 and ess[0] == pytest.approx((math.exp(-0.5) + 1) ** 2 / (math.exp(-1) + 1))
    assert isinstance(weights_figure(trace), go.Figure)
    assert isinstance(checks_figure(trace), go.Figure)
    empty = Trace(run_id="y", info=RunInfo(model="m", decoder="greedy", params={}, prompt="p"))
    assert "awrs" in json.dumps(tries_figure(empty).to_plotly_json(), default=str)


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_real_model_regex_and_json(smollm2):
    trace = record(smollm2, "awrs", "Is the sky blue? Answer yes or no.", {"constraint": "(yes|no)"},
                   RunSettings(max_new_tokens=4, seed=0, chat=True))
    assert trace.reason == "end of sequence" and trace.output_text in ("yes", "no")
    shape = '{"name": "string", "age": "integer"}'
    trace = record(smollm2, "awrs", "Write a JSON object for a person called Ann who is 31.",
                   {"constraint_type": "json", "constraint": shape, "particles": 2},
                   RunSettings(max_new_tokens=32, seed=0, chat=True))
    assert trace.reason == "end of sequence", trace.output_text
    value = json.loads(trace.output_text)
    assert list(value) == ["name", "age"] and isinstance(value["name"], str) and type(value["age"]) is int
    assert trace.metrics["checks_per_token"] < 100  # AWRS: a handful of checks, not the 49,152-token vocabulary
