"""Tree and lattice figures on built traces: structure, colours, truncation, acceptance accounting, escaping."""

from __future__ import annotations

import random

import pytest

from engine.events import (
    BeamNode,
    BeamStep,
    DiffusionStep,
    DraftNode,
    DraftRound,
    Output,
)
from engine.trace import Trace
from tests.helpers import (
    HOSTILE_TOKENS,
    assert_escaped,
    build_beam_trace,
    build_diffusion_trace,
    by_name,
    fig_strings,
    hand_rounds,
    make_trace,
)
from ui.figures.common import escape_token
from ui.figures.lattice import (
    canvas_html,
    commit_order,
    diffusion_steps,
    lattice_figure,
)
from ui.figures.trees import (
    BEAM_COLOURS,
    DRAFT_COLOURS,
    acceptance_by_depth,
    acceptance_figure,
    beam_tree_figure,
    draft_rounds,
    draft_tree_figure,
)

# ---------------------------------------------------------------- beam search


def beam_nodes(trace: Trace) -> list[BeamNode]:
    return [n for e in trace.events if isinstance(e, BeamStep) for n in e.nodes]


def node_count(fig, names) -> int:
    return sum(len(by_name(fig, n).x) for n in names)


def edge_count(trace_) -> int:
    return trace_.x.count(None)  # one None separator per edge segment


@pytest.fixture(scope="module")
def recorded_beam() -> Trace:
    from engine.models import load_model
    from engine.run import RunSettings, record

    return record(load_model("tiny-random-llama"), "beam", "Hello", {"num_beams": 3}, RunSettings(max_new_tokens=8))


@pytest.mark.parametrize("source", ["built", "recorded"])
def test_beam_tree_nodes_edges_and_best_path(source, recorded_beam):
    trace = recorded_beam if source == "recorded" else build_beam_trace(3, 6)
    nodes = beam_nodes(trace)
    fig = beam_tree_figure(trace)
    assert node_count(fig, ["prompt", "live", "pruned", "finished"]) == len(nodes) + 1
    assert edge_count(by_name(fig, "edges")) == len(nodes)
    for status in ("live", "pruned", "finished"):
        assert len(by_name(fig, status).x) == sum(n.status == status for n in nodes)
        assert by_name(fig, status).marker.color == BEAM_COLOURS[status]
    assert by_name(fig, "pruned").marker.size < by_name(fig, "live").marker.size
    assert by_name(fig, "pruned").opacity < 1
    output = next(e for e in trace.events if isinstance(e, Output))
    best = by_name(fig, "best sequence")
    assert edge_count(best) == len(output.token_ids)
    assert max(x for x in best.x if x is not None) == len(output.token_ids)
    # the path ends on a finished node
    finished = by_name(fig, "finished")
    end = (best.x[-2], best.y[-2])
    assert end in set(zip(finished.x, finished.y))


def test_beam_tree_layout_is_layered_without_overlaps():
    fig = beam_tree_figure(build_beam_trace(3, 6))
    groups = [by_name(fig, name) for name in ("prompt", "live", "pruned", "finished")]
    points = [(x, y) for group in groups for x, y in zip(group.x, group.y)]
    assert len(set(points)) == len(points)
    assert sorted({x for x, _ in points}) == list(range(7))


def test_beam_tree_up_to_step_and_live_trace():
    trace = build_beam_trace(3, 6)
    fig = beam_tree_figure(trace, up_to_step=2)
    shown = [n for e in trace.events if isinstance(e, BeamStep) and e.step <= 2 for n in e.nodes]
    assert node_count(fig, ["live", "pruned", "finished"]) == len(shown) == 18
    assert len(by_name(fig, "finished").x) == 0
    assert edge_count(by_name(fig, "best sequence")) == 3  # the output's prefix so far
    assert "step 2" in fig.layout.title.text
    live = make_trace([e for e in trace.events if not isinstance(e, Output)])
    assert not [t for t in beam_tree_figure(live).data if t.name == "best sequence"]
    empty = beam_tree_figure(make_trace([]))
    assert node_count(empty, ["prompt"]) == 1 and "no beam steps" in empty.layout.title.text


