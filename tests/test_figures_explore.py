"""The step tools' figures (token tree, re-processed step) and the Library's run tree rows and run labels, on
hand-built engine results with hostile token text."""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field

from engine.events import StageReport
from engine.explore import TokenTree, TreeNode
from engine.reprocess import Reprocessed, StageCut
from tests.helpers import (
    HOSTILE_TEXTS,
    RAW_FRAGMENTS,
    by_name,
    fig_strings,
    hand_step,
    hand_trace,
)
from ui.figures import (
    RUN_TREE_HEADERS,
    distribution_figure,
    escape_token,
    reprocess_figure,
    run_label,
    run_tree_rows,
    token_tree_figure,
)
from ui.figures.common import PRIMARY_HEIGHTS, text_px
from ui.figures.explore import TREE_LABEL_CHARS
from ui.figures.trees import NODE_FONT, PixelMap


def build_tree(depth: int = 3, children: int = 3, texts: list[str] | None = None) -> TokenTree:
    """Breadth first, ``children`` per node, probabilities 0.5, 0.3, 0.2 (scaled), path probability the product."""
    texts = texts or [" the", " a", " quick", "\n", "ing", " brown"]
    nodes: list[TreeNode] = []
    layer = [(-1, 1.0)]
    for d in range(1, depth + 1):
        nxt = []
        for parent, path in layer:
            for k in range(children):
                prob = [0.5, 0.3, 0.2, 0.1, 0.05][k] * (0.9 if d % 2 else 1.0)
                node = TreeNode(id=len(nodes), parent=parent, token_id=100 + len(nodes),
                                text=texts[len(nodes) % len(texts)], depth=d, prob=round(prob, 4),
                                path_prob=round(path * prob, 6))
                nodes.append(node)
                nxt.append((node.id, node.path_prob))
        layer = nxt
    return TokenTree(prefix_ids=[1, 2, 3], prefix_text="Once upon a <i>time</i>", depth=depth, max_children=children,
                     min_prob=0.01, nodes=nodes, model_calls=1 + sum(children ** d for d in range(depth)))


# ---------------------------------------------------------------- token tree


def test_token_tree_nodes_edges_and_click_ids():
    tree = build_tree()
    fig = token_tree_figure(tree)
    nodes = by_name(fig, "continuations")
    assert sorted(nodes.customdata) == [n.id for n in tree.nodes]  # a click names the node
    assert list(by_name(fig, "prefix").customdata) == [-1]
    by_id = {n.id: n for n in tree.nodes}
    for node_id, x, colour in zip(nodes.customdata, nodes.x, nodes.marker.color):
        assert x == by_id[node_id].depth  # left to right, one column per depth
        assert colour == by_id[node_id].path_prob
    assert by_name(fig, "edges").x.count(None) == len(tree.nodes)
    assert PRIMARY_HEIGHTS[0] <= fig.layout.height
    assert "Token tree" in fig.layout.title.text and "p(token | parent)" in fig.layout.title.text


def test_token_tree_edge_labels_are_the_node_probabilities():
    tree = build_tree(depth=3, children=3)
    fig = token_tree_figure(tree)
    edges = by_name(fig, "p(token | parent)")
    by_id = {n.id: n for n in tree.nodes}
    assert len(edges.text) == len(tree.nodes)  # a 39-node tree has room for every one
    for node_id, text, x in zip(edges.customdata, edges.text, edges.x):
        assert text == f"{by_id[node_id].prob:.2f}"
        assert by_id[node_id].depth - 1 < x < by_id[node_id].depth  # on the edge into that node


def test_token_tree_labels_and_hovers():
    texts = HOSTILE_TEXTS + ["a-very-long-token-indeed"]
    tree = build_tree(depth=2, children=3, texts=texts)
    fig = token_tree_figure(tree)
    nodes = by_name(fig, "continuations")
    by_id = {n.id: n for n in tree.nodes}
    for node_id, label, hover in zip(nodes.customdata, nodes.text, nodes.hovertext):
        node = by_id[node_id]
        if label:
            assert label == escape_token(node.text if len(node.text) <= TREE_LABEL_CHARS
                                         else node.text[: TREE_LABEL_CHARS - 1] + "…")
        assert f"path probability: {node.path_prob:.3f}" in hover
        path = node.text if node.parent == -1 else by_id[node.parent].text + node.text
        assert "path: “" + escape_token(path) + "”" in hover
    joined = "\n".join(fig_strings(fig))
    for raw in HOSTILE_TEXTS + RAW_FRAGMENTS + ["<i>time"]:
        assert raw not in joined
    assert escape_token("<i>time</i>") in joined


