"""One diffusion step up close: the step's token lattice, its table, tokens committed per step, the run summary,
and the diffusion branch of the shared views, on a hand-built Mask-Predict-like trace with hostile token texts."""

from __future__ import annotations

import dataclasses

import pytest

from engine.events import Candidate, DiffusionStep
from tests.helpers import (
    HOSTILE_TOKENS,
    assert_escaped,
    build_diffusion_trace,
    by_name,
    fig_strings,
    make_trace,
)
from ui.figures.common import escape_token
from ui.figures.diffusion import (
    BLOCK_COLOURS,
    DIFFUSION_TABLE_HEADERS,
    TOP_RANKS,
    VISIBLE_POSITIONS,
    committed_per_step_figure,
    diffusion_canvas_html,
    diffusion_step_table,
    diffusion_summary,
    step_lattice_figure,
)
from ui.figures.lattice import lattice_figure

MASK = 0
WIDTH = 8
INF = float("-inf")


def proposals_at(position: int) -> list[Candidate]:
    """Six proposals (one more than the lattice shows), hostile texts among them, probabilities falling."""
    return [Candidate(10 + (position + k) % 6, (6 - k) / 30 + position / 100, (6 - k) / 30 + position / 100)
            for k in range(6)]


def token_at(position: int, rank: int) -> int:
    return proposals_at(position)[rank - 1].token_id


def hand_steps() -> list[DiffusionStep]:
    """Step 0 commits positions 1 (rank 1) and 2 (rank 6: outside the lattice's top 5); step 1 commits 0 (rank 2)
    and 3, remasks 2 (committed earlier) and 3 (committed at this very step); step 2 commits 2 and 3 again (prefix
    cache); step 3, in the second block, commits 4-7 with two model calls (dual cache)."""
    plan = [  # (block, commits as {position: rank}, remasked, cache, model calls)
        ((0, 4), {1: 1, 2: 6}, [], "", 1),
        ((0, 4), {0: 2, 3: 1}, [2, 3], "", 1),
        ((0, 4), {2: 1, 3: 3}, [], "prefix", 1),
        ((4, 8), {4: 1, 5: 1, 6: 2, 7: 1}, [], "dual", 2),
    ]
    canvas, steps = [MASK] * WIDTH, []
    for index, (block, commits, remasked, cache, calls) in enumerate(plan):
        masked = [token == MASK for token in canvas]
        proposals = [proposals_at(p) if masked[p] else [] for p in range(WIDTH)]
        confidence = [proposals_at(p)[0].prob if masked[p] and block[0] <= p < block[1] else INF for p in range(WIDTH)]
        for position, rank in commits.items():
            canvas[position] = token_at(position, rank)
        for position in remasked:
            canvas[position] = MASK
        steps.append(DiffusionStep(
            step=index, canvas=list(canvas), mask_id=MASK, committed_positions=sorted(commits),
            confidence=confidence, proposals=proposals, block=list(block), model_calls=calls, cache=cache,
            remasked_positions=remasked,
        ))
    return steps


@pytest.fixture
def trace():
    built = make_trace(hand_steps(), {MASK: "[mask]"})
    built.metrics = {"model_calls": 5, "tokens_per_call": 1.6, "order_kendall_tau": 0.8125}
    return built


def outlined(fig) -> set[tuple[int, int]]:
    """(position, row) of every cell outlined as committed at this step."""
    return {(round(s.x0 + 0.5), round(s.y0 + 0.5)) for s in fig.layout.shapes if s.name == "committed this step"}


def text_of(token_id: int) -> str:
    return HOSTILE_TOKENS.get(token_id, f"w{token_id}")


def quoted(token_id: int) -> str:
    return f"“{escape_token(text_of(token_id))}”"


def cell(token_id: int) -> str:
    """A cell's label: the token cut to six characters, then escaped."""
    text = text_of(token_id)
    return escape_token(text if len(text) <= 6 else text[:5] + "…")


# ---------------------------------------------------------------- the step's token lattice