def test_beam_tree_max_nodes_hides_worst_pruned():
    trace = build_beam_trace(3, 10)  # 60 nodes, 30 of them pruned
    fig = beam_tree_figure(trace, max_nodes=40)
    assert node_count(fig, ["live", "pruned", "finished"]) == 40
    assert len(by_name(fig, "pruned").x) == 10
    assert "20 lowest-scoring pruned nodes hidden" in fig.layout.title.text
    assert "hidden" not in beam_tree_figure(trace).layout.title.text


def test_large_beam_trace_builds():
    trace = build_beam_trace(8, 100)
    fig = beam_tree_figure(trace, first_step=0)  # every step: the node budget hides the pruned ones
    assert node_count(fig, ["live", "finished"]) == 800
    assert len(by_name(fig, "pruned").x) == 0 and "800 lowest-scoring pruned" in fig.layout.title.text
    windowed = beam_tree_figure(trace)  # by default: the newest steps that fit across the page
    shown = sorted({x for name in ("live", "pruned", "finished") for x in by_name(windowed, name).x})
    assert shown[-1] == 100 and 8 <= len(shown) < 100 and "showing steps" in windowed.layout.title.text


# ---------------------------------------------------------------- speculative decoding


def random_round(rng: random.Random, step: int) -> DraftRound:
    """An EAGLE-like tree (10-60 nodes, depth <= 6) verified SpecInfer-style: along the accepted path every
    child is checked until one is accepted; after the path ends, the last node's children are all rejected."""
    nodes = [DraftNode(0, -1, rng.randrange(14, 60), 1, rng.random())]
    while len(nodes) < rng.randrange(10, 61):
        parent = rng.choice(nodes)
        if parent.depth < 6:
            nodes.append(DraftNode(len(nodes), parent.id, rng.randrange(10, 60), parent.depth + 1, rng.random()))
    kids = {n.id: [c for c in nodes if c.parent == n.id] for n in nodes}
    kids[-1] = [n for n in nodes if n.parent == -1]
    outcome: dict[int, bool] = {}
    path, at = [], -1
    while kids[at]:
        accepted_kid = None
        for kid in kids[at]:
            if rng.random() < 0.6:
                accepted_kid = kid.id
                outcome[kid.id] = True
                break
            outcome[kid.id] = False
        if accepted_kid is None:
            break
        path.append(accepted_kid)
        at = accepted_kid
    verified = [
        DraftNode(n.id, n.parent, n.token_id, n.depth, n.draft_prob, accepted=outcome.get(n.id),
                  **({"target_prob": rng.random(), "draw": rng.random()} if n.id in outcome else {}))
        for n in nodes
    ]
    committed = [nodes[i].token_id for i in path] + [12]
    return DraftRound(step=step, nodes=verified, accepted_path=path, committed=committed, bonus_token=12,
                      bonus_is_correction=bool(kids[at]))


