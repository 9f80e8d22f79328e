"""AdaDec and momentum decoding against independent computations, AdaDec's threshold learning, and the rerank
figures (hostile token text included)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from engine import RunSettings, load_model, record
from engine.adadec_threshold import learned_threshold, resolve_threshold
from engine.decoders.token.adadec import look_ahead
from engine.decoders.token.momentum import RESISTANCES, TokenGraph, label_of, momentum_rerank
from engine.events import Rerank, RunFinished, RunStarted, ScoredCandidate, TokenStep
from engine.offline.adadec_fit import (
    CUTOFFS, balanced_split, best_cutoff, fit_logistic, learn, teacher_force, threshold_from, windows,
)
from engine.params import ParamError
from engine.processing import entropy
from engine.recorder import Recorder
from engine.speculative.cache import PrefixCache
from engine.trace import RunInfo, Trace, dumps, loads
from ui.figures.common import CHOSEN_COLOR
from ui.figures.rerank import rerank_at, rerank_figure, rerank_timeline_figure

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def _events(trace: Trace, kind: type) -> list:
    return [e for e in trace.events if isinstance(e, kind)]


# ---------------------------------------------------------------- AdaDec


def test_adadec_with_a_huge_threshold_is_greedy(tiny):
    settings = RunSettings(max_new_tokens=16, ignore_eos=True)
    greedy = record(tiny, "greedy", PROMPT, settings=settings)
    adadec = record(tiny, "adadec", PROMPT, {"threshold": 1000.0}, settings)
    assert adadec.status == "finished"
    assert adadec.output_token_ids == greedy.output_token_ids
    assert not _events(adadec, Rerank)
    assert adadec.metrics["model_calls"] == 16 and adadec.metrics["paused_steps"] == 0


def _full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Next-token log-probs after ``ids`` from a full forward, no cache."""
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def test_adadec_pausing_everywhere_matches_an_independent_rerank(tiny):
    beam, length = 3, 3
    trace = record(tiny, "adadec", PROMPT, {"threshold": 1e-6, "lookahead_beam_size": beam, "lookahead_length": length},
                   RunSettings(max_new_tokens=5, ignore_eos=True))
    reranks, steps = _events(trace, Rerank), _events(trace, TokenStep)
    assert [r.position for r in reranks] == [s.position for s in steps] == list(range(5))
    for rerank, step in zip(reranks, steps):
        context = trace.prompt_token_ids + trace.output_token_ids[: rerank.position]
        logprobs = _full_logprobs(tiny, context)
        assert rerank.value == pytest.approx(float(entropy(logprobs)), abs=1e-4)
        top = torch.topk(logprobs, beam)
        scores = []
        for j, (logp, first) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            ids, rollout = context + [first], []
            for _ in range(length):
                lp = _full_logprobs(tiny, ids)
                ids.append(int(lp.argmax()))
                rollout.append(float(lp.max()))
            scores.append((logp + sum(rollout)) / (length + 1))
            candidate = rerank.candidates[j]
            assert candidate.token_id == first and candidate.tokens == ids[len(context) + 1 :]
            assert candidate.token_scores == pytest.approx(rollout, abs=1e-4)
            assert candidate.score == pytest.approx(scores[-1], abs=1e-4)
            assert candidate.parts == pytest.approx([logp, sum(rollout), length], abs=1e-4)
        best = max(range(beam), key=scores.__getitem__)
        assert rerank.chosen == best and rerank.baseline == 0 and rerank.label == "paused"
        assert step.token_id == top.indices[best] == trace.output_token_ids[rerank.position]
        assert rerank.model_calls == beam * length
    assert trace.metrics["model_calls"] == 5 * (1 + beam * length)


def test_look_ahead_stops_after_eos(tiny):
    context = tiny.encode(PROMPT)
    cache = PrefixCache(tiny)
    cache.forward(cache.sync(context))
    first = int(_full_logprobs(tiny, context).argmax())
    second = int(_full_logprobs(tiny, context + [first]).argmax())
    assert look_ahead(cache, context, first, 5, eos={second})[0] == [second]
    assert look_ahead(cache, context, first, 5, eos={first}) == ([], [])
    assert len(look_ahead(cache, context, first, 4, eos=set())[0]) == 4


