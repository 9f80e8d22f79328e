"""Model-free tree drafters: Token Recycling (adjacency matrix + static template) and ADED (tri-gram table + MCTS)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.decoders.speculative.aded import (
    AdedDrafter,
    Trie,
    adapt,
    best_sequences,
    draft_trie,
    search,
    trigram_table,
)
from engine.decoders.speculative.token_recycling import (
    TEMPLATE_2_2_2,
    UNKNOWN,
    Adjacency,
    RecyclingDrafter,
    adjacency_matrix,
    template,
)
from engine.events import DecoderMetric
from engine.speculative.tree import node_depths
from tests.helpers import (
    PROMPTS,
    assert_follows,
    first_token_law,
    rounds_of,
    run_ignoring_eos,
)

# The tiny Llama's greedy output after PROMPTS[1] repeats one token (both drafters hit); after PROMPTS[2] it wanders
# (ADED's drafts miss, Token Recycling's hit only once the matrix has seen the tokens).
HITS, MISSES = PROMPTS[1], PROMPTS[2]

# Adversarial settings: the paper's full tree and a sliver of it, k below the template's widest rank, a
# one-node ADED trie, a wide one with a long search, and a search of one iteration.
TR_SETTINGS = [
    {"reset_matrix": True},
    {"reset_matrix": True, "tree_size": 3},
    {"reset_matrix": True, "k": 2, "tree_size": 40},
    {},  # hot start: whatever earlier runs on this model left in the matrix
]
ADED_SETTINGS = [
    {"iterations": 40},
    {"iterations": 1, "budget": 1},
    {"iterations": 300, "budget": 64},
]
SETTINGS = [("token_recycling", p) for p in TR_SETTINGS] + [("aded", p) for p in ADED_SETTINGS]


# ---------------------------------------------------------------- Token Recycling: template and matrix


def test_template_is_the_papers_80_node_six_level_tree():
    assert len(set(TEMPLATE_2_2_2)) == 80
    levels = [sum(len(path) == depth for path in TEMPLATE_2_2_2) for depth in range(1, 7)]
    assert levels == [8, 21, 25, 15, 8, 3]
    assert list(template(80)) == sorted(TEMPLATE_2_2_2, key=lambda path: (len(path), path))
    for size in (1, 5, 17, 80):
        paths = template(size)
        assert len(paths) == size and all(len(p) == 1 or p[:-1] in paths[: paths.index(p)] for p in paths)
    assert template(3) == [(0,), (1,), (0, 0)]


def test_matrix_update_takes_the_top_k_of_each_nodes_logits_last_write_wins():
    matrix = Adjacency.blank(6, 2)
    logits = torch.tensor(
        [
            [0.0, 5.0, 4.0, 0.0, 0.0, 0.0],  # root (token 3): top-2 = 1, 2
            [9.0, 0.0, 0.0, 0.0, 0.0, 8.0],  # node token 4: 0, 5
            [0.0, 0.0, 0.0, 7.0, 6.0, 0.0],  # node token 1: 3, 4 (overwritten below)
            [0.0, 0.0, 1.0, 0.0, 0.0, 2.0],  # node token 1 again: 5, 2 wins
        ]
    )
    matrix.update([3, 4, 1, 1], logits)
    assert matrix.tokens.tolist() == [[UNKNOWN] * 2, [5, 2], [UNKNOWN] * 2, [1, 2], [0, 5], [UNKNOWN] * 2]
    torch.testing.assert_close(matrix.probs[4], logits[1].softmax(-1)[[0, 5]])  # the target's probabilities


def test_tree_is_filled_level_by_level_from_the_matrix_and_unknown_rows_are_pruned():
    matrix = Adjacency.blank(10, 2)
    matrix.tokens[7] = torch.tensor([1, 2])
    matrix.tokens[1] = torch.tensor([3, 4])  # token 2's row stays unknown: its subtree is dropped
    matrix.tokens[3] = torch.tensor([5, 6])
    matrix.probs[7] = torch.tensor([0.5, 0.25])
    drafter = RecyclingDrafter(matrix, [p for p in template(80) if max(p) < 2])
    draft = drafter.propose([9, 7], max_depth=6)
    depths = node_depths(draft.parents)
    paths = {(depths[i], draft.tokens[i], draft.tokens[draft.parents[i]] if draft.parents[i] >= 0 else 7) for i in range(len(draft.tokens))}
    assert paths == {(1, 1, 7), (1, 2, 7), (2, 3, 1), (2, 4, 1), (3, 5, 3), (3, 6, 3)}
    assert all(p < i for i, p in enumerate(draft.parents))
    assert draft.scores == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]  # each node's rank in its parent's row
    assert draft.logprobs is None  # deterministic drafts
    shallow = drafter.propose([9, 7], max_depth=1)
    assert shallow.tokens == [1, 2] and shallow.parents == [-1, -1] and shallow.probs == [0.5, 0.25]
    assert drafter.propose([9, 8], max_depth=6).tokens == []  # the root's row is unknown


def test_matrix_is_kept_across_runs_unless_reset(llama):
    def known_at_start(params):
        trace = run_ignoring_eos(llama, "token_recycling", MISSES, params, max_new_tokens=8)
        return trace.metrics["matrix_rows_known_at_start"]

    assert known_at_start({"reset_matrix": True}) == 0
    learnt = adjacency_matrix(llama.name, llama.vocab_size, 8, reset=False).known_rows()
    assert known_at_start({}) == learnt > 0


def test_siblings_are_distinct_tokens(llama):
    params = {"reset_matrix": True, "draft_length": "fixed"}  # the drafter's whole tree (no cost-aware cut)
    trace = run_ignoring_eos(llama, "token_recycling", MISSES, params, max_new_tokens=30)
    for r in rounds_of(trace):
        children = {}
        for node in r.nodes:
            children.setdefault(node.parent, []).append(node.token_id)
        assert all(len(kids) == len(set(kids)) for kids in children.values())
    assert max(len(r.nodes) for r in rounds_of(trace)) > 20  # the matrix filled up and the tree grew


# ---------------------------------------------------------------- ADED: table, adaptation, search, trie


def test_trigram_table_normalises_counts_and_keeps_the_top_continuations():
    table = trigram_table([[1, 2, 3, 1, 2, 3, 1, 2, 4], [5, 6, 7]], top=2)
    assert table[(1, 2)] == pytest.approx({3: 2 / 3, 4: 1 / 3})
    assert table[(2, 3)] == {1: 1.0} and table[(5, 6)] == {7: 1.0}
    wide = trigram_table([[1, 2, 3, 1, 2, 3, 1, 2, 4, 1, 2, 5]], top=2)
    assert wide[(1, 2)] == pytest.approx({3: 0.5, 4: 0.25})  # probabilities of the whole count, then pruned


def test_adaptation_adds_to_recent_trigrams_up_to_the_cap_without_touching_the_corpus_table():
    corpus = {(1, 2): {3: 0.5}}
    table, private = dict(corpus), set()
    adapt(table, [9] * 30 + [1, 2, 3, 1, 2, 4], private)
    assert table[(1, 2)] == pytest.approx({3: 0.54, 4: 0.04}) and table[(2, 3)] == pytest.approx({1: 0.04})
    assert table[(9, 9)] == pytest.approx({9: 8 * 0.04, 1: 0.04})  # only the last 16 tokens count: ten 9s
    assert corpus == {(1, 2): {3: 0.5}}
    for _ in range(200):
        adapt(table, [1, 2, 3], private)
    assert table[(1, 2)][3] == 3.0


TOY = {(0, 1): {2: 0.7, 3: 0.2, 4: 0.1}, (1, 2): {5: 0.9, 6: 0.1}, (2, 5): {7: 1.0}, (1, 3): {8: 1.0}, (5, 7): {9: 1.0}}


def _nodes(root):
    stack, seen = [(root, 0)], []
    while stack:
        node, depth = stack.pop()
        seen.append((node, depth))
        stack.extend((c, depth + 1) for c in node.children or [])
    return seen


def test_search_visits_are_consistent_and_favour_heavy_continuations():
    root = search(TOY, (0, 1), 150, random.Random(0))
    assert root.visits == 150
    for node, depth in _nodes(root):
        assert depth <= 4  # sequences of at most four tokens
        assert node.visits >= sum(c.visits for c in node.children or [])
        if node.children is not None:  # expanded: every continuation of its key is a child, likeliest first
            assert [c.token for c in node.children] == sorted(TOY.get(node.key, {}), key=lambda t: -TOY[node.key][t])
    assert max(root.children, key=lambda c: c.visits).token == 2
    assert max(root.children[0].children, key=lambda c: c.visits).token == 5


@pytest.mark.parametrize("budget", [1, 3, 6, 24])
@pytest.mark.parametrize("max_depth", [1, 2, 6])
def test_trie_respects_budget_and_depth_with_parents_before_children(budget, max_depth):
    trie = draft_trie(TOY, (0, 1), 150, budget, max_depth, random.Random(0))
    assert 0 < len(trie.tokens) <= budget
    assert all(-1 <= p < i for i, p in enumerate(trie.parents))
    assert max(node_depths(trie.parents)) <= max_depth
    paths = [tuple(trie.tokens[j] for j in _ancestry(trie.parents, i)) for i in range(len(trie.tokens))]
    assert len(set(paths)) == len(paths)  # a trie: no two nodes spell the same sequence
    assert trie.tokens[0] == 2  # the most visited first step


def _ancestry(parents, node):
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_trie_scores_are_the_search_visit_counts():
    root = search(TOY, (0, 1), 150, random.Random(0))
    sequences = best_sequences(root, TOY, 24)
    trie = Trie()
    for tokens, v in sequences:
        trie.insert(tokens, v, 64)
    for i, token in enumerate(trie.tokens):  # walk the search tree along the node's path: same visits
        node = root
        for j in _ancestry(trie.parents, i):
            node = next((c for c in node.children or [] if c.token == trie.tokens[j]), None)
            if node is None:
                break
        assert trie.visits[i] == (node.visits if node is not None else 0)
    assert trie.visits[0] == max(c.visits for c in root.children)


def test_aded_drafts_from_context_and_leaves_the_corpus_table_alone():
    corpus = {(0, 1): {2: 0.7}}
    drafter = AdedDrafter(corpus, iterations=20, budget=8)
    draft = drafter.propose([4, 5, 6, 4, 5, 6, 4, 5], max_depth=5)  # adapted: (4,5)->6, (5,6)->4, (6,4)->5
    assert draft.tokens[:3] == [6, 4, 5] and draft.parents[:3] == [-1, 0, 1] and draft.logprobs is None
    assert corpus == {(0, 1): {2: 0.7}}
    assert drafter.propose([7, 8], max_depth=5).tokens == []  # an unknown key drafts nothing


# ---------------------------------------------------------------- both: losslessness and the sampling law


@pytest.mark.parametrize("decoder,params", SETTINGS)
@pytest.mark.parametrize("prompt", [HITS, MISSES])
@pytest.mark.parametrize("max_new_tokens", [40, 17])  # 17: the budget ends inside a draft
def test_greedy_equals_greedy_llama(llama, decoder, params, prompt, max_new_tokens):
    expected = run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(llama, decoder, prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize("decoder,params", [SETTINGS[0], SETTINGS[2], SETTINGS[4], SETTINGS[6]])
@pytest.mark.parametrize("prompt", [HITS, MISSES])
def test_greedy_equals_greedy_gemma3_across_the_sliding_window(gemma, decoder, params, prompt):
    expected = run_ignoring_eos(gemma, "greedy", prompt, max_new_tokens=70).output_token_ids
    trace = run_ignoring_eos(gemma, decoder, prompt, params, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected
    assert len(trace.prompt_token_ids) + 70 > 2 * 32


@pytest.mark.parametrize("decoder", ["token_recycling", "aded"])
def test_drafts_hit_when_the_output_repeats(llama, decoder):
    # the drafter's own trees every round (the cost-aware length would cut them on a slow machine)
    trace = run_ignoring_eos(llama, decoder, HITS, {"draft_length": "fixed"}, max_new_tokens=40)
    assert trace.metrics["mean_accepted_tokens"] > 1.3
    assert any(e.name in ("matrix_rows_known_at_start", "corpus_trigram_keys") for e in trace.events if isinstance(e, DecoderMetric))
    for r in rounds_of(trace):
        assert all(n.source == decoder and n.score is not None for n in r.nodes)
        # ADED's lookups are certain; Token Recycling's nodes carry the target's probability when its row was stored
        assert all(n.draft_prob == 1.0 if decoder == "aded" else 0 < n.draft_prob < 1 for n in r.nodes)


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize("decoder,params", [("token_recycling", {"tree_size": 20}), ("aded", {"iterations": 30})])
def test_first_sampled_token_follows_processed_target(llama, decoder, params):
    run_ignoring_eos(llama, decoder, HITS, params, max_new_tokens=10)  # the matrix / table knows the prompt's end: drafts hit
    assert_follows(*first_token_law(llama, decoder, params, HITS, draws=600))