def test_step_lattice_cells_hold_each_positions_proposals(trace):
    fig = step_lattice_figure(trace, 0)
    cells = by_name(fig, "proposals")
    assert list(cells.y) == list(range(1, TOP_RANKS + 2))  # ranks 1-5 and the "other" row position 2 needs
    assert fig.layout.yaxis.ticktext[-1] == "other"
    for position in range(WIDTH):  # every position is masked going into the first step
        for rank, candidate in enumerate(proposals_at(position)[:TOP_RANKS]):
            assert cells.z[rank][position] == candidate.prob
            assert cells.text[rank][position] == cell(candidate.token_id)
            assert quoted(candidate.token_id) in cells.hovertext[rank][position]
    assert cells.z[TOP_RANKS][2] == proposals_at(2)[5].prob  # the committed rank-6 token, in the "other" row
    assert cells.text[TOP_RANKS][2] == cell(token_at(2, 6))
    assert [cells.z[TOP_RANKS][p] for p in range(WIDTH) if p != 2] == [None] * (WIDTH - 1)
    assert "rank 6" in cells.hovertext[TOP_RANKS][2] and "committed at this step" in cells.hovertext[TOP_RANKS][2]
    assert outlined(fig) == {(1, 1), (2, TOP_RANKS + 1)}
    assert all(z is None for row in by_name(fig, "committed earlier").z for z in row)


def test_step_lattice_earlier_commits_remasks_and_blocks(trace):
    steps = hand_steps()
    fig = step_lattice_figure(trace, 1)
    earlier = by_name(fig, "committed earlier")
    assert list(earlier.z[0]) == [None, 1, 1, None, None, None, None, None]  # positions 1 and 2 came in committed
    assert earlier.text[0][1] == cell(token_at(1, 1))
    assert earlier.text[0][2] == cell(token_at(2, 6))  # still on the canvas going in: remasked at this step
    cells = by_name(fig, "proposals")
    assert len(cells.y) == TOP_RANKS  # every commit ranks in the top 5: no "other" row
    assert cells.z[0][1] is None and cells.z[0][2] is None and cells.z[1][0] == proposals_at(0)[1].prob
    # position 3 was committed and remasked at once: no committed token to outline
    assert outlined(fig) == {(0, 2)}
    assert list(by_name(fig, "remasked").x) == [2, 3]
    assert f"{quoted(steps[0].canvas[2])} sent back" in by_name(fig, "remasked").hovertext[0]
    block = [s for s in fig.layout.shapes if s.name == "active block"]
    assert [(b.x0, b.x1) for b in block] == [(-0.5, 3.5)]
    assert [s.x0 for s in fig.layout.shapes if s.name == "block boundary"] == [3.5]

    last = step_lattice_figure(trace, 3)
    assert outlined(last) == {(4, 1), (5, 1), (6, 2), (7, 1)}
    assert "dual cache" in last.layout.title.text and "2 model calls" in last.layout.title.text
    assert not [t for t in last.data if t.name == "remasked"]


def test_wide_canvas_opens_on_the_active_block():
    wide = build_diffusion_trace(length=64, steps=16, block=8)  # step 9 denoises block [32, 40)
    low, high = step_lattice_figure(wide, 9).layout.xaxis.range
    assert high - low == VISIBLE_POSITIONS and low <= 31.5 and high >= 39.5
    narrow = build_diffusion_trace(length=16, steps=8, block=8)
    assert step_lattice_figure(narrow, 5).layout.xaxis.range == (-0.5, 15.5)


def test_step_lattice_on_an_empty_trace():
    assert step_lattice_figure(make_trace([]), 0).layout.annotations[0].text == "No diffusion steps yet"
    assert diffusion_step_table(make_trace([]), 0) == []


# ---------------------------------------------------------------- the step's table


def test_step_table_rows(trace):
    def top3(position: int) -> list[str]:
        return [f"{quoted(c.token_id)} {c.prob:.3f}" for c in proposals_at(position)[:3]]

    assert diffusion_step_table(trace, 0) == [
        [0, "no", "[MASK]", f"{proposals_at(0)[0].prob:.4g}", *top3(0)],
        [1, "yes", quoted(token_at(1, 1)), f"{proposals_at(1)[0].prob:.4g}", *top3(1)],
        [2, "yes", quoted(token_at(2, 6)), f"{proposals_at(2)[0].prob:.4g}", *top3(2)],
        [3, "no", "[MASK]", f"{proposals_at(3)[0].prob:.4g}", *top3(3)],
    ]
    assert diffusion_step_table(trace, 1) == [
        [0, "yes", quoted(token_at(0, 2)), f"{proposals_at(0)[0].prob:.4g}", *top3(0)],
        [2, "remasked", f"{quoted(token_at(2, 6))} → [MASK]", "—", "—", "—", "—"],  # was committed, no proposals
        [3, "remasked", "[MASK]", f"{proposals_at(3)[0].prob:.4g}", *top3(3)],
    ]
    assert [row[:2] for row in diffusion_step_table(trace, 3)] == [[4, "yes"], [5, "yes"], [6, "yes"], [7, "yes"]]
    assert all(len(row) == len(DIFFUSION_TABLE_HEADERS) for i in range(4) for row in diffusion_step_table(trace, i))


