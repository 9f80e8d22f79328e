"""Record the sample traces shipped in ``assets/samples`` from their recipes (``assets/samples/recipes.json``: one
entry per file, the settings each trace was recorded with), through the engine path ``decoding-explorer record``
takes. ``decoding-explorer assets rebuild samples`` runs it:

    python -m engine.offline.sample_traces --out assets/samples
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.attention import AttentionCapture
from engine.models import load_model
from engine.models.handle import LoadedModel
from engine.offline.recipes import get_recipe, shipped_location
from engine.run import RunSettings, record
from engine.trace import write_file

SAMPLES_DIR = shipped_location(get_recipe("samples"))
RECIPES_FILE = SAMPLES_DIR / "recipes.json"


def read_recipes(path: Path = RECIPES_FILE) -> dict[str, dict[str, Any]]:
    """File stem -> record settings (model, decoder, params, prompt, seed, chat, max_new_tokens, stop, record_top_k,
    attention)."""
    return json.loads(path.read_text(encoding="utf-8"))


def run_settings(recipe: dict[str, Any], max_new_tokens: int = 0) -> RunSettings:
    """The recipe's run settings; ``max_new_tokens`` > 0 caps its budget (a smoke run)."""
    budget = min(recipe["max_new_tokens"], max_new_tokens) if max_new_tokens else recipe["max_new_tokens"]
    attention = recipe["attention"]
    return RunSettings(max_new_tokens=budget, seed=recipe["seed"], chat=recipe["chat"], stop=recipe["stop"],
                       record_top_k=recipe["record_top_k"],
                       attention=AttentionCapture(**attention) if attention else None)


def record_samples(recipes: dict[str, dict[str, Any]], out: Path, max_new_tokens: int = 0,
                   load: Callable[[str], LoadedModel] = load_model,
                   log: Callable[[str], None] = print) -> list[Path]:
    """Record every recipe into ``out/<stem>.json.gz``; each model is loaded once for all the samples using it."""
    models: dict[str, LoadedModel] = {}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (stem, recipe) in enumerate(recipes.items(), 1):
        name = recipe["model"]
        model = models[name] if name in models else models.setdefault(name, load(name))
        trace = record(model, recipe["decoder"], recipe["prompt"], recipe["params"], run_settings(recipe, max_new_tokens))
        if trace.status != "finished":
            raise RuntimeError(f"sample {stem}: the run ended {trace.status} ({trace.reason})")
        written.append(write_file(trace, out / f"{stem}.json.gz"))
        log(f"[{index}/{len(recipes)}] {stem}: {trace.reason}, {len(trace.output_token_ids)} tokens: "
            f"{trace.output_text[:60]!r}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SAMPLES_DIR, help="folder for the <stem>.json.gz traces")
    parser.add_argument("--recipes", type=Path, default=RECIPES_FILE, help="the recipes (JSON, stem -> settings)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="cap every sample's budget (0 = as recorded)")
    parser.add_argument("--only", action="append", default=[], metavar="STEM", help="record only these samples")
    args = parser.parse_args(argv)
    recipes = read_recipes(args.recipes)
    unknown = sorted(set(args.only) - set(recipes))
    if unknown:
        parser.error(f"--only: no sample {', '.join(unknown)}")
    chosen = {stem: recipe for stem, recipe in recipes.items() if not args.only or stem in args.only}
    record_samples(chosen, args.out, args.max_new_tokens, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
