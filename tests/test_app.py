"""The app builds offline, fills every view from a trace, and never renders token text as markup."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import gradio as gr
import pytest

from engine import RunSettings, load_model, record
from storage import TraceStore
from ui.app import build
from ui.samples import SAMPLES_DIR, import_samples
from ui.views import view_values

HOSTILE = ['<script>alert(1)</script>', '<img src=x onerror=alert(2)>', "**bold** [link](javascript:x)", "\x00\x1b[31m"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def _strings(value):
    """Every string inside a view value (HTML, plotly figure JSON, table rows)."""
    if value is None:
        return []
    if hasattr(value, "to_json"):
        return _strings(json.loads(value.to_json()))
    if isinstance(value, gr.components.Component):
        return _strings(value.value)
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


@pytest.mark.parametrize(
    "decoder,params",
    [
        ("top_p", {"top_p": 0.9}),
        ("beam", {"num_beams": 3}),
        ("forced", {"continuation": "a b"}),
        ("speculative", {"draft_layers": 1, "temperature": 0.9}),
        ("dyspec", {"draft_layers": 1}),
    ],
)
def test_every_view_escapes_token_text(tiny, decoder, params):
    trace = record(tiny, decoder, "Hi", params, RunSettings(max_new_tokens=6, seed=3))
    for token_id in list(trace.vocab)[: len(HOSTILE)]:
        trace.vocab[token_id] = HOSTILE[token_id % len(HOSTILE)]
    values = view_values(trace, 1, "probability")
    text = " ".join(_strings(values))
    for raw in ("<script>", "<img", "\x1b", "\x00"):
        assert raw not in text


def test_samples_ship_and_import(tmp_path):
    assert len(list(SAMPLES_DIR.glob("*.json.gz"))) >= 4
    store = TraceStore(f"sqlite:///{tmp_path / 's.db'}")
    assert import_samples(store) >= 4
    assert import_samples(store) == 0  # already there
    decoders = {r.decoder for r in store.list_runs()}
    assert {"top_p", "beam", "greedy"} <= decoders


def test_app_builds_on_a_tiny_model(tmp_path):
    assert isinstance(build("tiny-random-llama", f"sqlite:///{tmp_path / 'ui.db'}"), gr.Blocks)


def test_a_model_that_cannot_load_is_reported_not_fatal(tmp_path):
    """The app builds (and would listen) at once; the failed load is reported by the pool with its reason."""
    from ui.pool import ModelPool

    assert isinstance(build("no-such-model-anywhere", f"sqlite:///{tmp_path / 'ui.db'}"), gr.Blocks)
    pool = ModelPool()
    with pytest.raises(Exception, match="not a built-in model"):
        pool.get("no-such-model-anywhere", timeout=60)
    assert "not a built-in model" in pool.status(" no-such-model-anywhere ").error


def test_the_model_pool_loads_a_name_once_whatever_its_spaces():
    from ui.pool import ModelPool

    pool = ModelPool(max_models=2)
    assert pool.get("tiny-random-llama") is pool.get(" tiny-random-llama\t")
    for seed in range(3):  # distinct names: the least recently used is dropped, memory stays bounded
        pool.get(f"tiny-random-llama:seed={seed}")
    assert pool.status("tiny-random-llama") is None and pool.status("tiny-random-llama:seed=2") is not None


def test_replay_only_opens_on_the_library_with_a_notice(tmp_path):
    demo = build("tiny-random-llama", f"sqlite:///{tmp_path / 'ui.db'}", replay_only=True)
    blocks = list(demo.blocks.values())
    tabs = next(b for b in blocks if isinstance(b, gr.Tabs))
    assert tabs.selected == "library"
    assert next(b for b in blocks if isinstance(b, gr.Tab) and b.id == "run").visible is False
    assert any("Replay-only mode" in str(getattr(b, "value", "")) for b in blocks)


def test_views_for_draft_and_diffusion_traces():
    """Built traces of the later decoder families fill the structure view and the canvas."""
    from tests.helpers import build_diffusion_trace, hand_rounds, make_trace

    diffusion = build_diffusion_trace()
    values = view_values(diffusion, 3, "probability")
    assert "▒" in values[0]  # the canvas at step 3 still has masked positions
    assert any(t.type == "heatmap" for t in values[2]["value"].data)  # the lattice, large
    assert "proposals per masked position" in values[5]["value"].layout.title.text  # the step's lattice, full width

    drafts = make_trace(hand_rounds())
    values = view_values(drafts, 0, "probability")
    assert values[2]["value"].data  # the draft tree, large


def test_speculative_views_walk_rounds(tiny):
    """A speculative run's slider walks rounds: stream grouped by round, the round's nodes, q vs p, acceptance."""
    # a draft every round (the adaptive default times plain steps first)
    params = {"draft_layers": 1, "num_draft_tokens": 3, "draft_length": "fixed"}
    trace = record(tiny, "speculative", "a b a b a b", params, RunSettings(max_new_tokens=12, ignore_eos=True))
    rounds = [e for e in trace.events if e.kind == "draft_round"]
    values = view_values(trace, 1, "probability")
    stream = values[0]
    assert stream.count('class="de-round"') == len(rounds)
    assert stream.count('class="de-token"') == len(trace.output_token_ids)
    assert 'data-step="1" data-selected="true"' in stream
    table = values[6].value
    assert table["headers"][:3] == ["node", "parent", "depth"] and len(table["data"]) == len(rounds[1].nodes)
    assert [row[-1] for row in table["data"]].count("accepted") == len(rounds[1].accepted_path)
    assert {t.name for t in values[4]["value"].data} >= {"draft q", "target p"}
    assert values[2]["value"].data and values[3]["value"].data  # draft tree, acceptance


QA_PROMPT = "Context: The red fox lives in the old mill. Question: Where does the fox live?"


@pytest.mark.parametrize(
    "decoder,params,prompt",
    [
        ("gift", {"alpha": 5.0}, QA_PROMPT),
        ("adadec", {"threshold": 0.001}, "Hi"),
        ("momentum", {"alpha": 0.5}, "Hi"),
        ("kv_compress", {"policy": "h2o", "budget": 4}, "Hi there, how are you today?"),
        ("superposed", {"n_drafts": 2}, "Hi"),
        ("self_certainty", {"n": 3}, "Hi"),
        ("exact_extract", {"max_answer_tokens": 3}, QA_PROMPT),
        ("awrs", {"constraint": "[ab]{2,5}", "particles": 2}, "Hi"),
    ],
)
def test_method_views_fill_and_escape(tiny, decoder, params, prompt):
    """The method's own views fill the structure panel (and a per-step view), with token text escaped."""
    trace = record(tiny, decoder, prompt, params, RunSettings(max_new_tokens=6, seed=3, ignore_eos=True))
    assert trace.status == "finished", trace.reason
    for token_id in list(trace.vocab):
        trace.vocab[token_id] = HOSTILE[token_id % len(HOSTILE)]
    values = view_values(trace, 1, "probability")
    assert values[2]["value"] is not None and values[2]["value"].data  # the method's main view, large
    if any(e.kind == "token" for e in trace.events):  # its per-step view, where attention would go
        assert values[5]["value"] is not None and values[5]["value"].data
    elif decoder != "exact_extract":  # runs without token steps show it beside the main view
        assert values[3]["value"] is not None and values[3]["value"].data
    text = " ".join(_strings(values))
    for raw in ("<script>", "<img", "\x1b", "\x00"):
        assert raw not in text


