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

CSGD (the paper's "glancing" after GLAT, Qian et al. 2021): a first forward without gradient predicts every
position's token; in each sequence, ``ratio`` times the number of wrongly predicted tokens (GLAT's Hamming
distance) of input positions are replaced by the truth of their own targets, the feature ``f_{t+k}`` and the token
``x_{t+k+1}`` together ("coupled"), as a prefix of a block (1 to k-1 consecutive positions from a block's start,
"sequential"; the released code glances block starts), and the second forward pays the loss. A glanced input is
seen by the rest of its block, so the block's later outputs learn to lean on the earlier ones' true values: the
intra-block dependency a SAR drafter otherwise misses. Choices where the paper is not specific: the ratio is
constant (``--glance``, 0.3: the released code anneals 0.45 -> 0.1), glanced positions are left out of the loss
(GLAT's rule; their own target is in their input), blocks start at a random offset per sequence so every alignment
is trained (drafting aligns blocks to the context's end), and the loss is EAGLE's (smooth-L1 on the feature +
``w_cls`` x the LM head's cross-entropy, U(-noise, noise) on the input features) where the released code also adds
a distillation KL. Evaluation (no generator) glances nothing and aligns blocks by row.
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache

from engine.models.handle import LoadedModel
from engine.params import ParamError
from engine.speculative.feature_head import LMHeadDrafter

if TYPE_CHECKING:  # the trainer imports this module
    from engine.offline.train_drafter import Batch


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


# ---------------------------------------------------------------- training: CSGD


def block_visible(n: int, block: int, offset: int) -> Tensor:
    """[n, n] bool: query t sees key s when s is at most the last position of t's block (blocks of ``block``
    positions starting at ``offset``, after a shorter first one)."""
    positions = torch.arange(n)
    ends = offset + ((positions - offset) // block + 1) * block - 1
    return positions[None, :] <= ends[:, None]


def glancing_mask(wrong: Tensor, scored: Tensor, offsets: list[int], block: int, ratio: float,
                  generator: torch.Generator) -> Tensor:
    """[B, n] bool: the input positions CSGD replaces by their targets' truth.

    Row r glances ``int(ratio * wrong scored positions)`` positions (fewer when its blocks run out): prefixes of 1 to
    ``block - 1`` positions of whole blocks (starting at ``offsets[r]`` mod ``block``) whose positions are all scored,
    blocks drawn at random without repeats.
    """
    glanced = torch.zeros_like(scored)
    if block < 2:
        return glanced  # a one-token block has no later position to glance for
    n = scored.shape[1]
    for row, offset in enumerate(offsets):
        budget = int(ratio * int((wrong[row] & scored[row]).sum()))
        starts = [s for s in range(offset, n - block + 1, block) if bool(scored[row, s: s + block].all())]
        for pick in torch.randperm(len(starts), generator=generator).tolist():
            if budget <= 0:
                break
            length = min(budget, 1 + int(torch.randint(block - 1, (1,), generator=generator)))
            glanced[row, starts[pick]: starts[pick] + length] = True
            budget -= length
    return glanced


def additive(visible: Tensor) -> Tensor:
    """An additive attention mask (0 where visible, the dtype's minimum elsewhere) of a float32 bool matrix."""
    return torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)


def falcon_loss(head: FalconHead, batch: Batch, w_cls: float, noise: float, ratio: float,
                generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """CSGD's loss on a ``make_batch`` batch and its parts (regression, classification, top-1 accuracy by place in
    the block, share of glanced positions); no generator: evaluation, without noise or glances."""
    k = head.block
    size, n = batch.tokens.shape
    # position t's target is k places ahead: make_batch's next-step targets shifted left by k - 1
    target_features = _shift(batch.next_features, k - 1)
    target_tokens, scored = _shift(batch.next_tokens, k - 1), _shift(batch.scored, k - 1)
    labels = head.draft_indices(target_tokens)
    offsets = (torch.randint(k, (size,), generator=generator) if generator is not None
               else torch.arange(size) % k).tolist()
    causal = additive(torch.ones(n, n, dtype=torch.bool).tril())[None, None].expand(size, -1, -1, -1)
    whole_block = torch.stack([additive(block_visible(n, k, o)) for o in offsets])[:, None]
    features = batch.features
    if noise and generator is not None:
        features = features + (torch.rand(features.shape, generator=generator) * 2 - 1) * noise
    positions = torch.arange(n)[None].expand(size, -1)
    glanced = torch.zeros_like(scored)
    if generator is not None and ratio:
        with torch.no_grad():
            first = head.logits(head(batch.tokens, features, positions, causal, whole_block)).argmax(-1)
        glanced = glancing_mask(first != labels, scored, offsets, k, ratio, generator)
    tokens = torch.where(glanced, target_tokens, batch.tokens)
    features = torch.where(glanced[..., None], target_features, features)
    predicted = head(tokens, features, positions, causal, whole_block)
    kept = scored & ~glanced
    regression = F.smooth_l1_loss(predicted[kept], target_features[kept])
    logits = head.logits(predicted[kept])
    classification = F.cross_entropy(logits, labels[kept], ignore_index=-1)
    loss = regression + w_cls * classification
    correct = torch.zeros_like(kept)
    correct[kept] = logits.argmax(-1) == labels[kept]
    places = {f"accuracy{i + 1}": _share(correct, kept & (_place(n, k, offsets) == i)) for i in range(k)}
    return loss, {"loss": loss.item(), "regression": regression.item(), "cls": classification.item(),
                  "accuracy": _share(correct, kept), **places, "glanced": _share(glanced, scored)}


def _shift(values: Tensor, by: int) -> Tensor:
    """``values`` [B, n, ...] moved ``by`` places left along n, the freed end zero (False)."""
    shifted = torch.zeros_like(values)
    shifted[:, : values.shape[1] - by] = values[:, by:]
    return shifted


def _place(n: int, block: int, offsets: list[int]) -> Tensor:
    """[B, n]: each position's place in its block (0 = first)."""
    return (torch.arange(n)[None] - torch.tensor(offsets)[:, None]) % block


def _share(hits: Tensor, among: Tensor) -> float:
    return (hits & among).sum().item() / max(1, among.sum().item())
