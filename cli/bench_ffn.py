"""``bench ffn``: FFN activation sparsity of a model's greedy decoding (BlockFFN's measures), in one run.

The same chat prompts are decoded greedily with FFN capture under several inactivity thresholds (a share of the
token's largest |activation| in the layer; 0 is BlockFFN's exact-zero rule) and chunk lengths. Per setting it prints
the mean token-level sparsity (TLS) and chunk-level sparsity (CLS) over layers and tokens, and finally the capture's
cost: wall time with capture over wall time without, on the same tokens (checked equal).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from engine import RunSettings, record
from engine.events import FfnSparsity
from engine.ffn import FfnCapture
from engine.models.handle import LoadedModel

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a short story about a lighthouse keeper and a storm.",
    "List three uses of a paper clip and explain each one.",
)
THRESHOLDS = (0.0, 0.001, 0.01, 0.05, 0.1)  # relative, at chunk 8
CHUNKS = (2, 4, 8, 16, 32)  # at the default threshold


def _run(model: LoadedModel, prompt: str, tokens: int, capture: FfnCapture | None):
    began = time.perf_counter()
    trace = record(model, "greedy", prompt, settings=RunSettings(max_new_tokens=tokens, chat=True, ignore_eos=True,
                                                                 ffn=capture))
    if trace.status != "finished":
        raise RuntimeError(trace.reason)
    return trace, time.perf_counter() - began


def _measures(traces: Sequence) -> tuple[float, float]:
    events = [e for trace in traces for e in trace.events if isinstance(e, FfnSparsity)]
    chunks = [e.chunk_level for e in events if e.chunk_level is not None]
    return float(np.mean([e.token_level for e in events])), float(np.mean(chunks)) if chunks else float("nan")


def main(model: LoadedModel, tokens: int = 64) -> None:
    default = FfnCapture()
    settings = [(t, 8) for t in THRESHOLDS] + [(default.threshold, k) for k in CHUNKS if k != 8]
    _run(model, PROMPTS[0], 4, None)  # warm-up
    plain = [_run(model, prompt, tokens, None)[0] for prompt in PROMPTS]
    print(f"FFN activation sparsity of {model.name}: greedy, {len(PROMPTS)} chat prompts x {tokens} tokens, "
          f"{model.num_layers} layers")
    print(f"{'threshold':>10} {'chunk':>6} {'TLS':>7} {'CLS':>7}", flush=True)
    ratios = []
    for threshold, chunk in tqdm(settings, desc="settings", file=sys.stderr, disable=None, leave=False):
        traces = []
        for prompt, reference in zip(PROMPTS, plain, strict=True):
            bare = _run(model, prompt, tokens, None)[1] if (threshold, chunk) == (default.threshold, default.chunk) else 0
            trace, seconds = _run(model, prompt, tokens, FfnCapture(threshold=threshold, chunk=chunk))
            if trace.output_token_ids != reference.output_token_ids:
                raise RuntimeError("FFN capture changed the generated tokens")
            traces.append(trace)
            if bare:  # the default setting's runs are timed against a plain run right before each
                ratios.append(seconds / bare)
        tls, cls = _measures(traces)
        shown = "—" if np.isnan(cls) else f"{cls:.3f}"  # —: no chunk of this length completed
        print(f"{threshold:>10g} {chunk:>6} {tls:>7.3f} {shown:>7}", flush=True)
    print(f"capture cost: {np.mean(ratios):.2f}x the wall time of a plain run of the same prompt (default setting, "
          "tokens identical)")
