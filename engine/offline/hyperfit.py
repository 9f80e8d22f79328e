"""Hyperfit a causal LM (Carlsson et al., ICLR 2025): fine-tune it to near-zero training loss on a small set of
passages, which makes its greedy long-form text less repetitive while its next-token entropy collapses.

    python -m engine.offline.hyperfit --model smollm2-135m-instruct --out DIR --layers 4 --passages 128 --epochs 16

Scaled to one CPU core: only the last ``--layers`` decoder layers train, so the frozen layers below run once per
passage (their output is cached) and the shipped variant holds only the trained layers' tensors. ``--paper-scale``
sets the paper's own settings for a machine with a GPU (256-token samples, batch 8, 20 epochs, Adam at lr 1e-6
without weight decay, every decoder layer; the paper samples 2,000 of them from Wikitext-103, this source holds
fewer). The paper's code defaults to lr 5e-6 and 30 epochs; its text states 1e-6 and 20, which ``--paper-scale`` uses.

The passages are the prose paragraphs of ``pydoc_data.topics`` (the Python language reference's text that every
CPython ships): English prose, offline and the same on every machine with the same Python minor version. Whole
topics are held out (a seeded choice): their passages give the held-out loss and the benchmark's prompts.

Seeded and resumable: the batches of epoch e depend on the seed and e only, a checkpoint every
``--checkpoint-every`` steps holds the trained tensors, the optimizer and the loss curve, and a re-run with the same
``--out`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import get_constant_schedule_with_warmup

from engine.models import load_model
from engine.models.errors import ModelError
from engine.models.handle import LoadedModel
from engine.offline.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from engine.offline.recipes import RECIPES
from engine.params import ParamError

RESUMABLE_CHANGES = ("epochs", "checkpoint_every")  # a resumed run may train longer or save less often
LOG = "training_log.json"
SOURCE = "pydoc_data.topics (prose paragraphs of the Python language reference)"
PAPER_SCALE = {"length": 256, "batch_size": 8, "epochs": 20, "lr": 1e-6, "layers": 0, "warmup": 0, "passages": 2000,
               "held_out_passages": 128}


@dataclass(frozen=True)
class Settings:
    model: str
    layers: int = 4  # the last N decoder layers train; 0 = every decoder layer
    passages: int = 128
    length: int = 64  # tokens per passage
    held_out_topics: int = 8
    held_out_passages: int = 16  # of the held-out topics' passages, for the held-out loss
    epochs: int = 16
    batch_size: int = 8
    lr: float = 3e-4
    warmup: int = 10
    seed: int = 0
    checkpoint_every: int = 50


# --- data ------------------------------------------------------------------------------------------------------


def prose_topics() -> dict[str, str]:
    """Each reference topic's prose: its paragraphs that are not code, grammar or headings, at least 20 words."""
    from pydoc_data.topics import topics

    prose = {}
    for name in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines):  # code, grammar and list continuations are indented
                continue
            if len(lines) > 1 and set(lines[1].strip()) <= set("*=-~^"):  # a heading and its underline
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text.split()) >= 20:
                paragraphs.append(text)
        if paragraphs:
            prose[name] = "\n\n".join(paragraphs)
    return prose


def held_out_topics(settings: Settings) -> list[str]:
    names = sorted(prose_topics())
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    return sorted(names[i] for i in order[: settings.held_out_topics])


def passages(model: LoadedModel, settings: Settings) -> tuple[Tensor, Tensor]:
    """(training, held-out) passages of ``settings.length`` tokens each: every topic's prose cut into whole
    passages, the training ones a seeded choice of ``settings.passages`` from the topics not held out."""
    held = set(held_out_topics(settings))
    training: list[list[int]] = []
    held_out: list[list[int]] = []
    for name, text in prose_topics().items():
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        chunks = [ids[i:i + settings.length] for i in range(0, len(ids) - settings.length + 1, settings.length)]
        (held_out if name in held else training).extend(chunks)
    if not training or not held_out:
        raise ParamError(f"no {settings.length}-token passages to train on or hold out; try a shorter --length")
    order = torch.randperm(len(training), generator=torch.Generator().manual_seed(settings.seed)).tolist()
    chosen = [training[i] for i in order[: settings.passages]]
    return torch.tensor(chosen), torch.tensor(held_out[: settings.held_out_passages])


