"""Figures at full page width: titles inside every figure, heights, ticks that fit, readable heatmap cell text, the
one label-cutting helper, and hostile text (HTML and Markdown) in every label."""

from __future__ import annotations

import glob
import json
import math

import plotly.graph_objects as go
import pytest

from engine.events import Candidate, DiffusionStep
from engine.trace import read_file
from tests.helpers import (
    HOSTILE_TEXTS,
    RAW_FRAGMENTS,
    build_diffusion_trace,
    by_name,
    fig_strings,
    make_trace,
)
from ui.figures.common import (
    COLORBAR_PX,
    FIGURE_WIDTH,
    PRIMARY_HEIGHTS,
    SECONDARY_HEIGHTS,
    clip_text,
    escape_token,
    text_px,
    token_label,
)
from ui.figures.constraint import tries_figure
from ui.figures.diffusion import CELL_CHARS, step_lattice_figure
from ui.figures.lattice import lattice_figure


def plot_width(fig) -> float:
    return FIGURE_WIDTH - fig.layout.margin.l - fig.layout.margin.r - COLORBAR_PX


def wcag(rgb) -> float:
    def channel(c):
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    hi, lo = sorted((wcag(a), wcag(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


VIRIDIS = [(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142), (31, 158, 137),
           (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37)]  # plotly's Viridis stops


def viridis(t: float) -> tuple[float, float, float]:
    scaled = min(max(t, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(scaled), len(VIRIDIS) - 2)
    f = scaled - i
    return tuple(a + (b - a) * f for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


NAMED = {"black": (0, 0, 0), "white": (255, 255, 255)}


# ---------------------------------------------------------------- the one cutting helper


def test_clip_text_cuts_before_escaping_and_keeps_either_end():
    assert clip_text("<script>alert(1)</script>", 8) == escape_token("<script") + "…"
    assert clip_text("abcdef", 6) == "abcdef" and clip_text("abcdefg", 6) == "abcde…"
    assert clip_text("abcdefg", 4, keep="end") == "…efg"
    assert clip_text("&&&&&&", 3) == "&amp;&amp;…"  # never a split character reference
    assert token_label({5: "[a](javascript:x)"}, 5, 4) == escape_token("[a]") + "…"
    assert token_label({}, 99) == "&lt;99&gt;"


def test_quotes_are_escaped_as_plotly_decodes_them():
    # plotly decodes numeric references but not "&quot;": a quote token would show as "&quot;"
    assert escape_token('"') == "&#34;" and "&quot;" not in escape_token('say "hi"')


# ---------------------------------------------------------------- the diffusion lattices


@pytest.mark.parametrize("length,steps,block", [(32, 16, 8), (256, 64, 32), (1024, 64, 256)])
def test_lattice_position_ticks_fit_the_width(length, steps, block):
    fig = lattice_figure(build_diffusion_trace(length=length, steps=steps, block=block))
    dtick = fig.layout.xaxis.dtick
    ticks = math.ceil(length / dtick)
    label = text_px(str(length - 1)) + 8
    assert ticks * label <= plot_width(fig), (ticks, dtick)
    assert dtick in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250)
    assert length > 40 or dtick == 1  # a short canvas numbers every position
    assert fig.layout.title.text.startswith("Unmasking lattice")
    assert PRIMARY_HEIGHTS[0] <= fig.layout.height <= PRIMARY_HEIGHTS[1]


def test_step_lattice_cell_text_contrasts_with_its_cell_and_fits():
    trace = build_diffusion_trace(length=64, steps=16, block=8)
    for token_id in range(10, 60):
        trace.vocab[token_id] = HOSTILE_TEXTS[token_id % 4]
    fig = step_lattice_figure(trace, 9)
    heat = by_name(fig, "proposals")
    assert heat.colorscale[0][1] == "#440154" and heat.colorbar.title.text == "p(token)"  # Viridis, labelled
    assert (heat.zmin, heat.zmax) == (0.0, 1.0) and not heat.texttemplate  # the text is drawn over the cells
    text = by_name(fig, "cell text")
    shown = fig.layout.xaxis.range[1] - fig.layout.xaxis.range[0]
    cell_px = plot_width(fig) / shown
    earlier = by_name(fig, "committed earlier")
    assert len(text.x) > 0
    for x, y, label, colour in zip(text.x, text.y, text.text, text.textfont.color):
        assert text_px(label, text.textfont.size) <= cell_px  # no label runs out of its cell
        plain = label.replace("…", "")
        assert len(plain) <= CELL_CHARS or "&" in label
        if heat.z[y - 1][x] is not None:
            ratio = contrast(NAMED[colour], viridis(heat.z[y - 1][x]))
        else:
            assert earlier.z[0][x] == 1 and y == 1
            ratio = contrast(NAMED[colour], (110, 110, 110))
        assert ratio >= 4.5, (label, colour, heat.z[y - 1][x])
    for fragment in RAW_FRAGMENTS:
        assert fragment not in "\n".join(fig_strings(fig))


def test_step_lattice_prints_no_text_in_cells_too_small_for_it():
    width = 300
    canvas = [0] * width
    props = [[Candidate(10 + k, 0.5 / (k + 1), 0.5 / (k + 1)) for k in range(5)] for _ in range(width)]
    step = DiffusionStep(step=0, canvas=canvas, mask_id=0, committed_positions=[], confidence=[0.5] * width,
                         proposals=props)  # no block: the whole 300-position canvas is in view
    fig = step_lattice_figure(make_trace([step], {0: "[mask]"}), 0)
    assert not [t for t in fig.data if t.name == "cell text"]
    ticks = math.ceil(width / fig.layout.xaxis.dtick)
    assert ticks * (text_px("299") + 8) <= plot_width(fig)


def test_constraint_tries_cells_are_readable():
    trace = read_file(sorted(glob.glob("assets/samples/awrs-json.json.gz"))[0])
    fig = tries_figure(trace, window=(0, 17))
    heat = fig.data[0]
    text = by_name(fig, "cell text")
    fills = {0: (200, 55, 55), 1: (35, 140, 75), 2: (120, 120, 120)}
    rows = list(heat.y)
    for x, y, colour in zip(text.x, text.y, text.textfont.color):
        status = heat.z[rows.index(y)][x]
        if status in fills:
            assert contrast(NAMED[colour], fills[status]) >= 4.5
    assert PRIMARY_HEIGHTS[0] <= fig.layout.height <= PRIMARY_HEIGHTS[1]


# ---------------------------------------------------------------- every figure of the shipped samples


def sample_figures():
    from ui.views import view_values

    for path in sorted(glob.glob("assets/samples/*.json.gz")):
        trace = read_file(path)
        for value in view_values(trace, 2, "probability"):
            value = value.get("value") if isinstance(value, dict) else value
            if isinstance(value, go.Figure):
                yield path, value


def test_every_figure_has_a_visible_title_and_a_full_width_height():
    figures = list(sample_figures())
    assert len(figures) > 40
    for path, fig in figures:
        layout = fig.layout
        message = bool(layout.annotations) and not fig.data
        assert layout.title.text or message, path
        assert layout.title.font.size >= 14
        assert layout.paper_bgcolor == "rgba(0,0,0,0)" and layout.plot_bgcolor == "rgba(0,0,0,0)", path
        assert layout.font.color == "rgb(128, 128, 128)"  # mid grey: readable on light and dark pages
        assert layout.margin.l >= 60 and layout.margin.b >= 50, path
        assert all(axis.automargin for axis in (layout.xaxis, layout.yaxis)), path  # tick labels are never clipped
        is_tree = "tree" in (layout.title.text or "").lower()
        low, high = (PRIMARY_HEIGHTS[0], 1200) if is_tree else (SECONDARY_HEIGHTS[0], PRIMARY_HEIGHTS[1])
        assert low <= layout.height <= high, (path, layout.title.text, layout.height)


def test_hostile_markdown_and_html_never_reach_any_sample_figure_raw():
    from ui.views import view_values

    for path in sorted(glob.glob("assets/samples/*.json.gz")):
        trace = read_file(path)
        for i, token_id in enumerate(sorted(trace.vocab)):
            trace.vocab[token_id] = HOSTILE_TEXTS[i % 4]
        trace.info.prompt = HOSTILE_TEXTS[2]
        text = json.dumps([v.to_json() if hasattr(v, "to_json") else str(v)
                           for v in view_values(trace, 2, "probability")])
        for raw in HOSTILE_TEXTS + RAW_FRAGMENTS:
            assert raw not in text, (path, raw)
