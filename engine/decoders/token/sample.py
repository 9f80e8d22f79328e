"""Sampling through the composable processing pipeline, and its named presets.

``top_k``, ``top_p``, ``min_p``, ``typical`` and ``top_h`` are the same decoder with a different default
switched on, so every preset exposes (and records) the whole pipeline.
"""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Sampled, autoregressive
from engine.events import Event
from engine.params import with_defaults
from engine.processing import build_pipeline
from engine.shared_params import PIPELINE_PARAMS


def sample_decoder(ctx: DecodeContext) -> Iterator[Event]:
    return autoregressive(ctx, Sampled(build_pipeline(ctx.params), ctx.generator))


_PRESETS = {
    "sample": ({}, "Sample from the processed distribution; combine any processing stages."),
    "top_k": ({"top_k": 50}, "Top-k sampling: sample among the k most probable tokens."),
    "top_p": ({"top_p": 0.9}, "Nucleus (top-p) sampling: sample from the smallest set with mass >= p."),
    "min_p": ({"min_p": 0.1}, "Min-p sampling: keep tokens at least min_p times as likely as the top token."),
    "typical": ({"typical_p": 0.9}, "Locally typical sampling (Meister et al. 2023)."),
    "top_h": ({"top_h": 0.4}, "Top-H: entropy-bounded truncation (Baghaei et al., NeurIPS 2025)."),
}

SPECS = [
    register(DecoderSpec(name=name, family="token", summary=summary, params=with_defaults(PIPELINE_PARAMS, **defaults), run=sample_decoder,
                        accepts_images=True))
    for name, (defaults, summary) in _PRESETS.items()
]