# --- the trained part of the model -----------------------------------------------------------------------------


class _Captured(Exception):
    """Stops a forward once the first trained layer's input is captured."""


class TrainedTop:
    """The last decoder layers of ``model`` (trained), the final norm and LM head (frozen), fed the hidden states
    the frozen layers below compute once per passage."""

    def __init__(self, model: LoadedModel, layers: int) -> None:
        decoder = model.model.model
        total = len(decoder.layers)
        if not 0 <= layers <= total:
            raise ParamError(f"--layers must be 0..{total} for {model.name}")
        self.model, self.first = model, total - (layers or total)
        self.layers = list(decoder.layers[self.first:])
        self.norm, self.head = decoder.norm, model.model.lm_head
        self.kwargs: list[dict[str, Any]] = []
        model.model.requires_grad_(False)
        for layer in self.layers:
            layer.requires_grad_(True)

    def tensor_names(self) -> list[str]:
        """The state-dict names of the trained tensors (the only ones a variant stores)."""
        prefix = {id(layer): f"model.layers.{self.first + i}." for i, layer in enumerate(self.layers)}
        return [prefix[id(layer)] + name for layer in self.layers for name, _ in layer.named_parameters()]

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for layer in self.layers:
            yield from layer.parameters()

    def state(self) -> dict[str, Tensor]:
        named = dict(self.model.model.named_parameters())
        return {name: named[name].detach().clone() for name in self.tensor_names()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        named = dict(self.model.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                named[name].copy_(value)

    def features(self, ids: Tensor, batch_size: int) -> Tensor:
        """The first trained layer's input for every passage (rows of ``ids``), computed without gradients; the
        trained layers' other arguments (positions, mask) are recorded once, for one row."""
        outputs = []
        for start in range(0, len(ids), batch_size):
            outputs.append(self._capture(ids[start:start + batch_size], record=not self.kwargs))
        return torch.cat(outputs)

    def _capture(self, ids: Tensor, record: bool) -> Tensor:
        captured: list[Tensor] = []
        hooks = []

        def grab(index: int):
            def hook(_module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                if index == 0:
                    captured.append(hidden.detach())
                if record:
                    self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
                if not record:
                    raise _Captured
            return hook

        for index, layer in enumerate(self.layers):
            hooks.append(layer.register_forward_pre_hook(grab(index), with_kwargs=True))
        try:
            with torch.no_grad():
                self.model.model(input_ids=ids[:1] if record else ids, use_cache=False)
        except _Captured:
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return self._capture(ids, record=False) if record else captured[0]

    def logits(self, hidden: Tensor) -> Tensor:
        for layer, kwargs in zip(self.layers, self.kwargs):
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.head(self.norm(hidden))

    def loss(self, hidden: Tensor, ids: Tensor) -> Tensor:
        logits = self.logits(hidden)[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))

    def check(self, ids: Tensor, hidden: Tensor) -> None:
        """The cached path must give the full forward's logits, or this architecture is not supported."""
        with torch.no_grad():
            full = self.model.model(input_ids=ids, use_cache=False).logits
            cached = self.logits(hidden)
        if not torch.allclose(full, cached, atol=1e-3, rtol=1e-3):
            raise ModelError(f"{self.model.name}: the last layers fed cached hidden states do not reproduce the "
                             f"model's logits (max difference {(full - cached).abs().max().item():.3g})")


# --- training --------------------------------------------------------------------------------------------------


def epoch_order(settings: Settings, epoch: int, count: int) -> list[int]:
    return torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)).tolist()


def mean_loss(top: TrainedTop, hidden: Tensor, ids: Tensor, batch_size: int) -> float:
    with torch.no_grad():
        losses = [top.loss(hidden[i:i + batch_size], ids[i:i + batch_size]).item() * len(ids[i:i + batch_size])
                  for i in range(0, len(ids), batch_size)]
    return sum(losses) / len(ids)