def test_draft_tree_statuses_bonus_and_stats():
    trace = make_trace(hand_rounds())
    assert draft_rounds(trace) == [1, 2]
    fig = draft_tree_figure(trace, 1)
    assert [len(by_name(fig, s).x) for s in ("accepted", "rejected", "not verified")] == [2, 3, 3]
    for status in ("accepted", "rejected", "not verified"):
        assert by_name(fig, status).marker.color == DRAFT_COLOURS[status]
    correction = by_name(fig, "correction")
    assert correction.text[0] == escape_token(HOSTILE_TOKENS[13][:15]) + "… (correction)"  # labels are cut
    assert escape_token(HOSTILE_TOKENS[13]) in correction.hovertext[0] and escape_token(HOSTILE_TOKENS[12]) in correction.hovertext[0]
    assert correction.x == (3,)  # right after the 2-node accepted path
    assert edge_count(by_name(fig, "accepted path")) == 3
    assert edge_count(by_name(fig, "edges")) == 9  # 8 drafts + the correction
    stats = fig.layout.annotations[0].text
    assert "accepted 2 of 8 drafts (5 verified)" in stats and "committed 3" in stats and "draft calls 3" in stats
    assert "round 1 of 2" in fig.layout.title.text

    bonus = by_name(draft_tree_figure(trace, 2), "bonus")
    assert bonus.x == (5,) and bonus.text[0].endswith("(bonus)")
    context = by_name(draft_tree_figure(trace, 2), "context")  # root = the last committed token
    assert context.text[0].startswith(escape_token(HOSTILE_TOKENS[13][:15]))
    assert draft_tree_figure(trace, -1).layout.title.text == "Draft tree, round 2 of 2 (step 2)"
    with pytest.raises(ValueError):
        draft_tree_figure(trace, 0)


def test_draft_tree_keeps_duplicate_siblings_distinct():
    fig = draft_tree_figure(make_trace(hand_rounds()), 1)
    label = escape_token(HOSTILE_TOKENS[11])
    points = [(x, y) for name in ("accepted", "not verified") for x, y, t in
              zip(by_name(fig, name).x, by_name(fig, name).y, by_name(fig, name).text) if t == label]
    assert len(points) == 2 and len(set(points)) == 2 and {x for x, _ in points} == {1}


def test_draft_tree_random_rounds_node_counts():
    rng = random.Random(3)
    rounds = [random_round(rng, step) for step in range(12)]
    trace = make_trace(rounds)
    for index, rnd in zip(draft_rounds(trace), rounds):
        fig = draft_tree_figure(trace, index)
        counts = [len(by_name(fig, s).x) for s in ("accepted", "rejected", "not verified")]
        assert counts == [sum(n.accepted is v for n in rnd.nodes) for v in (True, False, None)]
        assert max(x for x in by_name(fig, "edges").x if x is not None) <= 7
        assert len([t for t in fig.data if t.name in ("bonus", "correction")]) == 1


def test_acceptance_by_depth_and_figure():
    """A level counts once per round that reached it, however many siblings the verifier tried there."""
    trace = make_trace(hand_rounds())
    assert acceptance_by_depth(trace) == {1: (2, 2), 2: (2, 2), 3: (1, 2), 4: (1, 1)}
    fig = acceptance_figure(trace)
    bars = by_name(fig, "acceptance rate")
    assert list(bars.x) == [1, 2, 3, 4]
    assert list(bars.y) == pytest.approx([1.0, 1.0, 0.5, 1.0])
    assert list(bars.text) == ["2/2", "2/2", "1/2", "1/1"]
    assert list(by_name(fig, "committed (bonus included)").y) == [3, 5]
    assert list(by_name(fig, "accepted drafts").y) == [2, 4]
    assert "4.00" in fig.layout.title.text
    assert acceptance_figure(make_trace([])).layout.annotations[0].text == "No draft rounds yet"


# ---------------------------------------------------------------- diffusion


