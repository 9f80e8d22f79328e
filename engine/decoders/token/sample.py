"""Sampling through the composable processing pipeline, and its named presets.

``top_k``, ``top_p``, ``min_p``, ``typical`` and ``top_h`` are the same decoder with a different default
switched on, so every preset exposes (and records) the whole pipeline.
"""

from __future__ import annotations

from typing import Any, Iterator

from engine.decoders.base import DecodeContext, DecoderSpec, register
from engine.decoding import autoregressive
from engine.events import Event
from engine.params import Param
from engine.processing import build_pipeline, sample

PIPELINE_PARAMS = (
    Param("temperature", "float", 1.0, "Divide logits by T before truncation (T < 1 sharpens, T > 1 flattens).", 0.01, 10.0),
    Param("top_k", "int", 0, "Keep the k most probable tokens (0 = off).", 0, 1_000_000),
    Param("top_p", "float", 1.0, "Nucleus: keep the smallest set with mass >= top_p (1 = off).", 0.0, 1.0),
    Param("min_p", "float", 0.0, "Keep tokens with p >= min_p * p_max (0 = off).", 0.0, 1.0),
    Param("typical_p", "float", 1.0, "Locally typical sampling: keep tokens whose surprisal is closest to the entropy until this mass (1 = off).", 0.001, 1.0),
    Param("epsilon", "float", 0.0, "Epsilon sampling: drop tokens with p < epsilon (0 = off; paper: 3e-4 to 9e-4).", 0.0, 0.999),
    Param("eta", "float", 0.0, "Eta sampling: drop tokens with p < min(eta, sqrt(eta) * exp(-H)) (0 = off).", 0.0, 0.999),
    Param("top_h", "float", 0.0, "Top-H: keep the largest top set whose cumulative entropy <= top_h * H (0 = off; typical 0.3-0.5).", 0.0, 1.0),
    Param("repetition_penalty", "float", 1.0, "Divide positive / multiply negative logits of tokens already in the context (1 = off).", 0.01, 10.0),
)


def sample_decoder(ctx: DecodeContext) -> Iterator[Event]:
    stages = build_pipeline(ctx.params)
    return autoregressive(ctx, stages, choose=lambda processed: sample(processed.logprobs, ctx.generator))


def _with_defaults(**defaults: Any) -> tuple[Param, ...]:
    return tuple(p if p.name not in defaults else Param(**{**p.__dict__, "default": defaults[p.name]}) for p in PIPELINE_PARAMS)


_PRESETS = {
    "sample": ({}, "Sample from the processed distribution; combine any processing stages."),
    "top_k": ({"top_k": 50}, "Top-k sampling: sample among the k most probable tokens."),
    "top_p": ({"top_p": 0.9}, "Nucleus (top-p) sampling: sample from the smallest set with mass >= p."),
    "min_p": ({"min_p": 0.1}, "Min-p sampling: keep tokens at least min_p times as likely as the top token."),
    "typical": ({"typical_p": 0.9}, "Locally typical sampling (Meister et al. 2023)."),
    "top_h": ({"top_h": 0.4}, "Top-H: entropy-bounded truncation (Baghaei et al., NeurIPS 2025)."),
}

SPECS = [
    register(DecoderSpec(name=name, family="token", summary=summary, params=_with_defaults(**defaults), run=sample_decoder,
                        accepts_images=True))
    for name, (defaults, summary) in _PRESETS.items()
]
