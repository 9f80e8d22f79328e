"""Speculative decoding with a draft model whose tokenizer differs from the target's (lossless).

Greedy: Universal Assisted Generation (transformers' ``AssistedCandidateGeneratorDifferentTokenizers``; UAG blog
2024). The drafter decodes greedily in its own vocabulary; its tokens are decoded to text and re-encoded into target
ids together with the last ``lookbehind`` committed target tokens, so tokens merge across the boundary as the
target's tokenizer merges them (:func:`engine.speculative.vocab_map.encode_continuation`). The target ids are a
deterministic draft verified by greedy matching, so the output equals greedy decoding.

Sampling: Universal Speculative Decoding (Timor et al., ICML 2025). Draft tokens are mapped to the target token
spelling the same text (``Ġ``/``▁`` normalised, :class:`~engine.speculative.vocab_map.VocabMap`); tokens without a
twin are suppressed; the draft samples from its processed, suppressed distribution, which, moved onto the target
vocabulary, is the ``q`` that standard speculative sampling (accept with min(1, p/q)) needs: lossless.

Either way the drafter's own cache follows the committed text: each round the committed target text is re-encoded
with the draft's tokenizer and its PrefixCache rolls back to the longest common prefix.
"""

from __future__ import annotations

from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import load_draft_model
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds
from engine.speculative.vocab_map import VocabMap, decode_continuation, encode_continuation


class CrossTokenizerDrafter(Drafter):
    """Drafts with a model of another tokenizer: by text for greedy rounds, by vocabulary map for sampled ones."""

    source = "draft_model"

    def __init__(
        self, target: LoadedModel, draft: LoadedModel, sampling: Sampling, num_draft_tokens: int, lookbehind: int
    ) -> None:
        self.target = target
        self.draft = draft
        self.cache = PrefixCache(draft)
        self.sampling = sampling
        self.num_draft_tokens = num_draft_tokens
        self.lookbehind = lookbehind
        self.vocab_map = None if sampling.greedy else VocabMap(draft, target)
        self.draft_eos = draft.eos_token_ids

    def draft_context(self, context: list[int]) -> list[int]:
        """The committed target tokens as the draft's tokenizer spells them (with its own BOS, if it adds one)."""
        text = self.target.decode(context, skip_special_tokens=True)
        return [int(i) for i in self.draft.tokenizer(text, add_special_tokens=True)["input_ids"]]

    def propose(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.num_draft_tokens, max_depth)
        if not k:
            return Draft([], [])
        if self.vocab_map is None:
            return self._propose_text(context, k, max_depth)
        return self._propose_mapped(context, k)

    def _propose_text(self, context: list[int], k: int, max_depth: int) -> Draft:
        draft_context = self.draft_context(context)
        feed = self.cache.sync(draft_context)
        drafted: list[int] = []
        for _ in range(k):
            token = int(self.cache.forward(feed, keep=1).logits[0, -1].argmax())
            if token in self.draft_eos:  # the draft's end of text has no spelling the target could verify
                break
            drafted.append(token)
            feed = [token]
        text = decode_continuation(self.draft, draft_context, drafted, self.lookbehind)
        tokens = encode_continuation(self.target, context, text, self.lookbehind)[:max_depth]
        # a deterministic draft: q is the one-hot on each token
        return Draft(tokens, [1.0] * len(tokens), calls=len(drafted) + (len(drafted) < k))

    def _propose_mapped(self, context: list[int], k: int) -> Draft:
        assert self.vocab_map is not None
        feed = self.cache.sync(self.draft_context(context))
        tokens: list[int] = []
        probs: list[float] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = self.vocab_map.suppress_absent(self.cache.forward(feed, keep=1).logits[0, -1])
            logprobs = self.sampling.process(logits).logprobs
            token = self.sampling.choose(logprobs)
            q = self.vocab_map.to_target(logprobs)
            tokens.append(int(self.vocab_map.draft_to_target[token]))
            probs.append(float(q[tokens[-1]].exp()))
            rows.append(q)
            feed = [token]
        return Draft(tokens, probs, torch.stack(rows), calls=k)


def assisted_cross_tokenizer(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    draft = load_draft_model(ctx.params["draft_model"], ctx.model)
    try:
        drafter = CrossTokenizerDrafter(
            ctx.model, draft, sampling, ctx.params["num_draft_tokens"], ctx.params["lookbehind"]
        )
    except ValueError as error:  # no shared token at all
        raise ParamError(str(error)) from None
    return speculative_rounds(ctx, drafter, sampling)


SPEC = register(
    DecoderSpec(
        name="assisted_cross_tokenizer",
        family="speculative",
        summary="Universal assisted generation: a draft model with another tokenizer drafts via text (greedy) "
        "or a vocabulary map (sampling).",
        params=(
            Param("draft_model", "str", "smollm2-135m-instruct", "Draft model; its tokenizer may differ from the target's.",
                  loads_files=True),
            Param("num_draft_tokens", "int", 5, "Draft-model tokens drafted per round.", 1, 64, limit="draft_tokens"),
            Param("lookbehind", "int", 10, "Committed tokens re-tokenized with each draft to fix token boundaries.", 0, 256),
            *SAMPLING_PARAMS,
        ),
        run=assisted_cross_tokenizer,
        lossless=True,
    )
)
