"""``bench mdlm-widths``: MDLM training steps with one random canvas width per batch (LLaDA's padding) against one
per group of ``--width-group`` rows of similar length, interleaved on the same batches in one run.

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
    tokenizer = build_tokenizer()
    model = build_model("mdlm", tokenizer, Shape(), seed).train()
    batches = Batches(tokenizer, seed, batch_size)
    batches.longest, batches.generator.common_share = batches.generator.max_people, COMMON_SHARE
    noise = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    seconds: dict[int, list[float]] = {0: [], width_group: []}
    columns = dict.fromkeys(seconds, 0)
    _step(model, mdlm_rows(batches, noise, model.config.mask_token_id, PREFIX_SHARE), micro_batch, autocast)  # warm-up
    for _ in tqdm(range(steps), desc="batches", file=sys.stderr, disable=None, leave=False):
        position = batches.state()
        for group in seconds:
            batches.load_state(position)
            rows = mdlm_rows(batches, noise, model.config.mask_token_id, PREFIX_SHARE, width_group=group)
            chunks = micro_batches(rows, micro_batch)
            columns[group] += sum(len(chunk) * int(rows.lengths[chunk].max()) for chunk in chunks)
            seconds[group].append(_step(model, rows, micro_batch, autocast))
    median = {group: statistics.median(values) for group, values in seconds.items()}
    print(f"MDLM training step, {Shape()}, batch {batch_size} in micro-batches of {micro_batch}, lists up to "
          f"{batches.longest} people, {steps} batches interleaved, torch threads {torch.get_num_threads()}")
    for group, label in ((0, "one width per batch"), (width_group, f"one width per {width_group} rows")):
        print(f"  {label:24} median {median[group]:6.2f} s/step   columns {columns[group]:>8,}")
    ratios = {"speedup": median[0] / median[width_group], "columns": columns[0] / columns[width_group]}
    print(f"  speed-up {ratios['speedup']:.2f}x, columns {ratios['columns']:.2f}x fewer")
    return ratios


def _step(model: torch.nn.Module, rows, micro_batch: int, autocast: torch.autocast) -> float:
    began = time.perf_counter()
    model.zero_grad(set_to_none=True)
    training_step(model, rows, micro_batch, autocast)
    return time.perf_counter() - began
