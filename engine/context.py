"""What a running decoder is given: the model, the prompt, its parameters and the runner's hooks.

Below the decoder registry and every shared decoding module (engine/decoding.py, engine/diffusion,
engine/speculative), so those take a context without importing the registry above them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from engine.attention import AttentionCapture
from engine.events import DecoderMetric
from engine.ffn import FfnCapture
from engine.models.handle import LoadedModel

Summary = Callable[[], Iterable[DecoderMetric]]


@dataclass
class DecodeContext:
    """Everything a decoder may use besides its own parameters. Decoders never print or store."""

    model: LoadedModel
    prompt_ids: list[int]
    params: dict[str, Any]
    max_new_tokens: int
    eos_token_ids: set[int]
    generator: torch.Generator
    record_top_k: int = 20
    attention: AttentionCapture | None = None
    ffn: FfnCapture | None = None  # FFN activation sparsity per token (engine/ffn.py)
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # extra inputs of the prefill (VLM pixels)
    summaries: list[Summary] = field(default_factory=list)  # called by the runner at the end, see on_finish

    def on_finish(self, summary: Summary) -> None:
        """Have the runner record ``summary()``'s metrics once the run ends, whatever ends it."""
        self.summaries.append(summary)
