"""The round loop every draft-then-verify decoder shares: chains (draft model, prompt lookup, Jacobi) and trees.

Each round the drafter proposes a draft (a chain, or a tree in topological order) of at most the depth the token
budget allows; the target runs ONE forward over the tokens it has not seen (the last committed token, plus the
prompt in the first round) followed by the draft (a plain causal forward for a chain, tree attention for a tree);
the verifier picks the accepted path and the bonus/correction token; the target's cache keeps only the accepted
path; and the drafter is shown the outcome (adaptive draft lengths, matrices updated from the target's logits).
Unless a decoder's ``draft_length`` is fixed, the cost-aware draft length (engine/speculative/draft_length.py) caps
each round's depth at what pays on this machine; each round also records the KV-cache bytes held.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.events import DraftNode, DraftRound
from engine.processing import Processed, Stage, build_pipeline, process, sample
from engine.shared_params import DRAFT_LENGTH_PARAMS, PIPELINE_PARAMS
from engine.speculative.cache import PrefixCache
from engine.speculative.draft_length import DraftLengthController
from engine.speculative.memory import MemoryMeter
from engine.speculative.tree import Riders, keep_path, node_depths, tree_forward
from engine.speculative.verify import Verdict, verify_tree

# Target and draft process their logits alike. Temperature is the pipeline's, with 0 added for greedy verification
# (a value between 0 and the pipeline's minimum is refused when the run builds its pipeline). Every speculative
# decoder declares these, so the round loop's own setting, the draft length, rides along.
_PIPELINE = {p.name: p for p in PIPELINE_PARAMS}
SAMPLING_PARAMS = (
    replace(_PIPELINE["temperature"], default=0.0, min=0.0,
            help="0 = greedy verification; > 0 = speculative sampling at this temperature."),
    _PIPELINE["top_k"],
    _PIPELINE["top_p"],
    *DRAFT_LENGTH_PARAMS,
)


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one round.

    ``parents[i]`` is node i's parent (-1: a child of the root, the committed context); None means a chain.
    ``logprobs`` row ``parent + 1`` is the processed distribution a node was drawn from (a chain's row i belongs
    to node i); None for deterministic drafts. ``without_replacement``: siblings were drawn without replacement
    (Gumbel-top-k, stochastic beam search), which the verifier must know. ``scores`` are the drafter's own
    per-node ranking scores, ``sources`` per-node drafter names (default: the drafter's ``source``). ``riders``
    ride along the verify forward (PPD's prompt tokens); their outputs come back in the Outcome.
    """

    tokens: list[int]
    probs: list[float]
    logprobs: Tensor | None = None
    parents: list[int] | None = None
    calls: int = 0
    without_replacement: bool = False
    scores: list[float] | None = None
    sources: list[str] | None = None
    mode: str = ""  # the drafter's phase this round, shown with the round (e.g. how many Jacobi guesses were refined)
    riders: Riders | None = None
    blocks: list[int] | None = None  # per node: the drafter forward (block) that drafted it (Falcon)

    @property
    def is_chain(self) -> bool:
        return self.parents is None

    @property
    def tree_parents(self) -> list[int]:
        return list(range(-1, len(self.tokens) - 1)) if self.parents is None else self.parents


@dataclass(frozen=True)
class Outcome:
    """A verified round as its drafter sees it afterwards.

    ``target_logits`` [n+1, V] are the target's raw logits (row 0 after the committed context, row u+1 after node
    u), ``target_logprobs`` the processed ones the verifier used; ``context`` is the committed context before the
    round and ``committed`` what the round appended to it. ``rider_logits`` [chains, k, V] are the target's raw
    logits at the draft's riders (None without riders).
    """

    context: list[int]
    draft: Draft
    target_logits: Tensor
    target_logprobs: Tensor
    verdict: Verdict
    committed: list[int]
    rider_logits: Tensor | None = None


class Drafter:
    """Base of every drafter: ``propose`` a draft, then ``observe`` how it fared (a no-op unless overridden)."""

    source = "draft"
    # Whether the round loop may verify only part of a draft (the cost-aware cut, draft_length.py): the drafter keeps
    # no state tied to nodes the target does not run.
    partial_verify = False

    def propose(self, context: list[int], max_depth: int) -> Draft:
        """A draft to follow ``context`` (the prompt and every committed token), no deeper than ``max_depth``."""
        raise NotImplementedError

    def observe(self, outcome: Outcome) -> None:
        """Learn from a verified round (draft-length schedules, n-gram tables); the default learns nothing."""


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

    @property
    def greedy(self) -> bool:
        return self.generator is None

    def process(self, logits: Tensor) -> Processed:
        return process(logits, self.stages)

    def choose(self, logprobs: Tensor) -> int:
        if self.generator is None:
            return int(logprobs.argmax(-1))
        return int(sample(logprobs, self.generator))


