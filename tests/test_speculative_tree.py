"""Tree attention (one forward over a draft tree, KV compaction) and the `dyspec` decoder built on it."""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.events import event_from_dict, event_to_dict
from engine.speculative.cache import PrefixCache
from engine.speculative.tree import keep_path, node_depths, tree_forward
from tests.helpers import PROMPTS, assert_round_totals, rounds_of, run_ignoring_eos

#        root ─┬─ 0 ─┬─ 2 ── 5 ─┬─ 7
#              │     └─ 3       └─ 6 (duplicate token of 5)
#              ├─ 1 ── 4
#              └─ 8 ── 9
PARENTS = [-1, -1, 0, 0, 1, 2, 5, 5, -1, 8]


def _path(parents: list[int], node: int) -> list[int]:
    path: list[int] = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def _last_logits(model, ids: list[int]) -> torch.Tensor:
    return model.forward(torch.tensor([ids])).logits[0, -1]


# ---------------------------------------------------------------- tree attention


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gemma3"])
def test_tree_logits_equal_per_path_forwards_and_compaction_equals_a_fresh_forward(name):
    """Rounds of tree forward + compaction, the context growing past Gemma's sliding window (32): every node's
    logits equal a plain forward over context + its root-to-node path, and after keeping an accepted path
    (not a prefix of the flattened tree) the next forward equals a fresh one over context + that path."""
    model = load_model(name)
    generator = torch.Generator().manual_seed(0)
    target = PrefixCache(model)
    context = torch.randint(3, model.vocab_size, (30,), generator=generator).tolist()
    for accepted_leaf in [7, 4, 9, 6, 3]:
        tokens = torch.randint(3, model.vocab_size, (len(PARENTS),), generator=generator).tolist()
        tokens[6] = tokens[5]
        logits = tree_forward(target, context, PARENTS, tokens)
        assert logits.shape == (len(PARENTS) + 1, model.vocab_size)
        torch.testing.assert_close(logits[0], _last_logits(model, context), atol=1e-4, rtol=0)
        for node in range(len(PARENTS)):
            expected = _last_logits(model, context + [tokens[i] for i in _path(PARENTS, node)])
            torch.testing.assert_close(logits[node + 1], expected, atol=1e-4, rtol=0)
        path = _path(PARENTS, accepted_leaf)
        slots = keep_path(target, tokens, path)
        assert slots == [len(context) + node for node in path]
        assert target.cache.get_seq_length() == len(context) + len(path) == len(target.tokens)
        context = context + [tokens[i] for i in path] + [int(logits[accepted_leaf + 1].argmax())]
        after = target.forward(target.sync(context))
        torch.testing.assert_close(after.logits[0, -1], _last_logits(model, context), atol=1e-4, rtol=0)
        context += torch.randint(3, model.vocab_size, (5,), generator=generator).tolist()  # past the window sooner
    assert len(context) > 2 * 32


def test_an_empty_tree_is_a_plain_forward(llama):
    target = PrefixCache(llama)
    context = llama.encode("Hello there")
    logits = tree_forward(target, context, [], [])
    assert keep_path(target, [], []) == []
    torch.testing.assert_close(logits[0], _last_logits(llama, context), atol=1e-4, rtol=0)
    assert target.cache.get_seq_length() == len(context)


def test_node_depths_need_parents_before_children():
    assert node_depths(PARENTS) == [1, 1, 2, 2, 2, 3, 4, 4, 1, 2]
    with pytest.raises(ValueError, match="parents must come before"):
        node_depths([-1, 2, 0])


# ---------------------------------------------------------------- dyspec: losslessness (greedy, float32)

SETTINGS = [
    {"tree_size": 1, "draft_layers": 1},
    {"tree_size": 8, "draft_layers": 1},
    {"tree_size": 32, "max_depth": 8, "draft_layers": 1},
    {"tree_size": 32, "max_depth": 1, "draft_layers": 2},
    {"tree_size": 8, "max_depth": 8, "draft_layers": 2},  # the whole target as its own draft
    {"tree_size": 32, "max_depth": 8, "draft_layers": 2},
]


