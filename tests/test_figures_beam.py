"""The beam tree at full page width: readable labels, the best hypothesis, pruned stubs, the hypotheses table.

Built traces follow the beam decoder's recording (tests.helpers.build_beam_trace); properties are checked
against values computed here from the events, and label geometry against the figure's own size.
"""

from __future__ import annotations

import itertools
import math

import pytest

from engine.events import BeamNode, BeamStep, Output
from tests.helpers import (
    HOSTILE_TEXTS,
    build_beam_trace,
    by_name,
    fig_strings,
    make_trace,
)
from ui.figures import (
    BEAM_HYPOTHESES_HEADERS,
    beam_final_text,
    beam_hypotheses,
    beam_tree_figure,
    escape_token,
)
from ui.figures.common import FIGURE_WIDTH, PRIMARY_HEIGHTS, text_px
from ui.figures.trees import BEAM_LABEL_CHARS, NODE_FONT, PixelMap

NODE_TRACES = ("prompt", "live", "pruned", "finished")


def hostile_beam(beams: int = 4, steps: int = 30):
    """A beam run whose every token is one of the hostile texts (ids 10-13 reuse them, 14-49 get them too)."""
    trace = build_beam_trace(beams, steps)
    for token_id in range(10, 50):
        trace.vocab[token_id] = HOSTILE_TEXTS[token_id % len(HOSTILE_TEXTS)] + f" {token_id}"
    return trace


def all_nodes(trace) -> dict[int, BeamNode]:
    return {n.id: n for e in trace.events if isinstance(e, BeamStep) for n in e.nodes}


def best_chain(trace) -> list[int]:
    """Independently: the finished node with the highest normalised score, and its ancestors, root first."""
    nodes = all_nodes(trace)
    end = max((n for n in nodes.values() if n.status == "finished"), key=lambda n: n.normalized_score)
    chain = [end.id]
    while nodes[chain[-1]].parent in nodes:
        chain.append(nodes[chain[-1]].parent)
    return chain[::-1]


def points_by_id(fig) -> dict:
    return {c: (x, y) for name in NODE_TRACES for x, y, c in
            zip(by_name(fig, name).x, by_name(fig, name).y, by_name(fig, name).customdata)}


def label_boxes(fig, width: int = FIGURE_WIDTH) -> list[tuple[str, tuple[float, float, float, float]]]:
    """Every non-empty node label's pixel box, from the figure's own ranges, height and margins at ``width``."""
    m = fig.layout.margin
    pixels = PixelMap(tuple(fig.layout.xaxis.range), tuple(fig.layout.yaxis.range), width - m.l - m.r,
                      fig.layout.height - m.t - m.b)
    boxes = []
    for name in NODE_TRACES:
        trace = by_name(fig, name)
        for x, y, text in zip(trace.x, trace.y, trace.text):
            if text:
                px, py = pixels(x, y)
                w = text_px(text, NODE_FONT)
                bottom = py - trace.marker.size / 2
                boxes.append((text, (px - w / 2, bottom - NODE_FONT * 1.2, px + w / 2, bottom)))
    return boxes


def assert_no_overlaps(fig) -> int:
    boxes = label_boxes(fig)
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        apart = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
        assert apart, f"labels {ta!r} and {tb!r} overlap: {a} {b}"
    return len(boxes)


@pytest.mark.parametrize("beams,steps", [(4, 30), (3, 6), (8, 12)])
def test_best_path_is_the_highest_normalised_finished_hypothesis(beams, steps):
    trace = build_beam_trace(beams, steps)
    fig = beam_tree_figure(trace, first_step=0)
    where = points_by_id(fig)
    path = by_name(fig, "best sequence")
    drawn = [(x, y) for x, y in zip(path.x, path.y) if x is not None]
    drawn = [p for i, p in enumerate(drawn) if i == 0 or p != drawn[i - 1]]  # segments share their end points
    assert drawn == [where[-1]] + [where[i] for i in best_chain(trace)]
    best = all_nodes(trace)[best_chain(trace)[-1]]
    assert best.status == "finished"
    output = next(e for e in trace.events if isinstance(e, Output))
    assert [all_nodes(trace)[i].token_id for i in best_chain(trace)] == output.token_ids