def test_adadec_threshold_comes_from_the_learned_file(tmp_path):
    path = tmp_path / "thresholds.json"
    with pytest.raises(ParamError, match="python -m engine.offline.adadec_fit --model tiny-random-llama"):
        resolve_threshold("tiny-random-llama", 0.0, path)
    path.write_text(json.dumps({"tiny-random-llama": {"threshold": 1.25, "accuracy": 0.7}}))
    assert learned_threshold("tiny-random-llama", path) == 1.25
    assert resolve_threshold("tiny-random-llama", 0.0, path) == 1.25
    assert resolve_threshold("tiny-random-llama", 3.0, path) == 3.0  # an explicit threshold wins


def test_adadec_without_a_learned_threshold_fails_clearly(tiny):
    trace = record(tiny, "adadec", PROMPT, {}, RunSettings(max_new_tokens=3))
    assert trace.status == "failed" and "engine.offline.adadec_fit" in trace.reason


# ---------------------------------------------------------------- threshold learning


def test_logistic_fit_and_cutoff_scan_on_known_data():
    # H = 0: 2 of 3 steps top-1; H = 1: 1 of 3. The unpenalised fit is exact: b = ln 2, a = -2 ln 2.
    h = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0] * 50, dtype=torch.float64)
    y = torch.tensor([True, True, False, True, False, False] * 50)
    a, b = fit_logistic(h, y, c=1e9)
    assert a == pytest.approx(-2 * math.log(2), abs=1e-5) and b == pytest.approx(math.log(2), abs=1e-5)
    # p = 2/3 at H=0, 1/3 at H=1: cut-offs 0.34..0.66 predict "top-1" at H=0 only, right 4 times in 6.
    cutoff, accuracy = best_cutoff(a, b, h, y)
    assert cutoff == 0.34 and accuracy == pytest.approx(4 / 6)
    tau = threshold_from(a, b, cutoff)
    assert tau == pytest.approx((math.log(0.34 / 0.66) - math.log(2)) / (-2 * math.log(2)), abs=1e-5)
    assert 0 < tau < 1  # the greedy side is below tau: H = 0 steps


def test_learning_separable_entropies_puts_tau_between_the_classes():
    rng = random.Random(0)
    h = [rng.uniform(0.0, 1.0) for _ in range(300)] + [rng.uniform(3.0, 4.0) for _ in range(100)]
    y = [True] * 300 + [False] * 100
    result = learn(h, y, seed=1)
    assert result["accuracy"] == 1.0 and result["slope"] < 0
    # The scan keeps the first cut-off with the best held-out accuracy: the lowest p, so the highest tau that
    # still leaves every held-out high-entropy step above it; one cut-off lower would let the nearest one through.
    _, _, test_h, test_y = balanced_split(torch.tensor(h, dtype=torch.float64), torch.tensor(y), seed=1)
    nearest = float(test_h[~test_y].min())
    assert max(h[:300]) < result["threshold"] < nearest
    lower = threshold_from(result["slope"], result["intercept"], round(result["cutoff"] - 0.01, 2))
    assert lower >= nearest - 1e-4
    assert CUTOFFS[0] == 0.01 and CUTOFFS[-1] == 0.99 and len(CUTOFFS) == 99


def test_balanced_split_undersamples_training_only():
    h = torch.arange(1000, dtype=torch.float64)
    y = torch.arange(1000) % 4 == 0  # a quarter positive
    train_h, train_y, test_h, test_y = balanced_split(h, y, seed=0)
    assert len(test_h) == 200 and int(train_y.sum()) == int((~train_y).sum())
    assert not set(train_h.tolist()) & set(test_h.tolist())
    assert train_y.tolist() == [v % 4 == 0 for v in train_h.long().tolist()]


