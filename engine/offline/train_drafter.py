"""Train a drafter head from cached feature shards (``engine.offline.drafter_data``'s folders):

    python -m engine.offline.train_drafter --head eagle --data DIR --out DIR --minutes 40 --steps 20000 --seed 0

Every head shares the loop below; a :class:`HeadKind` says what differs (module, loss, decoder, card).

The heads' losses are ``engine.offline.drafter_losses``'s. The loop: AdamW, linear warm-up then cosine decay, a step
cap and a time cap, seeded batches (the batch of step s depends on the seed and s only, so a resumed run draws the
same ones), a checkpoint every ``--checkpoint-every`` steps that a re-run with the same ``--out`` continues from.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import get_cosine_schedule_with_warmup

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec
from engine.decoders.speculative.eagle import SPEC as EAGLE_SPEC
from engine.decoders.speculative.falcon import SPEC as FALCON_SPEC
from engine.decoders.speculative.fspad import SPEC as FSPAD_SPEC
from engine.decoders.speculative.medusa import SPEC as MEDUSA_SPEC
from engine.decoders.speculative.ppd import SPEC as PPD_SPEC
from engine.events import DraftRound
from engine.models import load_model
from engine.models.handle import LoadedModel
from engine.offline.checkpoints import CHECKPOINT, load_checkpoint, save_checkpoint
from engine.offline.drafter_data import DrafterSequence, DrafterShards, layer_indices
from engine.offline.drafter_losses import (
    MEDUSA_DECAY,
    PPD_DECAY,
    PPD_WINDOW,
    eagle3_loss,
    eagle_loss,
    falcon_loss,
    make_batch,
    medusa_loss,
    ppd_loss,
)
from engine.offline.recipes import RECIPES
from engine.speculative.falcon_head import FalconHead
from engine.speculative.feature_head import FeatureHead, LMHeadDrafter, save_head
from engine.speculative.fspad_head import FspadHead
from engine.speculative.medusa_heads import MedusaHeads
from engine.speculative.ppd_prompts import PromptTokens


@dataclass(frozen=True)
class Settings:
    head: str
    data: str
    steps: int = 20_000
    minutes: float = 60.0  # 0 = no time cap
    batch_size: int = 8  # sequences per step
    lr: float = 5e-4
    warmup: int = 100
    w_cls: float = 0.1
    noise: float = 0.1  # features get U(-noise, noise)
    draft_vocab: int = 0  # 0 = the whole vocabulary
    heads: int = 4  # medusa: heads (tokens drafted past the target's own next one)
    ttt_steps: int = 3  # eagle3: draft steps unrolled by the training-time test
    block: int = 2  # falcon: tokens drafted per head forward (k)
    glance: float = 0.3  # falcon: CSGD's glancing ratio (glanced inputs per wrongly predicted token)
    held_out: float = 0.05  # share of the sequences (the last ones) kept for evaluation
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 20


@dataclass(frozen=True)
class HeadKind:
    """What differs between the heads this trainer trains; the loop, checkpoints and card frame are shared."""

    build: Callable[[LoadedModel, Tensor | None, Settings], LMHeadDrafter]
    loss: Callable[[Any, list[DrafterSequence], Settings, torch.Generator | None], tuple[Tensor, dict[str, float]]]
    decoder: DecoderSpec
    architecture: Callable[[str], str]  # the card's description, given the target's name
    objective: Callable[[Settings], str]  # the card's objective line


HEADS = {
    "eagle": HeadKind(
        build=lambda target, vocab, _: FeatureHead(target, vocab),
        loss=lambda head, sequences, s, generator: eagle_loss(head, make_batch(sequences), s.w_cls, s.noise, generator),
        decoder=EAGLE_SPEC,
        architecture=lambda model: f"""EAGLE-1's feature head (one {model} decoder layer fed