def test_a_live_stream_carries_a_light_chart_of_its_steps(tiny):
    """While a run streams, its text view carries an SVG chart whose points are the steps' entropy and p(chosen)."""
    import math
    import re

    from ui.views import light_values

    trace = record(tiny, "top_p", "Hi", {"top_p": 0.9}, RunSettings(max_new_tokens=5, seed=1))
    html_live, _ = light_values(trace, None, "probability", live=True)
    html_still, _ = light_values(trace, None, "probability")
    assert "de-sparkline" in html_live and "de-sparkline" not in html_still
    entropy, chosen = [[tuple(map(float, p.split(","))) for p in points.split()]
                       for points in re.findall(r'points="([^"]+)"', html_live)]
    steps = [e for e in trace.events if type(e).__name__ == "TokenStep"]
    assert len(entropy) == len(chosen) == len(steps) == 5
    top = max(s.entropy_raw for s in steps)
    height = 56
    for (_, y_e), (_, y_c), step in zip(entropy, chosen, steps):  # y grows downwards: 2 px margins
        assert y_e == pytest.approx(height - 2 - step.entropy_raw / top * (height - 4), abs=0.06)
        assert y_c == pytest.approx(height - 2 - math.exp(step.raw_logprob) * (height - 4), abs=0.06)


def test_a_selected_step_keeps_the_slider_unless_it_must_be_clamped(tiny):
    """An answer to an earlier selection must not take back a step typed since: the slider is left alone when the
    step is in range, and clamped when it is not."""
    from ui.views import selected_step_values

    trace = record(tiny, "greedy", "Hi", {}, RunSettings(max_new_tokens=4, seed=1))
    in_range = selected_step_values(trace, 2, "probability")
    assert in_range[1] == gr.skip()
    assert 'data-step="2" data-selected="true"' in in_range[0]
    clamped = selected_step_values(trace, 99, "probability")
    assert clamped[1].value == 3


def test_the_app_turns_gradio_analytics_off_before_gradio_loads():
    """Gradio reports usage to its analytics host unless told not to: ``python app.py`` tells it, before gradio is
    imported (the variable is read at import)."""
    import subprocess
    import sys

    from tests.browser import ROOT

    code = ("import os, sys; os.environ.pop('GRADIO_ANALYTICS_ENABLED', None); import app; "
            "print(os.environ['GRADIO_ANALYTICS_ENABLED'], 'gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


class _Markup(HTMLParser):
    """The elements and attributes a string would create if a page rendered it as HTML."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.made: list[tuple[str, list]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.made.append((tag, attrs))


@pytest.mark.parametrize("sample", sorted(SAMPLES_DIR.glob("*.json.gz")), ids=lambda p: p.name.removesuffix(".json.gz"))
def test_every_table_cell_is_escaped_whatever_column_type_draws_it(sample):
    """A table's rows can meet another run kind's column types for a moment while the views change kind (CI caught
    an alert() of a hostile dyspec copy's "drafted by" cell drawn under the diffusion table's html column): so every
    string cell of every kind's table is inert as HTML, and no column is left as plain "str"."""
    from engine.trace import trace_from_dict
    from tests.hostile import hostile_copy
    from ui.views import step_count

    trace = trace_from_dict(hostile_copy(sample))
    for position in {0, max(step_count(trace) - 1, 0)}:
        table = view_values(trace, position, "probability")[6]
        assert "str" not in table.datatype
        for row in table.value["data"]:
            for cell in row:
                made = _Markup(cell).made if isinstance(cell, str) else []
                assert all(tag in {"span", "i", "b", "code"} and not attrs for tag, attrs in made), (cell, made)
