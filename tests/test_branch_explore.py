"""Branching from a token, the token-tree explorer and live re-processing of a recorded step, on tiny-random-llama."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sqlite3

import pytest
import torch
from sqlalchemy import create_engine, inspect, text
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from cli.main import main
from engine.events import TokenStep, TraceFormatError
from engine.explore import expand_token_tree
from engine.params import ParamError
from engine.reprocess import recorded_settings, reprocess_step
from engine.run import Run, RunSettings, branch_point, record
from engine.trace import dumps, loads, trace_to_dict
from storage import TraceStore, migrations

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def parent(llama):
    """A greedy run that always writes 12 tokens (EOS ignored), so every branch position exists."""
    return record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=12, ignore_eos=True))


@pytest.fixture(scope="module")
def sampled(llama):
    """A sampling run whose steps carry a temperature, top-k and top-p cut."""
    params = {"temperature": 0.7, "top_k": 40, "top_p": 0.8}
    return record(llama, "top_p", PROMPT, params, RunSettings(max_new_tokens=8, seed=3, ignore_eos=True))


def token_steps(trace) -> dict[int, TokenStep]:
    return {e.position: e for e in trace.events if isinstance(e, TokenStep)}


def next_probs(model, ids: list[int]) -> torch.Tensor:
    """An independent reference: one plain forward of the transformers model, softmax of the last position."""
    with torch.inference_mode():
        return model.model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)


# ---------------------------------------------------------------- branching


def test_branch_on_the_parents_own_greedy_token_reproduces_its_continuation(llama, parent):
    k = 4
    point = branch_point(parent, k, parent.output_token_ids[k])
    settings = RunSettings(max_new_tokens=len(parent.output_token_ids) - k - 1, ignore_eos=True, branch=point)
    child = record(llama, "greedy", PROMPT, settings=settings)
    assert child.prompt_token_ids == parent.prompt_token_ids + parent.output_token_ids[: k + 1]
    assert child.output_token_ids == parent.output_token_ids[k + 1 :]


def test_branch_with_another_token_is_recorded_stored_and_listed(llama, parent, tmp_path):
    k = 3
    alternative = token_steps(parent)[k].candidates[1].token_id  # the parent's second choice at k
    assert alternative != parent.output_token_ids[k]
    child = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=5, branch=branch_point(parent, k, alternative)))
    expected_prompt = parent.prompt_token_ids + parent.output_token_ids[:k] + [alternative]
    assert child.prompt_token_ids == expected_prompt
    assert child.info.prompt == parent.info.prompt
    assert child.info.parent == {"run_id": parent.run_id, "step": k, "token_id": alternative}
    first = token_steps(child)[0]
    assert first.token_id == int(next_probs(llama, expected_prompt).argmax())

    with TraceStore(f"sqlite:///{tmp_path / 'branches.db'}") as store:
        store.save(parent)
        streamed = Run(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=3, branch=branch_point(parent, 0, 7)),
                       sinks=[store.sink()]).to_end()
        store.save(child)
        listed = {r.run_id: r for r in store.list_runs()}
        assert (listed[parent.run_id].parent_run_id, listed[parent.run_id].branch_step) == (None, None)
        assert (listed[child.run_id].parent_run_id, listed[child.run_id].branch_step) == (parent.run_id, k)
        assert (listed[streamed.run_id].parent_run_id, listed[streamed.run_id].branch_step) == (parent.run_id, 0)
        assert store.load(child.run_id).info.parent == child.info.parent
        assert store.load(parent.run_id).info.parent is None
    assert loads(dumps(child)).info.parent == child.info.parent


def test_trace_files_validate_the_parent(parent):
    doc = trace_to_dict(parent)
    del doc["run"]["info"]["parent"]  # a file written before branches existed
    assert loads(json.dumps(doc)).info.parent is None
    for bad in ({"run_id": 5, "step": 1, "token_id": 2}, {"run_id": "a", "step": True, "token_id": 2},
                {"run_id": "a", "step": 1}, {"run_id": "a", "step": 1, "token_id": 2, "code": "x"}, "abc"):
        doc["run"]["info"]["parent"] = bad
        with pytest.raises(TraceFormatError, match="run.info.parent"):
            loads(json.dumps(doc))


def test_an_old_database_keeps_its_runs_through_the_branch_migration(llama, parent, tmp_path):
    db = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        assert migrations.upgrade(conn, target=2) == 2
        conn.execute(text(
            "INSERT INTO runs VALUES ('old2run', '2024-01-01T00:00:00+00:00', 'gpt2', 'greedy', '{}', 'Hi', 3,"
            " 'finished', '', '[1]', '[42]', ' there', :metrics, :info)"
        ), {"metrics": '{"new_tokens":1}', "info": '{"chat":false}'})
        conn.execute(text("INSERT INTO vocab VALUES ('old2run', 42, ' there')"))
    engine.dispose()

    with TraceStore(f"sqlite:///{db}") as store:
        [old] = store.list_runs()
        assert (old.run_id, old.prompt, old.parent_run_id, old.branch_step) == ("old2run", "Hi", None, None)
        trace = store.load("old2run")
        assert trace.output_token_ids == [42] and trace.info.seed == 3 and trace.info.parent is None
        child = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=2, branch=branch_point(parent, 2, 9)))
        store.save(child)
    con = sqlite3.connect(db)
    assert con.execute("SELECT max(version) FROM schema_version").fetchone() == (migrations.LATEST_VERSION,)
    assert con.execute("SELECT run_id, parent_run_id, branch_step FROM runs ORDER BY created_at").fetchall() == [
        ("old2run", None, None), (child.run_id, parent.run_id, 2)]
    con.close()
    assert "ix_runs_parent_run_id" in {i["name"] for i in inspect(create_engine(f"sqlite:///{db}")).get_indexes("runs")}


def test_bad_branches_are_refused_clearly(llama, parent, tmp_path):
    n = len(parent.output_token_ids)
    with pytest.raises(ParamError, match=f"branch position must be between 0 and {n}.*got {n + 1}"):
        branch_point(parent, n + 1, 5)
    with pytest.raises(ParamError, match="got -1"):
        branch_point(parent, -1, 5)
    with pytest.raises(ParamError, match="branch token id must be >= 0"):
        branch_point(parent, 0, -3)
    with pytest.raises(ParamError, match=f"outside tiny-random-llama's vocabulary \\(ids 0 to {llama.vocab_size - 1}\\)"):
        Run(llama, "greedy", PROMPT, settings=RunSettings(branch=branch_point(parent, 1, llama.vocab_size)))
    with pytest.raises(ParamError, match="cannot take an image"):
        Run(llama, "greedy", PROMPT, settings=RunSettings(branch=branch_point(parent, 1, 5), image=str(tmp_path / "x.png")))
    with_image = dataclasses.replace(parent, info=dataclasses.replace(parent.info, settings={"image": "cat.png"}))
    with pytest.raises(ParamError, match="read an image"):
        branch_point(with_image, 1, 5)
    foreign = dataclasses.replace(parent, prompt_token_ids=[llama.vocab_size + 10])
    with pytest.raises(ParamError, match="do not fit tiny-random-llama's vocabulary"):
        Run(llama, "greedy", PROMPT, settings=RunSettings(branch=branch_point(foreign, 0, 5)))


def run_cli(capsys, *argv: str) -> dict:
    assert main(list(argv)) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_cli_branch_from_a_stored_run(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    first = run_cli(capsys, "record", "--model", "tiny-random-llama", "--prompt", PROMPT, "--chat", "--max-new-tokens", "6",
                    "--db", db, "--json")
    branch = run_cli(capsys, "record", "--branch-from", first["run_id"][:8], "--at", "2", "--token", "17",
                     "--max-new-tokens", "3", "--db", db, "--json")
    assert branch["model"] == "tiny-random-llama" and branch["prompt"] == PROMPT  # both the parent's
    assert branch["prompt_token_ids"] == first["prompt_token_ids"] + first["output_token_ids"][:2] + [17]
    with TraceStore(db) as store:
        info = store.load(branch["run_id"]).info
    assert info.chat is True and info.parent == {"run_id": first["run_id"], "step": 2, "token_id": 17}
    listed = {r["run_id"]: r for r in run_cli(capsys, "runs", "list", "--db", db, "--json")}
    assert (listed[branch["run_id"]]["parent_run_id"], listed[branch["run_id"]]["branch_step"]) == (first["run_id"], 2)

    for argv, message in (
        (["--branch-from", first["run_id"], "--at", "1"], "--branch-from needs --at POSITION and --token ID"),
        (["--branch-from", first["run_id"], "--at", "99", "--token", "1"], "branch position must be between 0 and"),
        (["--branch-from", "nope1234", "--at", "1", "--token", "1"], "no run with id 'nope1234'"),
        (["--model", "tiny-random-llama", "--at", "1", "--token", "1", "--prompt", "x"], "--at and --token go with --branch-from"),
        (["--model", "tiny-random-llama"], "record needs --prompt"),
    ):
        assert main(["record", *argv, "--db", db]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err


# ---------------------------------------------------------------- token tree


def brute_force_tree(model, prefix, depth, max_children, min_prob, warpers=()) -> list[tuple[list[int], float, float]]:
    """(path, prob, path_prob) breadth first, from one plain forward per path."""
    out, frontier = [], [([], 1.0)]
    for _ in range(depth):
        next_frontier = []
        for path, path_prob in frontier:
            ids = torch.tensor([prefix + path])
            with torch.inference_mode():
                scores = model.model(input_ids=ids).logits[:, -1].float()
            for warper in warpers:
                scores = warper(ids, scores)
            probs, tokens = scores.softmax(-1)[0].topk(max_children)
            for p, token in zip(probs.tolist(), tokens.tolist()):
                if p >= min_prob and p > 0:
                    out.append((path + [token], p, path_prob * p))
                    next_frontier.append((path + [token], path_prob * p))
        frontier = next_frontier
    return out


@pytest.mark.parametrize(
    "depth,max_children,min_prob,params,warpers",
    [
        (3, 3, 0.05, None, ()),
        (2, 4, 0.0, None, ()),
        (3, 3, 0.02, {"temperature": 0.7, "top_k": 5}, (TemperatureLogitsWarper(0.7), TopKLogitsWarper(5))),
        (2, 5, 0.01, {"top_p": 0.5}, (TopPLogitsWarper(0.5),)),  # top-p leaves fewer than 5 tokens: no zero-prob child
    ],
)
def test_token_tree_equals_brute_force(llama, depth, max_children, min_prob, params, warpers):
    prefix = llama.encode(PROMPT)
    tree = expand_token_tree(llama, prefix, depth=depth, max_children=max_children, min_prob=min_prob, params=params)
    expected = brute_force_tree(llama, prefix, depth, max_children, min_prob, warpers)
    assert len(tree.nodes) == len(expected) > 0
    for node, (path, prob, path_prob) in zip(tree.nodes, expected):
        assert tree.path_ids(node.id) == path and node.depth == len(path)
        assert node.prob == pytest.approx(prob, abs=1e-5) and node.path_prob == pytest.approx(path_prob, abs=1e-5)
        assert node.text == llama.token_text(node.token_id)
    assert tree.model_calls == depth and tree.prefix_ids == prefix
    children = [sum(1 for n in tree.nodes if n.parent == parent) for parent in [-1, *(n.id for n in tree.nodes)]]
    assert max(children) <= max_children and all(n.prob >= min_prob for n in tree.nodes)
    if min_prob == 0 and params is None:  # nothing cuts: the full tree
        assert len(tree.nodes) == sum(max_children**d for d in range(1, depth + 1))


def test_min_prob_cuts_the_tree(llama):
    prefix = llama.encode(PROMPT)
    wide = expand_token_tree(llama, prefix, depth=2, max_children=6, min_prob=0.0)
    cut = expand_token_tree(llama, prefix, depth=2, max_children=6, min_prob=0.1)
    kept = [(tuple(wide.path_ids(n.id)), n.prob) for n in wide.nodes
            if n.prob >= 0.1 and (n.parent == -1 or wide.nodes[n.parent].prob >= 0.1)]
    assert [tuple(cut.path_ids(n.id)) for n in cut.nodes] == [path for path, _ in kept]
    assert [n.prob for n in cut.nodes] == pytest.approx([prob for _, prob in kept], abs=1e-6)  # other batch sizes
    assert 0 < len(cut.nodes) < len(wide.nodes)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"depth": 0}, "depth must be between 1 and 6"),
        ({"depth": 7}, "depth must be between 1 and 6"),
        ({"max_children": 11}, "max_children must be between 1 and 10"),
        ({"min_prob": 1.0}, r"min_prob must be in \[0, 1\)"),
        ({"min_prob": -0.1}, r"min_prob must be in \[0, 1\)"),
        ({"depth": 4, "max_children": 10, "min_prob": 0.0}, "may grow 11110 nodes"),
        ({"params": {"top_p": 2.0}}, "top_p=2.0 is above the maximum 1"),
        ({"prefix_ids": []}, "non-empty prefix"),
        ({"prefix_ids": [1, 10**6]}, "vocabulary"),
    ],
)
def test_token_tree_bounds(llama, kwargs, message):
    args = {"prefix_ids": [1, 5], **kwargs}
    with pytest.raises(ParamError, match=message):
        expand_token_tree(llama, **args)


# ---------------------------------------------------------------- re-processing


WARPERS = {
    "temperature": TemperatureLogitsWarper,
    "top_k": lambda v: TopKLogitsWarper(int(v)),
    "top_p": TopPLogitsWarper,
    "min_p": MinPLogitsWarper,
    "typical_p": TypicalLogitsWarper,
}


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.7},
        {"top_k": 10},
        {"top_p": 0.8},
        {"min_p": 0.05},
        {"typical_p": 0.9},
        {"temperature": 0.7, "top_k": 10, "top_p": 0.8},
        {"temperature": 0.7, "min_p": 0.05, "typical_p": 0.9},
        {"top_k": 10, "top_p": 0.8, "min_p": 0.05, "typical_p": 0.9, "temperature": 0.7},
    ],
)
def test_exact_reprocessing_equals_transformers(llama, sampled, settings):
    position = 5
    context = sampled.prompt_token_ids + sampled.output_token_ids[:position]
    ids = torch.tensor([context])
    with torch.inference_mode():
        scores = llama.model(input_ids=ids).logits[:, -1].float()
    for name in WARPERS:  # transformers' order
        if name in settings:
            scores = WARPERS[name](settings[name])(ids, scores)
    expected = scores.softmax(-1)[0]

    result = reprocess_step(sampled, position, settings, model=llama, shown=llama.vocab_size)
    assert result.exact and result.covered_mass == 1.0 and len(result.token_ids) == llama.vocab_size
    got = torch.zeros(llama.vocab_size, dtype=torch.float64)
    got[list(result.token_ids)] = torch.tensor(result.probs, dtype=torch.float64)
    assert torch.allclose(got, expected.double(), atol=1e-5, rtol=0)
    assert result.stages[-1].kept == int((expected > 0).sum())  # over the whole vocabulary
    assert result.stages[-1].survivors == tuple(bool(expected[t] > 0) for t in result.token_ids)
    raw = next_probs(llama, context)
    assert list(result.token_ids[:5]) == raw.topk(5).indices.tolist()
    assert result.chosen_token_id == sampled.output_token_ids[position]


def test_exact_repetition_penalty_equals_transformers(llama, sampled):
    context = sampled.prompt_token_ids + sampled.output_token_ids[:6]
    ids = torch.tensor([context])
    with torch.inference_mode():
        scores = llama.model(input_ids=ids).logits[:, -1].float()
    expected = TopKLogitsWarper(8)(ids, RepetitionPenaltyLogitsProcessor(1.5)(ids, scores)).softmax(-1)[0]
    result = reprocess_step(sampled, 6, {"repetition_penalty": 1.5, "top_k": 8}, model=llama, shown=8)
    assert result.probs == pytest.approx(expected[list(result.token_ids)].tolist(), abs=1e-5)


def test_recorded_settings_reproduce_the_recorded_steps(llama, sampled):
    settings = recorded_settings(sampled)
    assert settings == {"temperature": 0.7, "top_k": 40.0, "top_p": 0.8, "min_p": 0.0, "typical_p": 1.0, "top_h": 0.0,
                        "repetition_penalty": 1.0}
    for position, step in token_steps(sampled).items():
        result = reprocess_step(sampled, position, settings, model=llama, shown=len(step.candidates))
        assert result.exact
        assert list(result.token_ids) == [c.token_id for c in step.candidates]
        assert result.probs == pytest.approx([c.prob for c in step.candidates], abs=1e-5)  # cached vs full forward
        assert [(s.name, s.kept) for s in result.stages] == [(s.name, s.kept) for s in step.stages]
        assert [s.survivors for s in result.stages] == [
            tuple(bool(r.survivors >> i & 1) for i in range(len(step.candidates))) for r in step.stages]
        assert result.entropy == pytest.approx(step.entropy, abs=1e-5)


def test_approximate_reprocessing_renormalises_the_recorded_candidates(sampled):
    step = token_steps(sampled)[2]
    result = reprocess_step(sampled, 2, {"temperature": 0.5, "top_k": 3}, shown=5)
    raw = [c.raw_prob for c in step.candidates]
    scaled = [math.log(p / sum(raw)) / 0.5 for p in raw]
    top3 = sorted(scaled, reverse=True)[:3]
    norm = sum(math.exp(s) for s in top3)
    expected = [math.exp(s) / norm if s >= top3[-1] else 0.0 for s in scaled[:5]]
    assert not result.exact and result.covered_mass == pytest.approx(sum(raw), abs=1e-6) and result.covered_mass < 1
    assert list(result.token_ids) == [c.token_id for c in step.candidates[:5]]
    assert result.texts == tuple(sampled.vocab[t] for t in result.token_ids)
    assert result.raw_probs == pytest.approx([p / sum(raw) for p in raw[:5]], abs=1e-6)
    assert result.probs == pytest.approx(expected, abs=1e-6)
    assert [(s.name, s.kept) for s in result.stages] == [("temperature", len(raw)), ("top_k", 3)]
    assert result.stages[1].survivors == (True, True, True, False, False)


def test_a_model_that_does_not_reproduce_the_step_falls_back_to_approximate(llama, sampled):
    altered = copy.deepcopy(sampled)
    position = 1
    index = next(i for i, e in enumerate(altered.events) if isinstance(e, TokenStep) and e.position == position)
    step = altered.events[index]
    first = dataclasses.replace(step.candidates[0], raw_prob=step.candidates[0].raw_prob + 0.01)
    altered.events[index] = dataclasses.replace(step, candidates=[first, *step.candidates[1:]])
    assert reprocess_step(sampled, position, {}, model=llama).exact
    assert not reprocess_step(altered, position, {}, model=llama).exact


@pytest.mark.parametrize(
    "position,settings,kwargs,message",
    [
        (99, {}, {}, "has no token step at output position 99"),
        (0, {"top_p": 2}, {}, "top_p=2.0 is above the maximum 1"),
        (0, {"top_k": 2.5}, {}, "top_k expects int"),
        (0, {"nucleus": 0.9}, {}, "unknown setting"),
        (0, {"temperature": "hot"}, {}, "must be numbers"),
        (0, {"repetition_penalty": 1.3}, {}, "repetition_penalty needs the model"),
        (0, {}, {"shown": 0}, "shown must be at least 1"),
    ],
)
def test_reprocessing_refuses_bad_input(sampled, position, settings, kwargs, message):
    with pytest.raises(ParamError, match=message):
        reprocess_step(sampled, position, settings, **kwargs)
