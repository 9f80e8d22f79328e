"""Steps shared by the token-level decoders: the autoregressive loop and the per-token event."""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import torch

from engine.attention import attention_hooks
from engine.context import DecodeContext
from engine.events import Candidate, Event, TokenStep
from engine.processing import Processed, Stage, entropy, process, stage_reports

Chooser = Callable[[Processed], torch.Tensor]


def token_event(
    processed: Processed,
    token_id: int,
    *,
    step: int,
    position: int,
    top_k: int,
    row: int = 0,
    **extra,
) -> TokenStep:
    """The TokenStep for ``token_id`` drawn from row ``row`` of a processed distribution."""
    raw = processed.raw_logprobs[row]
    final = processed.logprobs[row]
    top_raw, top_ids = torch.topk(raw, k=min(top_k, raw.shape[-1]))
    ids = top_ids.tolist()
    probs_raw, probs = top_raw.exp().tolist(), final[top_ids].exp().tolist()
    h_raw = entropy(raw)
    return TokenStep(
        step=step,
        position=position,
        token_id=token_id,
        logprob=final[token_id],
        raw_logprob=raw[token_id],
        rank=int((raw > raw[token_id]).sum()) + 1,
        entropy_raw=h_raw,
        entropy=h_raw if processed.logprobs is processed.raw_logprobs else entropy(final),
        candidates=[Candidate(i, pr, p) for i, pr, p in zip(ids, probs_raw, probs)],
        stages=stage_reports(processed, ids, row=row),
        **extra,
    )


def greedy_choice(processed: Processed) -> torch.Tensor:
    return processed.logprobs.argmax(dim=-1)


def autoregressive(ctx: "DecodeContext", stages: Sequence[Stage], choose: Chooser) -> Iterator[Event]:
    """Prefill, then one forward per token with a KV cache: the loop greedy and sampling share.

    The runner stops the generator on EOS, stop strings or cancel; this loop only bounds the length.
    """
    model = ctx.model
    cache = model.new_cache()
    context = torch.tensor([ctx.prompt_ids], dtype=torch.long)
    new_ids = context
    capture = ctx.attention
    if capture is not None:
        model.use_explorer_attention()
    for position in range(ctx.max_new_tokens):
        start = time.perf_counter()
        with attention_hooks(capture.hooks() if capture is not None else None):
            out = model.forward(new_ids, cache, inputs=ctx.prompt_inputs if position == 0 else None)
        processed = process(out.logits[:, -1, :], stages, context_ids=context)
        token = choose(processed)
        seconds = time.perf_counter() - start
        token_id = int(token[0])
        if capture is not None:  # before the token: the runner may stop right after it
            queries = list(range(context.shape[1] - new_ids.shape[1], context.shape[1]))
            attention_map = capture.take(step=position, query_positions=queries)
            if attention_map is not None:
                yield attention_map
        yield token_event(
            processed, token_id, step=position, position=position, top_k=ctx.record_top_k, seconds=seconds
        )
        new_ids = token.view(1, 1)
        context = torch.cat([context, new_ids], dim=1)
