"""LLM-KICK's two yardsticks for a (compressed) model: perplexity on prose, and exact match on one-word facts.

LLM-KICK (Jaiswal et al., ICLR 2024) found that pruning loses knowledge that perplexity hides. Both measures run on
files written for the project: ``assets/benchmarks/perplexity_text.txt`` (encyclopedic prose on varied topics) and
``assets/benchmarks/knowledge_qa.jsonl`` (questions with one-word answers, each with the start of the sentence the
answer completes; the whole sentence is the passage of the open-book contrast: knowledge recalled vs read).

    from engine.offline.knowledge_eval import exact_match, perplexity, read_questions
    perplexity(model, TEXT_PATH.read_text()).ppl
    exact_match(model, read_questions()).accuracy
"""

from __future__ import annotations

import copy
import json
import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from engine.models.handle import LoadedModel

BENCHMARKS = Path(__file__).resolve().parents[2] / "assets" / "benchmarks"
QUESTIONS_PATH = BENCHMARKS / "knowledge_qa.jsonl"
TEXT_PATH = BENCHMARKS / "perplexity_text.txt"
INSTRUCTION = "Answer with one word."
ANSWER_TOKENS = 5  # enough for the longest one-word answer
ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    question: str
    answers: tuple[str, ...]  # accepted spellings, each one word
    cloze: str  # the start of a sentence the answer completes: the model's reply begins with it

    @property
    def context(self) -> str:
        """The sentence that states the answer: the open-book prompt's passage."""
        return f"{self.cloze} {self.answers[0]}."


@dataclass(frozen=True)
class Perplexity:
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored: every token of the text but the first, each once
    window: int  # most tokens one forward read

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@dataclass(frozen=True)
class KnowledgeScore:
    correct: tuple[bool, ...]  # per question, in the file's order
    outputs: tuple[str, ...]  # the model's answers as generated

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)


