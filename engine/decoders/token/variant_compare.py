"""A model variant decoded step by step beside its base: the companion run of compressed, pruned or searched models.

The run's model is the BASE; the ``variant`` parameter names the VARIANT, a model with the base's tokenizer (a
derived variant's name or folder, any listed model, or empty for the base itself). The variant chooses every token
(greedily, or by sampling at a temperature) and its distribution is each TokenStep's; the base, with its own KV
cache, is teacher-forced on the same tokens. Each step records a VariantStep: KL(p_base || p_variant), whether the
two top-1 tokens agree, the rank of the base's top-1 under the variant and of the chosen token under the base, and
both entropies; the run's metrics are the mean KL, the agreement and the first step where the base's top-1 differs
from the chosen token. The same shape as ``kv_compress``, whose reference is the full cache of one model.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.decoding import Step, Tally, TokenHook, autoregressive, rank_of
from engine.events import Event, VariantStep
from engine.params import Param
from engine.processing import entropy
from engine.shared_params import PIPELINE_PARAMS
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import tokenizer_twin
from engine.speculative.rounds import Sampling

_TEMPERATURE = next(p for p in PIPELINE_PARAMS if p.name == "temperature")
PARAMS = (
    Param("variant", "str", "", "The variant that picks the tokens: any model the model list shows (a derived "
          "variant's name, a built-in) or a model folder, with the base's tokenizer. Empty = the base itself (KL 0: "
          "a check of the comparison).", loads_files=True),
    replace(_TEMPERATURE, default=0.0, min=0.0, help="0 = the variant decodes greedily; > 0 = it samples at this "
            "temperature."),
)


class VariantChooses(TokenHook):
    """The loop runs the variant on its own cache; the base's cache follows the chosen tokens one step behind."""

    def __init__(self, ctx: DecodeContext) -> None:
        name = ctx.params["variant"].strip()
        self.variant = tokenizer_twin(name, ctx.model, "variant") if name else ctx.model
        self.sampling = Sampling.of(ctx)
        self.stages = self.sampling.stages
        self.own = PrefixCache(self.variant)
        self.base = PrefixCache(ctx.model)
        self.prompt_inputs = ctx.prompt_inputs
        self.tally = Tally("variant", "base", "variant", "base model")

    def start(self, ctx: DecodeContext) -> Iterator[Event]:
        if ctx.attention is not None:  # the loop switches the base's attention for the capture; the variant runs it
            self.variant.use_explorer_attention()
        return iter(())

    def cache(self, own: PrefixCache) -> PrefixCache:
        return self.own

    def choose(self, step: Step) -> int:
        return self.sampling.choose(step.processed.logprobs[0])

    def report(self, step: Step, token: int) -> Iterator[Event]:
        began = time.perf_counter()
        inputs = self.prompt_inputs if step.position == 0 else None  # the prefill's extra inputs (a VLM's pixels)
        base = self.base.forward(self.base.sync(step.context), inputs=inputs, keep=1).logits[0, -1]
        variant = step.logits
        kl, base_top, agree = self.tally.add(step.position, base, variant, token)
        yield VariantStep(
            step=step.position, variant=self.variant.name, kl=kl, top1_agree=agree, base_top=base_top,
            variant_top=int(variant.argmax()), base_top_rank=rank_of(variant, base_top),
            token_base_rank=rank_of(base, token), token_base_logprob=float(base.log_softmax(-1)[token]),
            base_entropy=float(entropy(base)), variant_entropy=float(entropy(variant)),
            seconds=time.perf_counter() - began,
        )


def variant_compare(ctx: DecodeContext) -> Iterator[Event]:
    hook = VariantChooses(ctx)
    ctx.on_finish(hook.tally.metrics)
    return autoregressive(ctx, hook)


SPEC = register(
    DecoderSpec(
        name="variant_compare",
        family="token",
        summary="Decode with a model variant (quantised, pruned, searched: the variant parameter) while the run's "
                "model, the base, reads the same tokens: KL, top-1 agreement, ranks and first divergence per step.",
        params=PARAMS,
        run=variant_compare,
    )
)
