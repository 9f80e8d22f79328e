"""Self-certainty best-of-N (Kang et al., NeurIPS 2025, arXiv 2502.18581; backprop07/Self-Certainty).

N samples are drawn together (one batched forward per token over a shared prompt cache) through the usual
processing pipeline. Each token's certainty is ``KL(U || p_i) = -log V - mean_j log p_ij`` on the model's raw
(unprocessed) distribution, V being the width of the model's output layer (the reference's
``model.config.vocab_size``, equal to it for the models here); a sample's self-certainty SC is the mean over its
tokens, EOS included. ``best`` answers with the most certain sample; ``borda`` ranks the samples by SC (r = 1
best), gives each the vote ``(N - r + 1)^p`` for its answer class and answers with the most certain sample of the
class with the most votes (p = 0 is a majority vote). A class is the normalised text (stripped, lower case,
whitespace collapsed), or the last number in the text with ``answer = last_number``; samples without a number then
get no class and are chosen only when no sample has one (as the reference sets their score to -inf).
"""

from __future__ import annotations

import math
import re
import time
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Rows
from engine.events import Event, Output, Rerank, ScoredCandidate
from engine.params import Param, with_defaults
from engine.processing import build_pipeline, process, sample
from engine.shared_params import PIPELINE_PARAMS

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def token_certainty(raw_logprobs: torch.Tensor) -> torch.Tensor:
    """``KL(U || p) = -log V - mean_j log p_j`` per row of [B, V] log-probs, in nats (0 for a uniform p)."""
    return -math.log(raw_logprobs.shape[-1]) - raw_logprobs.mean(-1)


def answer_key(text: str, mode: str) -> str | None:
    """The sample's answer class: normalised text, or its last number (None when it has none)."""
    if mode == "last_number":
        numbers = _NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None
    return " ".join(text.lower().split())


def borda_votes(certainty: list[float], power: float) -> list[float]:
    """Each sample's vote ``(N - r + 1)^power`` by its certainty rank r (1 = most certain; ties by sample order)."""
    order = sorted(range(len(certainty)), key=lambda i: -certainty[i])
    votes = [0.0] * len(certainty)
    for rank, i in enumerate(order, start=1):
        votes[i] = float(len(certainty) - rank + 1) ** power
    return votes


def choose(certainty: list[float], keys: list[str | None], votes: list[float], selection: str) -> tuple[int, list[float]]:
    """(chosen sample, each sample's class vote total); samples without a class only win when none has one."""
    totals: dict[str, float] = {}
    for key, vote in zip(keys, votes):
        if key is not None:
            totals[key] = totals.get(key, 0.0) + vote
    class_votes = [totals.get(key, 0.0) if key is not None else 0.0 for key in keys]
    eligible = [i for i, key in enumerate(keys) if key is not None] or list(range(len(keys)))
    if selection == "borda" and totals:
        best_class = max(totals, key=lambda key: totals[key])  # first class to reach the maximum on ties
        eligible = [i for i in eligible if keys[i] == best_class]
    return max(eligible, key=lambda i: certainty[i]), class_votes


def draw_samples(ctx: DecodeContext, n: int) -> tuple[list[list[int]], list[list[float]], int]:
    """N samples drawn in one batch; (tokens up to and including EOS, per-token certainty, model calls)."""
    stages = build_pipeline(ctx.params)
    rows = Rows(ctx, n)
    context = torch.tensor([ctx.prompt_ids]).expand(n, -1)
    tokens: list[list[int]] = [[] for _ in range(n)]
    certainty: list[list[float]] = [[] for _ in range(n)]
    done, calls = [False] * n, 1
    for position in range(ctx.max_new_tokens):
        processed = process(rows.logits, stages, context_ids=context)
        drawn = sample(processed.logprobs, ctx.generator)
        kl = token_certainty(processed.raw_logprobs).tolist()
        for i, token in enumerate(drawn.tolist()):
            if not done[i]:
                tokens[i].append(token)
                certainty[i].append(kl[i])
                done[i] = token in ctx.eos_token_ids
        if all(done) or position + 1 == ctx.max_new_tokens or ctx.cancel.is_set():
            break
        context = torch.cat([context, drawn[:, None]], dim=1)  # finished rows run on; their tokens are dropped
        rows.extend(drawn.tolist())
        calls += 1
    return tokens, certainty, calls


def self_certainty(ctx: DecodeContext) -> Iterator[Event]:
    n, selection, power = ctx.params["n"], ctx.params["selection"], ctx.params["borda_power"]
    start = time.perf_counter()
    tokens, per_token, calls = draw_samples(ctx, n)
    certainty = [sum(values) / len(values) for values in per_token]
    keys = [answer_key(ctx.model.decode(ids), ctx.params["answer"]) for ids in tokens]
    votes = borda_votes(certainty, power)
    chosen, class_votes = choose(certainty, keys, votes, selection)
    candidates = [
        ScoredCandidate(
            token_id=ids[0], score=certainty[i], parts=[certainty[i], votes[i], class_votes[i]],
            tokens=list(ids), token_scores=list(per_token[i]),
            label="(no answer)" if keys[i] is None else keys[i][:80],
        )
        for i, ids in enumerate(tokens)
    ]
    yield Rerank(
        step=0, position=0, method="self_certainty", part_names=["self-certainty", "borda vote", "class votes"],
        candidates=candidates, chosen=chosen, baseline=0, label=selection, model_calls=calls,
        seconds=time.perf_counter() - start,
    )
    yield Output(token_ids=list(tokens[chosen]), score=certainty[chosen])


SPEC = register(
    DecoderSpec(
        name="self_certainty",
        family="token",
        summary="Best-of-N by self-certainty (mean KL from uniform of each token's distribution), or its Borda vote.",
        params=(
            Param("n", "int", 4, "Samples drawn (in one batch).", 1, 64, limit="samples"),
            Param(
                "selection", "choice", "best",
                "best: the most self-certain sample; borda: answer classes vote with (N - rank + 1)^borda_power.",
                choices=("best", "borda"),
            ),
            Param("borda_power", "float", 0.5, "Exponent p of the Borda vote (0 = majority vote).", 0.0, 10.0),
            Param(
                "answer", "choice", "text",
                "Answer classes for voting: the normalised text, or the last number in it.",
                choices=("text", "last_number"),
            ),
            *with_defaults(PIPELINE_PARAMS, temperature=0.7),
        ),
        run=self_certainty,
    )
)