`FC([embed(x_(t+1)); f_t])`, predicting the next last-layer feature; tokens through the target's frozen LM head),
drafted as an EAGLE-2 dynamic tree.""",
        objective=lambda s: f"""smooth-L1 on the predicted feature + {s.w_cls} x cross-entropy of the LM head
  against the target's next token, over answer positions; U(-{s.noise}, {s.noise}) noise on the input features.""",
    ),
    "eagle3": HeadKind(
        build=lambda target, vocab, _: FeatureHead(target, vocab, tuple(layer_indices(target.num_layers).values())),
        loss=lambda head, sequences, s, _g: eagle3_loss(head, make_batch(sequences, fused=True), s.ttt_steps),
        decoder=EAGLE_SPEC,
        architecture=lambda model: f"""EAGLE-3's head (one {model} decoder layer fed
`FC([embed(x_(t+1)); W [l_t; m_t; h_t]])`, the target's low, mid and last features fused; tokens through the
target's frozen LM head), drafted as an EAGLE-2 dynamic tree.""",
        objective=lambda s: f"""cross-entropy of the LM head against the target's next token over answer positions,
  under a training-time test of {s.ttt_steps} unrolled draft steps (step j reads the head's own step j - 1
  outputs), weighted {MEDUSA_DECAY}^(j-1).""",
    ),
    "fspad": HeadKind(
        build=lambda target, vocab, _: FspadHead(target, vocab),
        loss=lambda head, sequences, s, generator: eagle_loss(head, make_batch(sequences), s.w_cls, s.noise, generator),
        decoder=FSPAD_SPEC,
        architecture=lambda model: f"""FSPAD's head: EAGLE-1's (one {model} decoder layer fed
`FC([embed(x_(t+1)); f_t])`) with feature sampling (the FC's output passed through a residual MLP whose gate reads
the token embedding, `x + down(act(gate(e)) * up(norm(x)))`) and the layer's MLP projecting to two halves over a
shared residual: a logit half for the target's frozen LM head and a feature half predicting the next last-layer
feature; drafted as an EAGLE-2 dynamic tree.""",
        objective=lambda s: f"""partial alignment distillation: smooth-L1 of the feature half against the target's
  next feature + {s.w_cls} x cross-entropy of the LM head on the logit half against the target's next token, over
  answer positions; U(-{s.noise}, {s.noise}) noise on the input features.""",
    ),
    "falcon": HeadKind(
        build=lambda target, vocab, s: FalconHead(target, vocab, s.block),
        loss=lambda head, sequences, s, generator: falcon_loss(head, make_batch(sequences), s.w_cls, s.noise, s.glance,
                                                               generator),
        decoder=FALCON_SPEC,
        architecture=lambda model: f"""Falcon's semi-autoregressive head (two {model} decoder layers fed
`FC([embed(x_(t+1)); f_t])`, position t predicting the last-layer feature k places ahead, so one forward drafts a
block of k tokens; tokens through the target's frozen LM head), drafted as Falcon's tree of block forwards.""",
        objective=lambda s: f"""coupled sequential glancing distillation with k = {s.block}: smooth-L1 on the
  feature k places ahead + {s.w_cls} x cross-entropy of the LM head against the target's token there, over answer
  positions not glanced, after {s.glance} x (wrong first-pass tokens) inputs per sequence, block prefixes, were
  replaced by their targets' true feature and token; U(-{s.noise}, {s.noise}) noise on the input features.""",
    ),
    "medusa": HeadKind(
        build=lambda target, vocab, s: MedusaHeads(target, vocab, s.heads),
        loss=lambda heads, sequences, _s, _g: medusa_loss(heads, sequences),
        decoder=MEDUSA_SPEC,
        architecture=lambda model: f"""Medusa-1's heads (each a residual block `f + SiLU(W f)` on {model}'s
last hidden state, then the target's frozen LM head; head k proposes the token k + 1 places ahead), drafted as
Medusa's static tree of top-i choices.""",
        objective=lambda s: f"""sum over heads k = 1..{s.heads} of {MEDUSA_DECAY}^(k-1) x cross-entropy of the
  LM head on head k's output against the target's token k + 1 places ahead, over answer positions.""",
    ),
    "ppd": HeadKind(
        build=lambda target, vocab, s: PromptTokens(target, vocab, s.heads),
        loss=lambda prompts, sequences, _s, generator: ppd_loss(prompts, sequences, generator),
        decoder=PPD_SPEC,
        architecture=lambda model: f"""parallel prompt decoding's prompt tokens (trained input embeddings; appended
after a position of the frozen {model}, prompt token i's output guesses the token i + 1 places ahead), riding along
the verify forward and drafted as PPD's dynamic sparse tree of their top choices.""",
        objective=lambda s: f"""sum over prompt tokens i = 1..{s.heads} (`--heads`) of {PPD_DECAY}^(i-1) x
  KL(target || prompt token i) against the target's own distribution i places on, over answer positions of
  {PPD_WINDOW}-token windows, divided by {s.heads}; only the embeddings are trained.""",
    ),
}


