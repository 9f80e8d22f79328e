"""``decoding-explorer evopress BASE``: search each decoder layer's sparsity (EvoPress) at a fixed mean sparsity.

It stores the search as a run (decoder ``evopress``: open it in the Library tab), writes the best profile in the
``models derive --layer-profile`` format, and prints the best profile's KL to the base model against the uniform
profile's at the same budget, on the calibration rows and on held-out rows of the same text (and with
``--perplexity``, the perplexity of the dense, uniform and best models on the LLM-KICK prose text):

    decoding-explorer evopress smollm2-135m-instruct --method wanda --sparsity 0.5 --generations 20 --offspring 8 \\
        --out profile.json
    decoding-explorer models derive smollm2-135m-instruct --layer-profile profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.params import ParamError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base model: built-in name, local folder or Hub id")
    p.add_argument("--method", choices=["wanda", "magnitude"], default="wanda", help="how each layer is pruned")
    p.add_argument("--sparsity", type=float, default=0.5, help="the mean sparsity (weighted by each layer's weights); "
                   "one of the levels")
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--offspring", type=int, default=8, help="offspring per generation (λ)")
    p.add_argument("--stages", default="4:256,2:1024", help="selection stages before the last, SURVIVORS:TOKENS "
                   "comma-separated (the last stage is always the whole calibration set, one survivor)")
    p.add_argument("--rows", type=int, default=8, help="calibration rows the fitness reads")
    p.add_argument("--row-tokens", type=int, default=128, help="tokens per calibration row")
    p.add_argument("--heldout-rows", type=int, default=8, help="further rows of the text, scored only at the end")
    p.add_argument("--perplexity", action="store_true", help="also the perplexity of the dense, uniform and best "
                   "models on assets/benchmarks/perplexity_text.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="write the best profile here (JSON, the --layer-profile format)")
    p.add_argument("--db", help="SQLAlchemy URL (default: $DECODING_EXPLORER_DB or a SQLite file in the user data dir)")
    p.add_argument("--no-save", action="store_true", help="do not store the search as a run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")


def parse_stages(text: str):
    """``"4:256,2:1024"`` -> the selection stages before the last."""
    from engine.offline.evopress import SelectionStage

    stages = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        survivors, _, tokens = part.partition(":")
        if not (survivors.isdigit() and tokens.isdigit()) or int(survivors) < 1 or int(tokens) < 1:
            raise ParamError(f"stage {part!r} must read SURVIVORS:TOKENS with both at least 1, such as 4:256")
        stages.append(SelectionStage(int(survivors), int(tokens)))
    return tuple(stages)


def evopress_command(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from engine.models import load_model
    from engine.models.variants import calibration_texts
    from engine.offline.evopress import SearchSettings, record_search

    if args.generations < 0 or args.offspring < 1:
        raise ParamError("--generations must be >= 0 and --offspring >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SearchSettings(method=args.method, sparsity=args.sparsity, generations=args.generations,
                              offspring=args.offspring, stages=parse_stages(args.stages), rows=args.rows,
                              row_tokens=args.row_tokens, heldout_rows=args.heldout_rows, seed=args.seed)
    model = load_model(args.model, dtype=args.dtype, device=args.device,
                       progress=lambda message: print(message, file=sys.stderr))
    measures = None
    if args.perplexity:
        from engine.offline.knowledge_eval import TEXT_PATH, perplexity

        prose = TEXT_PATH.read_text(encoding="utf-8")

        def measures(variant):
            return {"ppl": perplexity(variant, prose).ppl}

    store = None
    if not args.no_save:
        from storage import TraceStore

        store = TraceStore(args.db)
    print(f"calibrating {model.name} on {args.rows} x {args.row_tokens} tokens ...", file=sys.stderr)
    bar = tqdm(total=args.generations + 1, unit="gen", desc="evopress (generation 0 prunes every layer)")

    def on_generation(event) -> None:
        bar.set_description("evopress")
        bar.set_postfix(best_kl=f"{event.best_fitness:.4f}", improved="yes" if event.accepted else "no")
        bar.update()

    try:
        outcome = record_search(model, "\n\n".join(calibration_texts()), settings,
                                sinks=[store.sink()] if store else (), on_generation=on_generation, measures=measures)
    finally:
        bar.close()
        if store is not None:
            store.close()
    metrics = outcome.metrics
    levels = outcome.document["levels"]
    print(f"best profile ({args.method}, mean sparsity {args.sparsity}): "
          + " ".join(f"{levels[str(i)]:.1f}" for i in range(len(levels))))
    print("KL to the base, nats/token    uniform     best   uniform/best")
    for label, key in (("calibration", ""), ("held-out", "heldout_")):
        if f"{key}uniform_kl" in metrics:
            uniform, best = metrics[f"{key}uniform_kl"], metrics[f"{key}best_kl"]
            print(f"  {label:27} {uniform:8.4f} {best:8.4f} {uniform / best if best else float('inf'):9.2f}x")
    if "dense_ppl" in metrics:
        print(f"perplexity (LLM-KICK prose): dense {metrics['dense_ppl']:.2f}, uniform {metrics['uniform_ppl']:.2f}, "
              f"best {metrics['best_ppl']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(outcome.document, indent=2) + "\n", encoding="utf-8")
        print(f"profile written to {args.out} (decoding-explorer models derive {model.name} --layer-profile "
              f"{args.out})")
    if store is not None:
        print(f"run {outcome.trace.run_id} stored (open it in the Library tab)")
