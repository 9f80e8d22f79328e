"""The drafters' training losses, each on a batch of self-distilled sequences (``engine.offline.drafter_data``);
the loop that minimises them is ``engine.offline.train_drafter``'s.

EAGLE-1's objective (Li et al. 2024, speculative.md §10): at every answer position the head reads the true feature
``f_t`` (with U(-0.1, 0.1) noise, as the paper's training adds) and the next token, predicts ``f_{t+1}``, and pays
smooth-L1 against the target's true ``f_{t+1}`` plus ``w_cls`` (0.1) times the cross-entropy of the frozen LM head
on its prediction against the target's own next token.

Medusa-1's objective (Cai et al. 2024): at every position whose next token is an answer token, head k reads the
true feature ``f_t`` and pays ``0.8^(k-1)`` times the cross-entropy of the frozen LM head on its output against the
target's own token ``x_{t+k+1}`` (``--heads`` heads).

EAGLE-3's objective (Li et al. 2025): the head reads the target's low, mid and last features fused (the data's three
layers) and pays the LM head's cross-entropy only (no feature regression), under a training-time test: ``--ttt-steps``
unrolled draft steps, step j reading at position t the head's own step-(j-1) output at t - 1 (what drafting feeds it
past the committed context) and attending to the true context up to t - j plus its own earlier steps' outputs on
its path, with weight ``0.8^(j-1)``.

FSPAD's objective (Gui et al. 2024): EAGLE-1's, on a head whose output has two halves (engine.speculative.fspad_head):
the regression on the feature half only, the cross-entropy on the logit half only (partial alignment distillation).

Falcon's objective (Gao et al. 2025): EAGLE-1's, for the feature ``--block`` places ahead, under coupled sequential
glancing distillation (``--glance``): CSGD, the paper's "glancing" after GLAT (Qian et al. 2021). A first forward
without gradient predicts every position's token; in each sequence, ``ratio`` times the number of wrongly predicted
tokens (GLAT's Hamming distance) of input positions are replaced by the truth of their own targets, the feature
``f_{t+k}`` and the token ``x_{t+k+1}`` together ("coupled"), as a prefix of a block (1 to k-1 consecutive positions
from a block's start, "sequential"; the released code glances block starts), and the second forward pays the loss. A
glanced input is seen by the rest of its block, so the block's later outputs learn to lean on the earlier ones' true
values: the intra-block dependency a SAR drafter otherwise misses. Choices where the paper is not specific: the
ratio is constant (``--glance``, 0.3: the released code anneals 0.45 -> 0.1), glanced positions are left out of the
loss (GLAT's rule; their own target is in their input), blocks start at a random offset per sequence so every
alignment is trained (drafting aligns blocks to the context's end), and the loss is EAGLE's (smooth-L1 on the
feature + ``w_cls`` x the LM head's cross-entropy, U(-noise, noise) on the input features) where the released code
also adds a distillation KL. Evaluation (no generator) glances nothing and aligns blocks by row.

PPD's distillation objective (:func:`ppd_loss`, Chen et al. 2024): the frozen target runs a window of a self-distilled
sequence with the prompt tokens attached after several answer positions t at once (one 4D mask: the real tokens
never see them); prompt token i pays ``0.8^(i-1)`` times KL(target || prompt) between the target's own distribution
at position t + i (the same forward's output there, which the prompt tokens cannot change) and its output; the sum
is divided by m, as PPD's DistillationTrainer. Gradients reach the embeddings only. Windows are cut to
:data:`PPD_WINDOW` tokens so a step stays cheap on a CPU; the sliding window of Gemma-style layers is not applied
(windows are shorter than it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from engine.offline.drafter_data import DrafterSequence
from engine.speculative.falcon_head import FalconHead
from engine.speculative.feature_head import FeatureHead
from engine.speculative.medusa_heads import MedusaHeads
from engine.speculative.ppd_prompts import PromptTokens

MEDUSA_DECAY = 0.8  # Medusa's lambda_k = 0.8^(k-1) for head k
PPD_DECAY = 0.8  # PPD's weight 0.8^(i-1) for prompt token i
PPD_WINDOW = 64  # tokens of a training sequence in one forward (the cost of a step grows with it)
PPD_ANCHORS = 16  # answer positions per sequence that get the prompt tokens attached in one training forward


@dataclass(frozen=True)
class Batch:
    tokens: Tensor  # [B, n] x_{t+1}
    features: Tensor  # [B, n, H] f_t (fused: [B, n, 3H], the low, mid and last features side by side)
    next_features: Tensor  # [B, n, H] f_{t+1}
    next_tokens: Tensor  # [B, n] x_{t+2}
    scored: Tensor  # [B, n] bool: answer positions


def make_batch(sequences: list[DrafterSequence], fused: bool = False) -> Batch:
    """Head inputs for positions t = 0 .. n-3 of each sequence, right-padded (a causal head never reads the pads)."""
    width = max(len(s.input_ids) for s in sequences) - 2
    hidden = sequences[0].hidden_last.shape[-1]
    batch = Batch(torch.zeros(len(sequences), width, dtype=torch.long),
                  torch.zeros(len(sequences), width, hidden * (3 if fused else 1)),
                  torch.zeros(len(sequences), width, hidden), torch.zeros(len(sequences), width, dtype=torch.long),
                  torch.zeros(len(sequences), width, dtype=torch.bool))
    for row, s in enumerate(sequences):
        n = len(s.input_ids) - 2
        features = s.hidden_last.float()
        read = torch.cat([s.hidden_low, s.hidden_mid, s.hidden_last], dim=-1).float() if fused else features
        batch.tokens[row, :n] = s.input_ids[1:-1]
        batch.features[row, :n] = read[:-2]
        batch.next_features[row, :n] = features[1:-1]
        batch.next_tokens[row, :n] = s.input_ids[2:]
        batch.scored[row, max(0, s.answer_start - 2): n] = True  # the positions that predict an answer token
    return batch


def eagle_loss(head: FeatureHead, batch: Batch, w_cls: float, noise: float,
               generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """EAGLE-1's loss on a batch and its parts (regression, classification, top-1 accuracy of the drafted token); on
    FSPAD's head, whose output has a feature part and a logit part, its partial alignment distillation."""
    features = batch.features
    if noise:
        features = features + (torch.rand(features.shape, generator=generator) * 2 - 1) * noise
    positions = torch.arange(features.shape[1])[None].expand(features.shape[0], -1)
    predicted = head(batch.tokens, features, positions)[batch.scored]
    regression = F.smooth_l1_loss(head.next_feature(predicted), batch.next_features[batch.scored])
    labels = head.draft_indices(batch.next_tokens[batch.scored])
    logits = head.logits(predicted)
    classification = F.cross_entropy(logits, labels, ignore_index=-1)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    loss = regression + w_cls * classification
    return loss, {"loss": loss.item(), "regression": regression.item(), "cls": classification.item(),
                  "accuracy": accuracy.item()}


