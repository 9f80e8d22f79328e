"""Superposed Decoding (Shen et al., NeurIPS 2024, arXiv 2405.18400): k drafts for the price of one forward per step.

Read from RAIVNLab/SuperposedDecoding (``superposed/llama/superpose.py``, ``superposed_generation.py``). One shared
sequence and KV cache: the prompt runs as usual; afterwards each position is fed the *superposition* of the drafts'
last tokens, ``e_t = sum_d w_d E[x_t^(d)]`` with ``w = softmax_d(score_d)`` over the drafts' cumulative scores.
From the one next-token distribution ``p = softmax(logits / temp)``, its ``n_token_sample`` most likely tokens are
kept and renormalised; each draft d then scores each kept token v by

    log s_d(v) = (1 - alpha) log p(v) + alpha log p_ng^(d)(v),  p_ng^(d)(v) = sum_n w_n P_n(v | last n-1 tokens of d)

(n = 2..6, weights 0.01, 0.04, 0.15, 0.18, 0.12, the context being prompt + draft). A token without any n-gram
support gets -inf unless no kept token of the draft has any, in which case the draft falls back to
``(1 - alpha) log p(v) - 200``. The k best non-EOS candidates (draft score + log s) become the next drafts
(never a -inf one, so a step may carry fewer drafts, where the reference keeps dead drafts of weight 0); EOS
candidates among the best 2k enter a pool of finished drafts (its k best are kept). alpha = 0 switches the n-gram
model off. Defaults are the paper's ``p15_d3_mixed`` config; its temperature 0.06 makes p nearly one-hot, so
drafts other than the greedy one mostly differ through the n-gram term.

Two simplifications of the reference: the next drafts are the k best non-EOS candidates overall (the reference
looks only among the best 2k and leaves dead slots when more than k of them end), and decoding stops early once a
finished draft scores at least the best live one (scores only fall, so no live draft could overtake it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event, Output, ScoredCandidate, SuperposedStep
from engine.ngram import ORDERS, NgramModel, corpus_documents
from engine.params import Param, ParamError, with_defaults
from engine.processing import Stage, process
from engine.shared_params import PIPELINE_PARAMS

NGRAM_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)  # for n = 2..6, the reference's i_weights
PENALTY = 200.0  # subtracted when no kept token has n-gram support in a draft


@dataclass
class Draft:
    tokens: list[int]
    score: float  # cumulative sum of log s_d over the draft's tokens


@dataclass
class Scored:
    """One draft x token candidate of a step."""

    draft: int
    token: int
    lm: float  # log p(v) under the kept, renormalised distribution
    ngram: float  # log p_ng^(d)(v); -inf without support
    score: float  # the draft's score + log s_d(v)


def ngram_model(ctx: DecodeContext, source: str) -> NgramModel:
    """The n-gram model over the bundled corpus, the prompt, or both (in the run model's tokens)."""
    documents: list[list[int]] = []
    if source in ("corpus", "both"):
        documents += corpus_documents(ctx.model.name, ctx.model.vocab_size, ctx.model.tokenizer)
    if source in ("prompt", "both"):
        documents.append(list(ctx.prompt_ids))
    return NgramModel(documents, ORDERS)


def score_candidates(
    drafts: list[Draft], logits: torch.Tensor, prompt: list[int], ngrams: NgramModel, *, temp: float, keep: int,
    alpha: float,
) -> list[Scored]:
    """Every draft x kept-token candidate, draft-major, kept tokens most likely first."""
    processed = process(logits, [Stage("temperature", temp), Stage("top_k", keep)])
    lm, ids = processed.logprobs.topk(keep)
    ids, lm = ids.tolist(), lm.tolist()
    scored = []
    for d, draft in enumerate(drafts):
        mixed = ngrams.mixture(prompt + draft.tokens, ids, NGRAM_WEIGHTS)
        ng = [math.log(p) if p > 0 else -math.inf for p in mixed]
        if alpha == 0:
            step = lm
        elif any(p > 0 for p in mixed):
            step = [(1 - alpha) * a + alpha * b for a, b in zip(lm, ng)]
        else:
            step = [(1 - alpha) * a - PENALTY for a in lm]
        scored += [Scored(d, v, a, b, draft.score + s) for v, a, b, s in zip(ids, lm, ng, step)]
    return scored


def select(scored: list[Scored], k: int, eos: set[int]) -> tuple[list[int], list[int]]:
    """(indices of the k best finite non-EOS candidates, indices of EOS candidates among the best 2k)."""
    order = sorted(range(len(scored)), key=lambda i: -scored[i].score)
    alive = [i for i in order if scored[i].token not in eos and scored[i].score > -math.inf][:k]
    ended = [i for i in order[: 2 * k] if scored[i].token in eos and scored[i].score > -math.inf]
    return alive, ended


def draft_weights(drafts: list[Draft]) -> torch.Tensor:
    """The mixing weights ``softmax_d(score_d)``: the drafts' shares of the next input embedding."""
    return torch.softmax(torch.tensor([d.score for d in drafts], dtype=torch.float64), 0)


def superposed_input(model, drafts: list[Draft], weights: torch.Tensor) -> torch.Tensor:
    """``sum_d w_d E[last token of d]`` as a [1, 1, hidden] input embedding (through the model's own embedding
    module, so a scaled embedding such as Gemma's is mixed after scaling, as the reference mixes the table rows)."""
    vectors = model.get_input_embeddings()(torch.tensor([d.tokens[-1] for d in drafts], device=model.device))
    return (weights.to(vectors)[:, None] * vectors).sum(0).view(1, 1, -1)


def superposed(ctx: DecodeContext) -> Iterator[Event]:
    k, alpha, temp = ctx.params["n_drafts"], ctx.params["alpha"], ctx.params["temperature"]
    keep = ctx.params["n_token_sample"] or k * k
    if keep < k:
        raise ParamError(f"n_token_sample must be >= n_drafts ({k}) so that every draft slot can be filled, or 0 for k^2")
    if keep > ctx.model.vocab_size:
        raise ParamError(f"n_token_sample={keep} exceeds the vocabulary ({ctx.model.vocab_size} tokens)")
    start = time.perf_counter()
    ngrams = ngram_model(ctx, ctx.params["ngram_source"])
    hf, cache = ctx.model.model, ctx.model.new_cache()
    logits = ctx.model.forward(torch.tensor([ctx.prompt_ids]), cache, keep=1).logits[0, -1]
    drafts, finished = [Draft([], 0.0)], []
    weights = draft_weights(drafts)

    def pool() -> list[tuple[Draft, str]]:
        """Every draft still in the race, best first."""
        return sorted([(d, "live at the end") for d in drafts] + [(d, "finished with EOS") for d in finished],
                      key=lambda item: -item[0].score)

    ctx.on_finish(lambda: (DecoderMetric(f"draft_{rank + 1}_score", draft.score, f"{state}, {len(draft.tokens)} tokens")
                           for rank, (draft, state) in enumerate(pool())))
    for step in range(ctx.max_new_tokens):
        scored = score_candidates(drafts, logits, ctx.prompt_ids, ngrams, temp=temp, keep=keep, alpha=alpha)
        alive, ended = select(scored, k, ctx.eos_token_ids)
        new = [Draft(drafts[scored[i].draft].tokens + [scored[i].token], scored[i].score) for i in alive]
        done = [Draft(drafts[scored[i].draft].tokens + [scored[i].token], scored[i].score) for i in ended]
        finished = sorted(finished + done, key=lambda f: -f.score)[:k]
        entering, drafts = drafts, new  # the summary sees this step's drafts if the run ends at its event
        yield SuperposedStep(
            step=step,
            drafts=[_draft_event(i, d, w) for i, (d, w) in enumerate(zip(entering, weights.tolist()))],
            candidates=[
                ScoredCandidate(c.token, c.score, [c.lm, c.ngram], label=f"draft {c.draft}") for c in scored
            ],
            kept=alive,
            finished=ended,
            seconds=time.perf_counter() - start,
        )
        if not drafts or (finished and finished[0].score >= drafts[0].score) or step + 1 == ctx.max_new_tokens:
            break
        start = time.perf_counter()
        weights = draft_weights(drafts)
        embeds = superposed_input(hf, drafts, weights)
        with torch.inference_mode():  # LoadedModel.forward takes token ids only
            logits = hf(inputs_embeds=embeds, past_key_values=cache, use_cache=True, return_dict=True).logits[0, -1].float()
    best = pool()[0][0]
    yield Output(token_ids=best.tokens, score=best.score)


def _draft_event(index: int, draft: Draft, weight: float) -> ScoredCandidate:
    last = draft.tokens[-1] if draft.tokens else -1  # -1: the empty draft before the first step
    return ScoredCandidate(last, draft.score, [weight], tokens=list(draft.tokens), label=f"draft {index}")


SPEC = register(
    DecoderSpec(
        name="superposed",
        family="token",
        summary="Superposed Decoding: k drafts from one forward per step over superposed embeddings, n-gram rescored.",
        params=(
            Param("n_drafts", "int", 3, "k: drafts decoded together in one superposed sequence.", 1, 16, limit="samples"),
            Param("n_token_sample", "int", 0, "Tokens kept from the model's distribution per step (0 = k^2).", 0, 1024),
            Param("alpha", "float", 0.54, "Weight of the n-gram log-prob against the model's (0 = no n-gram model).", 0.0, 1.0),
            # the paper's 0.06: nearly greedy
            *with_defaults(tuple(p for p in PIPELINE_PARAMS if p.name == "temperature"), temperature=0.06),
            Param(
                "ngram_source", "choice", "both",
                "Text the n-gram model counts: the bundled assistant-answers corpus, the prompt, or both.",
                choices=("both", "corpus", "prompt"),
            ),
        ),
        run=superposed,
    )
)
