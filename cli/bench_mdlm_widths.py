"""``bench mdlm-widths``: MDLM training steps with one random canvas width per batch (LLaDA's padding) against one
per group of ``--width-group`` rows of similar length, interleaved on the same batches in one run; ``bench
mdlm-precision``: the same steps with the forward pass autocast to bfloat16 against float32.

Each batch is drawn once per setting from the same data stream position, so both see the same examples; the step is
the forward and backward of the whole batch in micro-batches (the optimizer step, the same for both, is left out).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from tqdm import tqdm

from engine.offline.train_dllm import Batches, Shape, build_model, micro_batches, mdlm_rows, training_step
from engine.offline.waitline_tokenizer import build_tokenizer

PREFIX_SHARE, COMMON_SHARE = 0.5, 0.4  # as the waitline-mdlm recipe's adaptation stage


def main(steps: int = 8, width_group: int = 8, batch_size: int = 32, micro_batch: int = 8, seed: int = 0) -> dict:
    """One canvas width per batch against one per ``width_group`` rows, both autocast to bfloat16."""
    settings = {"one width per batch": (0, True), f"one width per {width_group} rows": (width_group, True)}
    median, columns = _interleaved(settings, steps, batch_size, micro_batch, seed)
    whole, grouped = settings
    ratios = {"speedup": median[whole] / median[grouped], "columns": columns[whole] / columns[grouped]}
    print(f"  speed-up {ratios['speedup']:.2f}x, columns {ratios['columns']:.2f}x fewer")
    return ratios


def compare_precisions(steps: int = 8, width_group: int = 8, batch_size: int = 32, micro_batch: int = 8,
                       seed: int = 0) -> dict:
    """The forward pass autocast to bfloat16 against float32 throughout (``bench mdlm-precision``): a CPU without
    bfloat16 arithmetic emulates it, which decides ``train_dllm --float32-from``."""
    settings = {"bfloat16 autocast": (width_group, True), "float32": (width_group, False)}
    median, _ = _interleaved(settings, steps, batch_size, micro_batch, seed)
    ratios = {"float32_speedup": median["bfloat16 autocast"] / median["float32"]}
    print(f"  float32 {ratios['float32_speedup']:.2f}x the speed of bfloat16 autocast")
    return ratios


def _interleaved(settings: dict[str, tuple[int, bool]], steps: int, batch_size: int, micro_batch: int,
                 seed: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median seconds per training step and canvas columns run, per setting (label -> (width group, bfloat16)), each
    batch drawn once per setting from the same data stream position; prints one line per setting."""
    tokenizer = build_tokenizer()
    model = build_model("mdlm", tokenizer, Shape(), seed).train()
    batches = Batches(tokenizer, seed, batch_size)
    batches.longest, batches.generator.common_share = batches.generator.max_people, COMMON_SHARE
    noise = torch.Generator().manual_seed(seed)
    autocasts = {enabled: torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled) for enabled in (False, True)}
    seconds: dict[str, list[float]] = {label: [] for label in settings}
    columns = dict.fromkeys(settings, 0)
    for group, bfloat16 in settings.values():  # warm-up: each setting's kernels once
        _step(model, mdlm_rows(batches, noise, model.config.mask_token_id, PREFIX_SHARE, width_group=group),
              micro_batch, autocasts[bfloat16])
    for _ in tqdm(range(steps), desc="batches", file=sys.stderr, disable=None, leave=False):
        position = batches.state()
        for label, (group, bfloat16) in settings.items():
            batches.load_state(position)
            rows = mdlm_rows(batches, noise, model.config.mask_token_id, PREFIX_SHARE, width_group=group)
            chunks = micro_batches(rows, micro_batch)
            columns[label] += sum(len(chunk) * int(rows.lengths[chunk].max()) for chunk in chunks)
            seconds[label].append(_step(model, rows, micro_batch, autocasts[bfloat16]))
    median = {label: statistics.median(values) for label, values in seconds.items()}
    print(f"MDLM training step, {Shape()}, batch {batch_size} in micro-batches of {micro_batch}, lists up to "
          f"{batches.longest} people, {steps} batches interleaved, torch threads {torch.get_num_threads()}")
    for label in settings:
        print(f"  {label:24} median {median[label]:6.2f} s/step   columns {columns[label]:>8,}")
    return median, columns


def _step(model: torch.nn.Module, rows, micro_batch: int, autocast: torch.autocast) -> float:
    began = time.perf_counter()
    model.zero_grad(set_to_none=True)
    training_step(model, rows, micro_batch, autocast)
    return time.perf_counter() - began