def frequent_tokens(sequences: list[DrafterSequence], k: int, always: set[int]) -> Tensor:
    """The ``k`` most frequent answer tokens (the end-of-turn ids among them whatever their count)."""
    counts = Counter(token for s in sequences for token in s.input_ids[s.answer_start:].tolist())
    chosen = list(always) + [token for token, _ in counts.most_common() if token not in always]
    return torch.tensor(sorted(chosen[:k]))


def train(settings: Settings, data: DrafterShards, target: LoadedModel, out: Path,
          log: Callable[[str], None] = print) -> tuple[LMHeadDrafter, dict[str, Any]]:
    """Train on ``data`` for ``target`` (or continue from ``out``'s checkpoint); the head and the run record."""
    target.model.requires_grad_(False)  # frozen: the embedding and LM head are read, never trained
    sequences = [data[i] for i in range(len(data))]
    held = max(1, round(len(sequences) * settings.held_out)) if len(sequences) > 1 else 0
    training, held_out = sequences[: len(sequences) - held], sequences[len(sequences) - held:]
    torch.manual_seed(settings.seed)
    vocab = frequent_tokens(training, settings.draft_vocab, target.eos_token_ids) if settings.draft_vocab else None
    kind = HEADS[settings.head]
    head = kind.build(target, vocab, settings).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup, settings.steps)
    record: dict[str, Any] = {"step": 0, "seconds": 0.0, "curve": []}
    checkpoint = out / CHECKPOINT
    state = load_checkpoint(checkpoint, asdict(settings), ("minutes", "log_every", "checkpoint_every"))
    if state:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        record = state["record"]
        log(f"resuming at step {record['step']}")
    started, window = time.monotonic() - record["seconds"], []
    while record["step"] < settings.steps:
        if settings.minutes and time.monotonic() - started > settings.minutes * 60:
            log(f"time cap of {settings.minutes} min reached at step {record['step']}")
            break
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + record["step"])
        picks = torch.randint(len(training), (settings.batch_size,), generator=generator).tolist()
        loss, parts = kind.loss(head, [training[i] for i in picks], settings, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        optimizer.step()
        schedule.step()
        record["step"] += 1
        record["seconds"] = time.monotonic() - started
        window.append(parts)
        if record["step"] % settings.log_every == 0 or record["step"] == settings.steps:
            mean = {name: round(sum(w[name] for w in window) / len(window), 4) for name in window[0]}
            record["curve"].append({"step": record["step"], **mean})
            window = []
        if record["step"] % settings.checkpoint_every == 0:
            save_checkpoint(checkpoint, asdict(settings), record, head=head.state_dict(),
                            optimizer=optimizer.state_dict(), schedule=schedule.state_dict())
        if not window:  # a window was just logged
            log(f"step {record['step']}/{settings.steps} "
                + " ".join(f"{k} {v}" for k, v in record["curve"][-1].items() if k != "step")
                + f" ({record['seconds']:.0f} s)")
    head.eval()
    if held_out:
        with torch.no_grad():
            parts = kind.loss(head, held_out, replace(settings, noise=0.0), None)[1]
            record["held_out"] = {k: round(v, 4) for k, v in parts.items()}
    record.update(manifest=data.manifest, sequences=len(training), held_out_sequences=len(held_out),
                  parameters=sum(p.numel() for p in head.parameters()))
    return head, record


def measure_acceptance(target: LoadedModel, folder: Path, prompts: list[list[int]], max_new_tokens: int,
                       decoder: DecoderSpec = EAGLE_SPEC) -> dict[str, Any]:
    """Greedy runs of ``decoder`` with its default tree, drafted in full every round, on ``prompts``: tokens per
    target call and acceptance by depth (the head's quality, whatever the adaptive draft length would make of it)."""
    params = {p.name: p.default for p in decoder.params} | {"drafter": str(folder), "draft_length": "fixed"}
    committed = rounds = 0
    reached: Counter[int] = Counter()  # rounds whose accepted path reached each depth
    for prompt in prompts:
        ctx = DecodeContext(target, prompt, params, max_new_tokens, target.eos_token_ids, torch.Generator())
        for event in decoder.run(ctx):
            if isinstance(event, DraftRound) and event.nodes:
                rounds += 1
                committed += len(event.committed)
                reached.update(range(1, len(event.accepted_path) + 1))
                if set(event.committed) & target.eos_token_ids:
                    break
    return {"prompts": len(prompts), "rounds_with_a_draft": rounds,
            "mean_accepted_tokens": round(committed / rounds, 3) if rounds else None,
            "acceptance_by_depth": {d: round(reached[d] / rounds, 3) for d in sorted(reached)}}


def _self_written(manifest: dict[str, Any]) -> str:
    count = manifest.get("kinds", {}).get("self", 0)
    return f", {count} of them requests the target wrote itself (Magpie)" if count else ""


def card(config: dict[str, Any]) -> str:
    record, manifest = config["record"], config["record"]["manifest"]
    kind = HEADS[config["settings"]["head"]]
    acceptance = config.get("acceptance")
    measured = (f"Greedy `{kind.decoder.name}` runs with the default tree on {acceptance['prompts']} held-out prompts: "
                f"**{acceptance['mean_accepted_tokens']} tokens per target call**, acceptance by depth "
                f"{acceptance['acceptance_by_depth']}." if acceptance else "Not measured (train with `--eval N`).")
    vocab = config["settings"]["draft_vocab"] or "the whole vocabulary"
    return f"""# {kind.decoder.name} drafter for {manifest['model']}

The `{kind.decoder.name}` decoder's drafter: {kind.architecture(manifest['model'])}
{record['parameters']:,} trained parameters; draft vocabulary: {vocab}.

- **Data**: `{config['settings']['data']}`: {manifest.get('sequences')} self-distilled sequences (prompts of the
  drafter_prompts kinds{_self_written(manifest)}, the target's own greedy answers, seed {manifest.get('seed')}),
  {record['sequences']} for training, the last {record['held_out_sequences']} held out.
- **Objective**: {kind.objective(Settings(**config['settings']))}
- **Training**: {record['step']} steps of AdamW (lr {config['settings']['lr']}, warm-up {config['settings']['warmup']},
  cosine), {config['settings']['batch_size']} sequences a step, {record['seconds'] / 60:.1f} min on CPU; last logged
  window: {record['curve'][-1] if record['curve'] else 'none'}; held out: {record.get('held_out')}.
- **Rebuild**: `{config['command']}`{_shipped_recipe(config['settings']['head'], manifest['model'])}
- **Measured acceptance**: {measured}
"""


def _shipped_recipe(head: str, model: str) -> str:
    """The sentence naming the recipe that rebuilds the shipped head of this kind for ``model``, if one ships."""
    for recipe in RECIPES:
        trains = [stage for stage in recipe.stages if stage.tool == __spec__.name]
        shipped_as = f"{HEADS[head].decoder.name}-{model.split('-')[0]}"  # an eagle3 head ships as eagle's
        if trains and trains[-1].args[1] == head and recipe.target.endswith(shipped_as):
            return f"; the shipped head, data included: `{recipe.command}`"
    return ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", choices=sorted(HEADS), required=True)
    parser.add_argument("--data", required=True, help="a drafter data folder (decoding-explorer data drafter)")
    parser.add_argument("--out", type=Path, required=True)
    defaults = Settings("eagle", "")
    for name in ("steps", "minutes", "batch_size", "lr", "warmup", "w_cls", "noise", "draft_vocab", "heads", "ttt_steps",
                 "block", "glance", "held_out", "seed", "checkpoint_every", "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    parser.add_argument("--eval", type=int, default=0, help="measure acceptance on N held-out prompts at the end")
    parser.add_argument("--eval-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in asdict(defaults) if n not in ("head", "data")]
    settings = Settings(args.head, args.data, **{n: getattr(args, n) for n in names})
    data = DrafterShards(args.data)
    target = load_model(data.manifest["model"])
    head, record = train(settings, data, target, args.out, progress)
    command = (f"python -m engine.offline.train_drafter --head {args.head} --data {args.data} --out {args.out} "
               + " ".join(f"--{n.replace('_', '-')} {getattr(args, n)}" for n in names))
    config = {"settings": asdict(settings), "record": record, "command": command}
    save_head(head, args.out, config, card(config))
    if args.eval:
        prompts = [data[i].input_ids[: data[i].answer_start].tolist()
                   for i in range(len(data) - min(args.eval, record["held_out_sequences"]), len(data))]
        config["acceptance"] = measure_acceptance(target, args.out, prompts, args.eval_tokens, HEADS[args.head].decoder)
        progress(json.dumps(config["acceptance"]))
        save_head(head, args.out, config, card(config))
    progress(f"saved {args.out}")


def progress(line: str) -> None:
    print(line, flush=True)  # progress lines: tqdm is off without a TTY


if __name__ == "__main__":
    main()
