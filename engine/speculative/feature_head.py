"""EAGLE's feature head (Li et al. 2024, speculative.md §10): a drafter that reads the target's own hidden states.

The head maps ``FC([embed(x_{t+1}); f_t])`` (2H -> H) through ONE decoder layer of the target's own architecture
and width to a prediction of the next feature ``f_{t+1}``; tokens come from the target's LM head applied to that
feature. ``f_t`` is the target's last hidden state at position t, after the final norm: what its LM head reads.
The embedding and the LM head are the target's own modules (shared, frozen, never saved with the head).

A reduced draft vocabulary (the K most frequent target tokens of the training answers) computes the head's logits
over those K rows of the LM head only; :meth:`FeatureHead.target_ids` maps draft indices back to target ids.

:class:`LMHeadDrafter` holds what every such drafter shares (the frozen LM head, the reduced vocabulary, the folder
format); Medusa's heads (:mod:`engine.speculative.medusa_heads`) are another kind of it. A head is saved as a
folder: ``config.json`` (its kind and shape), ``head.safetensors`` (the head's own weights), optionally
``draft_vocab.safetensors`` (the K target ids), and a card ``README.md``.
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import DynamicCache

from engine.models.cpu_linear import by_row_count, linear_product
from engine.models.handle import LoadedModel
from engine.params import ParamError

CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, CARD_FILE = "config.json", "head.safetensors", "draft_vocab.safetensors", "README.md"


def train_command(kind: str) -> str:
    """The command that trains a ``kind`` head (shown when none can be loaded)."""
    return f"python -m engine.offline.train_drafter --head {kind} --data DIR --out DIR"


TRAIN_COMMAND = train_command("eagle")
H = TypeVar("H", bound="LMHeadDrafter")


class LMHeadDrafter(nn.Module):
    """A trained drafter whose tokens come from ``target``'s frozen LM head (over ``draft_vocab``'s rows when given).

    Subclasses name their ``kind`` (the config's "head" and the train_drafter ``--head``), build their own layers
    after this constructor, and move themselves to the target's device and dtype with :meth:`match_target`.
    """

    kind, title = "", ""

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None) -> None:
        super().__init__()
        config = target.model.config.get_text_config()
        # The target's modules, outside this module's registry: not trained, not saved, not copied.
        self._frozen = (target.model.get_input_embeddings(), target.model.get_output_embeddings())
        self.hidden_size, self.vocab_size, self.model_name = config.hidden_size, target.vocab_size, target.name
        self.model_type = config.model_type
        self.draft_vocab: Tensor | None = None
        self.row_kernels: dict[int, int] = {}  # for the draft vocabulary's rows (engine.models.cpu_linear)
        self.set_draft_vocab(draft_vocab)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> LMHeadDrafter:
        """A head of the shape a saved ``config`` describes (weights not loaded)."""
        return cls(target, draft_vocab)

    def shape(self) -> dict[str, Any]:
        """The head's own shape settings, saved in its config beside the target's."""
        return {}

    def match_target(self, target: LoadedModel) -> None:
        self.to(device=target.device, dtype=next(target.model.parameters()).dtype)

    def set_draft_vocab(self, token_ids: Tensor | None) -> None:
        """Restrict the head's logits to ``token_ids`` (None: the whole vocabulary)."""
        if token_ids is None:
            self.draft_vocab = None
            return
        token_ids = token_ids.long().flatten()
        if token_ids.numel() == 0 or int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size:
            raise ParamError(f"a draft vocabulary needs target ids in [0, {self.vocab_size})")
        self.draft_vocab = token_ids
        # The K LM-head rows are gathered once: every draft forward reads them.
        self._draft_rows = self._frozen[1].weight.detach()[token_ids]
        self._draft_index = torch.full((self.vocab_size,), -1, dtype=torch.long)
        self._draft_index[token_ids] = torch.arange(len(token_ids))

    def logits(self, features: Tensor) -> Tensor:
        """Logits of the next token from features: over the draft vocabulary when there is one, else the target's."""
        if self.draft_vocab is None:
            return self._frozen[1](features)
        rows = features.numel() // features.shape[-1]
        return linear_product(features, self._draft_rows, None, self.row_kernels.get(rows, 0))

    def target_ids(self, indices: Tensor) -> Tensor:
        """Target token ids of logit indices (the identity without a draft vocabulary)."""
        return indices if self.draft_vocab is None else self.draft_vocab.to(indices.device)[indices]

    def draft_indices(self, token_ids: Tensor) -> Tensor:
        """Logit indices of target ids, -1 for ids outside the draft vocabulary (training labels)."""
        return token_ids if self.draft_vocab is None else self._draft_index.to(token_ids.device)[token_ids]

    def own_state(self) -> dict[str, Tensor]:
        return {name: value.detach().contiguous() for name, value in self.state_dict().items()}


class FeatureHead(LMHeadDrafter):
    """EAGLE's head for ``target``; ``draft_vocab`` (target ids) restricts its logits to those tokens.

    With ``fused_layers`` (``hidden_states`` indices, low to high) it is EAGLE-3's head: the target features it reads
    are those layers' states side by side, fused by one linear map (kH -> H) before the FC; its own outputs, which
    it reads at drafted positions, are already H wide and skip the fusion.
    """

    kind, title = "eagle", "EAGLE"

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None,
                 fused_layers: tuple[int, ...] | None = None) -> None:
        super().__init__(target, draft_vocab)
        backbone = target.model.get_decoder()
        layer_class = type(backbone.layers[0])
        if "position_embeddings" not in inspect.signature(layer_class.forward).parameters:
            raise ParamError(f"EAGLE heads need a Llama-style decoder layer; {layer_class.__name__} is not one")
        config = copy.deepcopy(target.model.config.get_text_config())
        config.num_hidden_layers = 1
        config._attn_implementation = "sdpa"  # the head's own attention, whatever the target's runs
        self.fused_layers = tuple(fused_layers) if fused_layers else None
        if self.fused_layers:
            self.fuse = nn.Linear(len(self.fused_layers) * self.hidden_size, self.hidden_size, bias=False)
        self.fc = nn.Linear(2 * self.hidden_size, self.hidden_size)
        self.layer = layer_class(config, layer_idx=0)
        self.rotary = type(backbone.rotary_emb)(config=config)
        self.match_target(target)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> FeatureHead:
        return cls(target, draft_vocab, config.get("fused_layers"))

    def shape(self) -> dict[str, Any]:
        return {"fused_layers": list(self.fused_layers)} if self.fused_layers else {}

    @property
    def target_features(self) -> bool | tuple[int, ...]:
        """What the target's forwards must record for this head (PrefixCache.record_hidden)."""
        return self.fused_layers or True

    def next_feature(self, output: Tensor) -> Tensor:
        """The part of the head's output that predicts the target's next feature (regressed in training, read back
        at drafted positions): all of it here; FSPAD's head keeps another part for the logits."""
        return output

    def forward(
        self, token_ids: Tensor, features: Tensor, position_ids: Tensor, mask: Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> Tensor:
        """Predicted next features [B, n, H] from tokens x_{t+1} [B, n] and features f_t [B, n, H or kH].

        ``mask`` is an additive [B, 1, n, keys] mask over the cached positions then these (None: causal over
        these n alone).
        """
        if features.shape[-1] != self.hidden_size:  # the target's fused layers, not the head's own output
            features = self.fuse(features)
        embedded = self._frozen[0](token_ids).to(features.dtype)
        x = self.fc(torch.cat([embedded, features], dim=-1))
        return self.layer(x, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                          position_embeddings=self.rotary(x, position_ids))


def save_head(head: LMHeadDrafter, folder: Path, config: dict[str, Any], card: str) -> None:
    """Write the head's folder: config (shape and ``config``), its own weights, the draft vocabulary and the card."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(head.own_state(), str(folder / WEIGHTS_FILE))
    vocab_file = folder / VOCAB_FILE
    if head.draft_vocab is not None:
        save_file({"token_ids": head.draft_vocab.contiguous()}, str(vocab_file))
    elif vocab_file.exists():
        vocab_file.unlink()  # an older head in this folder had one
    shape = {"head": head.kind, "model": head.model_name, "model_type": head.model_type,
             "hidden_size": head.hidden_size, "vocab_size": head.vocab_size,
             "draft_vocab_size": None if head.draft_vocab is None else len(head.draft_vocab), **head.shape()}
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **shape}, indent=1))
    (folder / CARD_FILE).write_text(card)


def load_head(folder: Path | str, target: LoadedModel, kind: type[H] = FeatureHead) -> H:
    """The ``kind`` of head saved in ``folder`` on ``target``; a ParamError naming the training command when it cannot be."""
    folder = Path(folder).expanduser()
    if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise ParamError(f"no {kind.title} head in {folder} ({CONFIG_FILE} and {WEIGHTS_FILE} expected); train one "
                         f"with `{train_command(kind.kind)}`")
    config = json.loads((folder / CONFIG_FILE).read_text())
    if config.get("head", "eagle") != kind.kind:
        raise ParamError(f"{folder} holds a {config.get('head')} head, not a {kind.title} one; train one with "
                         f"`{train_command(kind.kind)}`")
    text_config = target.model.config.get_text_config()
    shape = (text_config.model_type, text_config.hidden_size, target.vocab_size)
    if (config.get("model_type"), config.get("hidden_size"), config.get("vocab_size")) != shape:
        raise ParamError(f"the {kind.title} head in {folder} was trained for {config.get('model')!r} "
                         f"({config.get('model_type')}, hidden {config.get('hidden_size')}, vocabulary "
                         f"{config.get('vocab_size')}), not {target.name}")
    vocab_file = folder / VOCAB_FILE
    draft_vocab = load_file(str(vocab_file))["token_ids"] if vocab_file.is_file() else None
    head = kind.from_config(target, config, draft_vocab)
    head.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=str(target.device)))
    # The draft vocabulary's rows (16k x 576 floats, more than a cache holds) on the products the target's layers
    # were timed fastest with (engine.models.cpu_linear); the head's own small layers stay on F.linear.
    head.row_kernels = by_row_count(target.details.get("row_kernels", {}))
    return head.eval()


def shipped_or_named_head(drafter: str, target: LoadedModel, shipped: dict[str, Path], kind: type[H]) -> H:
    """The ``kind`` head in the folder a decoder's ``drafter`` parameter names, else the one shipped for ``target``."""
    if drafter:
        return load_head(drafter, target, kind)
    folder = shipped.get(target.name)
    if folder is None or not folder.is_dir():
        raise ParamError(f"no {kind.title} head is shipped for {target.name}: train one with "
                         f"`{train_command(kind.kind)}` and pass its folder as drafter")
    return load_head(folder, target, kind)
