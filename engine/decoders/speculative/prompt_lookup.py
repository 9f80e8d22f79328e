"""Prompt lookup decoding (Saxena 2023, apoorvumang/prompt-lookup-decoding): drafts copied from the context.

The last n tokens (n = max_ngram down to 1) are searched in the prompt and the text generated so far; the
tokens that followed their leftmost earlier occurrence are the draft. No draft model: the draft is
deterministic, verified by the same chain rule (greedy matching, or accept with probability p(token)).
"""

from __future__ import annotations

from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param, ParamError
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds


def lookup_continuation(context: list[int], max_ngram: int, k: int, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the leftmost earlier occurrence of the longest matching suffix n-gram
    (``max_ngram`` down to ``min_ngram`` tokens long)."""
    ids = torch.tensor(context)
    for n in range(min(max_ngram, len(context) - 1), min_ngram - 1, -1):
        windows = ids[:-1].unfold(0, n, 1)  # drop the last token: the suffix itself is not a match
        hits = (windows == ids[-n:]).all(dim=1).nonzero()
        if len(hits):
            start = int(hits[0]) + n
            return context[start : start + k]
    return []


class PromptLookupDrafter(Drafter):
    source = "prompt_lookup"

    def __init__(self, max_ngram: int, num_draft_tokens: int, min_ngram: int = 1) -> None:
        if min_ngram > max_ngram:
            raise ParamError(f"min_ngram ({min_ngram}) must not exceed max_ngram ({max_ngram})")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.num_draft_tokens = num_draft_tokens

    def propose(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.num_draft_tokens, max_depth)
        tokens = lookup_continuation(context, self.max_ngram, k, self.min_ngram) if k else []
        return Draft(tokens, [1.0] * len(tokens))


def prompt_lookup(ctx: DecodeContext) -> Iterator[Event]:
    drafter = PromptLookupDrafter(ctx.params["max_ngram"], ctx.params["num_draft_tokens"], ctx.params["min_ngram"])
    return speculative_rounds(ctx, drafter, Sampling.of(ctx))


SPEC = register(
    DecoderSpec(
        name="prompt_lookup",
        family="speculative",
        summary="Prompt lookup decoding: draft the tokens that followed the last n-gram's earlier occurrence.",
        params=(
            Param("max_ngram", "int", 3, "Longest suffix n-gram searched for (then shorter ones).", 1, 32),
            Param("min_ngram", "int", 1, "Shortest suffix n-gram that may match (2 skips one-token coincidences).", 1, 32),
            Param("num_draft_tokens", "int", 10, "Most tokens copied per round.", 1, 128, limit="draft_tokens"),
            *SAMPLING_PARAMS,
        ),
        run=prompt_lookup,
        lossless=True,
    )
)