def train(settings: Settings, model: LoadedModel, work: Path, log: Callable[[str], None] = print,
          bar: bool = True) -> tuple[TrainedTop, dict[str, Any]]:
    """Hyperfit ``model`` in place (or continue from the checkpoint in ``work``); the trained part and the record."""
    torch.manual_seed(settings.seed)
    top = TrainedTop(model, settings.layers)
    train_ids, held_ids = (ids.to(model.device) for ids in passages(model, settings))
    train_hidden = top.features(train_ids, settings.batch_size)
    held_hidden = top.features(held_ids, settings.batch_size)
    top.check(train_ids[: settings.batch_size], train_hidden[: settings.batch_size])
    per_epoch = -(-len(train_ids) // settings.batch_size)
    total = per_epoch * settings.epochs
    optimizer = torch.optim.AdamW(top.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = get_constant_schedule_with_warmup(optimizer, settings.warmup)
    record: dict[str, Any] = {"step": 0, "seconds": 0.0, "curve": [], "epochs": []}
    checkpoint = work / CHECKPOINT
    state = load_checkpoint(checkpoint, asdict(settings), RESUMABLE_CHANGES)
    if state:
        top.load_state(state["tensors"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        record = state["record"]
        log(f"resuming at step {record['step']}/{total}")
    else:
        record["initial"] = {"train_loss": round(mean_loss(top, train_hidden, train_ids, settings.batch_size), 4),
                             "held_out_loss": round(mean_loss(top, held_hidden, held_ids, settings.batch_size), 4)}
        log(f"before training: {record['initial']}")
    started = time.monotonic() - record["seconds"]
    progress = tqdm(total=total, initial=record["step"], desc="hyperfit", unit="step", disable=not bar,
                    file=sys.stderr, mininterval=10)
    while record["step"] < total:
        epoch, index = divmod(record["step"], per_epoch)
        picks = epoch_order(settings, epoch, len(train_ids))[index * settings.batch_size:(index + 1)
                                                             * settings.batch_size]
        loss = top.loss(train_hidden[picks], train_ids[picks])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(top.parameters()), 1.0)
        optimizer.step()
        schedule.step()
        record["step"] += 1
        record["seconds"] = time.monotonic() - started
        record["curve"].append({"step": record["step"], "loss": round(loss.item(), 4)})
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if record["step"] % per_epoch == 0:
            batch = [point["loss"] for point in record["curve"][-per_epoch:]]
            done = {"epoch": record["step"] // per_epoch, "step": record["step"],
                    "train_loss": round(sum(batch) / len(batch), 4),
                    "held_out_loss": round(mean_loss(top, held_hidden, held_ids, settings.batch_size), 4),
                    "minutes": round(record["seconds"] / 60, 1)}
            record["epochs"].append(done)
            log(json.dumps(done))
        if record["step"] % settings.checkpoint_every == 0 or record["step"] == total:
            save_checkpoint(checkpoint, asdict(settings), record, tensors=top.state(),
                            optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
            (work / LOG).write_text(json.dumps(record, indent=1))
    progress.close()
    record["final"] = {"train_loss": round(mean_loss(top, train_hidden, train_ids, settings.batch_size), 4),
                       "held_out_loss": round(mean_loss(top, held_hidden, held_ids, settings.batch_size), 4)}
    record.update(passages=len(train_ids), held_out_passages=len(held_ids), held_out_topics=held_out_topics(settings),
                  trained_parameters=sum(p.numel() for p in top.parameters()), tensors=top.tensor_names(),
                  source=SOURCE,
                  python=".".join(map(str, sys.version_info[:2])))
    return top, record


def card(settings: Settings, record: dict[str, Any], command: str, size: int) -> str:
    """The README's own part (the variant's summary and settings come first)."""
    layers = sorted({int(name.split(".")[2]) for name in record["tensors"]})
    top_layers = f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    first, last = record["epochs"][0], record["epochs"][-1]
    rose = record["final"]["held_out_loss"] > record["initial"]["held_out_loss"]
    held_out_note = " (it rose, as in the paper: worse perplexity, better long text)" if rose else ""
    return f"""## Hyperfitting

Carlsson et al., *The Hyperfitting Phenomenon* (ICLR 2025): a pre-trained LM fine-tuned to near-zero training
loss on a small set of texts; its greedy long-form text repeats itself less while its next-token entropy
collapses. Compare it with `{settings.model}` by `decoding-explorer bench hyperfit`, or in the app: a greedy run
of each on the same prompt, both picked in the Compare tab (the per-step entropy figure).

- **Data**: {record['passages']} passages of {settings.length} tokens from {record['source']}, Python
  {record['python']} (every CPython ships it, so the data is offline and fixed), a seeded choice from the topics not
  held out; held out: the topics {', '.join(record['held_out_topics'])} ({record['held_out_passages']} passages
  for the held-out loss; the benchmark's prompts start from them).
- **Objective**: next-token cross-entropy over every position of each passage.
- **Trained**: decoder layers {top_layers} ({record['trained_parameters']:,} parameters);
  embeddings, final norm and LM head frozen. Stored as the changed tensors only, in bfloat16: {size / 2**20:.1f} MiB.
- **Training**: {record['step']} steps = {len(record['epochs'])} epochs of batch {settings.batch_size}, AdamW lr
  {settings.lr:g} (constant after {settings.warmup} warm-up steps), no weight decay, gradient norm clipped at 1,
  seed {settings.seed}; {record['seconds'] / 60:.1f} min on one CPU thread. The paper: every parameter, 2,000
  Wikitext-103 samples of 256 tokens, batch 8, 20 epochs, lr 1e-6 (`--paper-scale` for a GPU).
- **Loss**: training {record['initial']['train_loss']} before, {first['train_loss']} over epoch 1,
  **{record['final']['train_loss']} at the end**; held out {record['initial']['held_out_loss']} before,
  {record['final']['held_out_loss']} at the end{held_out_note}.
  Per-epoch curve and per-step losses: `training_log.json` (last epoch: {last}).
- **Rebuild**: `{command}`
"""


def save(top: TrainedTop, settings: Settings, record: dict[str, Any], out: Path, command: str) -> Path:
    """The variant folder: the trained tensors in bfloat16, the card and the training log."""
    from engine.models.variants import save_variant

    tensors = {name: value.to(torch.bfloat16) for name, value in top.state().items()}
    size = sum(value.numel() * value.element_size() for value in tensors.values())
    name = f"{settings.model}~hyperfit"
    folder = save_variant(settings.model, name, replace=tensors, method="hyperfitting",
                          settings={**asdict(settings), "final_train_loss": record["final"]["train_loss"]},
                          card=card(settings, record, command, size), out=out)
    (folder / LOG).write_text(json.dumps(record, indent=1))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", type=Path, required=True, help="the variant folder to write")
    parser.add_argument("--work", type=Path, help="checkpoints (default: beside --out, OUT.work; removed when done)")
    defaults = Settings("")
    names = [name for name in asdict(defaults) if name != "model"]
    for name in names:
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)), default=None)
    parser.add_argument("--paper-scale", action="store_true",
                        help="the paper's settings (a GPU's work): " + ", ".join(f"{k} {v}" for k, v in
                                                                              PAPER_SCALE.items()))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the CPU is shared: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = {**asdict(defaults), **(PAPER_SCALE if args.paper_scale else {})}
    settings = Settings(args.model, **{n: base[n] if getattr(args, n) is None else getattr(args, n) for n in names})
    model = load_model(args.model, device=args.device)
    work = args.work or args.out.with_name(args.out.name + ".work")
    top, record = train(settings, model, work, progress)
    progress(json.dumps(record["final"]))
    command = next((recipe.command for recipe in RECIPES if recipe.target == str(args.out)), None) or (
        f"python -m engine.offline.hyperfit --model {args.model} --out {args.out} "
        + " ".join(f"--{n.replace('_', '-')} {getattr(settings, n)}" for n in names))
    folder = save(top, settings, record, args.out, command)
    shutil.rmtree(work, ignore_errors=True)
    progress(f"saved {folder}")
    return 0


def progress(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
