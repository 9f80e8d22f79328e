"""Train the built-in waiting-line models: ``waitline-mdlm`` (masked diffusion) and its AR twin ``waitline-ar``.

    python -m engine.offline.train_dllm --model mdlm --steps 3000 --minutes 30 --out assets/models/waitline-mdlm

Both are stock ``LlamaForCausalLM`` checkpoints of the same shape and tokenizer, so ``from_pretrained`` (and
``load_model``) read them from a folder. The diffusion model's config sets ``is_causal: false``: transformers then
builds a bidirectional attention mask for every layer (``masking_utils.create_causal_mask``), which turns the
decoder stack into the bidirectional encoder LLaDA uses ("a LLaMA with the causal mask removed"); position i
predicts token i (no logits shift). ``mask_token_id`` and ``diffusion_gen_length`` are stored in its config.

Objectives. AR: next-token cross-entropy on the answer and its end-of-text. MDLM (Sahoo et al. 2024; LLaDA SFT
recipe): the canvas is ``<s> prompt | answer </s> </s> ...`` (end-of-text padding up to a random length, trained on
too, as LLaDA does); per sequence t ~ U(0, 1) (stratified across the batch), every answer-side token is masked
with probability p = (1 - eps) t + eps, and the loss is the cross-entropy on masked tokens weighted by 1/p, summed
and divided by the number of answer-side tokens. The prompt is never masked. ``--prefix-share`` mixes in rows whose
answer is clean up to a random cut (the case semi-autoregressive block decoding meets at every block). The
curriculum (``--grow-below``) watches the same loss over the answers' own tokens, never the padding.

Seeded and resumable: ``--minutes`` stops a run, saving the model so far (its card says "in progress") and a
checkpoint (weights, optimizer, the data and masking streams' position) in ``--work``; the same command continues
it, ending where an uninterrupted run does. Without the checkpoint (a fresh machine with only the committed
folder) it continues from the saved weights and the streams' position in ``training_log.json``, with fresh
optimizer moments. The held-out score uses one token per step: greedy for AR; for MDLM the single most confident
masked position.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine.models.registry import rebuild_command
from engine.offline.checkpoints import CHECKPOINT, changed_settings, load_checkpoint, save_checkpoint
from engine.offline.names import name_pool
from engine.offline.parallelbench import read_rows
from engine.offline.waitline_data import OPERATIONS, Example, WaitlineGenerator, prompt_text, score
from engine.offline.waitline_tokenizer import MASK, SPECIALS, build_tokenizer, name_pieces, with_rainbow_pads
from engine.params import ParamError

KINDS = ("mdlm", "ar")
GEN_LENGTH = 192  # answer-side canvas: 15 people of pool names take up to ~150 tokens, then end of text
MAX_POSITIONS = 1024  # prompts with an in-context example of 15 people reach ~480 tokens
MASK_EPS = 1e-3
INVENTED_NAME_RATE = 0.05  # per first/last name in training lists, so unseen (multi-token) names are handled too
ICL_SHARE = 0.3  # training prompts that carry one in-context example in chat turns, as ParallelBench's files do
# The scored tasks get more of the data; the others are learnt too (the bench shows how parallel decoding breaks them).
TASK_WEIGHTS = {op: 1.0 for op in OPERATIONS} | {"copy": 1.5, "reverse": 2.0, "sort": 3.0}
TARGETS = {"copy": 0.97, "reverse": 0.97, "sort": 0.90}  # one token per step, on fresh lists and ParallelBench's files
HELD_OUT_SEED = 10_000  # training rows use seeds from 0, the Learn2PD filter 20_000, bench lists 30_000
PROMPT_FORMAT = "parallelbench-waiting-line"  # declared in config.json: the app fills in and checks this format
CURRICULUM_START = 4  # short lists first: the copy circuits form on them far sooner than on 15-person lists


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    ffn: int = 1024


@dataclass(frozen=True)
class TrainSettings:
    kind: str
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    minutes: float = 0.0  # stop (resumably) after this long; 0 = no cap. The schedule follows the steps only.
    shape: Shape = Shape()
    log_every: int = 50
    grow_below: float = 1.0  # curriculum: one more person allowed whenever a logging window's loss is below this
    init_from: str = ""  # a saved folder of the same kind to continue from (fresh optimizer and schedule)
    task_weights: tuple[tuple[str, float], ...] = tuple(TASK_WEIGHTS.items())
    prefix_share: float = 0.0  # MDLM: share of rows whose answer is clean up to a random cut (semi-AR blocks' case)
    width_group: int = 0  # MDLM: rows of similar length per common canvas width (Batches.mdlm); 0 = the whole batch
    precision: str = "bfloat16"  # autocast dtype of the forward pass (float32 = none); weights stay float32
    # From this step on (0 = never) the forward pass runs in float32 whatever ``precision`` says: a CPU without
    # bfloat16 arithmetic emulates it, 2.9x slower than float32 (``bench mdlm-precision``; BENCHMARKS.md, issue 21,
    # twenty-sixth session).
    float32_from: int = 0
    checkpoint_every: int = 100
    # Data mixture schedule: from step ``common_from`` on, this share of the lists is of common English names only
    # (``WaitlineGenerator.common_share``). Steps before it draw exactly the data they drew without it.
    common_share: float = 0.0
    common_from: int = 0
    rainbow_pads: int = 0  # MDLM: one end of text, then a cycle of this many pad tokens; 0 = end of text throughout
    # Share of batches whose lists are all of the longest length allowed (ParallelBench's long file is 15 people);
    # the rest draw the length uniformly. The uniform draw gives 15-person lists one batch in 13.
    long_share: float = 0.0
    invented_rate: float = INVENTED_NAME_RATE  # chance that a training first or last name is made up from syllables
    piece_rate: float = 0.0  # chance that a training first or last name is glued from the tokenizer's name pieces


RESUMABLE_CHANGES = ("minutes", "log_every", "checkpoint_every")  # may differ between the runs of one training
MIXTURE_SCHEDULE = ("common_share", "common_from")  # may change for steps not yet run: check_mixture_schedule
PRECISION_SCHEDULE = ("float32_from",)  # may change for steps not yet run: check_precision_schedule
SCHEDULES = MIXTURE_SCHEDULE + PRECISION_SCHEDULE
PRECISIONS = ("bfloat16", "float32")


def build_model(kind: str, tokenizer: PreTrainedTokenizerFast, shape: Shape, seed: int) -> LlamaForCausalLM:
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    extra = {"is_causal": False, "mask_token_id": tokenizer.mask_token_id, "diffusion_gen_length": GEN_LENGTH}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True, prompt_format=PROMPT_FORMAT, **ids, **(extra if kind == "mdlm" else {}),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model


class Batches:
    """Seeded training batches; all lists of one batch have the same length so that little padding is needed."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, seed: int, batch_size: int,
                 task_weights: dict[str, float] = TASK_WEIGHTS, pad_cycle: tuple[int, ...] = (),
                 long_share: float = 0.0, invented_rate: float = INVENTED_NAME_RATE, piece_rate: float = 0.0) -> None:
        self.tokenizer, self.batch_size, self.pad_cycle, self.long_share = tokenizer, batch_size, pad_cycle, long_share
        pieces = name_pieces(tokenizer) if piece_rate else ((), ())
        self.generator = WaitlineGenerator(seed, invented_rate=invented_rate, split="train", icl_share=ICL_SHARE,
                                           piece_rate=piece_rate, pieces=pieces)
        self.rng = random.Random(seed + 1)
        self.operations, self.weights = list(task_weights), list(task_weights.values())
        self.longest = self.generator.max_people

    def state(self) -> dict[str, Any]:
        """Where the data stream is (JSON-safe), so a resumed run draws the batches an uninterrupted one would."""
        return {"generator": _json_random_state(self.generator.rng), "picks": _json_random_state(self.rng),
                "longest": self.longest}

    def load_state(self, state: dict[str, Any]) -> None:
        for rng, saved in ((self.generator.rng, state["generator"]), (self.rng, state["picks"])):
            version, internal, gauss = saved
            rng.setstate((version, tuple(internal), gauss))
        self.longest = state["longest"]

    def examples(self) -> list[Example]:
        # no extra draw at share 0, so such streams stay as they were
        if self.long_share and self.rng.random() < self.long_share:
            count = self.longest
        else:
            count = self.generator.rng.randint(self.generator.min_people, self.longest)
        ops = self.rng.choices(self.operations, self.weights, k=self.batch_size)
        return [self.generator.example(op, count) for op in ops]

    def encoded(self) -> list[tuple[list[int], list[int]]]:
        """(the prompt's chat turns, answer ids + ``</s>``) per example; a lone prompt is ``<s>`` + prompt ids."""
        eos = self.tokenizer.eos_token_id
        return [(encode_messages(self.tokenizer, e.messages), encode_answer(self.tokenizer, e.answer_text) + [eos])
                for e in self.examples()]

    def ar(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Input ids right-padded with ``<pad>``, and labels that score only the answer and its end of text."""
        pairs = self.encoded()
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id)
        labels = torch.full((len(pairs), width), -100)
        for row, (prompt, answer) in enumerate(pairs):
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            labels[row, len(prompt): len(prompt) + len(answer)] = torch.tensor(answer)
        return ids, labels

    def mdlm(self, width_group: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Clean canvases, the answer-side mask, and the mask of the answers' own tokens (each answer and its first
        end of text, not the padding). Each answer side is padded to a random width common to its group (LLaDA's
        padding): the whole batch, or ``width_group`` rows of similar length each; the padding is end of text, or the
        ``pad_cycle`` after the answer's one end of text (Rainbow Padding). A batch of 32 with
        one long in-context row is otherwise read at that row's width throughout (1.6x the columns of groups of 8)."""
        pairs = self.encoded()
        if width_group:
            pairs.sort(key=lambda pair: len(pair[0]) + len(pair[1]))
        size, widths = width_group or len(pairs), []
        for start in range(0, len(pairs), size):
            group = pairs[start: start + size]
            widths += [self._common_width(group)] * len(group)
        ids = torch.full((len(pairs), max(widths)), self.tokenizer.eos_token_id)
        answer_side = torch.zeros(ids.shape, dtype=torch.bool)
        own = torch.zeros_like(answer_side)
        for row, ((prompt, answer), width) in enumerate(zip(pairs, widths, strict=True)):
            ids[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            if self.pad_cycle:
                end, tail = len(prompt) + len(answer), width - len(prompt) - len(answer)
                ids[row, end: width] = torch.tensor(self.pad_cycle * (tail // len(self.pad_cycle) + 1))[:tail]
            answer_side[row, len(prompt): width] = True
            own[row, len(prompt): len(prompt) + len(answer)] = True
        return ids, answer_side, own

    def _common_width(self, pairs: list[tuple[list[int], list[int]]]) -> int:
        """The longest row plus a random run of padding, the canvas at most ``GEN_LENGTH`` for the shortest prompt."""
        longest = max(len(p) + len(a) for p, a in pairs)
        shortest_prompt = min(len(p) for p, _ in pairs)
        return longest + self.rng.randint(0, max(0, shortest_prompt + GEN_LENGTH - longest))


def _json_random_state(rng: random.Random) -> list[Any]:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def stream_state(batches: Batches, noise: torch.Generator) -> dict[str, Any]:
    """The data and masking streams' position, JSON-safe (kept in ``training_log.json`` of an unfinished run)."""
    return {"batches": batches.state(), "noise": base64.b64encode(noise.get_state().numpy().tobytes()).decode()}


def restore_stream(state: dict[str, Any], batches: Batches, noise: torch.Generator) -> None:
    batches.load_state(state["batches"])
    noise.set_state(torch.frombuffer(bytearray(base64.b64decode(state["noise"])), dtype=torch.uint8))


def encode_prompt(tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_messages(tokenizer: PreTrainedTokenizerFast, messages: list[dict[str, str]]) -> list[int]:
    """Chat turns in the tokenizer's chat template (the app's chat format), ready for the answer to follow."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_answer(tokenizer: PreTrainedTokenizerFast, answer: str) -> list[int]:
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class LossRows:
    """One batch ready for the loss: per position the token to predict (-100: none) and its weight. The loss is a
    sum over rows divided by ``normaliser``, so micro-batches of rows add up to the whole batch's loss."""

    inputs: torch.Tensor  # what the model reads (MDLM: with masks)
    targets: torch.Tensor  # position i's hidden state predicts targets[i]
    weights: torch.Tensor
    normaliser: float
    # The curriculum's signal: the same loss over the answers' own tokens only, divided by their count. For MDLM the
    # end-of-text padding is most of the canvas and easy: its loss fell while names were still unlearnt, and the
    # lists grew to 15 people on nothing (BENCHMARKS.md, issue 21).
    own: torch.Tensor  # positions whose target is an answer's own token
    own_count: float
    # Per row, the columns that matter. A causal model's right padding changes nothing before it, so AR rows are
    # cut to their own length (half an AR batch's columns were padding: the in-context rows are long) and rows of
    # any lengths share a micro-batch. A bidirectional canvas is read at exactly its width: a micro-batch holds
    # rows of one width only.
    lengths: torch.Tensor | None = None
    bidirectional: bool = False


def ar_rows(batches: Batches) -> LossRows:
    """Next-token prediction on the answer and its end of text."""
    ids, labels = batches.ar()
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    scored = targets != -100
    count = float(scored.sum())
    lengths = labels.shape[1] - (labels != -100).flip(1).int().argmax(1)  # the end of text closes every row
    return LossRows(ids, targets, torch.ones(ids.shape), count, scored, count, lengths)  # all scored: the answer


def mdlm_rows(batches: Batches, generator: torch.Generator, mask_id: int, prefix_share: float = 0.0,
              shift: bool = False, width_group: int = 0) -> LossRows:
    """Masked diffusion: every answer-side token masked with probability p (one t per row), weighted 1/p."""
    ids, answer_side, own = batches.mdlm(width_group)
    rows = ids.shape[0]
    # Stratified t: one uniform offset, evenly spaced across the batch (lower-variance ELBO estimate, as in MDLM).
    t = (torch.rand(1, generator=generator) + torch.arange(rows) / rows) % 1.0
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS)[:, None]
    maskable = answer_side & ~clean_prefix(answer_side, prefix_share, generator) if prefix_share else answer_side
    masked = (torch.rand(ids.shape, generator=generator) < p_mask) & maskable
    targets = ids.masked_fill(~masked, -100)
    weights = (1.0 / p_mask).expand_as(ids)
    if shift:  # AR-initialised: the state before a masked position predicts it (the prompt never is)
        targets = torch.cat([targets[:, 1:], torch.full((rows, 1), -100)], dim=1)
        weights = torch.cat([weights[:, 1:], weights[:, -1:]], dim=1)
        own_targets = torch.cat([own[:, 1:], torch.zeros((rows, 1), dtype=torch.bool)], dim=1)
    else:
        own_targets = own
    widths = ids.shape[1] - answer_side.flip(1).int().argmax(1)  # each canvas ends where its answer side does
    return LossRows(ids.masked_fill(masked, mask_id), targets, weights, float(answer_side.sum()), own_targets,
                    float(own.sum()), widths, bidirectional=True)


def rows_loss(model: LlamaForCausalLM, rows: LossRows,
              chunk: slice | torch.Tensor = slice(None)) -> tuple[torch.Tensor, float]:
    """The loss of the rows in ``chunk`` (a slice or row indices; its share of the whole batch's loss), and their
    share of the curriculum's signal (:class:`LossRows`)."""
    width = rows.inputs.shape[1] if rows.lengths is None else int(rows.lengths[chunk].max())
    cut = lambda values: values[chunk, :width].to(model.device)  # noqa: E731
    targets = cut(rows.targets)
    scored = targets != -100
    hidden = model.model(input_ids=cut(rows.inputs)).last_hidden_state
    # the output layer only where a loss is taken: the prompt's logits would be computed for nothing
    token_loss = F.cross_entropy(model.lm_head(hidden[scored]), targets[scored], reduction="none")
    weighted = token_loss * cut(rows.weights)[scored]
    own = cut(rows.own)[scored]
    return weighted.sum() / rows.normaliser, weighted.detach()[own].sum().item() / max(rows.own_count, 1.0)


def ar_loss(model: LlamaForCausalLM, batches: Batches) -> torch.Tensor:
    return rows_loss(model, ar_rows(batches))[0]


def mdlm_loss(model: LlamaForCausalLM, batches: Batches, generator: torch.Generator,
              prefix_share: float = 0.0) -> torch.Tensor:
    return rows_loss(model, mdlm_rows(batches, generator, model.config.mask_token_id, prefix_share,
                                      shifts_logits(model)))[0]


def micro_batches(rows: LossRows, size: int) -> list[torch.Tensor]:
    """Row indices, at most ``size`` per micro-batch, rows sorted by length; bidirectional rows of different widths
    never share one."""
    if rows.lengths is None:
        return list(torch.arange(rows.inputs.shape[0]).split(size))
    order = torch.argsort(rows.lengths, stable=True)
    runs = torch.unique_consecutive(rows.lengths[order], return_counts=True)[1].tolist() if rows.bidirectional \
        else [len(order)]
    return [chunk for run in order.split(runs) for chunk in run.split(size)]


def training_step(model: LlamaForCausalLM, rows: LossRows, micro_batch: int,
                  autocast: torch.autocast) -> tuple[float, float]:
    """Accumulate the batch's gradient ``micro_batch`` rows at a time (the activations of 32 rows of up to 600
    tokens took over 10 GB), the forward under ``autocast``; returns the batch's loss and curriculum signal.
    Rows of similar length share a micro-batch, so each is cut to little more than its own length."""
    total = signal = 0.0
    for chunk in micro_batches(rows, micro_batch):
        with autocast:
            loss, own = rows_loss(model, rows, chunk)
        loss.backward()
        total += loss.item()
        signal += own
    return total, signal


def clean_prefix(answer_side: torch.Tensor, share: float, generator: torch.Generator) -> torch.Tensor:
    """For a ``share`` of the rows, the answer-side positions before a uniform random cut, kept clean.

    Semi-autoregressive decoding (LLaDA's blocks, Fast-dLLM) always sees a finished answer prefix with masks after
    it; uniform masking almost never shows that case on long answers, as block diffusion (Arriola et al. 2025)
    points out. The ELBO weights stay 1/p: it is the same objective, conditioned on the prefix."""
    rows, width = answer_side.shape
    chosen = torch.rand(rows, generator=generator) < share
    start = answer_side.float().argmax(-1)
    cut = start + (torch.rand(rows, generator=generator) * answer_side.sum(-1)).long()
    columns = torch.arange(width)[None]
    return chosen[:, None] & answer_side & (columns < cut[:, None])


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak over the steps (a time cap never changes it, so an
    interrupted and resumed run trains exactly as an uninterrupted one)."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    settings: TrainSettings, log: Callable[[str], None] = print, work: Path | None = None, until: int | None = None,
    saved: Path | None = None, device: str = "cpu", micro_batch: int = 8,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict[str, Any]]:
    """Train one model, continuing from the checkpoint in ``work`` if one is there (written every
    ``checkpoint_every`` steps and when the time cap, or step ``until``, stops this call early); returns the
    model, the tokenizer and the run record (loss curve, steps done, time, ``finished`` and, unfinished, the
    data streams' position).

    ``micro_batch`` rows are run at a time (memory only: the gradient is the whole batch's).
    Without a checkpoint, an unfinished run's ``saved`` model folder (its float16 weights and training log, as
    committed) is continued with fresh optimizer moments: close to, not bit for bit, the uninterrupted run."""
    if settings.kind not in KINDS:
        raise ValueError(f"--model must be one of {', '.join(KINDS)}, not {settings.kind!r}")
    if settings.precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {settings.precision!r}")
    if settings.width_group and settings.kind != "mdlm":
        raise ValueError("--width-group applies to MDLM only: AR rows are each cut to their own length")
    if settings.rainbow_pads and settings.kind != "mdlm":
        raise ValueError("--rainbow-pads applies to MDLM only: an AR answer ends at its end of text")
    torch.manual_seed(settings.seed)
    tokenizer = build_tokenizer()  # one tokenizer for the whole family, whatever the training seed
    pad_cycle = tuple(with_rainbow_pads(tokenizer, settings.rainbow_pads)) if settings.rainbow_pads else ()
    model = _initial_model(settings, tokenizer).train()
    batches = Batches(tokenizer, settings.seed, settings.batch_size, dict(settings.task_weights), pad_cycle,
                      settings.long_share, settings.invented_rate, settings.piece_rate)
    batches.longest = starting_length(settings, batches.generator.max_people)
    noise = torch.Generator().manual_seed(settings.seed + 2)
    model.to(device)  # a lent GPU trains the same recipe; the data and masking streams stay on the CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.98), weight_decay=0.01)
    record: dict[str, Any] = {"steps_done": 0, "seconds": 0.0, "loss_curve": [], "settings": asdict(settings),
                              "starting_length": batches.longest}
    checkpoint = work / CHECKPOINT if work else None
    state = load_checkpoint(checkpoint, asdict(settings), RESUMABLE_CHANGES + SCHEDULES) if checkpoint else None
    previous = _unfinished_record(saved, settings) if saved and not state else None
    written = (state or {}).get("settings") or (previous or {}).get("settings")
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
        restore_stream(state["stream"], batches, noise)
        record = {**state["record"], "settings": asdict(settings)}
        log(f"resuming at step {record['steps_done']}/{settings.steps} from {checkpoint}")
    elif previous:
        model.load_state_dict(LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32).state_dict())
        restore_stream(previous.pop("stream"), batches, noise)
        record = {**previous, "settings": asdict(settings),
                  "restarts_without_optimizer_state": previous.get("restarts_without_optimizer_state", 0) + 1}
        log(f"no checkpoint: continuing at step {record['steps_done']}/{settings.steps} from the weights in {saved} "
            "with fresh optimizer moments")
    if written:
        check_mixture_schedule(settings, written, record["steps_done"])
        check_precision_schedule(settings, written, record["steps_done"])
        check_added_settings(settings, written)
    if settings.init_from:
        record["continued_from"] = _previous_record(Path(settings.init_from))
    autocasts = [torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=enabled) for enabled in (False, True)]
    bfloat16_until = bfloat16_steps(asdict(settings))
    start, window = time.monotonic() - record["seconds"], []
    session = time.monotonic()
    while record["steps_done"] < min(settings.steps, until or settings.steps):
        step = record["steps_done"]
        if settings.minutes and time.monotonic() - session > settings.minutes * 60:
            log(f"time cap of {settings.minutes:g} min reached at step {step}: rerun the same command to continue")
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batches.generator.common_share = settings.common_share if step >= settings.common_from else 0.0
        rows = ar_rows(batches) if settings.kind == "ar" else mdlm_rows(
            batches, noise, model.config.mask_token_id, settings.prefix_share, shifts_logits(model),
            settings.width_group)
        optimizer.zero_grad(set_to_none=True)
        window.append(training_step(model, rows, micro_batch, autocasts[step < bfloat16_until]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        record["steps_done"], record["seconds"] = step + 1, round(time.monotonic() - start, 1)
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.steps:
            losses, signals = zip(*window)
            record["loss_curve"].append((step + 1, sum(losses) / len(window), batches.longest))
            signal = sum(signals) / len(window)
            window = []
            log(f"step {step + 1}/{settings.steps} loss {record['loss_curve'][-1][1]:.4f}"
                + (f" (answers' own tokens {signal:.4f})" if settings.kind == "mdlm" else "")
                + f" lists <= {batches.longest} ({record['seconds']:.0f} s)")
            grow(batches, settings, signal)
        if checkpoint and (step + 1) % settings.checkpoint_every == 0:
            _save_checkpoint(checkpoint, settings, record, model, optimizer, batches, noise)
    record["finished"] = record["steps_done"] >= settings.steps
    if checkpoint and not record["finished"]:
        _save_checkpoint(checkpoint, settings, record, model, optimizer, batches, noise)
    if not record["finished"]:
        record["stream"] = stream_state(batches, noise)
    return model.cpu().eval(), tokenizer, record


def check_mixture_schedule(settings: TrainSettings, written: dict[str, Any], steps_done: int) -> None:
    """A run may continue under another data mixture schedule only if both schedules gave the steps done so far the
    same data: the command then names the whole run (the mixture settings are exempt from ``changed_settings``)."""
    def start_and_share(values: dict[str, Any]) -> tuple[float, float]:
        share = values.get("common_share", 0.0)
        return (min(values.get("common_from", 0), steps_done) if share else steps_done), share

    (then, then_share), (now, now_share) = start_and_share(written), start_and_share(asdict(settings))
    if then != now or (now < steps_done and then_share != now_share):
        raise ParamError(f"--common-share/--common-from: the {steps_done} steps done so far were trained with another "
                         f"mixture of common names; keep it, or start the new one at step {steps_done} or later")


def bfloat16_steps(settings: dict[str, Any]) -> float:
    """How many first steps autocast their forward pass to bfloat16 (the rest run in float32)."""
    if settings.get("precision", "float32") != "bfloat16":
        return 0
    return settings.get("float32_from", 0) or math.inf


def check_precision_schedule(settings: TrainSettings, written: dict[str, Any], steps_done: int) -> None:
    """A run may switch its forward pass to float32 (``float32_from``) only for steps it has not run yet, so the
    command names the precision of every step."""
    if min(bfloat16_steps(asdict(settings)), steps_done) != min(bfloat16_steps(written), steps_done):
        raise ParamError(f"--precision/--float32-from: the {steps_done} steps done so far ran in another precision; "
                         f"keep it, or switch at step {steps_done} or later")


def check_added_settings(settings: TrainSettings, written: dict[str, Any]) -> None:
    """A setting added since a run began (``changed_settings`` lets it pass) was at its default for the steps done:
    each new setting's default is the behaviour before it. Any other value would make the card's command wrong."""
    defaults = asdict(TrainSettings(kind=settings.kind))
    added = [key for key, value in asdict(settings).items() if key not in written
             and key not in RESUMABLE_CHANGES + SCHEDULES and value != defaults[key]]
    if added:
        raise ParamError(f"{', '.join(added)}: the run so far was trained before this setting existed, so at its "
                         "default; keep the default, or start a new run")


def _save_checkpoint(path: Path, settings: TrainSettings, record: dict[str, Any], model: LlamaForCausalLM,
                     optimizer: torch.optim.Optimizer, batches: Batches, noise: torch.Generator) -> None:
    save_checkpoint(path, asdict(settings), record, model=model.state_dict(), optimizer=optimizer.state_dict(),
                    stream=stream_state(batches, noise))


def _unfinished_record(folder: Path, settings: TrainSettings) -> dict[str, Any] | None:
    """The training log of an unfinished run of these settings saved in ``folder``, if there is one."""
    record = _previous_record(folder)
    if not record or record.get("finished", True) or "stream" not in record:
        return None
    changed = changed_settings(record["settings"], asdict(settings), RESUMABLE_CHANGES + SCHEDULES)
    if changed:
        raise ParamError(f"{folder} holds an unfinished run with other settings ({', '.join(changed)}); "
                         "use another --out or delete it")
    return {k: v for k, v in record.items() if k not in ("command", "held_out", "held_out_common", "test_files")}


def starting_length(settings: TrainSettings, maximum: int) -> int:
    """Where the curriculum starts: short lists, or where the run continued from had got to."""
    if not settings.grow_below:
        return maximum
    if settings.init_from:
        curve = _previous_record(Path(settings.init_from)).get("loss_curve") or [[0, 0.0, maximum]]
        return curve[-1][2] if len(curve[-1]) > 2 else maximum
    return CURRICULUM_START


def grow(batches: Batches, settings: TrainSettings, window_loss: float) -> None:
    """Competence-based curriculum: allow one more person once the current lengths are learnt (the loss on the
    answers' own tokens below ``grow_below``). A fixed schedule grew the lists before the copy circuits had formed,
    and nothing was learnt."""
    if window_loss < settings.grow_below:
        batches.longest = min(batches.generator.max_people, batches.longest + 1)


def shifts_logits(model: LlamaForCausalLM) -> bool:
    return bool(getattr(model.config, "diffusion_shift_logits", False))


def _initial_model(settings: TrainSettings, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    if not settings.init_from:
        return build_model(settings.kind, tokenizer, settings.shape, settings.seed)
    model = LlamaForCausalLM.from_pretrained(settings.init_from, dtype=torch.float32)
    if model.config.vocab_size < len(tokenizer):  # new pad tokens: rows drawn around the trained ones' mean
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    causal = getattr(model.config, "is_causal", True)
    if settings.kind == "mdlm" and causal:
        return _diffusion_from_ar(model, tokenizer, settings)
    if causal != (settings.kind == "ar"):
        raise ValueError(f"{settings.init_from} is not a waitline-{settings.kind} model folder")
    return model


def _diffusion_from_ar(ar: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, settings: TrainSettings) -> LlamaForCausalLM:
    """A bidirectional copy of an AR model's weights that keeps its logits shift (as Dream and DiffuLLaMA adapt AR
    models): the state at position i-1 predicts the masked token at i."""
    model = build_model("mdlm", tokenizer, settings.shape, settings.seed)
    model.load_state_dict(ar.state_dict())
    model.config.diffusion_shift_logits = True
    return model


def _saved_shape(folder: Path) -> Shape:
    """The shape of a saved model folder (a continued run keeps it, whatever the shape flags say)."""
    config = json.loads((folder / "config.json").read_text())
    return Shape(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                 config["intermediate_size"])


def _previous_record(folder: Path) -> dict[str, Any]:
    """The earlier run's log (read before ``save`` overwrites the folder), so the card can show the whole history."""
    log_file = folder / "training_log.json"
    return json.loads(log_file.read_text()) if log_file.is_file() else {}


# --- held-out measurement (one token per step) -------------------------------------------------------------------


def _left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, attention


@torch.inference_mode()
def answer_ar(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[list[int]]
) -> list[list[int]]:
    """Greedy continuations (left-padded batch), up to end of text."""
    ids, attention = _left_padded(prompts, tokenizer.pad_token_id)
    out = model.generate(ids, attention_mask=attention, max_new_tokens=GEN_LENGTH, do_sample=False)
    return [_until_eos(row[ids.shape[1]:].tolist(), tokenizer.eos_token_id) for row in out]


@torch.inference_mode()
def answer_mdlm(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[list[int]], block: int = GEN_LENGTH
) -> list[list[int]]:
    """Unmask ``[prompt | <mask> x GEN_LENGTH]`` one position per step: the most confident argmax within the current
    block of ``block`` positions (LLaDA's semi-autoregressive blocks; the whole canvas by default), never revised.
    A row leaves the batch once its answer is settled (an end of text with nothing masked before it): later steps
    would only fill the padding after it, which the answer never includes."""
    mask_id, eos = model.config.mask_token_id, tokenizer.eos_token_id
    ids, attention = _left_padded(prompts, tokenizer.pad_token_id)
    canvas = torch.cat([ids, torch.full((len(prompts), GEN_LENGTH), mask_id)], dim=1)
    attention = torch.cat([attention, torch.ones(len(prompts), GEN_LENGTH, dtype=torch.long)], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    answer_column = torch.arange(GEN_LENGTH)
    for step in range(GEN_LENGTH):
        live = (~_settled(canvas[:, ids.shape[1]:], mask_id, eos)).nonzero().squeeze(-1)
        if not len(live):
            break
        outside = answer_column // block != step // block
        rows = canvas[live]
        logits = model(input_ids=rows, attention_mask=attention[live], position_ids=positions[live]).logits.float()
        if shifts_logits(model):
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_id] = -math.inf
        confidence, proposal = logits.softmax(-1).max(-1)
        confidence = confidence.masked_fill(rows != mask_id, -1.0)
        confidence[:, ids.shape[1]:] = confidence[:, ids.shape[1]:].masked_fill(outside, -1.0)
        position = confidence.argmax(-1)
        canvas[live, position] = proposal[torch.arange(len(live)), position]
    return [_until_eos(row[ids.shape[1]:].tolist(), tokenizer.eos_token_id) for row in canvas]


def _settled(answers: torch.Tensor, mask_id: int, eos: int) -> torch.Tensor:
    """Per row: an end of text is committed and no position before the first one is still masked."""
    is_eos = answers == eos
    first_eos = torch.where(is_eos.any(-1), is_eos.int().argmax(-1), answers.shape[1])
    masked_before = (answers == mask_id) & (torch.arange(answers.shape[1]) < first_eos[:, None])
    return is_eos.any(-1) & ~masked_before.any(-1)


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def held_out_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, kind: str,
                      operations: tuple[str, ...] = tuple(TARGETS), per_operation: int = 50, seed: int = HELD_OUT_SEED,
                      batch_size: int = 25, block: int = GEN_LENGTH, common: bool = False) -> dict[str, float]:
    """Score on fresh lists of held-out names (``common``: of held-out common English names only, as
    ParallelBench's lists are): exact match, or validity for open-ended tasks."""
    generator = WaitlineGenerator(seed, split="held_out", common_share=float(common))
    cases = {op: [(e.prompt, e.row()["answer"]) for e in (generator.example(op) for _ in range(per_operation))]
             for op in operations}
    return accuracy(model, tokenizer, kind, cases, batch_size, block)


def file_accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, kind: str, folder: Path,
                  operations: tuple[str, ...] = tuple(TARGETS), per_operation: int = 50, batch_size: int = 25,
                  block: int = GEN_LENGTH) -> dict[str, float]:
    """Score on the first rows of ParallelBench's own test files (``folder/<task>.jsonl``), each prompt rendered
    without its in-context example, as ``eval parallelbench`` renders it."""
    cases = {op: [(prompt_text(row, op), row["answer"]) for row in read_rows(folder / f"{op}.jsonl", op)[:per_operation]]
             for op in operations}
    return accuracy(model, tokenizer, kind, cases, batch_size, block)


def accuracy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, kind: str,
             cases: dict[str, list[tuple[str, Any]]], batch_size: int = 25, block: int = GEN_LENGTH) -> dict[str, float]:
    """Per operation, the share of (prompt, answer field) cases solved with one token per step."""
    answer = answer_ar if kind == "ar" else functools.partial(answer_mdlm, block=block)
    results = {}
    for operation, pairs in cases.items():
        correct = 0.0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start: start + batch_size]
            outputs = answer(model, tokenizer, [encode_prompt(tokenizer, prompt) for prompt, _ in chunk])
            for (_, expected), ids in zip(chunk, outputs, strict=True):
                correct += score(operation, tokenizer.decode(ids, skip_special_tokens=True), expected)
        results[operation] = correct / max(1, len(pairs))
    return results


