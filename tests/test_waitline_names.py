"""The waitline data's name pool and its train / held-out split: training rows never show a held-out name."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from engine.offline import train_dllm
from engine.offline.names import (
    ENGLISH_LOCALES, FAKER_LOCALES, FIRST_NAMES, LAST_NAMES, SPLITS, common_names, faker_names, name_pool, plain, split_of,
)
from engine.offline.parallelbench import task_rows
from engine.offline.waitline_data import MAX_PEOPLE, MIN_PEOPLE, OPERATIONS, WaitlineGenerator, parse_list
from engine.offline.waitline_tokenizer import build_tokenizer, name_pieces


def names_in(example) -> set[str]:
    """Every first and last name an example shows: its people, its newcomer, and its in-context example's."""
    people = [*example.people, *example.answer, *([example.word] if example.word else [])]
    for shown in example.icl:
        people += [*shown.people, *shown.answer, *([shown.word] if shown.word else [])]
    return {name for person in people for name in person.split(" ")}


def test_pool_is_large_varied_plain_and_split_disjointly():
    for kind in ("first", "last"):
        train, held_out = set(name_pool(kind, "train")), set(name_pool(kind, "held_out"))
        assert len(train) > 5000 and len(held_out) > 500 and not train & held_out
        assert 0.08 < len(held_out) / (len(train) + len(held_out)) < 0.16
        assert all(plain(name) == name and " " not in name for name in train | held_out)
    assert sum(len(faker_names(locale, "first")) > 100 for locale in FAKER_LOCALES) >= 12
    # both roles of one name share its split, so a held-out name is never seen in training in the other role
    assert not set(name_pool("first", "train")) & set(name_pool("last", "held_out"))
    assert plain("Müller") == "Muller" and plain("Łukasz") is None and plain("De Jong") is None
    assert plain("O'Brien") == "O'Brien" and plain("Smith-Jones") == "Smith-Jones"


def test_split_is_a_property_of_the_name_not_of_the_lists():
    names = list(name_pool("last", "train") + name_pool("last", "held_out"))
    before = {name: split_of(name) for name in names}
    random.Random(0).shuffle(names)
    assert {name: split_of(name) for name in names[:500]} == {name: before[name] for name in names[:500]}
    assert {split_of(name) for name in names} == set(SPLITS)
    with pytest.raises(ValueError, match="split must be one of"):
        WaitlineGenerator(0, split="test")
    held_out_name = name_pool("first", "held_out")[0]
    with pytest.raises(ValueError, match="must be of the 'train' split"):
        WaitlineGenerator(0, names=((held_out_name,), name_pool("last", "train")))


@pytest.mark.parametrize("split", SPLITS)
def test_generated_rows_use_only_their_splits_names_with_every_operation_and_length(split):
    generator = WaitlineGenerator(3, invented_rate=0.3, split=split, icl_share=0.5)
    examples = [generator.example(operation) for operation in OPERATIONS for _ in range(60)]
    shown = set().union(*map(names_in, examples))
    assert shown and {split_of(name) for name in shown} == {split}
    assert {e.operation for e in examples} == set(OPERATIONS)
    assert {len(e.people) for e in examples} == set(range(MIN_PEOPLE, MAX_PEOPLE + 1))
    assert 0.3 < sum(bool(e.icl) for e in examples) / len(examples) < 0.7
    assert any(name not in name_pool("first", split) + name_pool("last", split) for name in shown)  # invented ones
    firsts = [person.split(" ")[0] for person in WaitlineGenerator(4, split=split).people(600)]
    english = set(name_pool("first", split, ENGLISH_LOCALES))
    assert 0.5 < sum(name in english for name in firsts) / len(firsts) < 0.8  # half drawn from them, some by chance


@pytest.mark.parametrize("piece_rate", [0.0, 0.3])
def test_training_batches_never_show_a_held_out_name(piece_rate):
    batches = train_dllm.Batches(build_tokenizer(), seed=11, batch_size=64, piece_rate=piece_rate)
    examples = [example for _ in range(30) for example in batches.examples()]
    assert {e.operation for e in examples} == set(OPERATIONS) and any(e.icl for e in examples)
    assert {split_of(name) for name in set().union(*map(names_in, examples))} == {"train"}


