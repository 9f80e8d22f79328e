"""``bench kv``: what KV-cache compression does to the next-token distribution, per policy, in one run.

Each setting decodes the same chat prompts greedily with a compressed cache beside the full one (``kv_compress``);
per setting it prints the mean KL(full || compressed), the top-1 agreement, the first step where the two disagree,
the share of the cache kept, and whether the text equals plain greedy decoding. Eviction is simulated by masking,
so this measures fidelity, not speed or memory.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

from engine import RunSettings, record
from engine.decoders import get_decoder
from engine.models.handle import LoadedModel
from engine.params import parse_setting

PROMPTS = (
    "Explain why the sky is blue in two sentences.",
    "Write a short story about a lighthouse keeper and a storm.",
    "List three uses of a paper clip and explain each one.",
)
DEFAULT_SETTINGS = (
    "h2o:budget=16", "h2o:budget=32", "snapkv:budget=16:window=8", "streaming:budget=16", "ems:budget=16:window=8",
    "mustafar:sparsity=0.5:residual=8", "mustafar:sparsity=0.7:residual=8", "gear:bits=4:buffer=8",
    "gear:bits=2:buffer=8",
)


@dataclass(frozen=True)
class Row:
    setting: str
    mean_kl: float
    top1: float
    first_divergence: float  # mean over prompts; a prompt without divergence counts as the run length
    kept: float
    same_text: int  # prompts whose output equals plain greedy decoding


def setting_params(setting: str) -> dict[str, str]:
    """``"snapkv:budget=16"`` -> ``kv_compress``'s parameters; ``ParamError`` (one line) for a typo."""
    policy, params = parse_setting(setting)
    params = {"policy": policy, **params}
    get_decoder("kv_compress").validate(params)
    return params


def run_setting(model: LoadedModel, setting: str, params: dict[str, str], tokens: int, greedy: list[list[int]]) -> Row:
    kls, top1, divergence, kept, same = [], [], [], [], 0
    for prompt, plain in zip(PROMPTS, greedy, strict=True):
        trace = record(model, "kv_compress", prompt, params, RunSettings(max_new_tokens=tokens, chat=True, ignore_eos=True))
        if trace.status != "finished":
            raise RuntimeError(f"{setting}: {trace.reason}")
        metrics = trace.metrics
        kls.append(metrics["cache_mean_kl"])
        top1.append(metrics["cache_top1_agreement"])
        first = metrics["cache_first_divergence"]
        divergence.append(tokens if first < 0 else first)
        kept.append(metrics["cache_mean_kept_fraction"])
        same += trace.output_token_ids == plain
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return Row(setting, mean(kls), mean(top1), mean(divergence), mean(kept), same)


def main(model: LoadedModel, settings: Sequence[str] = DEFAULT_SETTINGS, tokens: int = 32) -> list[Row]:
    from tqdm import tqdm

    params = {setting: setting_params(setting) for setting in settings}  # every typo fails before a run
    greedy = [record(model, "greedy", p, settings=RunSettings(max_new_tokens=tokens, chat=True, ignore_eos=True))
              .output_token_ids for p in PROMPTS]
    rows = [run_setting(model, s, params[s], tokens, greedy) for s in tqdm(settings, unit="setting", file=sys.stderr)]
    print(f"{model.name}: {len(PROMPTS)} chat prompts x {tokens} greedy tokens, compressed cache beside the full one")
    print(f"{'setting':38} {'mean KL':>8} {'top-1':>6} {'1st diff':>8} {'kept':>6} {'= greedy':>8}")
    for row in rows:
        print(f"{row.setting:38} {row.mean_kl:8.4f} {row.top1:6.2f} {row.first_divergence:8.1f} {row.kept:6.2f} "
              f"{row.same_text:>5}/{len(PROMPTS)}")
    return rows