def card_scores(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, kind: str, per_operation: int,
                seed: int = HELD_OUT_SEED, block: int = GEN_LENGTH, folders: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Every score a card shows: fresh lists of held-out names (``held_out``), of held-out common names only
    (``held_out_common``), and the first rows of each folder of ParallelBench's own test files (``test_files``);
    empty tables when ``per_operation`` is 0 (not scored, rather than 0 %)."""
    if not per_operation:
        return {"held_out": {}, "held_out_common": {}, "test_files": {}}
    fresh = functools.partial(held_out_accuracy, model, tokenizer, kind, per_operation=per_operation, seed=seed,
                              block=block)
    return {"held_out": fresh(), "held_out_common": fresh(common=True), "test_files": {
        f"`{folder.name}` (first {per_operation} rows)": file_accuracy(
            model, tokenizer, kind, folder, per_operation=per_operation, block=block) for folder in folders}}


def score_saved(folder: Path, kind: str, per_operation: int, seed: int = HELD_OUT_SEED, block: int = GEN_LENGTH,
                test_folders: tuple[Path, ...] = ()) -> tuple[dict[str, Any], LlamaForCausalLM]:
    """``card_scores`` of a saved model folder, loaded as the app loads it (float32), and the model scored."""
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return card_scores(model, tokenizer, kind, per_operation, seed, block, test_folders), model


# --- saving ------------------------------------------------------------------------------------------------------


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, card: str) -> None:
    """float16 safetensors (half the bytes; loaded back as float32 by ``load_model``), tokenizer and model card."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(card)


def _long_lists(settings: dict[str, Any]) -> str:
    share = settings.get("long_share", 0.0)
    return f" (in the last run {share:.0%} of the batches all of the longest, the rest of any length)" if share else ""


def _pieces(settings: dict[str, Any]) -> str:
    rate = settings.get("piece_rate", 0.0)
    return (f"; in the last run {rate:.0%} glued from the tokenizer's name pieces, drawn uniformly, so that pieces "
            "BPE merges away inside every training name are trained too" if rate else "")


def _invented(history: list[dict[str, Any]]) -> str:
    """The invented-name rate of the last run, and of the earlier runs where they differ."""
    rates = [run["settings"].get("invented_rate", INVENTED_NAME_RATE) for run in history]
    earlier = sorted(set(rates[:-1]) - {rates[-1]})
    return f"{rates[-1]:.0%} of names" + (f" ({', '.join(f'{r:.0%}' for r in earlier)} in the earlier runs)"
                                          if earlier else "")


def model_card(kind: str, record: dict[str, Any], accuracy: dict[str, float], parameters: int, command: str,
               shifted: bool = False, block: int = GEN_LENGTH, test_files: dict[str, dict[str, float]] | None = None,
               common: dict[str, float] | None = None) -> str:
    """The model card; ``test_files`` adds the accuracy on each folder of ParallelBench's own test files, ``common``
    on fresh lists of held-out common English names."""
    settings = record["settings"]
    objective = (
        "masked diffusion (MDLM / LLaDA SFT): t ~ U(0,1) per sequence (stratified), answer-side tokens masked with "
        "p = (1-1e-3) t + 1e-3, cross-entropy on masked tokens weighted 1/p; the prompt is never masked; answers "
        + ("end with one end-of-text, then Rainbow Padding (Kim et al., ICLR 2026): a cycle of "
           f"{settings['rainbow_pads']} distinct pad tokens (`<pad_0>`...; trained on too, so far positions are no "
           "longer all but certainly end of text)" if settings.get("rainbow_pads")
           else "padded with end-of-text (trained on too)")
        + " to a random width common to "
        + (f"each group of {settings['width_group']} rows of similar length" if settings.get("width_group")
           else "the batch") + ". Bidirectional attention (`is_causal: false`), "
        + ("initialised from the AR twin's weights and keeping its logits shift (`diffusion_shift_logits`: position "
           "i-1 predicts the masked token at i, as Dream adapts an AR model), " if shifted
           else "no logits shift, ")
        + f"mask token `<mask>` (id {SPECIALS.index(MASK)}), default canvas {GEN_LENGTH} tokens."
        + (f" In the last run {settings['prefix_share']:.0%} of the rows kept their answer clean up to a random cut "
           "(the clean-prefix case of semi-autoregressive blocks)." if settings.get("prefix_share") else "")
        if kind == "mdlm" else "next-token cross-entropy on the answer and its end-of-text (causal attention)."
    )
    history = _history(record)
    curve = "\n".join(f"| {step} | {loss:.4f} | {longest} |" for step, loss, longest in _whole_curve(history))
    restarts = record.get("restarts_without_optimizer_state", 0)
    status = "" if record["steps_done"] >= settings["steps"] else (
        f"- **Status: training in progress, step {record['steps_done']} of {settings['steps']}.** These are the "
        "weights so far; the same command continues from its checkpoint (kept outside the repository) or, on a "
        "fresh machine, from these weights and the data streams' position in `training_log.json`"
        + (f" (done {restarts} time(s) so far, with fresh optimizer moments)" if restarts else "") + ".\n")
    within = "the whole canvas" if block >= GEN_LENGTH else f"the current block of {block} (semi-autoregressive)"
    decoding = ("greedy" if kind == "ar" else
                f"the single most confident masked position of {within} committed per step (argmax)")
    scores, files = score_sections(accuracy, common, test_files)
    return f"""# waitline-{kind}

A {parameters / 1e6:.2f}M-parameter `LlamaForCausalLM` ({settings['shape']['layers']} layers, hidden
{settings['shape']['hidden']}, {settings['shape']['heads']} heads, MLP {settings['shape']['ffn']}, tied embeddings),
built into Decoding Explorer. Weights stored in float16.

- **Data**: ParallelBench's "waiting line" family generated by `engine/offline/waitline_data.py` from the
  training split of `engine/offline/names.py` ({len(name_pool('first', 'train'))} first x
  {len(name_pool('last', 'train'))} last names from Faker's locales and the hand lists; the held-out split,
  {len(name_pool('first', 'held_out'))} first x {len(name_pool('last', 'held_out'))} last names, is never trained on;
  {_invented(history)} invented from syllables, several tokens each{_pieces(settings)}), lists of 3-15
  people{_long_lists(settings)}; operations copy, reverse, sort, shuffle, insert/remove/replace at an index and at
  random (task weights
  {json.dumps(dict(settings['task_weights']))}). Prompt = ParallelBench's instruction in the tokenizer's chat
  format, {ICL_SHARE:.0%} of them after one in-context example (prompt and answer turns); answer = the JSON list,
  then `</s>`.{_mixture(settings)} Held-out accuracy below is measured on lists of held-out names.
- **Prompt format** (`prompt_format: {PROMPT_FORMAT}` in `config.json`, so it travels with the folder): ParallelBench's
  waiting-line instruction as the user turn of the chat template (`<s>` + prompt for one turn); the app fills in an
  example and warns on a prompt in another format.
- **Tokenizer**: byte-level BPE (`engine/offline/waitline_tokenizer.py`): any text round-trips; the hand-listed
  training names are one token each, other names several.
- **Objective**: {objective}
- **Earlier runs continued from**: {_earlier_runs(history[:-1])}
{status}- **Training**: `{command}`: {record['steps_done']} of {settings['steps']} steps of batch {settings['batch_size']}, AdamW
  lr {settings['lr']} (warm-up {settings['warmup']}, cosine to 10%), seed {settings['seed']}, curriculum:
  {_curriculum_start(history)}, one more person allowed whenever a 50-step window's loss fell below
  {settings.get('grow_below', 0)} (the longest list at each point is in the curve below),
  {record['seconds']:.0f} s on CPU, forward pass autocast to {_precision(settings)}.{_restarted(restarts)}
- **Rebuild** the shipped `waitline-{kind}`: `{rebuild_command(f"waitline-{kind}")}` ({_rebuilt_as(history)}:
  `engine/offline/recipes.py`).

## Held-out accuracy (fresh lists, one token per step: {decoding})

{scores}
{files}
## Loss curve (mean over each logging window)

| step | loss | longest list |
|---|---|---|
{curve}
"""


def _restarted(restarts: int) -> str:
    if not restarts:
        return ""
    return (f" Continued {restarts} time(s) on a machine without its checkpoint, from the saved weights and the data "
            "streams' position with fresh optimizer moments: close to, not bit for bit, the command's run.")


def _precision(settings: dict[str, Any]) -> str:
    until = bfloat16_steps(settings)
    return {0: "float32", math.inf: "bfloat16"}.get(until, f"bfloat16 until step {until}, float32 from there on")


def _mixture(settings: dict[str, Any]) -> str:
    share, start = settings.get("common_share", 0.0), settings.get("common_from", 0)
    if not share:
        return ""
    return (f" {'From step ' + str(start) + ' on, ' if start else ''}{share:.0%} of the lists are of the training "
            "split's common English names only (the hand lists: one token each), ParallelBench's kind of lists.")


def score_sections(accuracy: dict[str, float], common: dict[str, float] | None = None,
                   test_files: dict[str, dict[str, float]] | None = None) -> tuple[str, str]:
    """A card's score tables: the held-out lists' (then the held-out common names', given ``common``), and one
    section per folder of ParallelBench's own test files."""
    scores = _score_table(accuracy)
    if common:
        scores += ("\n\nLists of held-out common English names only (ParallelBench's kind of names; held out, so "
                   f"the tokenizer splits each into several tokens):\n\n{_score_table(common)}")
    files = "".join(f"\n## ParallelBench's own test files: {name} (one token per step)\n\n{_score_table(table)}\n"
                    for name, table in (test_files or {}).items())
    if test_files:
        files += ("\nThe test files are furiosa-ai/ParallelBench's `dataset/parallel_bench/data/output/test/<folder>/"
                  "<task>.jsonl` (not shipped, never trained on); prompts rendered without their in-context example.\n")
    return scores, files


def _score_table(accuracy: dict[str, float]) -> str:
    if not accuracy:
        return "Not scored: it ran with `--eval-per-task 0`."
    rows = "\n".join(f"| {op} | {acc:.1%} | {TARGETS.get(op, 0):.0%} |" for op, acc in accuracy.items())
    return f"| task | accuracy | target |\n|---|---|---|\n{rows}"


def _history(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The chain of runs that produced these weights, oldest first."""
    earlier = record.get("continued_from") or {}
    return (_history(earlier) if earlier else []) + [record]


def _whole_curve(history: list[dict[str, Any]]) -> list[tuple[int, float, int | str]]:
    curve, offset = [], 0
    for run in history:
        curve += [(offset + point[0], point[1], point[2] if len(point) > 2 else "") for point in run["loss_curve"]]
        offset += run["steps_done"]
    return curve


def _curriculum_start(history: list[dict[str, Any]]) -> str:
    """Where the lists' length started, as the run recorded it (``starting_length``)."""
    run = history[-1]
    start = run.get("starting_length") or _start_before_it_was_recorded(history)
    if start is None or not run["settings"].get("grow_below"):
        return f"lists of any length{f' (up to {start} people)' if start else ''} from the start"
    if len(history) > 1:
        return f"lists of up to {start} people from the start, where the earlier run ended"
    return f"lists of 3-{start} people first"


def _start_before_it_was_recorded(history: list[dict[str, Any]]) -> int | None:
    """``starting_length``'s rule for logs from before the record kept it: the earlier run's last longest list."""
    if len(history) == 1:
        return CURRICULUM_START
    last = (history[-2].get("loss_curve") or [[]])[-1]
    return last[2] if len(last) > 2 else None


def _rebuilt_as(history: list[dict[str, Any]]) -> str:
    if len(history) == 1:
        return "the training command above, seeded, from scratch"
    return "the earlier runs' commands above in turn, then the training command above from their weights, each seeded"


def _earlier_runs(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return "none (trained from scratch)"
    return "; ".join(map(_run_entry, runs))


def _run_entry(run: dict[str, Any]) -> str:
    """A run's command and cost; a soup's (``engine.offline.soup``) names the runs it averaged besides the one
    before it in the chain, which is its first."""
    if run.get("soup_of"):
        others = "; ".join(map(_run_entry, run["soup_of"][1:]))
        return f"`{run.get('command', '?')}` (the uniform average of the run before it and {others})"
    return f"`{run.get('command', '?')}` ({run['steps_done']} steps, {run['seconds']} s)"


def task_weights(items: list[str]) -> dict[str, float]:
    """``TASK=W`` overrides, checked against the known operations."""
    weights = {}
    for item in items:
        task, _, weight = item.partition("=")
        if task not in TASK_WEIGHTS:
            raise SystemExit(f"--task-weight: unknown task {task!r} (one of {', '.join(TASK_WEIGHTS)})")
        weights[task] = float(weight)
    return weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=KINDS, required=True)
    parser.add_argument("--out", type=Path, help="folder to save the trained model in (required unless --score)")
    parser.add_argument("--work", type=Path, help="checkpoints (default: OUT.work beside --out; removed when done)")
    parser.add_argument("--score", metavar="FOLDER", help="no training: print a saved model's scores as its card has them "
                                                      "(fresh lists, and --parallelbench folders)")
    parser.add_argument("--write-card", action="store_true",
                        help="with --score: put the new scores into the folder's card and training_log.json")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps)
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="stop after this long, saving the model so far and a checkpoint that the same command "
                             "continues from (0 = no cap)")
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--warmup", type=int, default=TrainSettings.warmup)
    parser.add_argument("--grow-below", type=float, default=TrainSettings.grow_below,
                        help=f"curriculum: lists start at {CURRICULUM_START} people and grow by one whenever the loss "
                             "of a logging window is below this (0 = all lengths from the start)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="rows per forward; the gradient is still the whole batch's (memory only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to train (default: a GPU when there is one)")
    parser.add_argument("--precision", choices=PRECISIONS, default=TrainSettings.precision,
                        help="autocast dtype of the training forward pass")
    parser.add_argument("--float32-from", type=int, default=TrainSettings.float32_from, metavar="STEP",
                        help="from this step on, the forward pass runs in float32 (0 = never): a CPU without bfloat16 "
                             "arithmetic runs float32 faster; may be set when continuing a run, for steps not yet run")
    parser.add_argument("--checkpoint-every", type=int, default=TrainSettings.checkpoint_every)
    parser.add_argument("--eval-per-task", type=int, default=40)
    parser.add_argument("--eval-seed", type=int, default=HELD_OUT_SEED, help="seed of the held-out lists")
    parser.add_argument("--parallelbench", type=Path, action="append", default=[], metavar="DIR",
                        help="a folder of ParallelBench's own waiting-line test files (<task>.jsonl): the card also "
                             "scores their first --eval-per-task rows (repeatable; never trained on)")
    parser.add_argument("--task-weight", action="append", default=[], metavar="TASK=W",
                        help=f"override one task's share of the data (defaults: {TASK_WEIGHTS})")
    parser.add_argument("--prefix-share", type=float, default=TrainSettings.prefix_share,
                        help="MDLM: share of training rows with a clean answer prefix up to a random cut")
    parser.add_argument("--width-group", type=int, default=TrainSettings.width_group,
                        help="MDLM: rows of similar length that share one random canvas width (0 = the whole batch, "
                             "as LLaDA pads)")
    parser.add_argument("--common-share", type=float, default=TrainSettings.common_share,
                        help="share of training lists made of common English names only, as ParallelBench's are")
    parser.add_argument("--common-from", type=int, default=TrainSettings.common_from,
                        help="the step from which --common-share applies (earlier steps draw no such lists)")
    parser.add_argument("--rainbow-pads", type=int, default=TrainSettings.rainbow_pads, metavar="K",
                        help="MDLM: pad each answer with one end of text, then a cycle of K distinct pad tokens "
                             "(Rainbow Padding; 0 = end of text throughout, as LLaDA pads)")
    parser.add_argument("--long-share", type=float, default=TrainSettings.long_share,
                        help="share of batches of the longest lists allowed (the rest draw the length uniformly)")
    parser.add_argument("--invented-rate", type=float, default=TrainSettings.invented_rate,
                        help="chance that a training first or last name is invented from syllables (several tokens)")
    parser.add_argument("--piece-rate", type=float, default=TrainSettings.piece_rate,
                        help="chance that a training first or last name is glued from the tokenizer's name pieces, so "
                             "pieces that BPE merges away in every training name are trained too")
    parser.add_argument("--eval-block", type=int, default=GEN_LENGTH,
                        help="MDLM held-out score: semi-autoregressive block length (default: the whole canvas)")
    parser.add_argument("--init-from", default="", help="start from this saved model folder (an AR folder for an "
                                                        "MDLM: its weights, keeping the logits shift)")
    for name, default in asdict(Shape()).items():
        parser.add_argument(f"--{name}", type=int, default=default, help=f"model shape: {name} (ignored with --init-from)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = rewritable_record(args.score, parser) if args.write_card else None
    if args.score:
        scores, model = score_saved(Path(args.score), args.model, args.eval_per_task, args.eval_seed, args.eval_block,
                                    tuple(args.parallelbench))
        print(json.dumps(scores))
        if record:
            write_card(Path(args.score), record, scores, args.eval_block, model)
        return
    if args.out is None:
        parser.error("--out is required when training")
    shape = _saved_shape(Path(args.init_from)) if args.init_from else Shape(args.hidden, args.layers, args.heads, args.ffn)
    settings = TrainSettings(kind=args.model, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             warmup=args.warmup, seed=args.seed, minutes=args.minutes, grow_below=args.grow_below,
                             init_from=args.init_from, shape=shape, prefix_share=args.prefix_share,
                             task_weights=tuple((TASK_WEIGHTS | task_weights(args.task_weight)).items()),
                             precision=args.precision, float32_from=args.float32_from,
                             checkpoint_every=args.checkpoint_every,
                             common_share=args.common_share, common_from=args.common_from,
                             width_group=args.width_group, rainbow_pads=args.rainbow_pads,
                             long_share=args.long_share, invented_rate=args.invented_rate,
                             piece_rate=args.piece_rate)
    work = args.work or args.out.with_name(args.out.name + ".work")
    model, tokenizer, record = train(settings, log=lambda line: print(line, flush=True), work=work, saved=args.out,
                                     device=args.device, micro_batch=args.micro_batch)
    save(model, tokenizer, args.out, "")
    reloaded = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()  # what ships (float16 weights)
    scores = card_scores(reloaded, tokenizer, args.model, args.eval_per_task, args.eval_seed, args.eval_block,
                         tuple(args.parallelbench))
    print(json.dumps(scores), flush=True)
    write_card(args.out, {**record, "command": training_command(args, shape)}, scores, args.eval_block, reloaded)
    if record["finished"]:
        shutil.rmtree(work, ignore_errors=True)


def write_card(folder: Path, record: dict[str, Any], scores: dict[str, Any], block: int,
               model: LlamaForCausalLM) -> None:
    """A trained folder's card and ``training_log.json`` from its run record (with its ``command``) and scores."""
    log = {**record, **scores}
    card = model_card(record["settings"]["kind"], log, scores["held_out"], sum(p.numel() for p in model.parameters()),
                      record["command"], shifts_logits(model), block, scores["test_files"], scores["held_out_common"])
    (folder / "README.md").write_text(card)
    (folder / "training_log.json").write_text(json.dumps(log, indent=1))


def rewritable_record(score: str | None, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The run log whose card ``--write-card`` rewrites with new scores: a train_dllm run's (a soup's card is
    ``engine.offline.soup``'s)."""
    if not score:
        parser.error("--write-card goes with --score FOLDER")
    record = _previous_record(Path(score))
    if not record:
        parser.error(f"--write-card: {score} has no training_log.json (not a train_dllm output)")
    if "soup_of" in record:
        parser.error(f"--write-card: {score} is a weight average; run engine.offline.soup again to rescore its card")
    return record


def training_command(args: argparse.Namespace, shape: Shape) -> str:
    """The command that trains these weights (a time cap, threads and checkpoint rate leave them unchanged)."""
    return (f"python -m engine.offline.train_dllm --model {args.model} --steps {args.steps} "
            f"--batch-size {args.batch_size} --lr {args.lr:g} --warmup {args.warmup} --grow-below {args.grow_below:g} "
            f"--seed {args.seed} --precision {args.precision} "
            + (f"--float32-from {args.float32_from} " if args.float32_from else "")
            + f"--hidden {shape.hidden} --layers {shape.layers} --heads {shape.heads} --ffn {shape.ffn} "
            f"--out {args.out}"
            + (f" --init-from {args.init_from}" if args.init_from else "")
            + (f" --prefix-share {args.prefix_share:g}" if args.prefix_share else "")
            + (f" --width-group {args.width_group}" if args.width_group else "")
            + (f" --rainbow-pads {args.rainbow_pads}" if args.rainbow_pads else "")
            + (f" --long-share {args.long_share:g}" if args.long_share else "")
            + (f" --invented-rate {args.invented_rate:g}" if args.invented_rate != INVENTED_NAME_RATE else "")
            + (f" --piece-rate {args.piece_rate:g}" if args.piece_rate else "")
            + (f" --common-share {args.common_share:g}" if args.common_share else "")
            + (f" --common-from {args.common_from}" if args.common_share and args.common_from else "")
            + "".join(f" --task-weight {item}" for item in args.task_weight))


if __name__ == "__main__":
    main()