NO_DRAFT = Draft([], [])  # a round that only runs the target: one ordinary step


# A verification rule other than the shared lossless one: (parents, tokens, processed target log-probs) -> verdict
# (Medusa's typical acceptance, which is lossy).
VerifyRule = Callable[[list[int], list[int], Tensor], Verdict]


def speculative_rounds(
    ctx: "DecodeContext", drafter: Drafter, sampling: Sampling, target: PrefixCache | None = None,
    rule: VerifyRule | None = None,
) -> Iterator[DraftRound]:
    """Draft-and-verify rounds until ``max_new_tokens`` are committed (the runner stops earlier on EOS).

    With ``draft_length`` adaptive (the default of every decoder declaring SAMPLING_PARAMS) each round's draft is
    capped at the depth that pays (engine/speculative/draft_length.py); the run's memory is summed up at its end.
    """
    target = target or PrefixCache(ctx.model)
    controller = DraftLengthController() if ctx.params.get("draft_length") == "adaptive" else None
    memory = MemoryMeter(target, drafter)
    ctx.on_finish(memory.summary)
    context = list(ctx.prompt_ids)
    generated = 0
    step = 0
    while generated < ctx.max_new_tokens:
        # A round commits at most its accepted depth + 1 tokens: never draft deeper than the budget.
        budget = ctx.max_new_tokens - generated - 1
        limit = controller.limit(budget) if controller else None
        start = time.perf_counter()
        draft = drafter.propose(context, budget if limit is None else limit)
        if controller and drafter.partial_verify and (sampling.greedy or draft.logprobs is None):
            draft = subdraft(draft, controller.nodes_that_pay(draft.tree_parents, draft.probs), sampling.greedy)
        draft_seconds = time.perf_counter() - start
        outcome, slots = verify_round(target, context, draft, sampling, ctx.record_top_k, rule=rule)
        drafter.observe(outcome)
        context += outcome.committed
        event = draft_round(
            step,
            draft=draft,
            source=drafter.source,
            verdict=outcome.verdict,
            cache_slots_kept=slots,
            draft_seconds=draft_seconds,
            seconds=time.perf_counter() - start,
            mode=draft.mode,
            draft_depth_limit=limit,
            kv_cache_bytes=memory.sample(),
        )
        if controller:
            controller.observe(event, start, limit)
        yield event
        generated += len(outcome.committed)
        step += 1


def subdraft(draft: Draft, kept: list[int] | None, verified_greedily: bool = False) -> Draft:
    """``draft`` cut to the nodes ``kept`` (ascending, each one's parent kept too; None: all), its mode saying so.
    A sampled draft is cut only for greedy verification, which reads no draft distribution: a sampling verifier
    would be biased by nodes left out for their probability."""
    if kept is None:
        return draft
    if (draft.logprobs is not None and not verified_greedily) or draft.riders is not None:
        raise ValueError("only a deterministic draft, or one verified greedily, without riders can be verified in part")
    new_id = {node: i for i, node in enumerate(kept)}
    parents = draft.tree_parents
    logprobs = draft.logprobs
    if logprobs is not None:  # a chain's row i is node i's; a tree's row u + 1 the one node u's children came from
        logprobs = logprobs[kept] if draft.is_chain else logprobs[[0] + [node + 1 for node in kept]]

    def pick(values: list | None) -> list | None:
        return None if values is None else [values[node] for node in kept]

    cut = f"verified {len(kept)} of {len(draft.tokens)} drafted"
    return replace(
        draft, tokens=pick(draft.tokens), probs=pick(draft.probs), logprobs=logprobs, scores=pick(draft.scores),
        sources=pick(draft.sources), blocks=pick(draft.blocks), mode=f"{draft.mode}; {cut}" if draft.mode else cut,
        parents=None if draft.is_chain else [new_id[parents[node]] if parents[node] >= 0 else -1 for node in kept],
    )


