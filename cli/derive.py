"""``decoding-explorer models derive``: a quantised or pruned variant of a model, saved beside its base."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.params import ParamError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="built-in name, local folder, Hub id (in the local cache) or saved variant")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantisation (optimum-quanto)")
    p.add_argument("--group-size", type=int, help="input weights per int4 scale (default 64)")
    p.add_argument("--prune", choices=["magnitude", "wanda"], help="magnitude (per matrix) or Wanda (per output row)")
    p.add_argument("--sparsity", type=float, help="fraction of each group's weights set to zero, in [0, 1)")
    p.add_argument("--pattern", help="N:M semi-structured pruning, such as 2:4 (keep 2 of every 4 input weights)")
    p.add_argument("--layer-profile", type=Path, metavar="FILE",
                   help='per-layer levels, JSON {"method": "wanda"|"magnitude"|"int", "levels": {"0": 0.3, ...}} '
                        "(sparsity per layer, or bits 4/8/16 for int); replaces --prune/--quantize")
    p.add_argument("--calibration", default="assistant-answers", help="built-in calibration text for wanda")
    p.add_argument("--out", type=Path, help="folder to write (default: $DECODING_EXPLORER_HOME/variants/<name>)")


def spec_of(args: argparse.Namespace):
    """The ``VariantSpec`` the arguments ask for."""
    from engine.models.variant_spec import VariantSpec, read_profile, spec_from_profile

    if args.layer_profile is None:
        return VariantSpec(quantize=args.quantize, group_size=args.group_size, prune=args.prune,
                           sparsity=args.sparsity, pattern=args.pattern, calibration=args.calibration)
    if any(value is not None for value in (args.quantize, args.prune, args.sparsity, args.pattern)):
        raise ParamError("--layer-profile names its own method and levels; "
                         "drop --quantize/--prune/--sparsity/--pattern")
    spec = spec_from_profile(read_profile(args.layer_profile), args.calibration)
    if args.group_size is not None:
        spec = VariantSpec.from_dict({**spec.to_dict(), "group_size": args.group_size})
    return spec


def derive_command(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from engine.models.variant_store import read_record
    from engine.models.variants import derive

    spec = spec_of(args)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=stage, file=sys.stderr, disable=None))
        bar.update(done - bar.n)

    try:
        folder = derive(args.base, spec, args.out, progress)
    finally:
        for bar in bars.values():
            bar.close()
    record = read_record(folder)
    dense = record["settings"]["dense_linear_bytes"]
    print(f"{record['name']}: {record['method']}, {record['size_bytes']:,} bytes stored "
          f"({record['size_bytes'] / dense:.1%} of the {dense:,} bytes of the base's decoder linears) in {folder}")
    print(f"load it with --model {record['name'] if args.out is None else folder}")
