"""GIFT (gaze shift guided attention; amazon-science/GIFT, arXiv 2510.22067) on text: context + query prompts.

The prompt is a context (a passage; for a vision-language model the image) followed by a query. One plain forward
over the prompt measures the *gaze shift*: in the saliency layers, how much attention to each context token rises
as each content word of the query is read, Δ = ReLU(A[i, v] − A[i−1, v]), over the half of the heads that shift
most. Its mean, clipped to μ ± 3σ and scaled to [0, 1], gives the saliency ŝ and the factors S = exp(α ŝ).
Greedy decoding then runs with the last query row of the enhancement layers edited after the softmax: the half of
the heads that look at the context most have their context weights multiplied by S, the half that look at the
query most have their query weights multiplied by r (the context boost ratio), and the rows are renormalised.
α = 0 leaves every weight as it was, so the run equals plain greedy decoding.

The edit runs inside the explorer's registered attention function (engine.attention), so any architecture that
dispatches attention through transformers' registry is supported.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from engine.attention import AttentionHooks, attention_hooks
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, TokenHook, autoregressive
from engine.events import AttentionMap, DecoderMetric, Event, Steering, TokenStep
from engine.models.handle import LoadedModel
from engine.models.vision import image_token_id
from engine.params import Param, ParamError
from engine.processing import kl_divergence
from engine.prompt_spans import PromptSpans, marked_spans

# Query words that carry no content (GIFT keeps nouns, verbs, adjectives, adverbs and numbers via spaCy; a stopword
# list stands in for the tagger here).
STOPWORDS = frozenset(
    """a an the of to in on at by for from with and or but nor so is are was were be been being am do does did
    done have has had having what which who whom whose when where why how this that these those it its as if than
    then there here i you he she we they me him her us them my your his our their mine yours not no yes can could
    should would will shall may might must about into onto over under up down out off again also very just only
    any all some each every other such own same too most more less few many much please tell say give answer
    question context according""".split()
)
ENHANCE_DEPTH = (0.4, 0.7)  # GIFT enhances LLaVA-1.5-7B's layers 12-22 of 32; saliency comes from the layer below


@dataclass(frozen=True)
class Saliency:
    """ŝ over the prompt positions (0 outside the context), the context factors S, and the gaze shift rows."""

    normalized: Tensor  # [prompt length]
    scale: Tensor  # [context length], S = exp(alpha * ŝ)
    gaze: Tensor  # [kept query tokens, prompt length]: mean Δ over the selected layers and heads
    query_tokens: list[int]


@dataclass
class StepEdits:
    """What the enhancement hook did during one forward, per enhanced layer."""

    layers: list[int] = field(default_factory=list)
    context_heads: list[list[int]] = field(default_factory=list)
    query_heads: list[list[int]] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    mass_before: list[float] = field(default_factory=list)
    mass_after: list[float] = field(default_factory=list)


def content_positions(model: LoadedModel, ids: list[int], positions: range) -> list[int]:
    """Query positions whose token holds a content word (letters or digits, not a stopword)."""
    kept = []
    for position in positions:
        word = model.token_text(ids[position]).strip().lower()
        if re.search(r"[^\W_]", word) and re.sub(r"[^\w]", "", word) not in STOPWORDS:
            kept.append(position)
    return kept


def gaze_shift_saliency(
    weights: dict[int, Tensor], spans: PromptSpans, query_tokens: list[int], alpha: float, prompt_length: int
) -> Saliency:
    """GIFT's saliency from per-layer prompt attention ``weights[layer]`` = [heads, queries, keys]."""
    context = slice(spans.context.start, spans.context.stop)
    rows, previous = torch.tensor(query_tokens), torch.tensor(query_tokens) - 1
    deltas = []
    for layer in sorted(weights):
        attention = weights[layer].float()
        delta = (attention[:, rows, context] - attention[:, previous, context]).clamp(min=0)  # [H, n, C]
        heads = delta.sum(dim=(1, 2)).topk(max(1, attention.shape[0] // 2)).indices
        deltas.append(delta[heads])
    delta = torch.cat(deltas)  # [selected heads over layers, n, C]
    shift = delta.mean(dim=(0, 1))
    mean, spread = shift.mean(), shift.std(correction=0)
    shift = shift.clamp(mean - 3 * spread, mean + 3 * spread)
    span = shift.max() - shift.min()
    normalized_context = (shift - shift.min()) / span if span > 0 else torch.zeros_like(shift)
    normalized = torch.zeros(prompt_length)
    normalized[context] = normalized_context
    gaze = torch.zeros(len(query_tokens), prompt_length)
    gaze[:, context] = delta.mean(dim=0)
    return Saliency(normalized, torch.exp(alpha * normalized_context), gaze, query_tokens)


def amplify_last_row(weights: Tensor, scale: Tensor, spans: PromptSpans, edits: StepEdits, layer: int) -> Tensor:
    """GIFT's edit of the last query row of ``weights`` [1, heads, queries, keys]; the step is noted in ``edits``."""
    context = slice(spans.context.start, spans.context.stop)
    query = slice(spans.query.start, spans.query.stop)
    row = weights[0, :, -1, :]  # [H, K]
    half = max(1, row.shape[0] // 2)
    context_heads = row[:, context].sum(-1).topk(half).indices
    query_heads = row[:, query].sum(-1).topk(half).indices
    new = row.clone()
    new[context_heads, context] = row[context_heads, context] * scale.to(row.dtype)
    ratio = new[context_heads, context].sum() / row[context_heads, context].sum().clamp(min=1e-30)
    new[query_heads, query] = row[query_heads, query] * ratio
    new = new / new.sum(-1, keepdim=True)
    edited = weights.clone()
    edited[0, :, -1, :] = new
    edits.layers.append(layer)
    edits.context_heads.append(sorted(context_heads.tolist()))
    edits.query_heads.append(sorted(query_heads.tolist()))
    edits.ratios.append(float(ratio))
    edits.mass_before.append(float(row[:, context].sum(-1).mean()))
    edits.mass_after.append(float(new[:, context].sum(-1).mean()))
    return edited


def layer_list(text: str, num_layers: int, name: str) -> list[int]:
    """``"12-22"`` or ``"3,5,7"`` -> layer indices, checked against the model's depth."""
    layers: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(\d{1,6})(?:-(\d{1,6}))?", part)  # no model has a million layers
        if not match:
            raise ParamError(f"{name} takes layer indices like '12-22' or '3,5,7', not {text!r}")
        first, last = int(match[1]), int(match[2] or match[1])
        if max(first, last) >= num_layers:  # checked first: '0-99999999999' must not build a list that long
            raise ParamError(f"{name}={text!r} names a layer past the model's last one ({num_layers - 1})")
        layers.extend(range(first, last + 1))
    return sorted(set(layers))


def default_layers(num_layers: int) -> tuple[list[int], list[int]]:
    """(saliency layers, enhancement layers) at GIFT's relative depths."""
    start = max(1, round(ENHANCE_DEPTH[0] * num_layers))
    stop = min(num_layers, max(start + 1, round(ENHANCE_DEPTH[1] * num_layers)))
    return [start - 1], list(range(start, stop))


class Gift(TokenHook):
    """Greedy with the enhancement layers' last row amplified; a plain run, teacher-forced on the same tokens,
    beside it for the divergence and the KL."""

    model_calls = 2  # the steered forward and the plain one

    def __init__(self, ctx: DecodeContext) -> None:
        params, model = ctx.params, ctx.model
        self.model = model
        self.spans = marked_spans(model, ctx.prompt_ids, params["context_marker"], params["query_marker"],
                                  image_token_id(model))
        saliency_layers, enhance_layers = default_layers(model.num_layers)
        self.saliency_layers = layer_list(params["saliency_layers"], model.num_layers, "saliency_layers") or saliency_layers
        self.enhance_layers = layer_list(params["enhance_layers"], model.num_layers, "enhance_layers") or enhance_layers
        query_tokens = content_positions(model, ctx.prompt_ids, self.spans.query) if params["content_words_only"] else []
        self.query_tokens = query_tokens or list(self.spans.query)
        self.plain_cache = model.new_cache()
        self.divergence = -1

    def start(self, ctx: DecodeContext) -> Iterator[Event]:
        """The plain forward over the prompt: the gaze shift, and the prefill of the plain run."""
        self.model.use_explorer_attention()
        began = time.perf_counter()
        observed: dict[int, Tensor] = {}
        layers = self.saliency_layers
        observe = AttentionHooks(observe=lambda layer, w: observed.__setitem__(layer, w[0]) if layer in layers else None)
        with attention_hooks(observe):
            plain = self.model.forward(torch.tensor([ctx.prompt_ids]), self.plain_cache, inputs=ctx.prompt_inputs)
        self.plain_logits = plain.logits[0, -1]
        self.saliency = gaze_shift_saliency(observed, self.spans, self.query_tokens, ctx.params["alpha"],
                                            len(ctx.prompt_ids))
        yield _saliency_maps(self.saliency, layers, len(ctx.prompt_ids), time.perf_counter() - began)

    def steer(self, length: int) -> AttentionHooks:
        edits = self.edits = StepEdits()
        scale, spans, layers = self.saliency.scale, self.spans, self.enhance_layers
        return AttentionHooks(
            edit=lambda layer, w: amplify_last_row(w, scale, spans, edits, layer) if layer in layers else w
        )

    def report(self, step: Step, token: int) -> Iterator[Event]:
        plain_top = int(self.plain_logits.argmax())
        if step.position == 0 or (self.divergence < 0 and plain_top != token):
            self.divergence = step.position if plain_top != token else self.divergence
            yield DecoderMetric("first_divergence_from_plain", self.divergence,
                                "first step where plain greedy (same prefix) would take another token; -1 = none")
        edits = self.edits
        yield Steering(
            step=step.position, layers=edits.layers, context_heads=edits.context_heads, query_heads=edits.query_heads,
            ratios=edits.ratios, context_mass_before=edits.mass_before, context_mass_after=edits.mass_after,
            plain_token_id=plain_top, kl_from_plain=kl_divergence(self.plain_logits, step.logits),
        )

    def advance(self, event: TokenStep) -> None:
        # the plain run, teacher-forced on the steered run's token
        self.plain_logits = self.model.forward(torch.tensor([[event.token_id]]), self.plain_cache).logits[0, -1]


def gift(ctx: DecodeContext) -> Iterator[Event]:
    return autoregressive(ctx, Gift(ctx))


def _saliency_maps(saliency: Saliency, layers: list[int], prompt_length: int, seconds: float) -> AttentionMap:
    """The saliency ŝ as a one-row map over the prompt, with the gaze-shift rows of the kept query tokens below it."""
    data = torch.cat([saliency.normalized[None], saliency.gaze]).to(torch.float16).numpy().astype(np.float16)
    return AttentionMap(
        step=0, layers=layers, head_reduction="top half by gaze shift", layer_reduction="mean",
        query_positions=[prompt_length - 1, *saliency.query_tokens], shape=[1, data.shape[0], prompt_length],
        data=data.tobytes(), name="saliency",
    )


SPEC = register(
    DecoderSpec(
        name="gift",
        family="guided",
        summary="GIFT: greedy decoding with attention amplified towards the salient context and the query.",
        params=(
            Param("alpha", "float", 5.0, "Saliency strength: context weights scale by exp(alpha * saliency) "
                  "(0 = no amplification, equals greedy; GIFT uses 5 for LLaVA-1.5, 4 for Qwen2-VL).", 0.0, 20.0),
            Param("context_marker", "str", "Context:", "Text that opens the context (passage) in the prompt; "
                  "without it the context is everything before the query."),
            Param("query_marker", "str", "Question:", "Text that opens the query in the prompt (required)."),
            Param("saliency_layers", "str", "", "Layers the gaze shift is measured in, e.g. '11' or '10-11' "
                  "(empty = the layer below the enhanced ones)."),
            Param("enhance_layers", "str", "", "Layers whose attention is amplified, e.g. '12-22' "
                  "(empty = 40% to 70% of the depth, as GIFT's LLaVA setting)."),
            Param("content_words_only", "bool", True, "Measure the gaze shift only while content words of the query "
                  "are read (GIFT keeps nouns, verbs, adjectives, adverbs, numbers)."),
        ),
        run=gift,
        accepts_images=True,
    )
)
