"""exact-extract (Castel et al., AKBC 2022, arXiv 2108.05857): the most probable answer span of a passage, exactly.

The reference (ocastel/exact-extract, ``mlspan``) scores every span of the passage as a T5 answer, in one decoder
pass per start instead of one per span. This is its decoder-only adaptation: the answer follows the prompt (for a
chat prompt, the assistant header). The passage is the prompt text after ``passage_marker`` up to
``question_marker``; spans keep their in-passage token boundaries. The prompt runs once; its KV cache, expanded
over a batch of starts i, is followed by ``passage[i : i + L]``, so one forward per chunk of starts gives

    l(i, j) = -log p(passage[i + j] | prompt, passage[i : i + j]),   e(i, j) = -log p(terminator | prompt, passage[i : i + j + 1])

and the span of length j + 1 at i has NLL ``sum_{m <= j} l(i, m) + e(i, j)`` (+inf where it runs past the
passage). The terminator is EOS (all of the model's EOS ids together) or a newline. The answer is the argmin,
optionally of NLL / (j + 2) (tokens plus terminator). The greedy answer (up to 2 L tokens, until the terminator or
EOS) is recorded beside it for comparison.
"""

from __future__ import annotations

import math
import time
from typing import Iterator

import numpy as np
import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.event_arrays import ranking_values
from engine.events import Event, Output, SpanScores
from engine.params import Param, ParamError
from engine.prompt_spans import marked_spans
from engine.speculative.cache import crop_cache

CHUNK = 32  # starts per batched forward: bounds the [chunk, L, vocab] logits held at once


def terminator_ids(ctx: DecodeContext, terminator: str) -> list[int]:
    if terminator == "newline":
        ids = ctx.model.tokenizer.encode("\n", add_special_tokens=False)
        if len(ids) != 1:
            raise ParamError(f"this tokenizer writes a newline as {len(ids)} tokens; use terminator=eos")
        return ids
    ids = sorted(ctx.eos_token_ids or ctx.model.eos_token_ids)  # ignore_eos empties the run's set, not the model's
    if not ids:
        raise ParamError("this model declares no EOS token; use terminator=newline")
    return ids


def passage_of(ctx: DecodeContext, passage_marker: str, question_marker: str) -> range:
    """The passage's token positions in the prompt."""
    text = ctx.model.tokenizer.decode(ctx.prompt_ids, skip_special_tokens=False)
    if passage_marker and passage_marker not in text:
        raise ParamError(
            f"the prompt has no passage marker {passage_marker!r}: write '{passage_marker} <passage> "
            f"{question_marker} <question>' (or set passage_marker to '' to take the text before the question)"
        )
    return marked_spans(ctx.model, ctx.prompt_ids, passage_marker, question_marker).context


def greedy_answer(ctx: DecodeContext, cache, first_logits: torch.Tensor, stop: set[int], limit: int) -> tuple[list[int], int]:
    """Greedy tokens after the cached prompt until a terminator or ``limit`` tokens, and the forwards taken."""
    tokens: list[int] = []
    logits, calls = first_logits, 0
    while len(tokens) < limit:
        token = int(logits.argmax())
        if token in stop:
            break
        tokens.append(token)
        if len(tokens) < limit:
            logits = ctx.model.forward(torch.tensor([[token]]), cache).logits[0, -1]
            calls += 1
    return tokens, calls


def score_spans(
    ctx: DecodeContext, cache, first_logprobs: torch.Tensor, passage: list[int], length: int, stop: list[int]
) -> tuple[np.ndarray, int]:
    """The [starts, length] span NLL matrix and the forwards it took; ``cache`` holds exactly the prompt (batch 1)."""
    n, prompt_length = len(passage), cache.get_seq_length()
    rows = min(CHUNK, n)
    cache.batch_repeat_interleave(rows)
    padded = passage + [passage[-1]] * length  # filler after the passage end: only feeds spans that are masked
    token_nll = torch.empty(n, length, dtype=torch.float64)  # l(i, j)
    end_nll = torch.empty(n, length, dtype=torch.float64)  # e(i, j)
    token_nll[:, 0] = -first_logprobs[passage].double().cpu()
    calls = 0
    for first in range(0, n, rows):
        starts = [min(first + r, n - 1) for r in range(rows)]  # the last chunk repeats its final start
        batch = torch.tensor([padded[i : i + length] for i in starts])
        logprobs = ctx.model.forward(batch, cache).logits.log_softmax(-1)
        crop_cache(cache, prompt_length)
        calls += 1
        count = min(rows, n - first)
        if length > 1:
            nxt = batch[:count, 1:, None].to(logprobs.device)
            token_nll[first : first + count, 1:] = -logprobs[:count, :-1].gather(2, nxt)[..., 0].double().cpu()
        end_nll[first : first + count] = -logprobs[:count, :, stop].logsumexp(-1).double().cpu()
    nll = token_nll.cumsum(1) + end_nll
    overrun = torch.arange(n)[:, None] + torch.arange(1, length + 1)[None, :] > n
    return nll.masked_fill(overrun, math.inf).float().numpy(), calls


def exact_extract(ctx: DecodeContext) -> Iterator[Event]:
    length = min(ctx.params["max_answer_tokens"], ctx.max_new_tokens)
    normalized = ctx.params["length_normalized"]
    start = time.perf_counter()
    span = passage_of(ctx, ctx.params["passage_marker"], ctx.params["question_marker"])
    passage = ctx.prompt_ids[span.start : span.stop]
    stop = terminator_ids(ctx, ctx.params["terminator"])
    cache = ctx.model.new_cache()
    cache.activate_past_recording()  # sliding-window layers must keep what the crops roll back to
    first = ctx.model.forward(torch.tensor([ctx.prompt_ids]), cache, keep=1).logits[0, -1]
    greedy, greedy_calls = greedy_answer(ctx, cache, first, set(stop) | ctx.eos_token_ids, min(2 * length, ctx.max_new_tokens))
    crop_cache(cache, len(ctx.prompt_ids))
    nll, calls = score_spans(ctx, cache, first.log_softmax(-1), passage, length, stop)
    values = ranking_values(nll, normalized)
    best_i, best_j = np.unravel_index(int(np.argmin(values)), values.shape)
    yield SpanScores(
        step=0, starts=list(span), max_length=length, nll=nll.astype(np.float32).tobytes(),
        best_start=span.start + int(best_i), best_length=int(best_j) + 1, length_normalized=normalized,
        greedy_token_ids=greedy, model_calls=1 + greedy_calls + calls, seconds=time.perf_counter() - start,
    )
    answer = passage[int(best_i) : int(best_i) + int(best_j) + 1]
    yield Output(token_ids=answer, score=-float(values[best_i, best_j]))


SPEC = register(
    DecoderSpec(
        name="exact_extract",
        family="guided",
        summary="exact-extract: the answer is the passage span of least NLL (span + terminator), every span scored.",
        params=(
            Param("passage_marker", "str", "Context:", "Text before the passage in the prompt ('' = the text before the question)."),
            Param("question_marker", "str", "Question:", "Text that starts the question, after the passage."),
            Param("max_answer_tokens", "int", 8, "Longest span scored, in tokens (also capped by max_new_tokens).", 1, 64),
            Param(
                "terminator", "choice", "eos", "What ends an answer: the model's EOS token(s), or a newline.",
                choices=("eos", "newline"),
            ),
            Param("length_normalized", "bool", False, "Rank spans by NLL / (tokens + 1) instead of NLL."),
        ),
        run=exact_extract,
    )
)