def verify_round(
    target: PrefixCache, context: list[int], draft: Draft, sampling: Sampling, top_k: int = 20, bonus: bool = True,
    rule: VerifyRule | None = None,
) -> tuple[Outcome, list[int]]:
    """One target forward over ``draft`` after ``context``, its verdict, and the target cache cut to the accepted path.

    Returns the outcome and the cache slots the accepted nodes occupied. The target cache then holds
    ``context`` plus the accepted drafts (the bonus/correction token is run by the next forward). Without
    ``bonus`` a fully accepted chain commits no extra token (PEARL: the next drafts are already pending), and
    its last draft is left for the next forward to run. ``rule`` replaces the lossless verifier. The draft's riders
    run in the same forward (a chain with riders runs as a tree); the cache drops them with the rejected nodes.
    """
    parents = draft.tree_parents
    riders = draft.riders.nodes(len(context), parents) if draft.riders else None
    chain = draft.is_chain and riders is None
    rider_logits = None
    if chain:
        rows = len(draft.tokens) + 1
        ready = None if draft.tokens else target.logits_after(context)
        logits = ready[None] if ready is not None else target.forward(target.sync(context) + draft.tokens,
                                                                      keep=rows).logits[0, -rows:]
    else:
        logits = tree_forward(target, context, parents, draft.tokens, riders)
    if draft.riders:
        rider_logits = logits[len(draft.tokens) + 1 :].unflatten(0, draft.riders.embeddings.shape[:2])
        logits = logits[: len(draft.tokens) + 1]
    target_logprobs = sampling.process(logits).logprobs
    verdict = rule(parents, draft.tokens, target_logprobs) if rule else verify_tree(
        parents, draft.tokens, target_logprobs, draft.logprobs, sampling.generator, top_k, draft.without_replacement
    )
    committed = [draft.tokens[node] for node in verdict.accepted_path]
    if bonus or verdict.is_correction or not draft.tokens:
        committed.append(verdict.next_token)
    if chain:
        slots = list(range(len(context), len(context) + verdict.accepted))
        target.sync(context + committed)
    else:
        slots = keep_path(target, draft.tokens + (riders.tokens if riders else []), verdict.accepted_path)
    return Outcome(list(context), draft, logits, target_logprobs, verdict, committed, rider_logits), slots


def plain_round(step: int, target: PrefixCache, context: list[int], sampling: Sampling, top_k: int, source: str,
                mode: str) -> DraftRound:
    """One ordinary target step, no draft: what a cost-aware decoder runs while speculating pays less lately."""
    start = time.perf_counter()
    outcome, slots = verify_round(target, context, NO_DRAFT, sampling, top_k)
    return draft_round(step, draft=NO_DRAFT, source=source, verdict=outcome.verdict, cache_slots_kept=slots,
                       draft_seconds=0.0, seconds=time.perf_counter() - start, mode=mode)


def draft_round(
    step: int,
    *,
    draft: Draft,
    source: str,
    verdict: Verdict,
    cache_slots_kept: list[int],
    draft_seconds: float,
    seconds: float,
    model_calls: int = 1,
    mode: str = "",
    simulated_seconds: float | None = None,
    draft_depth_limit: int | None = None,
    kv_cache_bytes: int | None = None,
) -> DraftRound:
    """The DraftRound event of one verified round (chain or tree): its draft, the verdict and what it cost."""
    parents = draft.tree_parents
    depths = node_depths(parents)
    nodes = [
        DraftNode(
            id=node,
            parent=parents[node],
            token_id=token,
            depth=depths[node],
            draft_prob=draft.probs[node],
            source=draft.sources[node] if draft.sources else source,
            score=draft.scores[node] if draft.scores else None,
            block=draft.blocks[node] if draft.blocks else None,
            **(asdict(verdict.checks[node]) if node in verdict.checks else {}),  # NodeCheck's fields are DraftNode's
        )
        for node, token in enumerate(draft.tokens)
    ]
    return DraftRound(
        step=step,
        nodes=nodes,
        accepted_path=verdict.accepted_path,
        committed=[draft.tokens[node] for node in verdict.accepted_path] + [verdict.next_token],
        bonus_token=verdict.next_token,
        bonus_is_correction=verdict.is_correction,
        residual_top=verdict.residual_top,
        cache_slots_kept=cache_slots_kept,
        draft_calls=draft.calls,
        model_calls=model_calls,
        draft_seconds=draft_seconds,
        seconds=seconds,
        mode=mode,
        simulated_seconds=simulated_seconds,
        draft_depth_limit=draft_depth_limit,
        kv_cache_bytes=kv_cache_bytes,
    )