def test_windows_score_every_token_once_with_context():
    for length in (2, 100, 512, 513, 2000):
        scored = [i for start, stop, first in windows(length) for i in range(first, stop)]
        assert scored == list(range(1, length))
        assert all(first - start >= 128 for start, _, first in list(windows(length))[1:])


def test_teacher_force_matches_a_full_forward(tiny):
    ids = tiny.encode("one two three four five six seven eight nine ten")
    h, top1 = teacher_force(tiny, ids, 2, len(ids), 5)
    with torch.inference_mode():
        logits = tiny.model(input_ids=torch.tensor([ids[2:]])).logits[0].float()
    rows = range(5 - 2 - 1, len(ids) - 2 - 1)
    assert h == pytest.approx([float(entropy(logits[r])) for r in rows], abs=1e-4)
    assert top1 == [int(logits[r].argmax()) == ids[r + 3] for r in rows]


# ---------------------------------------------------------------- momentum


def _brute_length(walk: list[int], v: int, max_n: int) -> int:
    if v not in walk:
        return 0
    grams = lambda n: {tuple(walk[i : i + n]) for i in range(len(walk) - n + 1)}  # noqa: E731
    return next((n for n in range(max_n, 1, -1) if len(walk) >= n - 1 and tuple(walk[len(walk) - n + 1 :] + [v]) in grams(n)), 1)


@pytest.mark.parametrize(
    "walk, token, max_n, expected",
    [
        ([1, 2, 3, 1, 2], 4, 5, 0),  # a new node
        ([1, 2, 3, 1, 2], 3, 5, 3),  # (1, 2, 3) repeats; (3, 1, 2, 3) does not fit before the first 3
        ([1, 2, 3, 1, 2], 1, 5, 1),  # seen, but (2, 1) never occurred
        ([5, 1, 2, 3, 9, 1, 2], 3, 5, 3),  # (9, 1, 2, 3) is new
        ([1, 2, 3, 1, 2, 3, 1, 2], 3, 5, 5),  # a loop: capped at max_n
        ([1, 2, 3, 1, 2, 3, 1, 2], 3, 3, 3),
        ([7, 7, 7], 7, 5, 3),  # (7, 7, 7) repeats; (7, 7, 7, 7) never occurred
    ],
)
def test_repetition_length_by_hand(walk, token, max_n, expected):
    assert TokenGraph(walk).repetition_length(token, max_n) == expected == _brute_length(walk, token, max_n)


def test_repetition_length_matches_brute_force():
    rng = random.Random(3)
    for _ in range(300):
        walk = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        token, max_n = rng.randrange(5), rng.randrange(2, 7)
        assert TokenGraph(walk).repetition_length(token, max_n) == _brute_length(walk, token, max_n), (walk, token)


def test_resistance_tables():
    lengths = range(7)
    assert [RESISTANCES["linear"](l) for l in lengths] == [0, 1, 2, 3, 4, 5, 6]
    assert [RESISTANCES["ngram_block"](l) for l in lengths] == [0, 0, 0, 0, 5, math.inf, math.inf]
    assert [RESISTANCES["constant"](l) for l in lengths] == [0, 2, 2, 2, 2, 2, 2]
    assert [RESISTANCES["log"](l) for l in lengths] == pytest.approx([math.log(1 + l) / math.log(6) / 0.2 for l in lengths])
    assert RESISTANCES["log"](5) == pytest.approx(5.0)  # log_6(6) / 0.2
    assert [RESISTANCES["exp"](l) for l in lengths] == pytest.approx([0.5, 0.75, 1.125, 1.6875, 2.53125, 3.796875, 5.6953125])


def _logprobs(probs: dict[int, float], vocab: int = 8) -> torch.Tensor:
    p = torch.full((vocab,), 1e-6)
    for token, value in probs.items():
        p[token] = value
    return (p / p.sum()).log()


