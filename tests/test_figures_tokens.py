"""Token-level figures: token stream, step table, distribution, timeline, attention, comparison.

Traces come from real runs of the tiny random model and from events built by hand (hostile vocabularies,
crafted divergences, a 2,000-step run).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import plotly.graph_objects as go
import pytest

from engine import Run, RunSettings, load_model, record
from engine.attention import AttentionCapture
from engine.decoders import param_defaults
from engine.events import (
    AttentionMap,
    BeamNode,
    BeamStep,
    Candidate,
    Event,
    Output,
    RunStarted,
    StageReport,
)
from engine.trace import Trace
from tests.helpers import hand_step, hand_trace
from ui.figures import (
    WINDOW,
    aligned_tokens_html,
    attention_figure,
    attention_layers,
    attention_steps,
    cost_table,
    distribution_figure,
    divergence_figure,
    entropy_figure,
    escape_token,
    first_divergence,
    step_table,
    token_steps,
    token_stream_html,
)
from ui.figures.compare import topk_kl

HOSTILE = {
    0: "<script>alert(1)</script>",
    1: "<img src=x onerror=alert(1)>",
    2: "**bold**",
    3: "\x00\x1b[31m",
    4: "\n",
    5: " ok",
}
RAW_PAYLOADS = ["<script", "<img", "**bold**", "\x00", "\x1b", "[31m", "\n"]
ESCAPED_FORMS = [
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&lt;img src=x onerror=alert(1)&gt;",
    "&#42;&#42;bold&#42;&#42;",
    "&#92;x00&#92;x1b&#91;31m",
    "↵",
]


# ---------------------------------------------------------------- building traces


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


@pytest.fixture(scope="module")
def sampled(tiny) -> Trace:
    params = {"temperature": 0.7, "top_k": 5, "top_p": 0.9, "min_p": 0.05}
    settings = RunSettings(max_new_tokens=8, seed=1, record_top_k=10, attention=AttentionCapture())
    return record(tiny, "sample", "Hello world", params, settings)


@pytest.fixture(scope="module")
def greedy(tiny) -> Trace:
    return record(tiny, "greedy", "Hello world", settings=RunSettings(max_new_tokens=8, ignore_eos=True))


def hostile_trace() -> Trace:
    probs = {0: 0.3, 1: 0.25, 2: 0.2, 3: 0.15, 4: 0.05, 5: 0.05}
    stages = [StageReport("top_k", kept=4, mass=0.9, survivors=0b1111, threshold=0.15)]
    prompt = list(HOSTILE)
    keys = len(prompt) + 2
    attention = AttentionMap(
        step=0, layers=[1], head_reduction="mean", layer_reduction="last", query_positions=list(range(keys)),
        shape=[1, keys, keys], data=np.full((1, keys, keys), 1 / keys, dtype=np.float16).tobytes(),
    )
    events: list[Event] = [RunStarted(prompt_token_ids=prompt)]
    events += [hand_step(i, t, probs, stages, forced=i == 1) for i, t in enumerate([0, 1, 2, 3, 4, 5])]
    events.append(attention)
    return hand_trace(events, HOSTILE)


def long_trace(n: int = 2000) -> Trace:
    vocab = {i: f" w{i}" for i in range(50)}
    events: list[Event] = [RunStarted(prompt_token_ids=[0, 1])]
    events += [hand_step(i, i % 50, {i % 50: 0.6, (i + 1) % 50: 0.3, (i + 2) % 50: 0.1}) for i in range(n)]
    return hand_trace(events, vocab)


def all_strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in all_strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in all_strings(v)]
    if isinstance(value, np.ndarray) and value.dtype.kind in "OU":
        return [s for v in value.ravel() for s in all_strings(v)]
    return []


def figure_text(fig: go.Figure) -> str:
    return "\x1f".join(all_strings(fig.to_plotly_json()))


def assert_escaped(text: str) -> None:
    for raw in RAW_PAYLOADS:
        assert raw not in text, raw
    for escaped in ESCAPED_FORMS:
        assert escaped in text, escaped


def span_count(html: str) -> int:
    return html.count('class="de-token"')


def shape_names(fig: go.Figure) -> list[str]:
    return [s.name for s in fig.layout.shapes]


def annotation_text(fig: go.Figure) -> str:
    return " ".join(a.text for a in fig.layout.annotations)


# ---------------------------------------------------------------- escaping


def test_escape_token_makes_whitespace_and_controls_visible():
    assert escape_token("a\nb\tc  d") == "a↵b→c  d"
    assert escape_token("\x07") == "&#92;x07"
    assert escape_token("\u202e") == "&#92;u202e"  # a bidi override would reorder the text around it
    assert escape_token('"quoted" & <tag>') == "&#34;quoted&#34; &amp; &lt;tag&gt;"  # plotly knows no &quot;


def test_hostile_tokens_never_reach_html_raw():
    trace = hostile_trace()
    for color_by in ("probability", "entropy", "rank"):
        assert_escaped(token_stream_html(trace, color_by=color_by, selected_step=2))
    assert_escaped(aligned_tokens_html([trace, trace]))
    assert_escaped(" ".join(str(cell) for row in step_table(trace, 0) for cell in row))


def test_hostile_tokens_never_reach_plotly_text_raw():
    trace = hostile_trace()
    for fig in (distribution_figure(trace, 0), entropy_figure(trace, 1), attention_figure(trace, 0)):
        assert_escaped(figure_text(fig))


# ---------------------------------------------------------------- token stream and step table


def test_token_stream_spans_tooltips_and_prompt(sampled):
    html = token_stream_html(sampled, selected_step=3)
    steps = token_steps(sampled)
    assert span_count(html) == len(steps) == 8
    assert [int(s) for s in re.findall(r'class="de-token" data-step="(\d+)"', html)] == list(range(8))
    assert html.count('class="de-prompt"') == len(sampled.prompt_token_ids)
    selected = re.search(r'<span class="de-token" data-step="3"[^>]*>', html).group(0)
    assert "outline:2px" in selected and html.count("outline:2px") == 1
    tooltip = re.search(r'title="([^"]*)"', selected).group(1)
    assert "rank" in tooltip and "entropy" in tooltip and tooltip.count("&#10;") == 3 and "top:" in tooltip
    assert "raw probability of the chosen token" in html  # the legend


def test_token_colours_follow_probability_and_rank():
    vocab = {0: "a", 1: "b", 2: "c"}
    events = [
        hand_step(0, 0, {0: 0.95, 1: 0.05}),
        hand_step(1, 2, {0: 0.6, 1: 0.38, 2: 0.02}),
    ]
    trace = hand_trace(events, vocab)

    def backgrounds(html: str) -> list[str]:
        return re.findall(r'class="de-token" data-step="\d+"[^>]*background:(rgba\([^)]*\))', html)

    high, low = backgrounds(token_stream_html(trace, "probability"))
    assert high != low
    top1, top10 = backgrounds(token_stream_html(trace, "rank"))
    assert top1 != top10
    assert len(set(backgrounds(token_stream_html(trace, "entropy")))) == 1  # same entropy, same colour
    with pytest.raises(ValueError):
        token_stream_html(trace, "loudness")


def test_forced_tokens_are_underlined(tiny):
    trace = record(tiny, "forced", "Hello", {"continuation": " world the"}, RunSettings(max_new_tokens=8))
    html = token_stream_html(trace)
    assert span_count(html) == len(token_steps(trace)) > 0
    assert html.count("underline dotted") == span_count(html) + 1  # every token, plus the legend
    assert "forced token" in distribution_figure(trace, 0).layout.title.text


def test_token_stream_windows_large_traces():
    trace = long_trace()
    html = token_stream_html(trace)
    assert span_count(html) == WINDOW
    assert f"showing tokens {2000 - WINDOW + 1}–2000 of 2000" in html
    assert 'class="de-prompt"' not in html  # the prompt is only shown with the first tokens
    html = token_stream_html(trace, window=(10, 20), selected_step=12)
    assert span_count(html) == 10 and "showing tokens 11–20 of 2000" in html
    assert entropy_figure(trace) is not None  # builds quickly; timing lives in the benchmark


def test_step_table_rows(sampled):
    rows = step_table(sampled, 3)
    s = token_steps(sampled)[3]
    assert len(rows) == len(s.candidates)
    assert [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert sum(r[5] == "✓" for r in rows) == 1
    chosen = next(r for r in rows if r[5] == "✓")
    assert chosen[4] == "kept"
    assert rows[-1][4] == "cut by top_k" and rows[-1][3] == 0.0
    assert step_table(sampled, 99) == []


def test_step_table_adds_a_chosen_token_outside_the_top_k():
    trace = hand_trace([hand_step(0, 7, {0: 0.6, 1: 0.4})], {0: "a", 1: "b", 7: "z"})
    rows = step_table(trace, 0)
    assert len(rows) == 3 and rows[-1][1] == "z" and rows[-1][5] == "✓" and rows[-1][4] == "?"
    assert [r[4] for r in rows[:2]] == ["—", "—"]  # no stages: nothing to survive


# ---------------------------------------------------------------- distribution


def test_distribution_bars_and_stage_cuts(sampled):
    s = token_steps(sampled)[3]
    fig = distribution_figure(sampled, 3)
    assert [type(t) for t in fig.data] == [go.Bar, go.Bar]
    assert all(len(t.x) == len(t.y) == len(s.candidates) for t in fig.data)
    assert list(fig.data[0].y) == [c.raw_prob for c in s.candidates]
    assert list(fig.data[1].y) == [c.prob for c in s.candidates]
    chosen = next(i for i, c in enumerate(s.candidates) if c.token_id == s.token_id)
    assert shape_names(fig) == ["chosen", "cut:temperature", "cut:top_k", "cut:top_p", "cut:min_p"]
    assert [st.name for st in s.stages] == ["temperature", "top_k", "top_p", "min_p"]
    assert fig.layout.shapes[0].x0 < chosen < fig.layout.shapes[0].x1
    assert fig.layout.shapes[2].x0 == 4.5  # top_k=5 cuts after the fifth candidate
    assert "kept 5" in annotation_text(fig) and "threshold" in annotation_text(fig)
    assert fig.layout.xaxis.ticktext[chosen].startswith("<b>")
    assert "entropy" in fig.layout.title.text and "nats" in fig.layout.title.text
    assert "rank" in fig.data[0].hovertext[0] and "processed p" in fig.data[0].hovertext[0]


def test_distribution_greedy_and_missing_step(greedy):
    fig = distribution_figure(greedy, 0)
    assert len(fig.data) == 2 and shape_names(fig) == ["chosen"]  # no stages, no cuts
    assert "no processing stages" in fig.layout.title.text
    empty = distribution_figure(greedy, 500)
    assert not empty.data and "No token distribution" in annotation_text(empty)


def test_distribution_marks_non_prefix_survivors():
    stages = [StageReport("typical", kept=2, mass=0.5, survivors=0b110)]  # the top candidate was dropped
    trace = hand_trace([hand_step(0, 1, {0: 0.5, 1: 0.3, 2: 0.2}, stages)], {0: "a", 1: "b", 2: "c"})
    fig = distribution_figure(trace, 0)
    assert shape_names(fig) == ["chosen", "cut:typical"]
    assert fig.layout.shapes[1].x0 == 2.5 and "not a prefix" in annotation_text(fig)


# ---------------------------------------------------------------- timeline


def test_entropy_timeline(sampled):
    steps = token_steps(sampled)
    fig = entropy_figure(sampled, selected_step=2)
    assert [type(t) for t in fig.data] == [go.Scatter] * 4
    assert all(len(t.x) == len(t.y) == len(steps) for t in fig.data)
    assert list(fig.data[0].customdata) == [s.position for s in steps]
    assert list(fig.data[0].y) == [s.entropy_raw for s in steps]
    assert list(fig.data[1].y) == [s.entropy for s in steps]
    assert np.allclose(fig.data[2].y, np.exp([s.raw_logprob for s in steps]))
    assert shape_names(fig) == ["selected"] and fig.layout.shapes[0].x0 == 2
    assert not entropy_figure(sampled).layout.shapes


def test_entropy_timeline_long_runs_use_webgl():
    fig = entropy_figure(long_trace(), selected_step=1500)
    assert [type(t) for t in fig.data] == [go.Scattergl] * 4 and len(fig.data[0].x) == 2000


def test_entropy_timeline_without_token_steps():
    beam = hand_trace(
        [RunStarted([0]), BeamStep(step=0, nodes=[BeamNode(0, -1, 1, -0.1, -0.1, "live")]), Output([1])],
        {0: "a", 1: "b"}, decoder="beam",
    )
    fig = entropy_figure(beam)
    assert not fig.data and "beam" in annotation_text(fig).lower()
    empty = hand_trace([], {}, status=None)
    assert "No tokens recorded yet" in annotation_text(entropy_figure(empty))
    assert "No tokens recorded yet" in token_stream_html(empty)


def test_figures_follow_a_live_trace(tiny):
    run = Run(tiny, "top_p", "Hello", {"top_p": 0.9}, RunSettings(max_new_tokens=5))
    shown = []
    for _ in run:
        shown.append(span_count(token_stream_html(run.trace)))
        entropy_figure(run.trace)
        distribution_figure(run.trace, 0)
    assert shown[0] == 0 and shown[-1] == len(run.trace.output_token_ids) == 5


# ---------------------------------------------------------------- attention


def test_attention_heatmaps(sampled):
    steps = attention_steps(sampled)
    assert steps == list(range(8))
    assert attention_layers(sampled, 0) == ["layer 1"]
    prompt = len(sampled.prompt_token_ids)
    fig = attention_figure(sampled, 0)
    assert [type(t) for t in fig.data] == [go.Heatmap]
    assert np.asarray(fig.data[0].z).shape == (prompt, prompt)
    assert len(fig.layout.xaxis.ticktext) == prompt
    assert fig.layout.xaxis.ticktext[1].endswith(escape_token(sampled.vocab[sampled.prompt_token_ids[1]]))
    later = attention_figure(sampled, 2)
    assert np.asarray(later.data[0].z).shape == (1, prompt + 2)
    with pytest.raises(ValueError):
        attention_figure(sampled, 0, layer_index=3)
    assert "No attention map at step 40" in annotation_text(attention_figure(sampled, 40))


def test_attention_missing_says_how_to_record_it(greedy):
    assert attention_steps(greedy) == []
    fig = attention_figure(greedy, 0)
    assert not fig.data and "--attention last" in annotation_text(fig)


# ---------------------------------------------------------------- comparison


def crafted(tokens: list[int], status: str = "finished") -> Trace:
    vocab = {i: f"t{i}" for i in range(10)}
    return hand_trace([RunStarted([0])] + [hand_step(i, t, {t: 0.7, (t + 1) % 10: 0.3}) for i, t in enumerate(tokens)], vocab, status=status)


def test_first_divergence():
    assert first_divergence(crafted([1, 2, 3]), crafted([1, 2, 4])) == 2
    assert first_divergence(crafted([1, 2, 3]), crafted([5, 2, 3])) == 0
    assert first_divergence(crafted([1, 2, 3]), crafted([1, 2, 3])) is None
    assert first_divergence(crafted([1, 2]), crafted([1, 2, 3])) == 2  # finished early: diverges there
    assert first_divergence(crafted([1, 2], status=None), crafted([1, 2, 3])) is None  # still running


def test_aligned_tokens_mark_the_divergence():
    runs = [crafted([1, 2, 3, 4]), crafted([1, 2, 5, 4]), crafted([1, 2, 3, 6])]
    html = aligned_tokens_html(runs)
    assert html.count("<tr>") == 4  # positions header + one row per run
    assert "first divergence at position 2" in html
    outlined = re.findall(r'<td data-step="(\d+)"[^>]*outline:2px', html)
    assert outlined == ["2", "2", "2"]
    assert len(re.findall(r'<td data-step="[01]"[^>]*opacity:0.55', html)) == 6
    assert "no divergence" in aligned_tokens_html([runs[0], crafted([1, 2, 3, 4])])


def test_divergence_zero_for_identical_runs_and_positive_otherwise(tiny, greedy):
    again = record(tiny, "greedy", "Hello world", settings=RunSettings(max_new_tokens=8, ignore_eos=True))
    fig = divergence_figure([greedy, again])
    assert [type(t) for t in fig.data] == [go.Scatter, go.Scatter]
    assert len(fig.data[0].x) == 8 and not fig.layout.shapes
    assert max(fig.data[0].y) == 0 and max(fig.data[1].y) == 0
    hot = record(tiny, "sample", "Hello world", {"temperature": 3.0}, RunSettings(max_new_tokens=8, ignore_eos=True))
    fig = divergence_figure([greedy, hot, again])
    assert len(fig.data) == 4
    diverge = first_divergence(greedy, hot)
    assert diverge is not None and list(fig.data[1].x) == list(range(diverge + 1))  # up to and including it
    assert min(fig.data[1].y) > 0  # temperature 3 flattens every processed distribution
    assert shape_names(fig) == [f"diverges:{fig.data[0].meta}"]
    assert "top-k" in fig.layout.title.text
    assert not divergence_figure([greedy]).data


def test_topk_kl():
    a = [Candidate(0, 0.6, 0.6), Candidate(1, 0.4, 0.4)]
    assert topk_kl(a, a) == 0
    b = [Candidate(0, 0.5, 0.5), Candidate(2, 0.5, 0.5)]
    assert topk_kl(a, b) > topk_kl(a, [Candidate(0, 0.5, 0.5), Candidate(1, 0.5, 0.5)]) > 0


def test_cost_table(sampled, greedy):
    rows = cost_table([sampled, greedy], param_defaults())
    assert [r["decoder"] for r in rows] == ["sample", "greedy"]
    assert rows[0]["new tokens"] == 8 and rows[0]["model calls"] == 8 and rows[0]["tokens/call"] == 1.0
    assert rows[0]["mean accepted"] is None and rows[0]["status"] == "finished"
    # parameters off the decoder's defaults, plus the seed because the runs disagree on it
    assert rows[0]["params"] == "seed=1 temperature=0.7 top_k=5 top_p=0.9 min_p=0.05"
    assert rows[1]["params"] == "seed=0"
    # without the decoders' defaults only what the runs disagree on is shown
    assert [r["params"] for r in cost_table([sampled, greedy])] == ["seed=1", "seed=0"]
