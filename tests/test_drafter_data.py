"""Drafter training data: the seeded prompt set, batched greedy answers, hidden-state shards, resume and loader."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from cli.main import main as cli_main
from engine import RunSettings, load_model, record
from engine.models.handle import LoadedModel
from engine.offline import drafter_data, self_prompts
from engine.offline.drafter_data import (
    SELF_KIND,
    DrafterShards,
    build_drafter_data,
    greedy_answers,
    is_self_written,
    load_shards,
    mixed_prompts,
)
from engine.offline.drafter_prompts import KINDS, Prompt, build_prompts
from engine.offline.self_prompts import SPEC_BENCH_SUBSET, Draw, leaks_spec_bench, self_written_prompts
from engine.params import ParamError

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


def test_prompt_set_is_seeded_distinct_and_covers_every_kind() -> None:
    prompts = build_prompts(240, seed=3)
    assert prompts == build_prompts(240, seed=3)
    assert prompts != build_prompts(240, seed=4)
    assert build_prompts(24, seed=3) == prompts[:24]  # a longer run extends a shorter one: resume relies on it
    assert len({p.text for p in prompts}) == len(prompts)
    assert {p.kind for p in prompts[: len(KINDS)]} == set(KINDS)


def spec_bench_questions() -> list[str]:
    return [turn for line in SPEC_BENCH_SUBSET.read_text().splitlines() for turn in json.loads(line)["turns"]]


def test_no_prompt_comes_from_spec_bench() -> None:
    questions = spec_bench_questions()
    assert all(leaks_spec_bench(question) for question in questions if len(question.split()) >= 8)
    for seed in (0, 1):
        for prompt in build_prompts(2400, seed):
            assert prompt.text not in questions
            assert not leaks_spec_bench(prompt.text), prompt.text


def test_the_target_writes_varied_requests_of_its_own(smollm2: LoadedModel) -> None:
    """Magpie: SmolLM2 given its chat template up to a user turn writes a user's request; seeded, a longer list
    extends a shorter one."""
    prompts = self_written_prompts(smollm2, 6, seed=0, batch_size=4).prompts
    assert self_written_prompts(smollm2, 3, seed=0, batch_size=4).prompts == prompts[:3]
    assert len(set(prompts)) == 6 and all(len(p.split()) >= 4 and not leaks_spec_bench(p) for p in prompts)
    assert not any(p.startswith(("<|im_start|>", "user")) for p in prompts)  # the request alone, no template


def test_self_written_prompts_leave_out_leaks_repeats_and_cut_off_turns(llama: LoadedModel, monkeypatch) -> None:
    leaked = next(q for q in spec_bench_questions() if len(q.split()) >= 12)
    turns = [leaked, "Plan a three-day trip to Oslo, please.", None, "Plan a three-day trip to Oslo, please.",
             "Too short.", "What should I cook for six friends tonight?"]
    encoded = [None if t is None else llama.tokenizer(t, add_special_tokens=False)["input_ids"] for t in turns]
    monkeypatch.setattr(self_prompts, "sample_user_turns", lambda model, count, seed: encoded[:count])
    assert self_written_prompts(llama, 2, seed=0, batch_size=6).prompts == [
        "Plan a three-day trip to Oslo, please.", "What should I cook for six friends tonight?"]
    with pytest.raises(ParamError, match="ended only 2 of 3"):
        self_written_prompts(llama, 3, seed=0, batch_size=6)


def test_a_longer_draw_continues_a_shorter_one_without_sampling_its_batches_again(llama, tmp_path, monkeypatch):
    """Extending the data set's requests reads on from where the shorter draw stopped: the same list as a fresh draw,
    and no batch before that point sampled again (each took minutes on two cores)."""
    sampled = []

    def batch_of_turns(model, count, seed):
        sampled.append(seed)
        texts = [None if i == 1 else f"Request {i} of batch {seed} for the model itself?" for i in range(count)]
        return [None if t is None else llama.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr(self_prompts, "sample_user_turns", batch_of_turns)
    fresh = self_written_prompts(llama, 8, seed=0, batch_size=3)
    short = self_written_prompts(llama, 5, seed=0, batch_size=3)
    assert (short.next_batch, short.next_turn) == (2, 1)  # 2 requests per batch of 3: the 5th is batch 2's first
    sampled.clear()
    assert self_written_prompts(llama, 8, seed=0, batch_size=3, resume=short) == fresh
    assert sampled == [2, 3]  # batches 0 and 1 were not drawn again
    # the data folder keeps the position; a bare list (older folders) is drawn again from the start
    mixed_prompts(llama, tmp_path, 10, seed=0, share=0.5, batch_size=3)
    assert drafter_data.read_draw(tmp_path / drafter_data.SELF_PROMPTS, 3) == (short, 3)
    sampled.clear()
    mixed_prompts(llama, tmp_path, 16, seed=0, share=0.5, batch_size=5)  # answered in other batches: drawn in 3s
    assert sampled == [2, 3] and drafter_data.read_draw(tmp_path / drafter_data.SELF_PROMPTS, 5) == (fresh, 3)
    (tmp_path / drafter_data.SELF_PROMPTS).write_text(json.dumps(short.prompts))
    sampled.clear()
    assert mixed_prompts(llama, tmp_path, 16, seed=0, share=0.5, batch_size=3)[1::2] == [
        Prompt(SELF_KIND, text) for text in fresh.prompts]
    assert sampled == [0, 1, 2, 3]


def test_a_share_of_self_written_prompts_is_interleaved_and_kept_for_a_resume(llama, tmp_path, monkeypatch) -> None:
    written = [f"Request number {i} from the model itself?" for i in range(4)]
    monkeypatch.setattr(drafter_data, "self_written_prompts",
                        lambda model, count, *args, **kwargs: Draw(written[:count], 1, 0))
    prompts = mixed_prompts(llama, tmp_path, 8, seed=0, share=0.5, batch_size=4)
    assert [p.kind for p in prompts[1::2]] == [SELF_KIND] * 4 and [p.text for p in prompts[1::2]] == written
    assert [p.text for p in prompts[::2]] == [p.text for p in build_prompts(4, seed=0)]
    assert sum(is_self_written(i, 0.3) for i in range(100)) == 30
    monkeypatch.setattr(drafter_data, "self_written_prompts", lambda *args, **kwargs: pytest.fail("drawn again"))
    assert mixed_prompts(llama, tmp_path, 6, seed=0, share=0.5, batch_size=4) == prompts[:6]  # read from the folder
    manifest = build_drafter_data(llama, tmp_path, sequences=4, batch_size=2, max_new_tokens=2, self_share=0.5)
    assert manifest["kinds"] == {"writing": 1, "roleplay": 1, SELF_KIND: 2} and manifest["self_share"] == 0.5


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
