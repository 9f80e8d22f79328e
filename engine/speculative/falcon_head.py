"""Falcon's semi-autoregressive drafter (Gao et al., AAAI 2025, arXiv 2412.12639; speculative.md §10) and its
Coupled Sequential Glancing Distillation (CSGD).

The head reads what EAGLE's reads, ``FC([embed(x_{t+1}); f_t])`` (2H -> H) with ``f_t`` the target's last hidden
state after the final norm, but runs it through TWO decoder layers of the target's own architecture and width, and
head position t predicts the feature ``f_{t+k}`` ``k`` places ahead (k = ``block``, 2 by default) instead of the
next one. So ONE forward over a block of k positions drafts k tokens: after the committed context
``x_0 .. x_n`` (features ``f_0 .. f_{n-1}`` known), positions n-k .. n-1 predict ``f_n .. f_{n+k-1}``, whose LM-head
logits give ``x_{n+1} .. x_{n+k}``; the next block forward reads those predicted features and drafted tokens at
positions n .. n+k-1 and drafts ``x_{n+k+1} .. x_{n+2k}``, and so on. Tokens come from the target's frozen LM head
(over a reduced draft vocabulary's rows when the head has one), as for every :class:`LMHeadDrafter`.

Attention (a reading of the paper's SAR mask that keeps a KV cache exact; the released code's mask lets every
position of an aligned block see the whole block in every layer): every layer but the last attends causally, and
the last layer's queries also see the rest of their own block. A block's inputs are all known when it runs (the
committed tail, or the block drafted by the previous forward), so each of its k outputs reads all of them; keys and
values never depend on the block partition (the last layer's come from causal states), so the cached committed
positions stay valid however many tokens a round commits, which need not be a multiple of k.

Training: CSGD (``engine.offline.drafter_losses.falcon_loss``).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import Tensor, nn
from transformers import DynamicCache

from engine.models.handle import LoadedModel
from engine.params import ParamError
from engine.speculative.feature_head import LMHeadDrafter


class FalconHead(LMHeadDrafter):
    """Falcon's drafter for ``target``: ``layers`` decoder layers drafting ``block`` tokens per forward."""

    kind, title = "falcon", "Falcon"
    target_features = True  # the target's forwards record their last hidden state (EagleDrafter reads it)

    def __init__(self, target: LoadedModel, draft_vocab: Tensor | None = None, block: int = 2, layers: int = 2) -> None:
        super().__init__(target, draft_vocab)
        if block < 1 or layers < 1:
            raise ParamError(f"a Falcon head needs a block and layers of at least 1, not {block} and {layers}")
        backbone = target.model.get_decoder()
        layer_class = type(backbone.layers[0])
        if "position_embeddings" not in inspect.signature(layer_class.forward).parameters:
            raise ParamError(f"Falcon heads need a Llama-style decoder layer; {layer_class.__name__} is not one")
        config = copy.deepcopy(target.model.config.get_text_config())
        config.num_hidden_layers = layers
        config._attn_implementation = "sdpa"  # the head's own attention, whatever the target's runs
        self.block = block
        self.fc = nn.Linear(2 * self.hidden_size, self.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, layer_idx=i) for i in range(layers))
        self.rotary = type(backbone.rotary_emb)(config=config)
        self.match_target(target)

    @classmethod
    def from_config(cls, target: LoadedModel, config: dict[str, Any], draft_vocab: Tensor | None) -> FalconHead:
        return cls(target, draft_vocab, config["block"], config["layers"])

    def shape(self) -> dict[str, Any]:
        return {"block": self.block, "layers": len(self.layers)}

    def forward(self, token_ids: Tensor, features: Tensor, position_ids: Tensor, causal: Tensor, whole_block: Tensor,
                cache: DynamicCache | None = None) -> Tensor:
        """Predicted features [B, n, H], ``block`` places ahead, from tokens x_{t+1} [B, n] and features f_t [B, n, H].

        ``causal`` and ``whole_block`` are additive [B, 1, n, keys] masks over the cached positions then these: the
        first for every layer but the last, the second for the last.
        """
        embedded = self._frozen[0](token_ids).to(features.dtype)
        x = self.fc(torch.cat([embedded, features], dim=-1))
        rotary = self.rotary(x, position_ids)
        for index, layer in enumerate(self.layers):
            mask = whole_block if index == len(self.layers) - 1 else causal
            x = layer(x, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=cache is not None,
                      position_embeddings=rotary)
        return x