def test_thirty_token_run_shows_a_window_with_no_overlapping_labels():
    trace = hostile_beam(4, 30)  # 240 nodes, long hostile token texts
    fig = beam_tree_figure(trace)
    assert PRIMARY_HEIGHTS[0] <= fig.layout.height <= 1200
    columns = sorted({x for name in NODE_TRACES for x in by_name(fig, name).x})
    assert columns[-1] == 30 and len(columns) < 31  # a window of the newest steps
    assert "showing steps" in fig.layout.title.text and "fold into the root" in fig.layout.title.text
    labelled = assert_no_overlaps(fig)
    live = by_name(fig, "live")
    assert labelled >= 0.6 * sum(1 for _ in live.x)  # most beams keep their label
    # the best sequence's visible part still ends on the best hypothesis
    assert points_by_id(fig)[best_chain(trace)[-1]] == (by_name(fig, "best sequence").x[-2],
                                                        by_name(fig, "best sequence").y[-2])


@pytest.mark.parametrize("first_step", [0, None])
def test_labels_never_overlap_even_when_every_step_is_forced_in(first_step):
    fig = beam_tree_figure(hostile_beam(8, 40), first_step=first_step)
    assert assert_no_overlaps(fig) > 0


def test_labels_are_cut_tokens_whole_in_the_hover():
    trace = hostile_beam(3, 6)
    fig = beam_tree_figure(trace)
    nodes = all_nodes(trace)
    live = by_name(fig, "live")
    for node_id, text, hover in zip(live.customdata, live.text, live.hovertext):
        whole = trace.vocab[nodes[node_id].token_id]
        if text:
            plain = text.removeprefix("<b>").removesuffix("</b>")
            assert plain == escape_token(whole[: BEAM_LABEL_CHARS - 1] + "…")
        assert escape_token(whole) in hover


def test_pruned_beams_are_small_grey_unlabelled_stubs_and_hovers_have_scores():
    trace = build_beam_trace(4, 8)
    fig = beam_tree_figure(trace)
    pruned, live = by_name(fig, "pruned"), by_name(fig, "live")
    assert len(pruned.x) == sum(n.status == "pruned" for n in all_nodes(trace).values())
    assert all(text == "" for text in pruned.text)
    assert pruned.marker.size < live.marker.size / 1.5 and pruned.opacity < 0.6
    nodes = all_nodes(trace)
    for node_id, hover in zip(live.customdata, live.hovertext):
        node = nodes[node_id]
        assert f"cumulative score (sum log p): {node.score:.4g}" in hover
        length = node_id // 8 + 1  # 8 candidates a step, one token deeper each step
        assert f"normalised score if it ended here: {node.score / length:.4g}" in hover
    finished = by_name(fig, "finished")
    for node_id, hover in zip(finished.customdata, finished.hovertext):
        assert f"normalised score: {nodes[node_id].normalized_score:.4g}" in hover
    # the kept beams' edges are drawn stronger than the pruned ones'
    assert by_name(fig, "beam edges").line.width > by_name(fig, "edges").line.width


def test_beam_hypotheses_ranked_by_normalised_score():
    trace = hostile_beam(4, 12)
    rows = beam_hypotheses(trace)
    nodes = all_nodes(trace)
    finished = [n for n in nodes.values() if n.status == "finished"]
    assert len(rows) == len(finished) == 4 and all(len(r) == len(BEAM_HYPOTHESES_HEADERS) for r in rows)
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[1] for r in rows] == sorted((n.normalized_score for n in finished), reverse=True)
    for rank, normalised, cumulative, length, text in rows:
        node = next(n for n in finished if n.normalized_score == normalised)
        assert cumulative == node.score and length == 12
        assert math.isclose(normalised, cumulative / length, rel_tol=1e-6)  # both kept to 7 significant digits
    best = [nodes[i].token_id for i in best_chain(trace)]
    assert rows[0][4] == escape_token(trace.text_of(best)) == beam_final_text(trace)
    assert beam_hypotheses(make_trace([])) == [] and beam_final_text(make_trace([])) == ""


def test_hostile_token_text_never_reaches_the_figure_or_table_raw():
    trace = hostile_beam(4, 10)
    texts = fig_strings(beam_tree_figure(trace)) + fig_strings(beam_tree_figure(trace, up_to_step=3))
    texts += [str(cell) for row in beam_hypotheses(trace) for cell in row] + [beam_final_text(trace)]
    joined = "\n".join(texts)
    for raw in HOSTILE_TEXTS:
        assert raw not in joined
    for fragment in ("<script", "<img", "](", "!["):
        assert fragment not in joined
    assert escape_token("[a](javascript:x) 11") in joined  # shown, as text
