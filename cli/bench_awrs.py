"""``bench awrs``: constraint evaluations and wall time of AWRS against plain token masking, in one run.

Each constraint is sampled with ``awrs`` and with ``mask`` (the constraint checked on every vocabulary token each
step) from the same seeds on the same model; the table gives checks per token, seconds per run and their ratios,
and whether every output satisfies its constraint.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine import RunSettings, record
from engine.models.handle import LoadedModel

CASES = (  # (name, prompt, constraint type, constraint, most new tokens: room for a complete match)
    ("yes/no", "Is the sea salty? Answer yes or no.", "regex", "(yes|no)", 8),
    ("date", "When did the first person walk on the Moon? Give the date as YYYY-MM-DD.", "regex",
     r"[0-9]{4}-[0-9]{2}-[0-9]{2}", 16),
    ("json", "Describe a cat called Tom who is 3 years old as JSON.", "json", '{"name": "string", "age": "integer"}',
     48),
)


@dataclass(frozen=True)
class Row:
    case: str
    method: str
    checks_per_token: float
    seconds: float
    satisfied: int


def run_case(model: LoadedModel, case: tuple[str, str, str, str, int], method: str, seeds: Sequence[int]) -> Row:
    name, prompt, kind, constraint, tokens = case
    params = {"constraint_type": kind, "constraint": constraint, "method": method, "temperature": 1.0}
    checks, drawn, satisfied, start = 0.0, 0.0, 0, time.perf_counter()
    for seed in seeds:
        trace = record(model, "awrs", prompt, params, RunSettings(max_new_tokens=tokens, chat=True, seed=seed))
        if trace.status != "finished":
            raise RuntimeError(f"{name}/{method}: {trace.reason}")
        checks += trace.metrics["constraint_checks"]
        drawn += trace.metrics["constraint_checks"] / max(trace.metrics["checks_per_token"], 1e-9)
        satisfied += int(trace.metrics["constraint_satisfied"])
    return Row(name, method, checks / max(drawn, 1.0), (time.perf_counter() - start) / len(seeds), satisfied)


def main(model: LoadedModel, seeds: Sequence[int] = (0, 1, 2)) -> list[Row]:
    from tqdm import tqdm

    jobs = [(case, method) for case in CASES for method in ("awrs", "mask")]
    rows = [run_case(model, case, method, seeds) for case, method in tqdm(jobs, unit="setting", file=sys.stderr)]
    print(f"{model.name}: {len(seeds)} seeds per setting, temperature 1, vocabulary {model.vocab_size}")
    print(f"{'constraint':10} {'method':6} {'checks/token':>12} {'s/run':>7} {'satisfied':>9}")
    for row in rows:
        print(f"{row.case:10} {row.method:6} {row.checks_per_token:12.1f} {row.seconds:7.2f} "
              f"{row.satisfied:>6}/{len(seeds)}")
    for awrs, mask in zip(rows[::2], rows[1::2]):
        print(f"{awrs.case}: mask/awrs checks per token {mask.checks_per_token / awrs.checks_per_token:.0f}x, "
              f"wall time {mask.seconds / awrs.seconds:.1f}x")
    return rows
