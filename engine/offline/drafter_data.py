"""Self-distilled training data for the trained drafters: the target's greedy answers and its hidden states.

    decoding-explorer data drafter --sequences 600 --max-new-tokens 128

The prompts are seeded templates (``engine.offline.drafter_prompts``) and, with ``--self-prompts SHARE``, requests
the target writes itself (``engine.offline.self_prompts``, kept in ``self_prompts.json``), chat-formatted as ``record
--chat`` does; the target answers them greedily in left-padded batches (transformers' ``generate``), stopping at
its end of turn; then one right-padded forward over prompt + answer gives its hidden states at every position. A
folder holds:

- ``manifest.json``: model, hidden_size, layers {low, mid, last}, shards, sequences, tokens, seed, max_new_tokens...,
  rewritten atomically after each shard;
- ``shard-00000.safetensors``, ...: ``input_ids`` int32 [T] (the shard's sequences concatenated, prompt then
  answer), ``offsets`` int64 [S+1], ``answer_start`` int64 [S] (index inside each sequence), and float16 [T, H]
  ``hidden_low``, ``hidden_mid``, ``hidden_last``.
- ``self_prompts.json``: the self-written requests, the batch size they were drawn in and where the draw stopped,
  so a larger set continues the draw (the same requests as drawing afresh) instead of sampling it all again.

Layer indices are those of transformers' ``hidden_states`` tuple: index i < L is the output of the first i decoder
layers, index L (``last``) the final hidden state after the final norm, the one the LM head reads. A re-run with the
same settings continues after the last complete shard.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import GenerationConfig

from engine.files import write_atomically
from engine.models.cache import data_dir
from engine.models.handle import LoadedModel
from engine.offline.drafter_prompts import KINDS, Prompt, build_prompts
from engine.offline.self_prompts import Draw, self_written_prompts
from engine.params import ParamError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATES = ("low", "mid", "last")
SETTINGS = ("model", "seed", "max_new_tokens", "layers", "format_version", "self_share")  # a resumed run's too
SELF_KIND = "self"  # the prompts the target wrote itself (engine.offline.self_prompts)
SELF_PROMPTS = "self_prompts.json"  # kept in the folder, so that a resumed run asks the same questions


@dataclass(frozen=True)
class DrafterSequence:
    """One prompt + answer of the data set with the target's hidden states at each of its positions."""

    input_ids: torch.Tensor  # int64 [n]
    answer_start: int  # index of the first answer token
    hidden_low: torch.Tensor  # float16 [n, H]
    hidden_mid: torch.Tensor
    hidden_last: torch.Tensor


def default_out(model_name: str) -> Path:
    return data_dir() / "drafter-data" / model_name


