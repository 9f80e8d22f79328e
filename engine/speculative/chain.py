"""The round loop of chain speculative decoding, shared by every chain drafter (draft model, prompt lookup).

Each round: the drafter proposes up to k tokens, the target runs ONE forward over the tokens it has not seen
(the last committed token, plus the prompt in the first round) followed by the drafts, the chain is verified,
the accepted drafts plus the bonus/correction token are committed, and both caches roll back to what stays valid.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:  # engine.decoders imports the speculative decoders, which import this module
    from engine.decoders.base import DecodeContext
from engine.events import DraftNode, DraftRound, r7
from engine.params import Param
from engine.processing import Processed, Stage, build_pipeline, process, sample
from engine.speculative.cache import PrefixCache
from engine.speculative.verify import Verdict, verify_chain

SAMPLING_PARAMS = (
    Param("temperature", "float", 0.0, "0 = greedy verification; > 0 = speculative sampling at this temperature.", 0.0, 10.0),
    Param("top_k", "int", 0, "Sampling only: keep the k most probable tokens, for target and draft alike (0 = off).", 0, 1_000_000),
    Param("top_p", "float", 1.0, "Sampling only: nucleus mass for target and draft alike (1 = off).", 0.0, 1.0),
)


@dataclass(frozen=True)
class Draft:
    """Proposed tokens; ``logprobs`` [n, V] are the processed distributions they were drawn from (None: deterministic)."""

    tokens: list[int]
    probs: list[float]
    logprobs: Tensor | None
    calls: int = 0


class Drafter(Protocol):
    source: str

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to ``k`` tokens to follow ``context`` (the prompt and every committed token)."""
        ...


@dataclass(frozen=True)
class Sampling:
    """How a run turns logits into a distribution and a token: greedy (no stages, argmax) or the pipeline."""

    stages: Sequence[Stage]
    generator: torch.Generator | None  # None = greedy

    @classmethod
    def of(cls, ctx: "DecodeContext") -> "Sampling":
        if ctx.params["temperature"] == 0:
            return cls((), None)
        return cls(build_pipeline(ctx.params), ctx.generator)

    def process(self, logits: Tensor) -> Processed:
        return process(logits, self.stages)

    def choose(self, logprobs: Tensor) -> int:
        if self.generator is None:
            return int(logprobs.argmax(-1))
        return int(sample(logprobs, self.generator))


def chain_rounds(ctx: "DecodeContext", drafter: Drafter, num_draft_tokens: int, sampling: Sampling) -> Iterator[DraftRound]:
    """Speculative rounds until ``max_new_tokens`` are committed (the runner stops earlier on EOS)."""
    target = PrefixCache(ctx.model)
    context = list(ctx.prompt_ids)
    generated = 0
    step = 0
    while generated < ctx.max_new_tokens:
        start = time.perf_counter()
        # The round commits at most k + 1 tokens: never draft past the budget.
        draft = drafter.propose(context, min(num_draft_tokens, ctx.max_new_tokens - generated - 1))
        draft_seconds = time.perf_counter() - start
        k = len(draft.tokens)
        out = target.forward(target.sync(context) + draft.tokens)
        target_logprobs = sampling.process(out.logits[0, -(k + 1) :]).logprobs
        verdict = verify_chain(draft.tokens, target_logprobs, draft.logprobs, sampling.generator, ctx.record_top_k)
        n = verdict.accepted
        committed = draft.tokens[:n] + [verdict.next_token]
        past = len(context)
        context += committed
        target.sync(context)
        yield draft_round(
            step,
            parents=list(range(-1, k - 1)),
            tokens=draft.tokens,
            probs=draft.probs,
            source=drafter.source,
            verdict=verdict,
            cache_slots_kept=list(range(past, past + n)),
            draft_calls=draft.calls,
            draft_seconds=draft_seconds,
            seconds=time.perf_counter() - start,
        )
        generated += len(committed)
        step += 1


def draft_round(
    step: int,
    *,
    parents: list[int],
    tokens: list[int],
    probs: list[float],
    source: str,
    verdict: Verdict,
    cache_slots_kept: list[int],
    draft_calls: int,
    draft_seconds: float,
    seconds: float,
    depths: list[int] | None = None,
) -> DraftRound:
    """The DraftRound event of one verified round (chain or tree): one target forward, its draft and outcome."""
    depths = depths or [i + 1 for i in range(len(tokens))]
    nodes = [
        DraftNode(
            id=node,
            parent=parents[node],
            token_id=token,
            depth=depths[node],
            draft_prob=probs[node],
            source=source,
            **(asdict(verdict.checks[node]) if node in verdict.checks else {}),  # NodeCheck's fields are DraftNode's
        )
        for node, token in enumerate(tokens)
    ]
    return DraftRound(
        step=step,
        nodes=nodes,
        accepted_path=verdict.accepted_path,
        committed=[tokens[node] for node in verdict.accepted_path] + [verdict.next_token],
        bonus_token=verdict.next_token,
        bonus_is_correction=verdict.is_correction,
        residual_top=verdict.residual_top,
        cache_slots_kept=cache_slots_kept,
        draft_calls=draft_calls,
        model_calls=1,
        draft_seconds=r7(draft_seconds),
        seconds=r7(seconds),
    )
