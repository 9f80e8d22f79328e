"""Prompts the target writes itself, for drafter training data (Magpie, Xu et al. 2024).

An instruction-tuned model, given its chat template up to the start of a user turn and nothing else, continues with
a user's request of the kind it was tuned on. Sampled this way (temperature 1, top-p 0.95, a fixed seed per batch),
the requests are far more varied than templates can be: the drafters then learn the target's answers to the
questions its own users ask, which is what a benchmark like Spec-Bench asks too. A request is kept if its turn ended
(not cut off by the token limit), it has at least ``MIN_WORDS`` words, it is new, and it shares no run of
``LEAK_WORDS`` words with a Spec-Bench question (the drafters are evaluated on those).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from transformers import GenerationConfig

from engine.models.handle import LoadedModel
from engine.params import ParamError

SPEC_BENCH_SUBSET = Path(__file__).resolve().parents[2] / "assets" / "benchmarks" / "spec_bench_subset.jsonl"
LEAK_WORDS = 8  # a prompt sharing this many words in a row with a Spec-Bench question counts as leaked
MIN_WORDS = 4
MAX_PROMPT_TOKENS = 96
TEMPERATURE, TOP_P = 1.0, 0.95
MAX_BATCHES_PER_PROMPT = 4  # batches drawn per prompt wanted before giving up (a model that rarely ends its turn)


def word_runs(text: str) -> set[tuple[str, ...]]:
    """Every run of ``LEAK_WORDS`` consecutive words, lower-cased."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + LEAK_WORDS]) for i in range(len(words) - LEAK_WORDS + 1)}


@cache
def spec_bench_runs() -> frozenset[tuple[str, ...]]:
    lines = SPEC_BENCH_SUBSET.read_text(encoding="utf-8").splitlines()
    turns = [turn for line in lines for turn in json.loads(line)["turns"]]
    return frozenset().union(*map(word_runs, turns))


def leaks_spec_bench(text: str) -> bool:
    return bool(word_runs(text) & spec_bench_runs())


def user_turn_prefix(model: LoadedModel) -> list[int]:
    """Token ids of the chat template up to where a user's words begin (the system turn, if the template adds one)."""
    if not model.has_chat_template:
        raise ParamError(f"{model.name} has no chat template: it cannot write its own prompts")
    marker = "\x00MARKER\x00"
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return [int(i) for i in model.tokenizer(text[: text.index(marker)], add_special_tokens=False)["input_ids"]]


@torch.inference_mode()
def sample_user_turns(model: LoadedModel, count: int, seed: int) -> list[list[int] | None]:
    """``count`` sampled user turns (token ids up to their end of turn; None where the token limit cut one off)."""
    prefix = user_turn_prefix(model)
    eos = sorted(model.eos_token_ids)
    config = GenerationConfig(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                              max_new_tokens=MAX_PROMPT_TOKENS, eos_token_id=eos, pad_token_id=eos[0])
    ids = torch.tensor([prefix] * count, device=model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    turns: list[list[int] | None] = []
    for row in out[:, len(prefix) :].tolist():
        end = next((i for i, token in enumerate(row) if token in eos), None)
        turns.append(None if end is None else row[:end])
    return turns


@dataclass(frozen=True)
class Draw:
    """Requests drawn so far, and where the next one would be read: turn ``next_turn`` of batch ``next_batch``."""

    prompts: list[str]
    next_batch: int = 0
    next_turn: int = 0


def self_written_prompts(
    model: LoadedModel, count: int, seed: int, batch_size: int = 16, progress: Callable[[int], None] | None = None,
    resume: Draw | None = None,
) -> Draw:
    """``count`` distinct requests the target writes itself, drawn in seeded batches (batch i uses seed
    ``seed * 100_003 + i``); the same model, seed and batch size give the same list on the same machine, and a
    longer list extends a shorter one. ``resume``: a shorter draw of the same seed and batch size, continued where it
    stopped (the same list as drawing afresh, without sampling its batches again)."""
    start = resume or Draw([])
    prompts, seen = list(start.prompts), set(start.prompts)
    for batch in range(start.next_batch, MAX_BATCHES_PER_PROMPT * count // batch_size + 1):
        turns = sample_user_turns(model, batch_size, seed * 100_003 + batch)
        first = start.next_turn if batch == start.next_batch else 0
        for position, turn in enumerate(turns[first:], start=first):
            text = None if turn is None else model.decode(turn, skip_special_tokens=True).strip()
            if not text or len(text.split()) < MIN_WORDS or text in seen or leaks_spec_bench(text):
                continue
            seen.add(text)
            prompts.append(text)
            if progress:
                progress(1)
            if len(prompts) == count:  # the next request: this batch's next turn, or the next batch's first
                return Draw(prompts, batch, position + 1) if position + 1 < len(turns) else Draw(prompts, batch + 1)
    raise ParamError(f"{model.name} ended only {len(prompts)} of {count} sampled user turns within "
                     f"{MAX_PROMPT_TOKENS} tokens; ask for fewer self-written prompts")
