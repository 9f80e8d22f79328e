"""Teacher forcing: how surprised is the model by a given continuation? One forward pass over all of it."""

from __future__ import annotations

import time
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import captured_forward, token_event
from engine.events import Event
from engine.params import Param, ParamError
from engine.processing import process


def forced(ctx: DecodeContext) -> Iterator[Event]:
    text = ctx.params["continuation"]
    target = ctx.model.tokenizer(text, add_special_tokens=False)["input_ids"][: ctx.max_new_tokens]
    if not target:
        raise ParamError("forced decoding needs a non-empty continuation (--param continuation=TEXT)")
    start = time.perf_counter()
    ids = torch.tensor([ctx.prompt_ids + target])
    out, captured = captured_forward(ctx, lambda: ctx.model.forward(ids, ctx.model.new_cache()), step=0,
                                     queries=list(range(ids.shape[1])), outputs=range(len(target)))
    first = len(ctx.prompt_ids) - 1
    processed = process(out.logits[0, first : first + len(target), :], stages=())
    seconds = time.perf_counter() - start
    yield from captured  # before the tokens: the runner stops right after the last one
    for position, token_id in enumerate(target):
        yield token_event(
            processed,
            token_id,
            step=0,
            position=position,
            top_k=ctx.record_top_k,
            row=position,
            forced=True,
            model_calls=1 if position == 0 else 0,
            seconds=seconds if position == 0 else 0.0,
        )


SPEC = register(
    DecoderSpec(
        name="forced",
        family="token",
        summary="Teacher-force a given continuation and record the model's distribution at each of its tokens.",
        params=(Param("continuation", "str", "", "The text to force after the prompt."),),
        run=forced,
    )
)