@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [45, 23])  # 23: the budget ends inside deep trees
def test_greedy_dyspec_equals_greedy_llama(llama, params, prompt, max_new_tokens):
    expected = run_ignoring_eos(llama, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    trace = run_ignoring_eos(llama, "dyspec", prompt, params, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


@pytest.mark.parametrize("params", [{"tree_size": 16, "draft_layers": 1}, {"tree_size": 32, "max_depth": 8, "draft_layers": 2}])
def test_greedy_dyspec_equals_greedy_gemma3(params):
    """70 tokens cross Gemma's sliding window: the per-layer-type tree masks and compaction must handle it."""
    gemma = load_model("tiny-random-gemma3")
    expected = run_ignoring_eos(gemma, "greedy", PROMPTS[1], max_new_tokens=70).output_token_ids
    trace = run_ignoring_eos(gemma, "dyspec", PROMPTS[1], params, max_new_tokens=70)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == expected


def test_dyspec_with_a_separate_draft_model_equals_greedy(llama):
    params = {"draft_model": "tiny-random-llama:seed=1", "tree_size": 12}
    trace = run_ignoring_eos(llama, "dyspec", PROMPTS[0], params, max_new_tokens=30)
    assert trace.output_token_ids == run_ignoring_eos(llama, "greedy", PROMPTS[0], max_new_tokens=30).output_token_ids
    assert {n.source for r in rounds_of(trace) for n in r.nodes} == {"tiny-random-llama:seed=1"}


# ---------------------------------------------------------------- dyspec: what a round records


@pytest.mark.parametrize(
    "params",
    [
        {"draft_layers": 1, "tree_size": 12, "max_depth": 4},
        {"draft_layers": 2, "tree_size": 12, "max_depth": 4},
        {"draft_layers": 1, "tree_size": 12, "max_depth": 4, "temperature": 0.8},
    ],
)
def test_draft_round_contents(llama, params):
    # the tree as DySpec grows it every round (the cost-aware draft length would skip some rounds' drafts)
    trace = run_ignoring_eos(llama, "dyspec", PROMPTS[2], {**params, "draft_length": "fixed"}, max_new_tokens=40)
    rounds = rounds_of(trace)
    sampling = params.get("temperature", 0) > 0
    past = len(trace.prompt_token_ids)
    for r in rounds:
        assert len(r.nodes) <= 12 and r.model_calls == 1 and r.seconds >= r.draft_seconds >= 0
        # the prompt's round drafts nothing (the draft shares the target's cache, still empty), nor the last with one
        # token left to commit
        assert r.nodes or r is rounds[0] or r is rounds[-1]
        assert (r.draft_calls > 0) == bool(r.nodes) and r.draft_calls <= len(r.nodes)  # root + nodes with children
        for i, node in enumerate(r.nodes):
            assert node.id == i and -1 <= node.parent < i  # every parent precedes its child
            assert node.depth == (1 if node.parent < 0 else r.nodes[node.parent].depth + 1) <= 4
            assert node.source == f"dyspec:draft_layers:{params['draft_layers']}"
            assert 0 < node.draft_prob <= 1
            assert (node.draw is not None) == (node.ratio is not None) == (node.accepted is not None and sampling)
        path = r.accepted_path
        assert [r.nodes[n].depth for n in path] == list(range(1, len(path) + 1))
        assert all(r.nodes[child].parent == parent for parent, child in zip([-1, *path], path))
        assert all(r.nodes[n].accepted for n in path)
        assert r.committed == [r.nodes[n].token_id for n in path] + [r.bonus_token]
        children_of_path_end = [n for n in r.nodes if n.parent == (path[-1] if path else -1)]
        assert r.bonus_is_correction == bool(children_of_path_end)
        assert all(n.accepted is False for n in children_of_path_end)
        assert r.cache_slots_kept == [past + n for n in path]  # the accepted nodes' slots in the flattened tree
        past += len(r.committed)
        if not sampling:
            assert r.residual_top == []
        assert event_from_dict(event_to_dict(r)) == r
    assert_round_totals(trace, rounds, 40)
    if params["draft_layers"] == 2 and not sampling:  # the draft is the target: its top-ranked chain always passes
        assert not any(r.bonus_is_correction for r in rounds)