def ttt_visible(n: int, step: int) -> Tensor:
    """Which keys a training-time-test query sees at draft step ``step`` (0-based) [n, (step + 1) n]: step 0's keys
    (the true context) up to position t - step, and step i's (1 <= i <= step) key at position t - (step - i)."""
    queries, keys = torch.arange(n)[:, None], torch.arange(n)[None, :]
    blocks = [keys <= queries - step] + [keys == queries - (step - i) for i in range(1, step + 1)]
    return torch.cat(blocks, dim=1)


def eagle3_loss(head: FeatureHead, batch: Batch, steps: int) -> tuple[Tensor, dict[str, float]]:
    """EAGLE-3's loss on a (fused) batch: each unrolled draft step's cross-entropy, weighted 0.8^j, and its accuracy."""
    size, n = batch.tokens.shape
    positions = torch.arange(n)[None].expand(size, -1)
    labels = head.draft_indices(batch.next_tokens)
    cache, features = DynamicCache(), batch.features
    loss = torch.zeros(())
    parts: dict[str, float] = {}
    for step in range(steps):
        visible = ttt_visible(n, step)
        mask = torch.zeros(visible.shape).masked_fill_(~visible, torch.finfo(torch.float32).min)
        out = head(batch.tokens, features, positions, mask[None, None].expand(size, -1, -1, -1), cache)
        scored = batch.scored.clone()
        scored[:, :step] = False  # fewer than ``step`` positions before: no draft reaches this far
        logits, target = head.logits(out[scored]), labels[scored]
        ce = F.cross_entropy(logits, target, ignore_index=-1)
        loss = loss + MEDUSA_DECAY**step * ce
        parts[f"cls{step + 1}"] = ce.item()
        parts[f"accuracy{step + 1}"] = (logits.argmax(-1) == target).float().mean().item()
        features = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], dim=1)  # step j + 1 at t reads out_j(t - 1)
    return loss, {"loss": loss.item(), **parts}


