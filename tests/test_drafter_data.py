"""Drafter training data: the seeded prompt set, batched greedy answers, hidden-state shards, resume and loader."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cli.main import main as cli_main
from engine import RunSettings, load_model, record
from engine.models.handle import LoadedModel
from engine.offline.drafter_data import (
    DrafterShards,
    build_drafter_data,
    greedy_answers,
    load_shards,
)
from engine.offline.drafter_prompts import KINDS, build_prompts

SPEC_BENCH = Path(__file__).resolve().parents[1] / "assets" / "benchmarks" / "spec_bench_subset.jsonl"
LEAK_WORDS = 8  # a prompt sharing this many words in a row with a Spec-Bench question counts as leaked
ANSWER_TOKENS = 10
# The same layers as ``hidden_states`` counts them: index i < L is the output of decoder layer i - 1.
DEEP_LAYERS = {"low": 1, "mid": 2, "last": 4}


@pytest.fixture(scope="module")
def deep_llama() -> LoadedModel:
    """tiny-random-llama with 4 layers, so that the low, mid and last states are three different layers."""
    base = load_model("tiny-random-llama")
    config = copy.deepcopy(base.model.config)
    config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    model.generation_config = base.model.generation_config
    return LoadedModel("tiny-random-llama-4", model, base.tokenizer, "random")


def word_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + LEAK_WORDS]) for i in range(len(words) - LEAK_WORDS + 1)}


def test_prompt_set_is_seeded_distinct_and_covers_every_kind() -> None:
    prompts = build_prompts(240, seed=3)
    assert prompts == build_prompts(240, seed=3)
    assert prompts != build_prompts(240, seed=4)
    assert build_prompts(24, seed=3) == prompts[:24]  # a longer run extends a shorter one: resume relies on it
    assert len({p.text for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts[: len(KINDS)]} == set(KINDS)


def test_no_prompt_comes_from_spec_bench() -> None:
    questions = [turn for line in SPEC_BENCH.read_text().splitlines() for turn in json.loads(line)["turns"]]
    banned = set().union(*map(word_grams, questions))
    for seed in (0, 1):
        for prompt in build_prompts(2400, seed):
            assert prompt.text not in questions
            assert not word_grams(prompt.text) & banned, prompt.text


def test_batched_answers_equal_single_sequence_greedy(llama: LoadedModel) -> None:
    prompts = build_prompts(16, seed=0)[6:16]  # lengths 37 to 873 tokens; two answers end at EOS
    ids = [llama.encode(p.text, chat=True) for p in prompts]
    answers = greedy_answers(llama, ids, ANSWER_TOKENS)
    expected = [record(llama, "greedy", p.text, {}, RunSettings(max_new_tokens=ANSWER_TOKENS, chat=True))
                .output_token_ids for p in prompts]
    assert answers == expected
    assert sum(a[-1] in llama.eos_token_ids and len(a) < ANSWER_TOKENS for a in answers) >= 1


@torch.inference_mode()
def test_shards_match_a_direct_forward(deep_llama: LoadedModel, tmp_path: Path) -> None:
    manifest = build_drafter_data(deep_llama, tmp_path, sequences=5, batch_size=2, shard_size=3,
                                  max_new_tokens=ANSWER_TOKENS)
    assert manifest["layers"] == DEEP_LAYERS and manifest["hidden_size"] == 64
    assert len(manifest["shards"]) == 2 and manifest["sequences"] == 5
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, index=index: captured.__setitem__(index, out))
             for index, layer in enumerate(deep_llama.model.model.layers)]
    records = list(load_shards(tmp_path))
    assert sum(len(r.input_ids) for r in records) == manifest["tokens"]
    for prompt, seq in zip(build_prompts(5, seed=0), records, strict=True):
        assert seq.input_ids[: seq.answer_start].tolist() == deep_llama.encode(prompt.text, chat=True)
        logits = deep_llama.model(seq.input_ids[None]).logits[0]
        low, mid = captured[DEEP_LAYERS["low"] - 1][0], captured[DEEP_LAYERS["mid"] - 1][0]
        last = deep_llama.model.model.norm(captured[DEEP_LAYERS["last"] - 1][0])
        for stored, direct in ((seq.hidden_low, low), (seq.hidden_mid, mid), (seq.hidden_last, last)):
            assert stored.dtype == torch.float16
            torch.testing.assert_close(stored.float(), direct, rtol=2e-3, atol=2e-3)  # float16 rounding
        torch.testing.assert_close(deep_llama.model.lm_head(seq.hidden_last.float()), logits, rtol=1e-2, atol=1e-2)
        greedy = logits[seq.answer_start - 1 : -1].argmax(-1)  # every answer token is the target's argmax
        assert seq.input_ids[seq.answer_start :].tolist() == greedy.tolist()
    for hook in hooks:
        hook.remove()


def test_resume_continues_without_duplicates(llama: LoadedModel, tmp_path: Path) -> None:
    settings = {"batch_size": 2, "shard_size": 2, "max_new_tokens": 4}
    build_drafter_data(llama, tmp_path / "once", sequences=5, **settings)
    build_drafter_data(llama, tmp_path / "twice", sequences=3, **settings)
    (tmp_path / "twice" / "shard-00002.safetensors").write_bytes(b"left by a crash before the manifest")
    manifest = build_drafter_data(llama, tmp_path / "twice", sequences=5, **settings)
    assert manifest["shards"] == [f"shard-{i:05d}.safetensors" for i in range(3)] and manifest["sequences"] == 5
    once, twice = DrafterShards(tmp_path / "once"), DrafterShards(tmp_path / "twice")
    assert len(once) == len(twice) == 5
    for a, b in zip(once, twice, strict=True):  # the third sequence was batched differently: rounding may differ
        assert torch.equal(a.input_ids, b.input_ids)
        torch.testing.assert_close(a.hidden_last, b.hidden_last, rtol=2e-3, atol=2e-3)
    assert len({tuple(r.input_ids.tolist()) for r in twice}) == 5


def test_cli_refuses_a_folder_of_other_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["data", "drafter", "--model", "tiny-random-llama", "--sequences", "1", "--max-new-tokens", "2",
            "--out", str(tmp_path)]
    assert cli_main(args) == 0
    assert cli_main([*args, "--seed", "1"]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "seed: 0" in last_line
