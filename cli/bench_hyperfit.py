"""``bench hyperfit``: greedy long-form text of a base model and its hyperfitted variant, on held-out prompts, in one
run (Carlsson et al., ICLR 2025: hyperfitting makes greedy text less repetitive while the entropy collapses).

Prompts are the first 32 tokens of held-out text, continued as plain text (no chat template): half from the
reference topics the hyperfitting run held out (its ``training_log.json`` names them), half from
``assets/corpus/assistant_answers.txt`` (another kind of prose). Per model it prints distinct-n (n = 1..3), the
share of repeated 4-grams, the longest repeated span, the type-token ratio over 96-token windows, and the mean
entropy and top-1 probability per step; then hyperfitted / base for each. Last, both models read the same held-out
reference texts (teacher-forced): their entropy, top-1 probability and loss on identical contexts.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine import RunSettings, record
from engine.events import TokenStep
from engine.models.handle import LoadedModel
from engine.offline.hyperfit import LOG, Settings, held_out_topics, prose_topics
from engine.offline.repetition import (
    distinct_n,
    longest_repeated_span,
    repeated_ngram_share,
    rolling_ttr,
)

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "assistant_answers.txt"
PROMPT_TOKENS = 32
TTR_WINDOW = 96
TEACHER_FORCED_TOKENS = 128
METRICS = ("distinct_1", "distinct_2", "distinct_3", "repeated_4grams", "longest_repeat", "ttr_96", "entropy", "top1")


@dataclass(frozen=True)
class Generation:
    """One greedy continuation: its token ids and, per step, the entropy (nats) and the top-1 probability."""

    tokens: list[int]
    entropies: list[float]
    top1: list[float]


def text_metrics(tokens: Sequence[int]) -> dict[str, float]:
    return {"distinct_1": distinct_n(tokens, 1), "distinct_2": distinct_n(tokens, 2),
            "distinct_3": distinct_n(tokens, 3), "repeated_4grams": repeated_ngram_share(tokens, 4),
            "longest_repeat": float(longest_repeated_span(tokens)), "ttr_96": rolling_ttr(tokens, TTR_WINDOW)}


def metrics(generations: Sequence[Generation]) -> dict[str, float]:
    """Each measure's mean over the generations (entropy and top-1 over every step of every one)."""
    per_text = [text_metrics(g.tokens) for g in generations]
    means = {name: sum(m[name] for m in per_text) / len(per_text) for name in per_text[0]}
    entropies = [e for g in generations for e in g.entropies]
    top1 = [p for g in generations for p in g.top1]
    return {**means, "entropy": sum(entropies) / len(entropies), "top1": sum(top1) / len(top1)}


def held_out_ids(model: LoadedModel, variant: Path) -> list[list[int]]:
    """The token ids of each reference topic the hyperfitting run held out."""
    log = variant / LOG
    topics = (json.loads(log.read_text())["held_out_topics"] if log.is_file()
              else held_out_topics(Settings(model.name)))
    prose = prose_topics()
    return [model.tokenizer(prose[name], add_special_tokens=False)["input_ids"] for name in topics]


def prompts(model: LoadedModel, variant: Path, count: int = 8) -> list[str]:
    """``count`` prompts: the first 32 tokens of held-out reference topics and of assistant-answer paragraphs."""
    paragraphs = [p for p in CORPUS.read_text().split("\n\n") if len(p.split()) >= 40]
    picked = [paragraphs[i * len(paragraphs) // (count - count // 2)] for i in range(count - count // 2)]
    answers = [model.tokenizer(text, add_special_tokens=False)["input_ids"] for text in picked]
    return [model.decode(ids[:PROMPT_TOKENS]) for ids in held_out_ids(model, variant)[: count // 2] + answers]


def generate(model: LoadedModel, prompt: str, tokens: int) -> Generation:
    trace = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=tokens, ignore_eos=True))
    if trace.status != "finished":
        raise RuntimeError(f"{model.name}: {trace.reason}")
    steps = [event for event in trace.events if isinstance(event, TokenStep)]
    return Generation(trace.output_token_ids, [s.entropy_raw for s in steps],
                      [s.candidates[0].raw_prob for s in steps])


def teacher_forced(model: LoadedModel, texts: Sequence[list[int]]) -> dict[str, float]:
    """Mean entropy, top-1 probability and next-token loss over ``texts`` read as given (the same contexts for
    both models, unlike their own greedy text)."""
    import torch

    sums = {"entropy": 0.0, "top1": 0.0, "loss": 0.0}
    for ids in texts:
        with torch.no_grad():
            logprobs = model.model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().log_softmax(-1)
        sums["entropy"] += float(-(logprobs.exp() * logprobs).sum(-1).mean())
        sums["top1"] += float(logprobs.exp().max(-1).values.mean())
        sums["loss"] += float(-logprobs[:-1].gather(-1, torch.tensor(ids[1:], device=model.device)[:, None]).mean())
    return {name: total / len(texts) for name, total in sums.items()}


def main(base: LoadedModel, hyperfitted: LoadedModel, variant: Path, count: int = 8,
         tokens: int = 192) -> dict[str, dict[str, float]]:
    from tqdm import tqdm

    texts = prompts(base, variant, count)
    runs = {name: [generate(model, p, tokens) for p in tqdm(texts, desc=name, unit="prompt", file=sys.stderr)]
            for name, model in (("base", base), ("hyperfitted", hyperfitted))}
    results = {name: metrics(generations) for name, generations in runs.items()}
    print(f"{base.name} vs {hyperfitted.name}: {len(texts)} held-out prompts x {tokens} greedy tokens (plain text)")
    print(f"{'measure':16} {'base':>8} {'hyperfit':>9} {'ratio':>7}")
    held = [held_out_ids(base, variant)[i][:TEACHER_FORCED_TOKENS] for i in range(count // 2)]
    forced = {name: teacher_forced(model, held) for name, model in (("base", base), ("hyperfitted", hyperfitted))}
    for name in METRICS:
        _row(name, results["base"][name], results["hyperfitted"][name])
    print(f"the same {len(held)} held-out reference texts read as given ({TEACHER_FORCED_TOKENS} tokens each):")
    for name in forced["base"]:
        _row(name, forced["base"][name], forced["hyperfitted"][name])
    return {**results, "teacher_forced": forced}


def _row(name: str, before: float, after: float) -> None:
    ratio = f"{after / before:7.2f}" if before else f"{'-':>7}"
    print(f"{name:16} {before:8.3f} {after:9.3f} {ratio}")