def test_momentum_labels_and_scores():
    graph = TokenGraph([1, 2, 3, 1, 2])
    kwargs = {"top_k": 3, "alpha": 0.2, "resistance": "linear", "max_n": 5, "position": 0}
    greedy = momentum_rerank(_logprobs({4: 0.5, 3: 0.3, 1: 0.2}), graph, **kwargs)
    assert (greedy.label, greedy.chosen) == ("greedy", 0)
    kept = momentum_rerank(_logprobs({1: 0.6, 4: 0.3, 3: 0.1}), graph, **kwargs)  # 0.6 - 0.2 * 1 > 0.3
    assert (kept.label, kept.chosen) == ("kept", 0)
    over = momentum_rerank(_logprobs({3: 0.5, 4: 0.4, 1: 0.1}), graph, **kwargs)  # 0.5 - 0.2 * 3 < 0.4
    assert (over.label, over.chosen, over.baseline) == ("overridden", 1, 0)
    assert [c.token_id for c in over.candidates] == [3, 4, 1]
    assert [c.parts[1:] for c in over.candidates] == [[3.0, 3.0], [0.0, 0.0], [1.0, 1.0]]
    assert [c.score for c in over.candidates] == pytest.approx([0.5 - 0.6, 0.4, 0.1 - 0.2], abs=1e-5)
    assert over.part_names == ["p", "repetition length", "resistance"] and over.method == "momentum"
    assert [label_of(0, 0), label_of(2, 0), label_of(2, 1)] == ["greedy", "kept", "overridden"]
    blocked = momentum_rerank(_logprobs({3: 0.9, 4: 0.1}), TokenGraph([1, 2, 3, 4, 1, 2, 3, 4, 1, 2]),
                              **{**kwargs, "resistance": "ngram_block"})
    assert blocked.candidates[0].score == -math.inf and blocked.chosen == 1


@pytest.mark.parametrize("resistance", ["linear", "ngram_block"])
def test_momentum_with_alpha_zero_is_greedy(tiny, resistance):
    settings = RunSettings(max_new_tokens=16, ignore_eos=True)
    greedy = record(tiny, "greedy", PROMPT, settings=settings)
    momentum = record(tiny, "momentum", PROMPT, {"alpha": 0.0, "resistance": resistance}, settings)
    assert momentum.output_token_ids == greedy.output_token_ids
    assert all(r.chosen == 0 and r.label != "overridden" for r in _events(momentum, Rerank))


def test_momentum_records_a_rerank_per_token_and_the_graph(tiny):
    trace = record(tiny, "momentum", PROMPT, {"alpha": 0.5, "resistance": "constant"},
                   RunSettings(max_new_tokens=24, ignore_eos=True))
    reranks, steps = _events(trace, Rerank), _events(trace, TokenStep)
    assert [r.position for r in reranks] == [s.position for s in steps] == list(range(24))
    walk = list(trace.prompt_token_ids)
    for rerank, step in zip(reranks, steps):
        assert rerank.candidates[rerank.chosen].token_id == step.token_id
        assert [c.parts[1] for c in rerank.candidates] == [_brute_length(walk, c.token_id, 5) for c in rerank.candidates]
        walk.append(step.token_id)
    assert trace.metrics["graph_nodes"] == len(set(walk))
    assert trace.metrics["graph_edges"] == len(set(zip(walk, walk[1:])))
    assert trace.metrics["overridden_steps"] == sum(r.label == "overridden" for r in reranks)
    assert trace.metrics["model_calls"] == 24


# ---------------------------------------------------------------- real model


