"""How every shipped asset is rebuilt, declared once as data: ``decoding-explorer assets rebuild NAME``.

A recipe is a seeded sequence of stages; a stage runs one offline tool's ``main(argv)`` (the same arguments as
``python -m <tool>``). Intermediate outputs go to a work folder under the output, removed once the recipe is done.

The built-in AR twin is one seeded run from scratch, a second on long lists, three more from the second, the
average of the last four's weights, and a run from that average with names glued from the tokenizer's pieces; the
built-in dLLM is the first run
followed by four seeded masked-diffusion runs from its weights (an adaptation, a warm restart on rows padded per
group of similar length, then two runs with Rainbow Padding weighted towards the target tasks); ``--minutes`` (added
by hand) only stops a run resumably, and the same command continues it, so an interrupted rebuild ends where an
uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from engine.models.registry import rebuild_command
from engine.params import ParamError

ROOT = Path(__file__).resolve().parents[2]
WORK = "work"


@dataclass(frozen=True)
class Stage:
    """One run of an offline tool. ``{out}`` in an argument is the recipe's output folder, ``{work}`` its work
    folder; ``output`` is where the stage writes; ``smoke`` arguments are appended for a few-steps run (argparse
    keeps the last value of an option)."""

    tool: str
    args: tuple[str, ...]
    output: str = "{out}"
    smoke: tuple[str, ...] = ()

    def argv(self, out: Path, smoke: bool = False) -> list[str]:
        return [_filled(arg, out) for arg in (*self.args, *(self.smoke if smoke else ()))]

    def command(self, out: Path, smoke: bool = False) -> str:
        return " ".join(["python -m", self.tool, *self.argv(out, smoke)])

    def output_path(self, out: Path) -> Path:
        return Path(_filled(self.output, out))

    def inputs(self, out: Path) -> list[Path]:
        """The folders this stage continues from (``--init-from``) or averages (``--from``)."""
        argv = self.argv(out)
        return [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg in ("--init-from", "--from")]


@dataclass(frozen=True)
class Recipe:
    name: str
    target: str  # the shipped location, relative to the repository root
    summary: str
    stages: tuple[Stage, ...]

    @property
    def command(self) -> str:
        return rebuild_command(self.name)


def _filled(arg: str, out: Path) -> str:
    return arg.format(out=out, work=out / WORK)


# --- the built-in waiting-line models: one seeded train_dllm run each -------------------------------------------

# A few steps, unscored: an MDLM's score unmasks a 192-position canvas one position per step (about a minute a stage
# on CI's cores, most of the smoke test's ten minutes there); tests/test_waitline_train.py covers the scoring.
_TRAIN_SMOKE = ("--steps", "3", "--batch-size", "4", "--eval-per-task", "0", "--checkpoint-every", "2")
WAITLINE_STEPS = 12_000  # resumable: --minutes stops a run, the same command continues it
# ParallelBench's lists are common English names, one token each in the waitline tokenizer; the AR run drew such
# lists too rarely to learn them (BENCHMARKS.md, issue 21, tenth session), so from the step it had reached when that
# was found, this share of the lists is of them (a data mixture schedule: the earlier steps' data is unchanged).
COMMON_SHARE = "0.4"
AR_MIXTURE = ("--common-share", COMMON_SHARE, "--common-from", "7000")
# The dLLM is adapted from the finished AR twin (as Dream and DiffuLLaMA adapt AR models): 1,537 steps of masked
# diffusion from scratch (3.5 CPU-hours) still answered nothing right (BENCHMARKS.md, issue 21, eleventh session).
ADAPT_STEPS = 3000
ADAPTED = "{work}/waitline-mdlm-adapted"
# Then a warm restart on batches padded per group of 8 rows of similar length (1.5x faster steps: BENCHMARKS.md,
# issue 21, twelfth session); after the adaptation the 15-person and held-out lists were still far below target.
REFINE_STEPS = 2000
REFINED = "{work}/waitline-mdlm-refined"
GROUPED_ROWS = ("--prefix-share", "0.5", "--common-share", COMMON_SHARE, "--width-group", "8")  # this run and later
# Then Rainbow Padding (one end of text, then a cycle of 7 pad tokens, Kim et al. ICLR 2026), weighted further
# towards the target tasks, on a fresh data stream (seed 3): decoding most-confident-first, the refined model committed
# its end-of-text padding first, from the back, and fixed wrong lengths (BENCHMARKS.md, issue 21, fifteenth session).
POLISH_STEPS = 2000
RAINBOW = "{work}/waitline-mdlm-rainbow"
TARGET_TASK_WEIGHTS = ("--task-weight", "copy=2", "--task-weight", "reverse=3", "--task-weight", "sort=4")
# Then more of the same on another fresh stream (seed 4), reverse and sort weighted up again: decoding strictly left to
# right, the Rainbow model still lost 5 / 15 / 15 points of copy / reverse / sort to the AR twin (BENCHMARKS.md, issue
# 21, sixteenth session), so its knowledge of the task, not only its order of commits, fell short.
FINAL_STEPS = 1800
FINAL_TASK_WEIGHTS = ("--task-weight", "copy=2", "--task-weight", "reverse=4", "--task-weight", "sort=5")
# The AR twin's first run reversed 38 % and sorted 22 % of ParallelBench's 15-person lists (its card), lists it drew one
# batch in 13; so a second run, on a fresh stream (seed 5), draws half its batches of 15 people, weighted as above.
# The dLLM stays adapted from the first run, the weights it was built from.
LONG_STEPS = 2000
LONG_LISTS = ("--common-share", COMMON_SHARE, "--long-share", "0.5")
AR_LONG = "{work}/waitline-ar-long"
# Runs continued from the long-list run on fresh streams each traded one task for another (seed 7: 15-person sort for
# reverse; seed 8 with 30 % invented names: reverse on every set; BENCHMARKS.md, issue 21, nineteenth and twentieth
# sessions), so no single run ships: the shipped twin is the uniform average of their weights and the long-list run's
# (a model soup, Wortsman et al. 2022), each run's own luck with its stream averaged out (twenty-first session).
AR_SOUP_RUNS = {  # output folder -> (seed, steps, data options beyond LONG_LISTS' long share and the task weights)
    "{work}/waitline-ar-seed7": (7, 2000, ("--common-share", COMMON_SHARE)),
    "{work}/waitline-ar-invented": (8, 1600, ("--invented-rate", "0.3", "--common-share", COMMON_SHARE)),
    "{work}/waitline-ar-common": (9, 1200, ("--common-share", "0.6")),
}
AR_SOUP = "{work}/waitline-ar-soup"
# Six of the soup's eleven failed rows of fresh held-out copy held a token that no training row ever showed: BPE's
# intermediate merges (" Spen" of " Spencer", "Thom" of "Thompson") that held-out names ("Spence") need. A last run
# from the soup glues 10 % of the names from the tokenizer's pieces, drawn uniformly (twenty-second session).
PIECE_RATE = "0.1"
PIECE_STEPS = 1000


def _train_waitline(kind: str, *extra: str, out: str = "{out}", steps: int = WAITLINE_STEPS, lr: str = "0.001",
                    warmup: int = 200, seed: int = 0) -> Stage:
    """One seeded, fixed-steps, checkpointed training run of a waiting-line model into ``out``: from scratch, or
    from a saved model when ``extra`` names ``--init-from`` (its shape, whatever the shape flags say)."""
    args = ("--model", kind, "--steps", str(steps), "--batch-size", "32", "--lr", lr, "--warmup", str(warmup),
            "--grow-below", "1", "--seed", str(seed), "--precision", "bfloat16", "--hidden", "256", "--layers", "6",
            "--heads", "8", "--ffn", "1024", "--out", out, *extra)
    return Stage("engine.offline.train_dllm", args, out, smoke=_TRAIN_SMOKE)


AR_TWIN = "{work}/waitline-ar"  # the twin's first run
AR_FIRST_RUN = _train_waitline("ar", *AR_MIXTURE, out=AR_TWIN)  # both recipes start with it


TEMPLATE_DATA = (2500, 0.0)  # (sequences, share the target wrote itself): the set falcon, medusa and ppd trained on
MIXED_DATA = (4800, 0.375)  # eagle and fspad: template prompts interleaved with SmolLM2's own requests


def _drafter_data(sequences: int, self_share: float) -> Stage:
    """SmolLM2's own greedy answers to the seeded prompt set, with its hidden states (a longer run with the same seed
    extends a shorter one); ``self_share`` of the prompts are requests SmolLM2 wrote itself (Magpie)."""
    return Stage("cli.main", ("data", "drafter", "--sequences", str(sequences), "--self-prompts", str(self_share),
                              "--max-new-tokens", "128", "--batch-size", "48", "--shard-size", "96", "--seed", "0",
                              "--threads", "2", "--out", "{work}/drafter-data"),
                 "{work}/drafter-data", ("--sequences", "2", "--max-new-tokens", "4", "--shard-size", "2"))


def _train_head(head: str, *args: str) -> Stage:
    return Stage("engine.offline.train_drafter",
                 ("--head", head, "--data", "{work}/drafter-data", "--out", "{out}", "--minutes", "0",
                  "--batch-size", "8", "--checkpoint-every", "100", "--threads", "1", "--seed", "0", *args),
                 smoke=("--steps", "2", "--warmup", "1", "--draft-vocab", "64", "--eval", "1", "--eval-tokens", "4",
                        "--held-out", "0.5"))


RECIPES = (
    Recipe("waitline-ar", "assets/models/waitline-ar",
           "the built-in AR twin: a train_dllm run, one on long lists, three from it, the average of the last four, "
           "and a run from the average with names glued from the tokenizer's pieces",
           (
               AR_FIRST_RUN,
               _train_waitline("ar", "--init-from", AR_TWIN, *LONG_LISTS, *FINAL_TASK_WEIGHTS, out=AR_LONG,
                               steps=LONG_STEPS, lr="0.0003", warmup=50, seed=5),
               *(_train_waitline("ar", "--init-from", AR_LONG, "--long-share", "0.5", *data, *FINAL_TASK_WEIGHTS,
                                 out=out, steps=steps, lr="0.0003", warmup=50, seed=seed)
                 for out, (seed, steps, data) in AR_SOUP_RUNS.items()),
               Stage("engine.offline.soup", ("--model", "ar", *(arg for out in (AR_LONG, *AR_SOUP_RUNS)
                                                                for arg in ("--from", out)),
                                             "--out", AR_SOUP, "--eval-per-task", "100", "--threads", "2"),
                     AR_SOUP, smoke=("--eval-per-task", "1")),
               _train_waitline("ar", "--init-from", AR_SOUP, *LONG_LISTS, "--piece-rate", PIECE_RATE,
                               *FINAL_TASK_WEIGHTS, steps=PIECE_STEPS, lr="0.0003", warmup=50, seed=10),
           )),
    Recipe("waitline-mdlm", "assets/models/waitline-mdlm",
           "the built-in dLLM: the AR twin's first run, then four masked-diffusion runs from its weights", (
               AR_FIRST_RUN,
               _train_waitline("mdlm", "--init-from", AR_TWIN, "--prefix-share", "0.5", "--common-share",
                               COMMON_SHARE, out=ADAPTED, steps=ADAPT_STEPS, lr="0.0005", warmup=100),
               _train_waitline("mdlm", "--init-from", ADAPTED, *GROUPED_ROWS, out=REFINED, steps=REFINE_STEPS,
                               lr="0.0002", warmup=50),
               _train_waitline("mdlm", "--init-from", REFINED, *GROUPED_ROWS, "--rainbow-pads", "7",
                               *TARGET_TASK_WEIGHTS, out=RAINBOW, steps=POLISH_STEPS, lr="0.0002", warmup=50, seed=3),
               _train_waitline("mdlm", "--init-from", RAINBOW, *GROUPED_ROWS, "--rainbow-pads", "7",
                               *FINAL_TASK_WEIGHTS, steps=FINAL_STEPS, lr="0.0002", warmup=50, seed=4),
           )),
    Recipe("learn2pd-filter", "assets/models/learn2pd-filter", "Learn2PD's filter for waitline-mdlm", (
        Stage("engine.offline.learn2pd_train",
              ("--model", "waitline-mdlm", "--examples", "100", "--seed", "20000", "--gen-length", "72",
               "--block-length", "32", "--hidden", "64", "--epochs", "60", "--out", "{out}"),
              smoke=("--examples", "2", "--epochs", "1", "--gen-length", "8", "--block-length", "8")),
    )),
    Recipe("adadec-thresholds", "assets/adadec", "AdaDec's entropy threshold for smollm2-135m-instruct", (
        Stage("engine.offline.adadec_fit",
              ("--model", "smollm2-135m-instruct", "--seed", "0", "--out", "{out}/thresholds.json"),
              smoke=("--max-chars", "400")),
    )),
    Recipe("eagle-smollm2", "assets/models/eagle-smollm2", "the eagle decoder's feature head for SmolLM2", (
        _drafter_data(*MIXED_DATA),
        _train_head("eagle", "--steps", "3000", "--lr", "1e-3", "--draft-vocab", "16384", "--eval", "12")),
    ),
    Recipe("fspad-smollm2", "assets/models/fspad-smollm2", "the fspad decoder's feature head for SmolLM2", (
        _drafter_data(*MIXED_DATA),
        _train_head("fspad", "--steps", "2400", "--lr", "1e-3", "--draft-vocab", "16384", "--eval", "12")),
    ),
    Recipe("falcon-smollm2", "assets/models/falcon-smollm2", "the falcon decoder's semi-autoregressive head for SmolLM2", (
        _drafter_data(*TEMPLATE_DATA),
        _train_head("falcon", "--steps", "1500", "--lr", "1e-3", "--draft-vocab", "16384", "--eval", "12")),
    ),
    Recipe("medusa-smollm2", "assets/models/medusa-smollm2", "the medusa decoders' heads for SmolLM2", (
        _drafter_data(*TEMPLATE_DATA),
        _train_head("medusa", "--heads", "4", "--steps", "3000", "--lr", "3e-3", "--warmup", "30", "--draft-vocab",
                    "4096", "--eval", "16")),
    ),
    Recipe("ppd-smollm2", "assets/models/ppd-smollm2", "the ppd decoder's prompt tokens for SmolLM2", (
        _drafter_data(*TEMPLATE_DATA),
        _train_head("ppd", "--heads", "3", "--steps", "400", "--batch-size", "2", "--lr", "1e-2", "--warmup", "20",
                    "--eval", "12")),
    ),
    Recipe("hyperfit-smollm2", "assets/models/hyperfit-smollm2", "SmolLM2 hyperfitted: its last 4 layers", (
        Stage("engine.offline.hyperfit",
              ("--model", "smollm2-135m-instruct", "--layers", "4", "--passages", "128", "--length", "64",
               "--epochs", "16", "--batch-size", "8", "--lr", "3e-4", "--seed", "0", "--threads", "1",
               "--out", "{out}", "--work", "{out}.work"),
              smoke=("--model", "tiny-random-llama", "--layers", "1", "--passages", "8", "--length", "16",
                     "--epochs", "1", "--held-out-passages", "2", "--warmup", "0")),
    )),
    Recipe("samples", "assets/samples", "the sample traces, re-recorded from assets/samples/recipes.json", (
        Stage("engine.offline.sample_traces", ("--out", "{out}"), smoke=("--max-new-tokens", "3")),
    )),
)


def get_recipe(name: str) -> Recipe:
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise ParamError(f"no recipe {name!r}; one of {', '.join(recipe.name for recipe in RECIPES)}")


def shipped_location(recipe: Recipe) -> Path:
    return ROOT / recipe.target


def display_path(path: Path) -> Path:
    """A path inside the repository as the cards write it (relative to the root), any other path absolute."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def rebuild(recipe: Recipe, out: Path | None = None, smoke: bool = False,
            log: Callable[[str], None] = print) -> Path:
    """Run every stage of ``recipe`` into ``out`` (default: the shipped location), from the repository root so the
    cards name paths as the repository does. ``smoke``: a few steps of each stage, never into the shipped location."""
    shipped = shipped_location(recipe)
    target = (out or shipped).resolve()
    if smoke and (out is None or target == shipped.resolve()):
        raise ParamError(f"--smoke writes a few-steps {recipe.name}: give --out a folder other than {recipe.target}")
    relative = display_path(target)
    with contextlib.chdir(ROOT):
        for index, stage in enumerate(recipe.stages, 1):
            log(f"[{index}/{len(recipe.stages)}] {stage.command(relative, smoke)}")
            status = import_module(stage.tool).main(stage.argv(relative, smoke))
            if isinstance(status, int) and status:  # the command line reports its own errors and returns a code
                raise ParamError(f"{recipe.name}: stage {index} ({stage.tool}) failed with exit status {status}")
    shutil.rmtree(target / WORK, ignore_errors=True)
    log(f"{recipe.name} rebuilt in {relative}")
    return target