def test_commit_order_and_lattice_shape():
    trace = build_diffusion_trace()
    order = commit_order(trace)
    assert sorted(order) == list(range(32)) and sorted(order.values()) == sorted(list(range(16)) * 2)
    assert all(order[p] // 4 == p // 8 for p in order)  # blocks fill left to right
    fig = lattice_figure(trace, selected_step=5)
    heat = by_name(fig, "confidence")
    assert len(heat.z) == 16 and all(len(row) == 32 for row in heat.z)
    assert (heat.zmin, heat.zmax) == (0.0, 1.0)
    assert len(by_name(fig, "committed").z) == 16
    markers = by_name(fig, "committed at")
    assert len(markers.x) == 32 and dict(zip(markers.x, markers.y)) == order
    vertical = [s for s in fig.layout.shapes if s.x0 == s.x1]
    horizontal = [s for s in fig.layout.shapes if s.y0 == s.y1]
    assert sorted(s.x0 for s in vertical) == [7.5, 15.5, 23.5]
    assert [s.y0 for s in horizontal] == [5]


def test_lattice_cells_masked_committed_and_outside_block():
    trace = build_diffusion_trace()
    steps = diffusion_steps(trace)
    fig = lattice_figure(trace)
    heat, done = by_name(fig, "confidence").z, by_name(fig, "committed").z
    first = steps[0]
    for p in first.committed_positions:
        assert heat[0][p] == pytest.approx(first.confidence[p])
    assert all(heat[0][p] is None for p in range(8, 32))  # -inf outside the first block
    later = steps[5]
    for p in range(32):
        committed_before = commit_order(trace)[p] < later.step
        assert (done[5][p] == 1) == committed_before
        assert (heat[5][p] is None) or not committed_before
    assert not fig.layout.shapes or all(s.y0 != s.y1 for s in fig.layout.shapes)  # no selected step line


def test_canvas_html_masks_and_tokens():
    trace = build_diffusion_trace()
    html = canvas_html(trace, 3)
    assert html.count('class="de-masked"') == 24 and html.count("▒") == 24
    assert html.count('class="de-new"') == 2 and html.count('class="de-old"') == 6
    final = canvas_html(trace, 15)
    assert "▒" not in final and final.count('class="de-new"') == 2
    with pytest.raises(ValueError):
        canvas_html(trace, 99)
    assert lattice_figure(make_trace([])).layout.annotations[0].text == "No diffusion steps yet"


# ---------------------------------------------------------------- escaping


def test_no_raw_token_text_in_any_figure():
    beam = build_beam_trace(3, 6)
    beam_strings = fig_strings(beam_tree_figure(beam))
    assert_escaped(beam_strings, [10, 11, 12, 13])
    assert any(escape_token("<i>prompt</i>") in text for text in beam_strings)
    rounds = make_trace(hand_rounds())
    assert_escaped(fig_strings(draft_tree_figure(rounds, 1)), [10, 11, 12, 13])
    assert_escaped(fig_strings(draft_tree_figure(rounds, 2)), [13])
    assert_escaped(fig_strings(acceptance_figure(rounds)), [])
    diffusion = build_diffusion_trace()
    assert_escaped(fig_strings(lattice_figure(diffusion)), [10, 11, 12, 13])
    assert_escaped([canvas_html(diffusion, 15)], [10, 11, 12, 13])


def test_inconsistent_traces_still_draw():
    """Imported traces are type-checked, not checked for consistency: cycles and dangling ids must not hang."""
    own_parent = [BeamNode(0, 0, 14, -1.0, -1.0, "live"), BeamNode(1, -1, 15, -1.0, -1.0, "live")]
    beam = make_trace([BeamStep(step=0, nodes=own_parent)])
    assert node_count(beam_tree_figure(beam), ["prompt", "live"]) == 2  # the self-parented node is unreachable
    duplicated = [DraftNode(0, -1, 14, 1, 0.5), DraftNode(1, 0, 15, 2, 0.5), DraftNode(0, 1, 16, 3, 0.5)]  # a cycle
    looped = DraftRound(step=0, nodes=duplicated, accepted_path=[7], committed=[16], bonus_token=16)
    fig = draft_tree_figure(make_trace([looped]), 1)
    assert node_count(fig, ["context", "not verified", "bonus"]) == 5
    canvas = DiffusionStep(step=0, canvas=[14, 0], mask_id=0, committed_positions=[0, 5], confidence=[0.5])
    diffusion = make_trace([canvas])
    assert commit_order(diffusion) == {0: 0}
    assert len(by_name(lattice_figure(diffusion), "committed at").x) == 1
