"""RAPID (Chen et al., ICML 2025, arXiv 2502.20330): speculative decoding with a retrieval-augmented drafter.

For long prompts the drafter sees a shortened context: the prompt minus its last ``query_tokens`` tokens is cut
into chunks of ``chunk_tokens``; the ``retrieved_chunks`` chunks scoring highest under BM25 (k1 = 1.2, b = 0.75;
terms = token ids, documents = the chunks, query = the prompt's last ``query_tokens`` tokens) are kept in their
original order, followed by the query tail and everything generated (a leading BOS is always kept). The target sees
the full context and verifies the drafts with the standard chain rule (greedy matching, or accept with min(1, p/q)),
so the output is lossless. The paper's retrieval-augmented target (a distillation step that moves p towards q) is
not lossless and is not implemented.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.params import Param
from engine.speculative.drafts import DraftModelDrafter, draft_model_drafter
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Sampling, speculative_rounds

BM25_K1, BM25_B = 1.2, 0.75


def bm25_scores(chunks: list[list[int]], query: list[int]) -> list[float]:
    """Okapi BM25 score of each chunk (a document of token ids) for the query's distinct token ids."""
    counts = [Counter(chunk) for chunk in chunks]
    mean_length = sum(map(len, chunks)) / len(chunks)
    scores = []
    for chunk, count in zip(chunks, counts):
        score = 0.0
        for term in set(query):
            holding = sum(term in c for c in counts)
            idf = math.log((len(chunks) - holding + 0.5) / (holding + 0.5) + 1)
            f = count[term]
            score += idf * f * (BM25_K1 + 1) / (f + BM25_K1 * (1 - BM25_B + BM25_B * len(chunk) / mean_length))
        scores.append(score)
    return scores


def retrieve_spans(prompt: list[int], lead: int, chunk_tokens: int, top: int, query_tokens: int) -> list[tuple[int, int]]:
    """Prompt spans [start, end) of the ``top`` best chunks of ``prompt[lead:-query_tokens]``, in prompt order."""
    body_end = max(lead, len(prompt) - query_tokens)
    spans = [(s, min(s + chunk_tokens, body_end)) for s in range(lead, body_end, chunk_tokens)]
    if len(spans) <= top:
        return spans
    scores = bm25_scores([prompt[s:e] for s, e in spans], prompt[body_end:])
    best = sorted(range(len(spans)), key=lambda i: (-scores[i], i))[:top]
    return [spans[i] for i in sorted(best)]


class RetrievalDrafter(Drafter):
    """A draft model that sees the retrieved chunks, the query tail and the generated tokens instead of the prompt."""

    source = "rag_drafter"
    partial_verify = True  # as its draft model's

    def __init__(self, inner: DraftModelDrafter, prompt: list[int], prefix: list[int]) -> None:
        self.inner = inner
        self.prompt_length = len(prompt)
        self.prefix = prefix

    def propose(self, context: list[int], max_depth: int) -> Draft:
        return self.inner.propose(self.prefix + context[self.prompt_length :], max_depth)


def rapid(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    sampling = Sampling.of(ctx)
    k = params["num_draft_tokens"]
    if not params["draft_model"] and params["draft_layers"] == 0:
        inner = DraftModelDrafter(ctx.model, "target", sampling, k)
    else:
        inner = draft_model_drafter(ctx, sampling, k)
    prompt = ctx.prompt_ids
    lead = int(prompt[0] == ctx.model.tokenizer.bos_token_id)
    query_start = max(lead, len(prompt) - params["query_tokens"])
    spans = retrieve_spans(prompt, lead, params["chunk_tokens"], params["retrieved_chunks"], params["query_tokens"])
    prefix = prompt[:lead] + [t for s, e in spans for t in prompt[s:e]] + prompt[query_start:]
    yield DecoderMetric("retrieved_chunks", len(spans), "prompt spans " + ", ".join(f"[{s}, {e})" for s, e in spans))
    yield DecoderMetric("draft_context_tokens", len(prefix), f"of {len(prompt)} prompt tokens")
    yield from speculative_rounds(ctx, RetrievalDrafter(inner, prompt, prefix), sampling)


SPEC = register(
    DecoderSpec(
        name="rapid",
        family="speculative",
        summary="RAPID: a drafter reading only the prompt chunks retrieved for its last tokens; the target verifies.",
        params=(
            Param("draft_model", "str", "", "Draft model with the target's tokenizer (empty = the target, or its first "
                  "draft_layers layers).", loads_files=True),
            Param("draft_layers", "int", 0, "Without draft_model: draft with the target's first N layers (0 = the whole target).", 0, 1000),
            Param("num_draft_tokens", "int", 4, "Tokens drafted per round (k).", 1, 64, limit="draft_tokens"),
            Param("chunk_tokens", "int", 32, "Prompt chunk length for retrieval, in tokens.", 1, 100_000),
            Param("retrieved_chunks", "int", 4, "Chunks the drafter sees (the best BM25 matches, in prompt order).", 1, 10_000),
            Param("query_tokens", "int", 32, "The prompt's last tokens: the retrieval query, always shown to the drafter.", 1, 100_000),
            *SAMPLING_PARAMS,
        ),
        run=rapid,
        lossless=True,
    )
)
