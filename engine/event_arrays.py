"""Numbers read back from recorded events with numpy alone: what decoders and figures both compute from a trace,
here so that the figures need neither torch nor a decoder module.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from engine.events import AttentionMap, SpanScores


def attention_array(event: AttentionMap) -> np.ndarray:
    """The stored map back as a float32 array of ``event.shape``."""
    return np.frombuffer(event.data, dtype=np.float16).astype(np.float32).reshape(event.shape)


def span_nll(event: SpanScores) -> np.ndarray:
    """The event's NLL matrix, [starts, max_length] float32 (column j = spans of j + 1 tokens)."""
    return np.frombuffer(event.nll, dtype=np.float32).reshape(len(event.starts), event.max_length)


def ranking_values(nll: np.ndarray, length_normalized: bool) -> np.ndarray:
    """What the argmin runs over: the NLL, or NLL / (tokens + 1 terminator)."""
    return nll / np.arange(2, nll.shape[1] + 2, dtype=np.float32) if length_normalized else nll


def effective_sample_size(log_weights: Sequence[float]) -> float:
    """(Σ w)² / Σ w² of the particles' weights; 0 when every weight is 0."""
    w = np.asarray(log_weights, dtype=np.float64)
    if not np.isfinite(w).any():
        return 0.0
    return float(np.exp(2 * np.logaddexp.reduce(w) - np.logaddexp.reduce(2 * w)))