def test_token_tree_labels_do_not_overlap_on_a_bushy_tree():
    fig = token_tree_figure(build_tree(depth=4, children=4, texts=["<img src=x onerror=alert(2)>", " fox"]))
    m = fig.layout.margin
    pixels = PixelMap(tuple(fig.layout.xaxis.range), tuple(fig.layout.yaxis.range), 1300 - m.l - m.r,
                      fig.layout.height - m.t - m.b)
    boxes = []
    for name in ("prefix", "continuations"):
        trace = by_name(fig, name)
        sizes = trace.marker.size if isinstance(trace.marker.size, tuple) else [trace.marker.size] * len(trace.x)
        for x, y, label, size in zip(trace.x, trace.y, trace.text, sizes):
            if label:
                px, py = pixels(x, y)
                w = text_px(label, NODE_FONT)
                boxes.append((px - w / 2, py - size / 2 - NODE_FONT * 1.2, px + w / 2, py - size / 2))
    edges = by_name(fig, "p(token | parent)")
    for x, y, label in zip(edges.x, edges.y, edges.text):
        px, py = pixels(x, y)
        w = text_px(label, edges.textfont.size)
        boxes.append((px - w / 2, py - 5, px + w / 2, py + 5))
    assert len(boxes) > 40  # 340 nodes in at most 1200 px: the labels that fit, none overlapping
    for a, b in itertools.combinations(boxes, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_token_tree_without_nodes():
    empty = TokenTree(prefix_ids=[1], prefix_text="x", depth=2, max_children=3, min_prob=0.9)
    fig = token_tree_figure(empty)
    assert not fig.data and "no continuation" in fig.layout.annotations[0].text


# ---------------------------------------------------------------- re-processing


def reprocessed(exact: bool = True, texts: tuple[str, ...] = (" Paris", " the", " a", " France", " Lyon")) -> Reprocessed:
    return Reprocessed(
        position=4, settings={"temperature": 0.7, "top_k": 3.0, "top_p": 0.9}, token_ids=(5, 6, 7, 8, 9),
        texts=texts, raw_probs=(0.4, 0.25, 0.15, 0.1, 0.05), probs=(0.55, 0.3, 0.15, 0.0, 0.0),
        stages=(StageCut("temperature", 50000, 1.0, None, (True,) * 5),
                StageCut("top_k", 3, 0.8, None, (True, True, True, False, False)),
                StageCut("top_p", 3, 0.95, 0.9, (True, True, True, False, False))),
        entropy_raw=2.1234, entropy=1.0012, exact=exact, covered_mass=0.9, chosen_token_id=6,
    )


def test_reprocess_bars_cuts_and_title():
    result = reprocessed()
    fig = reprocess_figure(result)
    assert [t.name for t in fig.data] == ["raw (model)", "re-processed"]
    assert list(fig.data[0].y) == list(result.raw_probs) and list(fig.data[1].y) == list(result.probs)
    shapes = {s.name: s for s in fig.layout.shapes}
    assert set(shapes) == {"chosen", "cut:temperature", "cut:top_k", "cut:top_p"}
    assert shapes["cut:top_k"].x0 == 2.5 and shapes["cut:temperature"].x0 == 4.5  # after the last survivor
    assert shapes["chosen"].x0 < 1 < shapes["chosen"].x1
    assert fig.layout.xaxis.ticktext[1].startswith("<b>")
    title = html.unescape(fig.layout.title.text)  # as plotly shows it
    assert "temperature=0.7 · top_k=3 · top_p=0.9" in title and "exact (full vocabulary)" in title
    assert "entropy 2.123 → 1.001 nats" in title
    approx = reprocess_figure(reprocessed(exact=False)).layout.title.text
    assert "approximate: from the recorded top-5 candidates (covering 90.0% of the mass)" in approx
    assert "No" in reprocess_figure(None).layout.annotations[0].text


def test_reprocess_cuts_are_drawn_by_the_distribution_code():
    """The same cut, fed once as a recorded StageReport and once as a re-processed StageCut, draws the same."""
    survivors = (True, False, True)  # not a prefix
    trace = hand_trace([hand_step(0, 1, {0: 0.5, 1: 0.3, 2: 0.2}, [StageReport("typical", 2, 0.5, 0b101, 0.3)])],
                  {0: "a", 1: "b", 2: "c"})
    recorded = distribution_figure(trace, 0)
    result = Reprocessed(position=0, settings={"typical_p": 0.3}, token_ids=(0, 1, 2), texts=("a", "b", "c"),
                         raw_probs=(0.5, 0.3, 0.2), probs=(0.7, 0.0, 0.3),
                         stages=(StageCut("typical", 2, 0.5, 0.3, survivors),), entropy_raw=1.0, entropy=0.6,
                         exact=True, covered_mass=1.0, chosen_token_id=1)
    again = reprocess_figure(result)
    cut = [s for s in recorded.layout.shapes if s.name == "cut:typical"][0]
    cut2 = [s for s in again.layout.shapes if s.name == "cut:typical"][0]
    assert (cut.x0, cut.line.dash) == (cut2.x0, cut2.line.dash) == (2.5, "dash")
    label = [a.text for a in recorded.layout.annotations if "typical" in a.text][0]
    assert label == [a.text for a in again.layout.annotations if "typical" in a.text][0]
    assert "not a prefix" in label


def test_reprocess_escapes_candidate_text():
    fig = reprocess_figure(reprocessed(texts=tuple(HOSTILE_TEXTS) + ("ok",)))
    joined = "\n".join(fig_strings(fig))
    for raw in HOSTILE_TEXTS + RAW_FRAGMENTS:
        assert raw not in joined
    assert escape_token(HOSTILE_TEXTS[0]) in joined  # whole in the hover


# ---------------------------------------------------------------- the Library's run tree


@dataclass
class Summary:
    run_id: str
    created_at: str
    prompt: str = "Explain entropy."
    model: str = "smollm2"
    decoder: str = "top_p"
    status: str = "finished"
    metrics: dict = field(default_factory=lambda: {"new_tokens": 7})


@dataclass
class BranchSummary(Summary):
    parent_run_id: str | None = None
    branch_step: int | None = None


def ids(rows):
    return [r[0] for r in rows]


def test_run_tree_rows_put_branches_under_their_parent():
    runs = [  # newest first, as the store lists them
        BranchSummary("c" * 32, "2025-01-05", parent_run_id="a" * 32, branch_step=3),
        BranchSummary("d" * 32, "2025-01-04", prompt="<b>x</b>\nsecond line"),
        BranchSummary("e" * 32, "2025-01-06", parent_run_id="c" * 32, branch_step=1),
        BranchSummary("b" * 32, "2025-01-03", parent_run_id="a" * 32, branch_step=5),
        BranchSummary("f" * 32, "2025-01-02", parent_run_id="z" * 32, branch_step=2),  # orphan: parent not listed
        BranchSummary("a" * 32, "2025-01-01"),
    ]
    rows = run_tree_rows(runs)
    assert ids(rows) == ["d" * 32, "f" * 32, "a" * 32, "b" * 32, "c" * 32, "e" * 32]
    assert all(len(r) == len(RUN_TREE_HEADERS) for r in rows)
    by = {r[0]: r for r in rows}
    assert by["a" * 32][6] == "Explain entropy." and by["a" * 32][5] == 7
    assert by["b" * 32][6] == "└ branch of aaaaaaaa @ step 5 · Explain entropy."
    assert by["e" * 32][6] == "\u00a0\u00a0\u00a0└ branch of cccccccc @ step 1 · Explain entropy."
    assert by["f" * 32][6] == "branch of zzzzzzzz @ step 2 · Explain entropy."  # a root, still marked
    assert by["d" * 32][6] == "<b>x</b> second line"  # plain text, one line: the Dataframe shows it as text


def test_run_tree_rows_without_branch_fields_and_with_a_cycle():
    plain = [Summary("p" * 32, "2025-01-02"), Summary("q" * 32, "2025-01-01")]  # summaries from before branching
    assert ids(run_tree_rows(plain)) == ["p" * 32, "q" * 32]
    loop = [BranchSummary("x" * 32, "1", parent_run_id="y" * 32), BranchSummary("y" * 32, "2", parent_run_id="x" * 32),
            BranchSummary("s" * 32, "3", parent_run_id="s" * 32)]
    assert sorted(ids(run_tree_rows(loop))) == sorted(r.run_id for r in loop)  # each run once, nothing lost


def test_run_label():
    run = Summary("0123456789abcdef" * 2, "2025-01-01T10:00:00+00:00", prompt="Explain   entropy\nin one sentence, "
                  "please, with an example of a fair coin.")
    assert run_label(run) == ("top_p · smollm2 · Explain entropy in one sentence, please,… · finished · "
                              "2025-01-01T10:00:00+00:00 · 01234567")
    assert run_label(Summary("ab", "t", prompt="short")) == "top_p · smollm2 · short · finished · t · ab"