def medusa_targets(sequences: list[DrafterSequence], heads: int) -> tuple[Tensor, Tensor]:
    """Features ``f_t`` [N, H] of every position whose next token is an answer token (and has one after it), and the
    tokens ``x_{t+k+1}`` [N, heads] that head k predicts there (-1 past the sequence's end)."""
    features, labels = [], []
    for s in sequences:
        n = len(s.input_ids)
        positions = torch.arange(max(0, s.answer_start - 1), n - 2)
        ahead = positions[:, None] + torch.arange(2, heads + 2)[None]
        labels.append(torch.where(ahead < n, s.input_ids[ahead.clamp(max=n - 1)], -1))
        features.append(s.hidden_last[positions].float())
    return torch.cat(features), torch.cat(labels)


def medusa_loss(heads: MedusaHeads, sequences: list[DrafterSequence]) -> tuple[Tensor, dict[str, float]]:
    """Medusa-1's loss on ``sequences`` and its parts (each head's cross-entropy and top-1 accuracy)."""
    features, labels = medusa_targets(sequences, heads.heads)
    predicted = heads(features)
    loss = torch.zeros(())
    parts: dict[str, float] = {}
    for k in range(heads.heads):
        target = torch.where(labels[:, k] >= 0, heads.draft_indices(labels[:, k].clamp(min=0)), -1)
        logits = heads.logits(predicted[k])
        ce = F.cross_entropy(logits, target, ignore_index=-1)
        loss = loss + MEDUSA_DECAY**k * ce
        scored = target >= 0
        parts[f"cls{k + 1}"] = ce.item()
        parts[f"accuracy{k + 1}"] = (logits.argmax(-1)[scored] == target[scored]).float().mean().item()
    return loss, {"loss": loss.item(), **parts}


# ---------------------------------------------------------------- Falcon: CSGD


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


# ---------------------------------------------------------------- PPD