@pytest.mark.real_model
def test_adadec_on_smollm2(smollm2):
    tau = learned_threshold("smollm2-135m-instruct")
    assert tau is not None and 0 < tau < math.log(smollm2.vocab_size)
    trace = record(smollm2, "adadec", "Name three primary colors.", {}, RunSettings(max_new_tokens=12, chat=True))
    assert trace.status == "finished" and trace.output_text.strip()
    steps = {s.position: s for s in _events(trace, TokenStep)}
    reranks = _events(trace, Rerank)
    for rerank in reranks:
        assert rerank.threshold == pytest.approx(tau) and rerank.value >= rerank.threshold
        assert rerank.candidates[rerank.chosen].token_id == steps[rerank.position].token_id
    paused = {r.position for r in reranks}
    assert all(s.entropy_raw < tau and s.rank == 1 for p, s in steps.items() if p not in paused)
    assert trace.metrics["paused_steps"] == len(reranks)
    extra = sum(r.model_calls for r in reranks)
    assert trace.metrics["model_calls"] == len(steps) + extra


@pytest.mark.real_model
def test_momentum_on_smollm2(smollm2):
    trace = record(smollm2, "momentum", "List the days of the week.", {}, RunSettings(max_new_tokens=16, chat=True))
    assert trace.status == "finished" and trace.output_text.strip()
    reranks, steps = _events(trace, Rerank), _events(trace, TokenStep)
    assert len(reranks) == len(steps) > 0
    for rerank, step in zip(reranks, steps):
        assert rerank.position == step.position
        assert rerank.candidates[rerank.chosen].token_id == step.token_id == trace.output_token_ids[step.position]
        assert (rerank.chosen == 0) == (rerank.label != "overridden")


# ---------------------------------------------------------------- figures

HOSTILE = {0: "<script>alert(1)</script>", 1: " ok", 2: "**b**", 3: "\n", 4: "<img src=x>"}


def _trace(events: list, vocab: dict[int, str], decoder: str) -> Trace:
    trace = Trace(run_id=f"hand{decoder.replace('_', '')}", info=RunInfo(model="hand", decoder=decoder, params={}, prompt="p"))
    recorder = Recorder(trace, lambda t: vocab.get(t, f"<{t}>"))
    for event in [RunStarted(prompt_token_ids=[1, 1]), *events, RunFinished(status="finished")]:
        recorder.record(event)
    return trace


def _step(position: int, token: int, h: float) -> TokenStep:
    return TokenStep(step=position, position=position, token_id=token, logprob=-1.0, raw_logprob=-1.0, rank=1,
                     entropy_raw=h, entropy=h, candidates=[])


def _figure_text(fig) -> str:
    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from strings(v)
    return "\x1f".join(strings(fig.to_plotly_json()))


def _assert_escaped(text: str, forms: tuple[str, ...] = ("&lt;script&gt;", "&lt;img src=x&gt;")) -> None:
    assert "<script" not in text and "<img" not in text and "**b**" not in text
    assert all(form in text for form in forms)


def _adadec_trace() -> Trace:
    rerank = Rerank(
        step=1, position=1, method="adadec", part_names=["log p", "look-ahead log p", "length"],
        candidates=[ScoredCandidate(1, -1.5, [-0.5, -4.0, 2.0], [3, 4], [-2.0, -2.0]),
                    ScoredCandidate(0, -0.9, [-1.0, -1.7, 2.0], [2, 4], [-1.0, -0.7])],
        chosen=1, baseline=0, label="paused", threshold=1.2, value=2.5, model_calls=4,
    )
    return _trace([_step(0, 1, 0.3), rerank, _step(1, 0, 2.5), _step(2, 4, 0.1)], HOSTILE, "adadec")


def test_rerank_figure_draws_token_candidates_escaped():
    trace = _adadec_trace()
    assert rerank_at(trace, 0).position == 1 and rerank_at(trace, 7).position == 1  # the nearest
    fig = rerank_figure(trace, 1)
    bar = fig.data[0]
    assert list(bar.x) == [-1.5, -0.9]
    assert bar.marker.color[1] == CHOSEN_COLOR and bar.marker.color[0] != CHOSEN_COLOR
    assert list(bar.text) == ["baseline", "chosen"]
    assert "look-ahead log p: -1.7" in bar.hovertext[1] and "continuation: “&#42;&#42;b&#42;&#42;&lt;img src=x&gt;”" in bar.hovertext[1]
    _assert_escaped(_figure_text(fig))


