"""``decoding-explorer assets``: the recipes that rebuild every shipped asset (engine/offline/recipes.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.offline.recipes import RECIPES, get_recipe, rebuild, shipped_location


def list_recipes(args: argparse.Namespace) -> None:
    for recipe in RECIPES:
        out = shipped_location(recipe)
        print(f"{recipe.name}: {recipe.summary}\n  {recipe.command}  (into {recipe.target})")
        for index, stage in enumerate(recipe.stages, 1):
            print(f"  {index}/{len(recipe.stages)} {stage.command(Path(recipe.target))}")
        if not out.exists():
            print("  (not built yet)")


def rebuild_asset(args: argparse.Namespace) -> None:
    rebuild(get_recipe(args.name), Path(args.out) if args.out else None, smoke=args.smoke,
            log=lambda line: print(line, flush=True))