def ppd_loss(prompts: PromptTokens, sequences: list[DrafterSequence],
             generator: torch.Generator | None) -> tuple[Tensor, dict[str, float]]:
    """PPD's distillation loss on ``sequences`` and its parts (each prompt token's KL and top-1 agreement with the
    target); ``generator`` draws the windows and anchors (None: the last window, evenly spread anchors)."""
    m, e = prompts.prompt_tokens, prompts.ensemble
    windows, anchors = zip(*(_window(s, m, generator) for s in sequences))
    width = max(len(w) for w in windows)
    riders = PPD_ANCHORS * e * m
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    positions = torch.zeros(len(windows), width + riders, dtype=torch.long)
    visible = torch.zeros(len(windows), width + riders, width + riders, dtype=torch.bool)
    for row, (window, points) in enumerate(zip(windows, anchors)):
        ids[row, : len(window)] = window
        positions[row, :width] = torch.arange(width)
        visible[row, :width, :width] = torch.ones(width, width, dtype=torch.bool).tril()
        for a in range(PPD_ANCHORS):
            t = points[a] if a < len(points) else 0  # a missing anchor: riders at 0, never scored
            for chain in range(e):
                start = width + (a * e + chain) * m
                rows = slice(start, start + m)
                positions[row, rows] = torch.arange(t + 1, t + 1 + m)
                visible[row, rows, : t + 1] = True
                visible[row, rows, rows] = torch.ones(m, m, dtype=torch.bool).tril()
    target = prompts._target
    embedded = target.model.get_input_embeddings()(ids.to(target.device))
    attached = prompts.embeddings.repeat(PPD_ANCHORS, 1, 1).flatten(0, 1)  # [PPD_ANCHORS * e * m, H]
    inputs = torch.cat([embedded, attached[None].expand(len(windows), -1, -1)], dim=1)
    mask = torch.zeros(visible.shape, dtype=inputs.dtype).masked_fill_(~visible, torch.finfo(inputs.dtype).min)
    hidden = target.model.get_decoder()(inputs_embeds=inputs, attention_mask=mask[:, None].to(target.device),
                                        position_ids=positions.to(target.device)).last_hidden_state
    scored = torch.tensor([[a < len(points) for a in range(PPD_ANCHORS)] for points in anchors])  # [B, PPD_ANCHORS]
    at = torch.tensor([[(points + [0] * PPD_ANCHORS)[a] for a in range(PPD_ANCHORS)] for points in anchors])
    rows = torch.arange(len(windows))[:, None, None]
    teacher_rows = (at[:, :, None] + torch.arange(1, m + 1)).clamp(max=width - 1)  # the target's output at t + i
    with torch.no_grad():
        teacher = prompts.logits(hidden[rows, teacher_rows.to(hidden.device)][scored]).float().log_softmax(-1)
    student = prompts.logits(hidden[:, width:].unflatten(1, (PPD_ANCHORS, e, m)).mean(2)[scored]).float()
    student = student.log_softmax(-1)  # [N, m, V']: the ensemble chains' mean logits, PPD's mean aggregation
    loss = torch.zeros(())
    parts: dict[str, float] = {}
    for i in range(m):
        kl = F.kl_div(student[:, i], teacher[:, i], log_target=True, reduction="batchmean")
        loss = loss + PPD_DECAY**i * kl
        parts[f"kl{i + 1}"] = kl.item()
        parts[f"accuracy{i + 1}"] = (student[:, i].argmax(-1) == teacher[:, i].argmax(-1)).float().mean().item()
    loss = loss / m
    return loss, {"loss": loss.item(), **parts}


def _window(sequence: DrafterSequence, m: int, generator: torch.Generator | None) -> tuple[Tensor, list[int]]:
    """A window of at most PPD_WINDOW tokens ending in the answer, and up to PPD_ANCHORS answer positions t in it
    (window indices) with m tokens after them."""
    ids = sequence.input_ids
    latest = max(len(ids) - PPD_WINDOW, 0)  # the last window start
    earliest = min(max(sequence.answer_start - PPD_WINDOW // 2, 0), latest)  # half a window of answer at least
    start = int(torch.randint(earliest, latest + 1, (1,), generator=generator)) if generator else latest
    window = ids[start: start + PPD_WINDOW]
    first, last = max(sequence.answer_start - 1 - start, 0), len(window) - 1 - m
    if last < first:
        return window, []
    choices = torch.arange(first, last + 1)
    if generator is None:
        picks = torch.linspace(0, len(choices) - 1, min(PPD_ANCHORS, len(choices))).round().long()
    else:
        picks = torch.randperm(len(choices), generator=generator)[:PPD_ANCHORS].sort().values
    return window, choices[picks].tolist()
