"""Greedy decoding: the most probable token at every step (equals ``generate(do_sample=False)``)."""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import TokenHook, autoregressive
from engine.events import Event


def greedy(ctx: DecodeContext) -> Iterator[Event]:
    return autoregressive(ctx, TokenHook())


SPEC = register(
    DecoderSpec(
        name="greedy",
        family="token",
        summary="Take the most probable token at every step.",
        params=(),
        run=greedy,
        lossless=True,
        accepts_images=True,
    )
)