# ---------------------------------------------------------------- the run at a glance


def test_committed_per_step_bars(trace):
    steps = hand_steps()
    fig = committed_per_step_figure(trace, selected=2)
    blocks = [t for t in fig.data if t.name.startswith("block")]
    assert [t.name for t in blocks] == ["block [0, 4)", "block [4, 8)"]
    assert [t.marker.color for t in blocks] == list(BLOCK_COLOURS[:2])
    heights = {x: y for t in blocks for x, y in zip(t.x, t.y)}
    assert heights == {s.step: len(s.committed_positions) for s in steps}
    assert [c for t in blocks for c in t.customdata] == [0, 1, 2, 3]  # a click selects the slider index
    remasked = by_name(fig, "remasked")
    assert list(remasked.y) == [-len(s.remasked_positions) for s in steps]
    marker = by_name(fig, "selected step")
    assert (marker.x, marker.y, marker.customdata) == ((2,), (2,), (2,))
    assert "10 commits, 2 remasks in 4 steps, 5 model calls" in fig.layout.title.text
    plain = committed_per_step_figure(build_diffusion_trace())
    assert not [t for t in plain.data if t.name in ("remasked", "selected step")]


def test_summary_holds_the_metrics(trace):
    summary = diffusion_summary(trace)
    assert "5 model calls" in summary and "1.6 tokens per call" in summary
    assert "order Kendall tau 0.812" in summary and "cache reused at 2 of 4 steps" in summary
    live = make_trace(hand_steps()[:2])  # nothing recorded the metrics yet: calls are counted from the steps
    assert diffusion_summary(live) == "2 model calls · cache reused at 0 of 2 steps"


def test_overview_lattice_marks_remasks(trace):
    fig = lattice_figure(trace)
    assert list(zip(by_name(fig, "remasked").x, by_name(fig, "remasked").y)) == [(2, 1), (3, 1)]
    assert by_name(fig, "committed").z[1][2] == 1  # position 2 came into step 1 committed, though remasked there
    assert by_name(fig, "committed").z[2][2] == 0  # and into step 2 masked again
    assert by_name(fig, "confidence").z[2][2] == pytest.approx(proposals_at(2)[0].prob)


# ---------------------------------------------------------------- escaping and the views


def test_no_raw_token_text_in_any_diffusion_view(trace):
    hostile_cache = make_trace([dataclasses.replace(hand_steps()[0], cache=HOSTILE_TOKENS[10])])
    for built in (trace, build_diffusion_trace(), hostile_cache):
        for index in range(len([e for e in built.events if isinstance(e, DiffusionStep)])):
            texts = fig_strings(step_lattice_figure(built, index)) + fig_strings(committed_per_step_figure(built, index))
            texts += [str(cell) for row in diffusion_step_table(built, index) for cell in row]
            texts.append(diffusion_canvas_html(built, index))
            assert_escaped(texts, [])
    everything = [s for i in range(4) for s in fig_strings(step_lattice_figure(trace, i))]
    assert_escaped(everything, [10, 11, 12, 13])
    assert escape_token(HOSTILE_TOKENS[10]) + " cache" in step_lattice_figure(hostile_cache, 0).layout.title.text


def test_views_walk_diffusion_steps(trace):
    from ui.views import view_values

    values = view_values(trace, 1, "probability")
    assert diffusion_summary(trace) in values[0] and "step 1 (4 in all)" in values[0]
    assert values[0].count("▒") == 6  # positions 2 and 3 (remasked) and the second block are masked after step 1
    assert values[1].maximum == 3 and values[1].value == 1
    assert [s.y0 for s in values[2]["value"].layout.shapes if s.name == "selected step"] == [1]  # the overview lattice, large
    assert by_name(values[3]["value"], "selected step").x == (1,)  # tokens committed per step
    assert values[4]["value"] is None and not values[4]["visible"]  # no attention recorded: its panel stays hidden
    assert outlined(values[5]["value"]) == {(0, 2)}  # the step's own lattice, full width
    table = values[6]
    assert table.value["headers"] == DIFFUSION_TABLE_HEADERS
    assert table.value["data"] == diffusion_step_table(trace, 1)
    assert "step 1" in table.label and "remasked 2" in table.label
    assert view_values(trace, 99, "probability")[1].value == 3  # past the end: the last step
