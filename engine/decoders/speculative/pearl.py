"""PEARL (Liu et al., ICLR 2025): drafting and verifying in parallel, with pre-verify and post-verify rounds.

In PEARL the draft and the target run at the same time on two devices. Each round the draft drafts ``gamma``
tokens while the target runs one forward, so drafting never waits for verification (speculative.md §9):

* pre-verify (the context ends with a verified token): the target checks only the FIRST new draft. Rejected: the
  correction is drawn from the residual and the other drafts are dropped. Accepted: it is committed and the
  other ``gamma - 1`` drafts stay pending; switch to post-verify;
* post-verify (``gamma - 1`` drafts pending): while the draft drafts ``gamma`` more after them, the target checks
  the pending drafts plus the first new one. All accepted: commit them, the other new drafts become pending; stay.
  Rejected at n: commit the n accepted and the correction, drop the rest; switch to pre-verify.

Here both run one after the other on one device, which gives the same tokens as the parallel run. Each round
records its measured time and ``simulated_seconds = max(draft time, target time)``, what the round would take
in parallel (synchronisation taken as free). The checks are standard speculative sampling (min(1, p/q), residual
on rejection), so PEARL is lossless. One difference of no consequence: the sequential target forward also runs
the round's last checked token, so when all are accepted the verifier draws a bonus token that PEARL has no
place for; it is dropped (``verify_round(bonus=False)``: a discarded independent draw leaves the output's law
unchanged), and the last checked token is left out of the target cache for the next round to run.

Cost-aware (``draft_length`` adaptive, the default): on one device a PEARL round costs the draft's forwards plus the
target's, so when its drafts are rarely accepted it is slower than plain decoding. Between rounds (never with
drafts pending) it takes a plain one-token step instead whenever those committed more tokens per second lately
(:class:`engine.speculative.draft_length.PayoffSwitch`), probing PEARL rounds again on a time budget.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Iterator

import torch

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import DecoderMetric, Event
from engine.params import Param
from engine.speculative.cache import PrefixCache
from engine.speculative.drafts import DRAFTER_PARAMS, draft_model_drafter
from engine.speculative.draft_length import PayoffSwitch
from engine.speculative.rounds import (
    NO_DRAFT, SAMPLING_PARAMS, Draft, Sampling, draft_round, plain_round, verify_round,
)


def pearl(ctx: DecodeContext) -> Iterator[Event]:
    sampling = Sampling.of(ctx)
    gamma = ctx.params["gamma"]
    drafter = draft_model_drafter(ctx, sampling, gamma)
    target = PrefixCache(ctx.model)
    context = list(ctx.prompt_ids)  # verified tokens only
    pending = NO_DRAFT  # drafts after the context, awaiting verification
    post_verify = False
    measured = simulated = 0.0
    step = 0
    switch = PayoffSwitch() if ctx.params["draft_length"] == "adaptive" else None

    def summary() -> Iterator[DecoderMetric]:
        if measured:
            yield DecoderMetric("simulated_seconds", simulated, "total round time had draft and target run in parallel")
            yield DecoderMetric("simulated_to_measured", simulated / measured, "simulated / measured sequential time")

    ctx.on_finish(summary)
    while len(context) - len(ctx.prompt_ids) < ctx.max_new_tokens:
        budget = ctx.max_new_tokens - (len(context) - len(ctx.prompt_ids))
        start = time.perf_counter()
        if switch and not post_verify and not switch.speculate():  # a pending chain is always checked first
            event = plain_round(step, target, context, sampling, ctx.record_top_k, drafter.source,
                                "plain step: drafting paid less than plain steps lately")
            event = replace(event, simulated_seconds=event.seconds)  # the target alone: nothing runs beside it
            measured += event.seconds
            simulated += event.seconds
            context += event.committed
            yield event
            switch.observe(False, len(event.committed), time.perf_counter() - start)
            step += 1
            continue
        kept = _part(pending, 0, budget)  # a round commits at most as many tokens as it checks
        # Back to the verified context first, re-running the pending drafts: a sliding-window layer (Gemma 3) can
        # roll back only what it took in since its last crop, and the next round may reject any pending draft.
        drafter.cache.sync(context)
        new = drafter.propose(context + kept.tokens, min(gamma, budget - len(kept.tokens)))
        draft_seconds = time.perf_counter() - start
        checked = _joined(kept, _part(new, 0, 1), calls=new.calls)
        outcome, slots = verify_round(target, context, checked, sampling, ctx.record_top_k, bonus=False)
        verdict, committed = outcome.verdict, outcome.committed
        seconds = time.perf_counter() - start
        round_simulated = max(draft_seconds, seconds - draft_seconds)
        measured += seconds
        simulated += round_simulated
        event = draft_round(
            step,
            draft=checked,
            source=drafter.source,
            verdict=verdict,
            cache_slots_kept=slots,
            draft_seconds=draft_seconds,
            seconds=seconds,
            mode="post-verify" if post_verify else "pre-verify",
            simulated_seconds=round_simulated,
        )
        post_verify = verdict.accepted == len(checked.tokens)
        if post_verify:  # no bonus token in PEARL: the remaining new drafts come next
            event = replace(event, committed=committed, bonus_token=None)
        pending = _part(new, 1) if post_verify else NO_DRAFT
        context += committed
        yield event
        if switch:
            switch.observe(True, len(committed), time.perf_counter() - start)
        step += 1


def _part(draft: Draft, start: int, stop: int | None = None) -> Draft:
    """Nodes ``start:stop`` of a chain draft, with their draft distributions."""
    rows = None if draft.logprobs is None else draft.logprobs[start:stop]
    return Draft(draft.tokens[start:stop], draft.probs[start:stop], rows)


def _joined(first: Draft, second: Draft, calls: int) -> Draft:
    """Two chain drafts, one after the other."""
    rows = [d.logprobs for d in (first, second) if d.logprobs is not None]
    return Draft(first.tokens + second.tokens, first.probs + second.probs, torch.cat(rows) if rows else None, calls=calls)


SPEC = register(
    DecoderSpec(
        name="pearl",
        family="speculative",
        summary="PEARL: the draft keeps drafting while the target verifies (pre-/post-verify), simulated on one device.",
        params=(
            *DRAFTER_PARAMS,
            Param("gamma", "int", 4, "Tokens the draft drafts per round, while the target runs one forward.", 1, 64, limit="draft_tokens"),
            *SAMPLING_PARAMS,
        ),
        run=pearl,
        lossless=True,
    )
)