def layer_indices(num_layers: int) -> dict[str, int]:
    """``hidden_states`` indices at about 1/4 and 1/2 depth, and the final (normed) state."""
    return {"low": max(1, num_layers // 4), "mid": max(1, num_layers // 2), "last": num_layers}


# ---------------------------------------------------------------- the target's answers and states


@torch.inference_mode()
def greedy_answers(model: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The target's greedy continuation of each prompt, up to and including its first end-of-turn token."""
    pad = _pad_id(model)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    eos = sorted(model.eos_token_ids)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    out = model.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [_through_eos(row[width:].tolist(), set(eos)) for row in out]


@torch.inference_mode()
def hidden_states(model: LoadedModel, sequences: list[list[int]], layers: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    """Float16 states of each sequence at the ``layers`` indices, from one right-padded forward of the body."""
    width = max(map(len, sequences))
    ids = torch.tensor([s + [_pad_id(model)] * (width - len(s)) for s in sequences], device=model.device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=model.device)
    # The body alone: the LM head's [batch, width, vocab] logits would be the largest tensor and are not needed.
    states = model.model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for name, index in layers.items():  # massive activations (SmolLM2's layer 15: ~25,000 at the first token) fit
        if states[index].abs().max() > torch.finfo(torch.float16).max:  # float16 on these models; say so if not
            raise OverflowError(f"{model.name}'s {name} hidden states (index {index}) exceed float16's range")
    return [{name: states[index][row, : len(s)].to("cpu", torch.float16) for name, index in layers.items()}
            for row, s in enumerate(sequences)]


def _pad_id(model: LoadedModel) -> int:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else min(model.eos_token_ids)  # masked out either way


def _through_eos(ids: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in eos:
            return ids[: index + 1]
    return ids


# ---------------------------------------------------------------- building the folder


def build_drafter_data(
    model: LoadedModel,
    out: Path,
    *,
    sequences: int,
    seed: int = 0,
    batch_size: int = 16,
    max_new_tokens: int = 128,
    shard_size: int = 64,
    self_share: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write (or continue) the data folder ``out`` until it holds ``sequences`` sequences; returns the manifest.

    ``self_share`` of the prompts (evenly interleaved) are requests the target writes itself, the rest templates.
    Raises FileExistsError when ``out`` holds data of other settings (model, seed, answer length, layers, share).
    """
    if not 0.0 <= self_share <= 1.0:
        raise ParamError(f"the share of self-written prompts must be between 0 and 1, not {self_share}")
    out.mkdir(parents=True, exist_ok=True)
    layers = layer_indices(model.num_layers)
    manifest = _start_manifest(out, model, layers, seed, max_new_tokens, self_share)
    prompts = mixed_prompts(model, out, sequences, seed, self_share, batch_size)
    bar = tqdm(total=sequences, initial=min(manifest["sequences"], sequences), unit="seq", desc="drafter data")
    while manifest["sequences"] < sequences:
        start = manifest["sequences"]
        chunk = prompts[start : start + shard_size]
        began = time.perf_counter()
        records = _shard_records(model, [model.encode(p.text, chat=True) for p in chunk], layers, batch_size,
                                 max_new_tokens, bar)
        name = f"shard-{len(manifest['shards']):05d}.safetensors"
        write_atomically(out / name, functools.partial(save_file, _shard_tensors(records)))
        tokens = sum(len(ids) for ids, _, _ in records)
        answer_tokens = sum(len(ids) - start_at for ids, start_at, _ in records)
        _add_shard(manifest, name, chunk, tokens, answer_tokens)
        write_atomically(out / MANIFEST, lambda path: path.write_text(json.dumps(manifest, indent=1)))
        if log:
            seconds = time.perf_counter() - began
            log(f"{name}: {len(chunk)} sequences, {tokens} tokens ({answer_tokens} answer) in {seconds:.0f} s, "
                f"{answer_tokens / seconds:.1f} answer tokens/s; {manifest['sequences']}/{sequences} done")
    bar.close()
    return manifest


def is_self_written(index: int, share: float) -> bool:
    """Whether prompt ``index`` of a set with this share of self-written ones is one (a prefix keeps the share)."""
    return math.floor((index + 1) * share) > math.floor(index * share)


def read_draw(path: Path, batch_size: int) -> tuple[Draw, int]:
    """The self-written prompts kept in ``path`` with where their draw stopped, and the batch size to continue it
    with: the one it was drawn with (another one draws other requests), ``batch_size`` for a new folder. A folder
    written before positions were kept holds a bare list: its prompts, no position."""
    if not path.is_file():
        return Draw([]), batch_size
    saved = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(saved, list):
        return Draw(saved), batch_size
    return Draw(saved["prompts"], *saved["next"]), saved["batch_size"]


def mixed_prompts(model: LoadedModel, out: Path, count: int, seed: int, share: float, batch_size: int) -> list[Prompt]:
    """The data set's prompts: templates (engine.offline.drafter_prompts) with ``share`` self-written ones
    interleaved; the self-written ones are drawn once and kept in ``out`` (a longer set extends a shorter one)."""
    wanted = sum(is_self_written(index, share) for index in range(count))
    path = out / SELF_PROMPTS
    kept, draw_batch = read_draw(path, batch_size)
    if len(kept.prompts) < wanted:
        resume = kept if kept.next_batch or kept.next_turn else None  # no position kept: drawn again from the start
        with tqdm(total=wanted, initial=len(resume.prompts) if resume else 0, unit="prompt",
                  desc="self-written prompts") as bar:
            kept = self_written_prompts(model, wanted, seed, draw_batch, progress=bar.update, resume=resume)
        saved = {"batch_size": draw_batch, "next": [kept.next_batch, kept.next_turn], "prompts": kept.prompts}
        write_atomically(path, lambda target: target.write_text(json.dumps(saved, indent=0), encoding="utf-8"))
    own = iter(kept.prompts)
    templates = iter(build_prompts(count - wanted, seed))
    return [Prompt(SELF_KIND, next(own)) if is_self_written(index, share) else next(templates)
            for index in range(count)]


def _start_manifest(out: Path, model: LoadedModel, layers: dict[str, int], seed: int, max_new_tokens: int,
                    self_share: float) -> dict:
    config = model.model.config.get_text_config()
    fresh = {"format_version": FORMAT_VERSION, "model": model.name, "hidden_size": int(config.hidden_size),
             "num_layers": model.num_layers, "layers": layers, "seed": seed, "max_new_tokens": max_new_tokens,
             "self_share": self_share, "chat": True, "eos_token_ids": sorted(model.eos_token_ids), "shards": [],
             "sequences": 0, "tokens": 0, "answer_tokens": 0, "kinds": {}}
    path = out / MANIFEST
    if not path.is_file():
        return fresh
    saved = json.loads(path.read_text(encoding="utf-8"))
    differing = [key for key in SETTINGS if saved.get(key) != fresh[key]]
    if differing:
        raise FileExistsError(f"{out} holds drafter data of other settings ({', '.join(differing)}: "
                              f"{', '.join(str(saved.get(k)) for k in differing)}); choose another --out")
    return saved


def _shard_records(model: LoadedModel, prompts: list[list[int]], layers: dict[str, int], batch_size: int,
                   max_new_tokens: int, bar: tqdm) -> list[tuple[list[int], int, dict[str, torch.Tensor]]]:
    """(ids, answer_start, states) per prompt, in prompt order; batches group prompts of similar length."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    records: dict[int, tuple[list[int], int, dict[str, torch.Tensor]]] = {}
    for first in range(0, len(order), batch_size):
        batch = order[first : first + batch_size]
        answers = greedy_answers(model, [prompts[i] for i in batch], max_new_tokens)
        full = [prompts[i] + answer for i, answer in zip(batch, answers, strict=True)]
        for i, ids, states in zip(batch, full, hidden_states(model, full, layers), strict=True):
            records[i] = (ids, len(prompts[i]), states)
        bar.update(len(batch))
    return [records[i] for i in range(len(prompts))]


def _shard_tensors(records: list[tuple[list[int], int, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(ids) for ids, _, _ in records])
    tensors = {
        "input_ids": torch.tensor([t for ids, _, _ in records for t in ids], dtype=torch.int32),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "answer_start": torch.tensor([start for _, start, _ in records], dtype=torch.int64),
    }
    for name in STATES:
        tensors[f"hidden_{name}"] = torch.cat([states[name] for _, _, states in records]).contiguous()
    return tensors


def _add_shard(manifest: dict[str, Any], name: str, chunk: list[Prompt], tokens: int, answer_tokens: int) -> None:
    manifest["shards"].append(name)
    manifest["sequences"] += len(chunk)
    manifest["tokens"] += tokens
    manifest["answer_tokens"] += answer_tokens
    kinds = Counter(manifest["kinds"]) + Counter(p.kind for p in chunk)
    manifest["kinds"] = {kind: kinds[kind] for kind in (*KINDS, SELF_KIND) if kinds[kind]}


# ---------------------------------------------------------------- reading it back


class DrafterShards(torch.utils.data.Dataset):
    """The sequences of a data folder, read on demand from memory-mapped shards (``safe_open``)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        self._files = [safe_open(str(self.folder / name), framework="pt") for name in self.manifest["shards"]]
        self._offsets = [f.get_tensor("offsets") for f in self._files]
        self._starts = [f.get_tensor("answer_start") for f in self._files]
        self._index = [(shard, row) for shard, starts in enumerate(self._starts) for row in range(len(starts))]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> DrafterSequence:
        shard, row = self._index[index]
        file, begin, end = self._files[shard], int(self._offsets[shard][row]), int(self._offsets[shard][row + 1])
        rows = {name: file.get_slice(name)[begin:end] for name in ("input_ids", *(f"hidden_{s}" for s in STATES))}
        return DrafterSequence(rows["input_ids"].long(), int(self._starts[shard][row]), rows["hidden_low"],
                               rows["hidden_mid"], rows["hidden_last"])


def load_shards(folder: str | Path) -> Iterator[DrafterSequence]:
    """Every sequence of a data folder, in order."""
    data = DrafterShards(folder)
    return (data[i] for i in range(len(data)))