def tokens_seen(batches: train_dllm.Batches, count: int) -> set[int]:
    return {token for _ in range(count) for prompt, answer in batches.encoded() for token in prompt + answer}


def test_piece_names_train_the_name_pieces_that_bpe_merges_away_in_every_training_name():
    tokenizer = build_tokenizer()
    initials, inners = name_pieces(tokenizer)
    assert "Thom" in initials and "Spen" in initials and "pson" in inners  # "Thompson", "Spencer" are one token
    assert all(piece[0].isupper() and piece[1:].islower() or len(piece) == 1 for piece in initials)
    pieces = {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.get_vocab()
              if tokenizer.convert_tokens_to_string([token]).strip() in set(initials) | set(inners)}
    unseen = [pieces - tokens_seen(train_dllm.Batches(tokenizer, seed=4, batch_size=32, piece_rate=rate), 40)
              for rate in (0.0, 0.3)]
    spen = tokenizer.convert_tokens_to_ids("ĠSpen")
    assert spen in unseen[0] and spen not in unseen[1]  # a held-out "Spence" is " Spen" + "ce"
    assert len(unseen[1]) < len(unseen[0]) / 3
    generator = WaitlineGenerator(1, piece_rate=1.0, pieces=(initials, inners))
    glued = [generator.piece_name() for _ in range(200)]
    assert all(any(name.startswith(i) for i in initials) and split_of(name) == "train" for name in glued)
    with pytest.raises(ValueError, match="piece_rate needs pieces"):
        WaitlineGenerator(0, piece_rate=0.1)


def test_held_out_test_files_use_only_held_out_names():
    for operation in OPERATIONS:
        for row in task_rows(operation, 20, seed=5):
            lists = [row["input"]["context"]] + [icl["input"]["context"] for icl in row["input"]["icl_examples"]]
            people = [person for text in lists for person in parse_list(text)] + [row["input"].get("word") or ""]
            names = {name for person in people for name in person.split(" ") if name}
            assert {split_of(name) for name in names} == {"held_out"}


def test_training_prompts_are_chat_turns_with_and_without_an_in_context_example():
    tokenizer = build_tokenizer()
    generator = WaitlineGenerator(2, icl_share=1.0)
    lone, shown = generator.example_without_icl("sort"), generator.example("reverse")
    assert train_dllm.encode_messages(tokenizer, lone.messages) == train_dllm.encode_prompt(tokenizer, lone.prompt)
    icl = shown.icl[0]
    assert [turn["role"] for turn in shown.messages] == ["user", "assistant", "user"]
    text = tokenizer.decode(train_dllm.encode_messages(tokenizer, shown.messages))
    assert text == f"<s>{icl.prompt}{icl.answer_text}</s>{shown.prompt}"
    assert shown.row()["input"]["icl_examples"] == [icl.row()]


@pytest.mark.parametrize("split", SPLITS)
def test_a_share_of_lists_is_common_english_names_with_their_in_context_example(split):
    generator = WaitlineGenerator(5, invented_rate=0.3, split=split, icl_share=1.0, common_share=0.4)
    examples = [generator.example(operation) for operation in OPERATIONS for _ in range(40)]
    common = set(common_names("first", split)) | set(common_names("last", split))
    assert common and {split_of(name) for name in common} == {split}
    all_common = [names_in(e) <= common for e in examples]  # names_in covers the in-context example too
    assert 0.3 < sum(all_common) / len(examples) < 0.5
    row = WaitlineGenerator(6, split=split, common_share=1.0).row("sort")
    assert {split_of(n) for person in json.loads(row["input"]["context"]) for n in person.split(" ")} == {split}


def test_a_zero_common_share_draws_the_stream_it_drew_before_the_share_existed():
    """A training run resumed from a data stream's saved position must draw what it drew before the common-name
    mixture existed: the digest is of rows made by the generator before the change (the hand lists, not Faker's)."""
    names = tuple(tuple(n for n in kind if split_of(n) == "train") for kind in (FIRST_NAMES, LAST_NAMES))
    generator = WaitlineGenerator(8, invented_rate=0.05, icl_share=0.3, names=names)
    rows = [generator.example(op).row() for op in OPERATIONS * 5] + [generator.row(op) for op in OPERATIONS]
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    assert digest == "a9d0bc1dfed9faf0ef7c8cd2d1232c5f7929a0c2cd1675ea4a0561e483ecc3f1"
