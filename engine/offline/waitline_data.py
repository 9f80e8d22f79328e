"""The "waiting line" task family of ParallelBench (Kim et al., ICLR'26), generated from a large pool of names.

People are drawn from one split of ``engine.offline.names`` (Faker's names in several locales plus the hand lists,
and names invented from syllables): training uses the "train" names, held-out test files the "held_out" names, so a
score on held-out files measures the task, not memorised names. A share of examples may carry one in-context
example, as ParallelBench's files do; ``Example.messages`` renders it as their chat turns.

A row has ParallelBench's test-file layout (``dataset/parallel_bench/data/output/test/waiting_line*/<task>.jsonl``):

    {"input": {"context": '["Ann Lee", ...]', "word"?: "...", "index"?: 3, "icl_examples": [row, ...]},
     "answer": '["..."]'  or, for shuffle and the random operations, {"input": [...], "word"?: ..., "example": '[...]'},
     "output_format": '["[MASK]", ...]', "metadata": {"length": n, "index"?: ..., "word"?: ...}}

The instruction wording is ParallelBench's (so their files render to the prompts the built-in models were trained
on); ``prompt_text`` renders a row without its in-context examples. Indices are 0-based; insert takes 0..n. Sort is
by the full name string (ParallelBench's answers sort by first name despite the wording "by last name").

Scoring follows ParallelBench's ``metrics.py``: exact list match for the deterministic tasks; shuffle = same
multiset and a different order; random insert/remove/replace = the input with exactly that one edit anywhere.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.models.waitline_prompt import OPERATIONS, PREAMBLE, TEMPLATES, format_list, render_prompt
from engine.offline.names import ENGLISH_LOCALES, KINDS, PLAIN_NAME, SPLITS, common_names, name_pool, split_of

# Tasks with many valid answers: scored by validity, and their rows carry the input instead of one answer.
OPEN_ENDED = ("shuffle", "insert_random", "remove_random", "replace_random")
MIN_PEOPLE, MAX_PEOPLE = 3, 15  # ParallelBench's files use 3-6 and 15
# ParallelBench's own answer length (max_tokens) per test set, as its cfg/paper/benchmark configs decode them
PARALLELBENCH_CANVAS = {"waiting_line": 32, "waiting_line_n15": 128}
ONSETS = ("b", "br", "c", "ch", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "sh", "t", "v", "w", "z")
VOWELS = ("a", "e", "i", "o", "u", "ay", "ee", "on", "er", "an")
ENGLISH_SHARE = 0.5  # of names drawn from the English lists (ParallelBench's kind of names), the rest from all locales


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt the model sees and one correct answer (a sample, for open-ended tasks)."""

    operation: str
    people: tuple[str, ...]
    answer: tuple[str, ...]
    word: str | None = None
    index: int | None = None
    icl: tuple[Example, ...] = ()  # in-context examples shown before the prompt

    @property
    def messages(self) -> list[dict[str, str]]:
        """The prompt as ParallelBench's chat turns: each in-context example's prompt and answer, then the prompt."""
        turns = [turn for example in self.icl for turn in (
            {"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.answer_text})]
        return turns + [{"role": "user", "content": self.prompt}]

    @property
    def prompt(self) -> str:
        return render_prompt(self.operation, list(self.people), self.word, self.index)

    @property
    def answer_text(self) -> str:
        return format_list(self.answer)

    def row(self, icl_examples: list[Example] | tuple[Example, ...] | None = None) -> dict[str, Any]:
        """This example as a ParallelBench test-file row (its own in-context examples unless others are given)."""
        icl_examples = self.icl if icl_examples is None else icl_examples
        inputs: dict[str, Any] = {"context": format_list(self.people)}
        if self.word is not None:
            inputs["word"] = self.word
        if self.operation.endswith("_index"):
            inputs["index"] = self.index
        if icl_examples:
            inputs["icl_examples"] = [example.row() for example in icl_examples]
        answer: Any = self.answer_text
        if self.operation in OPEN_ENDED:
            answer = {"input": list(self.people), **({"word": self.word} if self.word else {}), "example": answer}
        metadata: dict[str, Any] = {"length": len(self.people)}
        if self.operation not in ("copy", "reverse", "sort", "shuffle"):
            metadata.update(index=self.index, word=self.word)
        output_format = format_list(["[MASK]"] * len(self.answer))
        return {"input": inputs, "answer": answer, "output_format": output_format, "metadata": metadata}


def prompt_text(row: dict[str, Any], operation: str) -> str:
    """The prompt of a ParallelBench row (its in-context examples left out: the built-in models need none)."""
    inputs = row["input"]
    return PREAMBLE + TEMPLATES[operation].format(**{k: v for k, v in inputs.items() if k != "icl_examples"})


def operation_of(path: str) -> str:
    """The operation named by a test file such as ``.../waiting_line_n15/sort.jsonl``."""
    stem = re.sub(r"\.jsonl$", "", path.rsplit("/", 1)[-1])
    if stem not in TEMPLATES:
        raise ValueError(f"{path!r} is not a waiting-line task file; its name should be one of {', '.join(OPERATIONS)}")
    return stem


class WaitlineGenerator:
    """Seeded source of examples: the same seed always yields the same sequence.

    ``split`` ("train" or "held_out") is the part of the name pool people come from; invented names obey it too.
    ``invented_rate`` is the chance that a first or last name is made up from syllables instead of drawn from the
    pool: such names take several tokens, so a model trained with them also copes with names it never saw.
    ``icl_share`` is the chance that an example carries one in-context example of its operation. ``english_share``
    of the other names come from the split's English names, the rest from all its names; ``names`` (first and last
    names, each of ``split``) replaces the pool. ``common_share`` is the chance that a list (and its in-context
    example) is made of common English names only, as ParallelBench's lists are: the pool's names mostly take
    several tokens each, and a model that met one-token names only now and then confused them and lost count on
    ParallelBench's files (BENCHMARKS.md, issue 21, tenth session). ``piece_rate`` is the chance that a first or
    last name is glued from ``pieces`` (a tokenizer's name-initial and inner pieces, ``waitline_tokenizer.name_pieces``)
    drawn uniformly: BPE merges a training name's pieces into longer tokens, so a piece seen only inside them never
    meets the model, yet an unseen name ("Spence": " Spen" + "ce") needs it (BENCHMARKS.md, issue 21, 22nd session).
    """

    def __init__(
        self, seed: int, min_people: int = MIN_PEOPLE, max_people: int = MAX_PEOPLE, invented_rate: float = 0.0,
        split: str = "train", icl_share: float = 0.0, english_share: float = ENGLISH_SHARE,
        names: tuple[tuple[str, ...], tuple[str, ...]] | None = None, common_share: float = 0.0,
        piece_rate: float = 0.0, pieces: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self.rng = random.Random(seed)
        self.min_people, self.max_people = min_people, max_people
        self.invented_rate, self.split, self.icl_share = invented_rate, split, icl_share
        self.english_share, self.common_share = english_share, common_share
        if piece_rate and not all(pieces):
            raise ValueError("piece_rate needs pieces: name-initial and inner ones")
        self.piece_rate, self.pieces = piece_rate, pieces
        self.common = {kind: common_names(kind, split) for kind in KINDS}
        if names is None:  # per kind: (English names, all names) of the split
            self.pools = {kind: (name_pool(kind, split, ENGLISH_LOCALES), name_pool(kind, split)) for kind in KINDS}
        elif any(split_of(name) != split for kind_names in names for name in kind_names):
            raise ValueError(f"every name given must be of the {split!r} split")
        else:
            self.pools = {kind: (kind_names, kind_names) for kind, kind_names in zip(KINDS, names, strict=True)}

    def person(self, common: bool = False) -> str:
        return f"{self.name('first', common)} {self.name('last', common)}"

    def name(self, kind: str, common: bool = False) -> str:
        if common:
            return self.rng.choice(self.common[kind])
        if self.piece_rate and self.rng.random() < self.piece_rate:
            return self.piece_name()
        if self.invented_rate and self.rng.random() < self.invented_rate:
            return self.made_up(self.syllable_name)
        english, everyone = self.pools[kind]
        return self.rng.choice(english if self.rng.random() < self.english_share else everyone)

    def made_up(self, draw: Callable[[], str]) -> str:
        """A plain name of this split from ``draw``: about one draw in eight lands in the held-out split, so draw
        again until it does not."""
        while True:
            name = draw()
            if PLAIN_NAME.fullmatch(name) and split_of(name) == self.split:
                return name

    def syllable_name(self) -> str:
        syllables = self.rng.randint(2, 3)
        return "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(syllables)).capitalize()

    def piece_name(self) -> str:
        """A name of this split glued from a uniformly drawn name-initial piece and one or two inner pieces."""
        return self.made_up(self.glued_pieces)

    def glued_pieces(self) -> str:
        initials, inners = self.pieces
        return self.rng.choice(initials) + "".join(self.rng.choices(inners, k=self.rng.randint(1, 2)))

    def people(self, count: int, common: bool = False) -> list[str]:
        chosen: list[str] = []
        while len(chosen) < count:  # distinct people, as in ParallelBench's lists
            name = self.person(common)
            if name not in chosen:
                chosen.append(name)
        return chosen

    def example(self, operation: str, count: int | None = None) -> Example:
        """An example of ``operation`` (``count`` people, else a random length), with an in-context example for a
        share ``icl_share`` of them."""
        common = self.draws_common()
        icl = ((self.example_without_icl(operation, common=common),)
               if self.icl_share and self.rng.random() < self.icl_share else ())
        return dataclasses.replace(self.example_without_icl(operation, count, common), icl=icl)

    def draws_common(self) -> bool:
        """Whether the next list is of common names (no random draw at share 0, so such streams stay as they were)."""
        return bool(self.common_share) and self.rng.random() < self.common_share

    def example_without_icl(self, operation: str, count: int | None = None, common: bool = False) -> Example:
        count = count if count is not None else self.rng.randint(self.min_people, self.max_people)
        people = self.people(count + 1, common)
        newcomer, people = people[-1], people[:-1]
        return apply_operation(operation, people, newcomer, self.rng)

    def row(self, operation: str, count: int | None = None, icl_count: int = 1) -> dict[str, Any]:
        common = self.draws_common()
        icl = [self.example_without_icl(operation, common=common) for _ in range(icl_count)]
        return self.example_without_icl(operation, count, common).row(icl)


def apply_operation(operation: str, people: list[str], newcomer: str, rng: random.Random) -> Example:
    """An example of ``operation`` on ``people``; ``newcomer`` is the inserted or replacing person."""
    count = len(people)
    if operation in ("copy", "reverse", "sort", "shuffle"):
        answer = {"copy": people, "reverse": people[::-1], "sort": sorted(people)}.get(operation)
        if answer is None:
            answer = people[:]
            while answer == people:  # a shuffle must differ from the input
                rng.shuffle(answer)
        return Example(operation, tuple(people), tuple(answer))
    kind, _, where = operation.partition("_")
    index = rng.randint(0, count if kind == "insert" else count - 1)
    answer = people[:]
    if kind == "insert":
        answer.insert(index, newcomer)
    elif kind == "remove":
        del answer[index]
    else:
        answer[index] = newcomer
    word = None if kind == "remove" else newcomer
    return Example(operation, tuple(people), tuple(answer), word, index if where == "index" else None)


def parse_list(text: str) -> list[str]:
    """ParallelBench's lenient list parser: the last ``[...]`` in the text, items stripped of quotes and spaces."""
    if "[" in text:
        text = text.rsplit("[", 1)[1]
    if "]" in text:
        text = text.split("]", 1)[0]
    return [item.strip('" ') for item in text.strip("[]").split(",") if item.strip()]


def score(operation: str, prediction: str, answer: str | dict[str, Any]) -> float:
    """1.0 if ``prediction`` solves the task of a row whose answer field is ``answer``, else 0.0."""
    predicted = parse_list(prediction)
    if operation not in OPEN_ENDED:
        return float(predicted == parse_list(answer))
    given = list(answer["input"])
    if operation == "shuffle":
        return float(sorted(predicted) == sorted(given) and predicted != given)
    if operation == "insert_random":
        return float(answer["word"] in predicted and _without(predicted, answer["word"]) == given)
    if operation == "remove_random":
        return float(len(predicted) == len(given) - 1 and any(_without(given, p) == predicted for p in set(given)))
    changed = [i for i, (p, g) in enumerate(zip(predicted, given, strict=False)) if p != g]
    return float(len(predicted) == len(given) and len(changed) == 1 and predicted[changed[0]] == answer["word"])


def _without(people: list[str], person: str) -> list[str]:
    rest = people[:]
    rest.remove(person)
    return rest