def test_rerank_figure_leaves_out_infinite_scores():
    rerank = Rerank(step=0, position=0, method="momentum", part_names=["p", "repetition length", "resistance"],
                    candidates=[ScoredCandidate(0, -math.inf, [0.9, 5.0, math.inf]), ScoredCandidate(1, 0.1, [0.1, 0.0, 0.0])],
                    chosen=1, baseline=0, label="overridden")
    trace = _trace([rerank, _step(0, 1, 0.4)], HOSTILE, "momentum")
    assert loads(dumps(trace)).events == trace.events  # infinite scores survive the JSON trace
    bar = rerank_figure(trace, 0).data[0]
    assert list(bar.x) == [None, 0.1] and "score −∞" in bar.text[0] and "resistance: ∞" in bar.hovertext[0]
    timeline = rerank_timeline_figure(trace)
    markers = [d for d in timeline.data if d.name == "overridden"]
    assert len(markers) == 1 and list(markers[0].x) == [0] and list(markers[0].y) == [0.4]
    _assert_escaped(_figure_text(timeline), ("instead of “&lt;script&gt;alert(1)&lt;/script&gt;”",))


def test_rerank_timeline_marks_paused_steps_over_entropy_with_threshold():
    fig = rerank_timeline_figure(_adadec_trace(), selected_position=2)
    line, markers = fig.data[0], fig.data[1]
    assert list(line.x) == [0, 1, 2] and list(line.y) == [0.3, 2.5, 0.1]
    assert markers.name == "paused" and list(markers.x) == [1] and list(markers.marker.symbol) == ["diamond"]
    assert any(shape.y0 == 1.2 and shape.y1 == 1.2 for shape in fig.layout.shapes)
    _assert_escaped(_figure_text(fig))


def test_rerank_figures_for_whole_samples():
    rerank = Rerank(
        step=0, position=0, method="self_certainty", part_names=["self-certainty"],
        candidates=[ScoredCandidate(0, 2.0, [2.0], [0, 1, 2], [1.0, 2.0, 3.0]),
                    ScoredCandidate(4, 3.0, [3.0], [4, 3], [3.5, 2.5])],
        chosen=1, baseline=0,
    )
    trace = _trace([rerank], HOSTILE, "self_certainty")
    fig = rerank_figure(trace, 5)
    bars, heat = fig.data
    assert list(bars.y) == [2.0, 3.0] and bars.marker.color[1] == CHOSEN_COLOR
    assert [list(row) for row in heat.z] == [[1.0, 2.0, 3.0], [3.5, 2.5, None]]
    assert heat.text[1][0] == "&lt;img src=x&gt;" and heat.text[1][2] == ""
    _assert_escaped(_figure_text(fig))
    curves = rerank_timeline_figure(trace)
    assert [list(d.y) for d in curves.data] == [[1.0, 2.0, 3.0], [3.5, 2.5]] and curves.data[1].line.width > curves.data[0].line.width
    _assert_escaped(_figure_text(curves))


def test_rerank_figures_without_reranks(tiny):
    trace = record(tiny, "greedy", PROMPT, settings=RunSettings(max_new_tokens=2))
    assert "No rerank" in rerank_figure(trace, 0).layout.annotations[0].text
    assert "No rerank" in rerank_timeline_figure(trace).layout.annotations[0].text


def test_rerank_figures_on_a_recorded_momentum_run(tiny):
    trace = record(tiny, "momentum", PROMPT, {"alpha": 0.5, "resistance": "constant"}, RunSettings(max_new_tokens=12, ignore_eos=True))
    fig = rerank_figure(trace, 3)
    assert len(fig.data[0].x) == 5 and "momentum: candidates rescored at position 3" in fig.layout.title.text
    overridden = [r.position for r in _events(trace, Rerank) if r.label == "overridden"]
    timeline = rerank_timeline_figure(trace)
    marked = [d for d in timeline.data if d.name == "overridden"]
    assert (list(marked[0].x) if marked else []) == overridden