def read_questions(path: Path = QUESTIONS_PATH) -> list[Question]:
    """The question file's items; ``ValueError`` naming the line for a malformed one, a repeat or a multi-word answer."""
    questions, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item = Question(row["id"], row["category"], row["question"], tuple(row["answers"]), row["cloze"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path.name} line {number}: not a question item ({exc})") from None
        if not item.answers or any(len(words(answer)) != 1 for answer in item.answers):
            raise ValueError(f"{path.name} line {number}: every accepted answer must be one word, got {item.answers}")
        if item.question in seen or item.id in seen:
            raise ValueError(f"{path.name} line {number}: repeated question or id {item.id!r}")
        seen.update((item.question, item.id))
        questions.append(item)
    return questions


def words(text: str) -> list[str]:
    """SQuAD-style normal form as a word list: accents dropped, lower case, punctuation deleted, articles dropped."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    kept = "".join(c if c.isalnum() or c.isspace() else "" for c in plain)
    return [word for word in kept.split() if word not in ARTICLES]


def is_correct(output: str, answers: Sequence[str]) -> bool:
    """Whether the output's first word (normal form) is one of the accepted answers."""
    first = words(output)[:1]
    return bool(first) and first[0] in {words(answer)[0] for answer in answers}


def prompt_ids(model: LoadedModel, question: Question, open_book: bool = False) -> list[int]:
    """The question as the model is asked it (a chat turn where the model has a template, else a plain Q/A line),
    with the answer's cloze sentence begun: a small chat model answers in a sentence that restates the question
    whatever it is told, so its reply starts with that restatement and the next word is the answer."""
    passage = f"{question.context}\n" if open_book else ""
    if model.has_chat_template:
        cloze = model.tokenizer(question.cloze, add_special_tokens=False)["input_ids"]
        return model.encode(f"{passage}{INSTRUCTION} {question.question}", chat=True) + cloze
    return model.encode(f"{passage}Question: {question.question}\nAnswer: {question.cloze}")


def exact_match(model: LoadedModel, questions: Sequence[Question], *, open_book: bool = False, batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> KnowledgeScore:
    """Greedy answers (a few tokens, batched) scored by first-word match; ``progress(n)`` after each batch of n."""
    prompts = [prompt_ids(model, q, open_book) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of similar length pad little
    shared = _shared_prefix(model, prompts)
    outputs = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for index, answer in zip(batch, greedy_batch(model, shared, [prompts[i] for i in batch]), strict=True):
            outputs[index] = model.decode(answer)
        if progress:
            progress(len(batch))
    return KnowledgeScore(tuple(is_correct(o, q.answers) for o, q in zip(outputs, questions, strict=True)),
                          tuple(outputs))


@dataclass(frozen=True)
class SharedPrefix:
    ids: list[int]  # the tokens every prompt starts with (the chat template's system turn and the instruction)
    cache: DynamicCache  # their keys and values, computed once


@torch.inference_mode()
def _shared_prefix(model: LoadedModel, prompts: Sequence[Sequence[int]]) -> SharedPrefix:
    length = 0
    shortest = min(map(len, prompts))
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    cache = model.new_cache()
    if length:
        model.forward(torch.tensor([prompts[0][:length]]), cache, keep=1)
    return SharedPrefix(list(prompts[0][:length]), cache)


@torch.inference_mode()
def greedy_batch(model: LoadedModel, shared: SharedPrefix, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int = ANSWER_TOKENS) -> list[list[int]]:
    """Greedy continuations of prompts that all start with ``shared.ids``, up to the first EOS (dropped).

    The shared prefix's cache is copied per row and the rest of each prompt is left-padded after it, so a batch
    computes only what differs (about two thirds of a chat prompt here is the template's system turn)."""
    rows, start = len(prompts), len(shared.ids)
    cache = copy.deepcopy(shared.cache)
    if start:
        cache.batch_repeat_interleave(rows)
    rests = [list(p[start:]) for p in prompts]
    width = max(map(len, rests))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
    rest_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rests])
    mask = torch.cat([torch.ones(rows, start, dtype=torch.long), rest_mask], dim=1)
    positions = start + (rest_mask.cumsum(-1) - 1).clamp(min=0)
    eos, answers, done = model.eos_token_ids, [[] for _ in prompts], [False] * rows
    for _ in range(max_new_tokens):
        logits = model.forward(ids, cache, attention_mask=mask, position_ids=positions, keep=1).logits[:, -1]
        tokens = logits.argmax(-1).tolist()
        for row, token in enumerate(tokens):
            done[row] = done[row] or token in eos
            if not done[row]:
                answers[row].append(token)
        if all(done):
            break
        ids, positions = torch.tensor(tokens)[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], dim=1)
    return answers


@torch.inference_mode()
def perplexity(model: LoadedModel, text: str, window: int | None = None, stride: int | None = None) -> Perplexity:
    """Perplexity of the text, every token after the first scored exactly once.

    A text longer than ``window`` (default: the model's context, at most 2048) is read in sliding windows: each
    forward scores the next ``stride`` tokens (default half the window) with the window's earlier tokens as context,
    so every scored token but those of the first window sees at least ``window - stride`` tokens before it.
    """
    ids = model.encode(text)
    window = window or min(model.context_length or 2048, 2048)
    stride = stride or max(1, window // 2)
    if len(ids) < 2 or not 0 < stride < window:
        raise ValueError(f"need a text of two tokens or more and 0 < stride < window (got {len(ids)}, {stride}, {window})")
    total, done = 0.0, 1  # positions before ``done`` are scored (or are the first token)
    while done < len(ids):
        end = min(len(ids), max(window, done + stride))
        begin = max(0, end - window)
        logits = model.forward(torch.tensor([ids[begin:end]])).logits[0]
        targets = torch.tensor(ids[done:end], device=logits.device)
        total += F.cross_entropy(logits[done - 1 - begin:end - 1 - begin], targets, reduction="sum").item()
        done = end
    return Perplexity(total / (len(ids) - 1), len(ids) - 1, min(window, len(ids)))
