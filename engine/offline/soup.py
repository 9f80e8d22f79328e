"""Average the weights of waiting-line runs continued from the same model: a uniform model soup (Wortsman et al.,
"Model soups", ICML 2022). Runs fine-tuned from one starting point stay in one basin of the loss, so their mean is a
model too, and usually a better one than any of them: each run's own luck with its data stream averages out.

    python -m engine.offline.soup --model ar --from RUN_A --from RUN_B --out OUT [--parallelbench DIR ...]

Every run must be a ``train_dllm`` output of the same shape, tokenizer and first run (its ``training_log.json`` chain
starts with the same command). OUT gets the averaged weights (float16, as every waiting-line model ships), the
tokenizer and config of the first run, a ``training_log.json`` holding each run's own log, and a card with the soup's
held-out scores, each run's scores and the first run's card.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from engine.models.registry import rebuild_command
from engine.offline import train_dllm
from engine.offline.train_dllm import GEN_LENGTH, HELD_OUT_SEED, KINDS

WEIGHTS = "model.safetensors"
CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class SoupError(ValueError):
    """Runs that cannot be averaged: a different shape, tokenizer or starting point."""


def run_log(folder: Path) -> dict[str, Any]:
    path = folder / "training_log.json"
    if not path.is_file():
        raise SoupError(f"{folder}: no training_log.json (not a train_dllm output)")
    return json.loads(path.read_text())


def first_command(log: dict[str, Any]) -> str:
    """The command of the oldest run in a log's chain: runs that share it continued from the same weights."""
    return train_dllm._history(log)[0].get("command", "")


def check_compatible(folders: list[Path]) -> list[dict[str, Any]]:
    """The runs' logs, once they are known to be averageable."""
    if len(folders) < 2:
        raise SoupError("a soup needs at least two runs (--from twice or more)")
    logs = {folder: run_log(folder) for folder in folders}
    for name in ("config.json", "tokenizer.json"):
        if len({(folder / name).read_text() for folder in folders}) > 1:
            raise SoupError(f"the runs differ in {name}: only runs of one model can be averaged")
    starts = {folder: first_command(log) for folder, log in logs.items()}
    if len(set(starts.values())) > 1:
        raise SoupError("the runs do not continue from the same first run: "
                        + "; ".join(f"{folder}: {start or '?'}" for folder, start in starts.items()))
    return list(logs.values())


def average_weights(folders: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the runs' tensors, summed in float32 and stored in the runs' dtype."""
    states = [load_file(folder / WEIGHTS) for folder in folders]
    if any(state.keys() != states[0].keys() for state in states):
        raise SoupError("the runs' weight files hold different tensors")
    return {name: (sum(state[name].float() for state in states) / len(states)).to(states[0][name].dtype)
            for name in states[0]}


def soup(folders: list[Path], out: Path) -> list[dict[str, Any]]:
    """Write the averaged model into ``out`` (config and tokenizer from the first run); the runs' logs."""
    logs = check_compatible(folders)
    weights = average_weights(folders)
    out.mkdir(parents=True, exist_ok=True)
    for name in CARRIED:
        if (folders[0] / name).is_file():
            shutil.copy(folders[0] / name, out / name)
    save_file(weights, out / WEIGHTS, metadata={"format": "pt"})
    return logs


def total_seconds(logs: list[dict[str, Any]]) -> float:
    """Training time of all the runs, each shared earlier run counted once (and the runs of an earlier soup)."""
    runs: dict[str, float] = {}

    def visit(log: dict[str, Any]) -> None:
        for run in train_dllm._history(log):
            runs[run.get("command", "")] = run["seconds"]
            for averaged in run.get("soup_of", []):
                visit(averaged)

    for log in logs:
        visit(log)
    return sum(runs.values())


def soup_card(kind: str, folders: list[Path], logs: list[dict[str, Any]], scores: dict[str, Any], parameters: int,
              command: str) -> str:
    per_run = "\n".join(
        f"| {index} | `{log.get('command', '?')}` | {log['steps_done']} | {log['seconds']:.0f} | "
        + " / ".join(f"{accuracy:.0%}" for accuracy in log.get("held_out", {}).values()) + " |"
        for index, log in enumerate(logs, 1))
    tables, files = train_dllm.score_sections(scores["held_out"], scores["held_out_common"], scores["test_files"])
    first_card = (folders[0] / "README.md").read_text().replace("\n## ", "\n### ").split("\n", 1)[1]
    return f"""# waitline-{kind}

A {parameters / 1e6:.2f}M-parameter `LlamaForCausalLM` built into Decoding Explorer: the uniform average of the
weights of {len(folders)} runs continued from the same weights (a model soup, Wortsman et al., ICML 2022), each on
its own data stream. Weights stored in float16. Data, objective, tokenizer and prompt format are those of the runs
(the first run's card is below; the runs differ only in the options of their commands).

- **Averaged**: `{command}`.
- **Training time**: {total_seconds(logs):.0f} s on CPU in all (every run below and their shared earlier runs once).
- **Rebuild** the shipped `waitline-{kind}`: `{rebuild_command(f"waitline-{kind}")}` (the runs' commands in turn,
  each seeded, then the average: `engine/offline/recipes.py`).

## Held-out accuracy (fresh lists, one token per step: {"greedy" if kind == "ar" else "most confident first"})

{tables}
{files}
## The runs averaged

| run | command | steps | seconds | its own card's held-out copy / reverse / sort (fresh lists) |
|---|---|---|---|---|
{per_run}

## The first run's card
{first_card}"""


def soup_record(command: str, logs: list[dict[str, Any]], scores: dict[str, Any]) -> dict[str, Any]:
    """The soup's ``training_log.json``: each run's log, shaped as a zero-step run continued from the first run, so a
    training run continued from the soup shows its history as from any other model."""
    return {"command": command, "steps_done": 0, "seconds": 0.0, "loss_curve": [], "finished": True,
            "settings": logs[0]["settings"], "continued_from": logs[0], "soup_of": logs, **scores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=KINDS, required=True)
    parser.add_argument("--from", dest="runs", type=Path, action="append", required=True, metavar="DIR",
                        help="a train_dllm output folder (twice or more)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--eval-per-task", type=int, default=40)
    parser.add_argument("--eval-seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--eval-block", type=int, default=GEN_LENGTH)
    parser.add_argument("--parallelbench", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder of ParallelBench's own test files to score on too (repeatable)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        logs = soup(args.runs, args.out)
    except SoupError as error:
        raise SystemExit(f"error: {error}") from error
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    scores = train_dllm.card_scores(model, tokenizer, args.model, args.eval_per_task, args.eval_seed,
                                    args.eval_block, tuple(args.parallelbench))
    print(json.dumps(scores), flush=True)
    command = (f"python -m engine.offline.soup --model {args.model} "
               + " ".join(f"--from {folder}" for folder in args.runs) + f" --out {args.out}")
    parameters = sum(p.numel() for p in model.parameters())
    (args.out / "README.md").write_text(soup_card(args.model, args.runs, logs, scores, parameters, command))
    (args.out / "training_log.json").write_text(json.dumps(soup_record(command, logs, scores), indent=1))


if __name__ == "__main__":
    main()
