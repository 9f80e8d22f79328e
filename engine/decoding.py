"""Steps shared by the token-level decoders: the autoregressive loop, its token-step hook and the per-token event."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from engine.attention import AttentionHooks, attention_hooks
from engine.context import DecodeContext
from engine.events import (
    AttentionMap,
    Candidate,
    DecoderMetric,
    Event,
    FfnSparsity,
    TokenStep,
)
from engine.models.handle import ForwardResult
from engine.processing import (
    Processed,
    Stage,
    entropy,
    kl_divergence,
    process,
    sample,
    stage_reports,
)
from engine.speculative.cache import PrefixCache


def token_event(
    processed: Processed,
    token_id: int,
    *,
    step: int,
    position: int,
    top_k: int,
    row: int = 0,
    **extra,
) -> TokenStep:
    """The TokenStep for ``token_id`` drawn from row ``row`` of a processed distribution."""
    raw = processed.raw_logprobs[row]
    final = processed.logprobs[row]
    top_raw, top_ids = torch.topk(raw, k=min(top_k, raw.shape[-1]))
    ids = top_ids.tolist()
    probs_raw, probs = top_raw.exp().tolist(), final[top_ids].exp().tolist()
    h_raw = entropy(raw)
    return TokenStep(
        step=step,
        position=position,
        token_id=token_id,
        logprob=final[token_id],
        raw_logprob=raw[token_id],
        rank=rank_of(raw, token_id),
        entropy_raw=h_raw,
        entropy=h_raw if processed.logprobs is processed.raw_logprobs else entropy(final),
        candidates=[Candidate(i, pr, p) for i, pr, p in zip(ids, probs_raw, probs)],
        stages=stage_reports(processed, ids, row=row),
        **extra,
    )


def rank_of(scores: torch.Tensor, token_id: int) -> int:
    """The 1-based rank of ``token_id`` under ``scores`` [V] (logits or log-probs); ties rank first."""
    return int((scores > scores[token_id]).sum()) + 1


@dataclass
class Step:
    """One step of the shared loop as a hook sees it: ``context`` is prompt + output so far (the step's token not
    yet appended), ``logits`` the forward's last-position logits [V], ``cache`` the cache that forward extended."""

    position: int
    context: list[int]
    logits: torch.Tensor
    processed: Processed
    cache: PrefixCache


class TokenHook:
    """The token-step hook: what one autoregressive decoder changes in :func:`autoregressive`, the loop every
    token-level decoder shares (as ``Drafter`` is for speculative decoding and ``CommitRule`` for diffusion).
    Each default is plain greedy decoding, so a decoder overrides only what it changes."""

    stages: Sequence[Stage] = ()  # the processing pipeline (engine.processing) applied to each step's logits
    model_calls: int = 1  # model calls per step, counted on each TokenStep

    def start(self, ctx: DecodeContext) -> Iterator[Event]:
        """Before the first step: extra forwards and their events (GIFT's saliency pass)."""
        return iter(())

    def cache(self, own: PrefixCache) -> PrefixCache:
        """The cache this step's forward extends; ``own`` is the loop's cache of ``ctx.model``."""
        return own

    def steer(self, length: int) -> AttentionHooks | None:
        """Attention hooks on this step's forward over a context of ``length`` tokens (steering, hidden keys)."""
        return None

    def choose(self, step: Step) -> int:
        return int(step.processed.logprobs[0].argmax())

    def report(self, step: Step, token: int) -> Iterator[Event]:
        """The step's own events, out before its TokenStep (a rerank, a cache comparison)."""
        return iter(())

    def fields(self) -> dict[str, Any]:
        """Extra TokenStep fields of this step."""
        return {}

    def advance(self, event: TokenStep) -> None:
        """After each token, before it goes out: the runner may stop the loop right after it."""


class Sampled(TokenHook):
    """Sampling from the processed distribution."""

    def __init__(self, stages: Sequence[Stage], generator: torch.Generator) -> None:
        self.stages, self.generator = stages, generator

    def choose(self, step: Step) -> int:
        return int(sample(step.processed.logprobs[0], self.generator))


def captured_forward(
    ctx: DecodeContext, forward: Callable[[], ForwardResult], *, step: int, queries: list[int],
    steer: AttentionHooks | None = None, outputs: Sequence[int] | None = None,
) -> tuple[ForwardResult, list[AttentionMap | FfnSparsity]]:
    """Run ``forward`` under the steering hooks and the run's captures: the result and the captured events, the
    attention map of its ``queries`` rows (absolute positions, the forward's last rows) and the FFN sparsity of the
    rows predicting the output positions ``outputs`` (default: the one its last row predicts). No event without a
    capture or once its budget is spent."""
    capture, ffn = ctx.attention, ctx.ffn
    if capture is not None:
        ctx.model.use_explorer_attention()
    if outputs is None:
        outputs = [queries[-1] - len(ctx.prompt_ids) + 1]
    rows_back = [queries[-1] - (len(ctx.prompt_ids) - 1 + position) for position in outputs]
    with attention_hooks(steer, capture.hooks() if capture is not None else None), \
            ffn.observing(ctx.model.model, rows_back) if ffn is not None else nullcontext():
        out = forward()
    attention_map = None if capture is None else capture.take(step=step, query_positions=queries)
    return out, ([] if attention_map is None else [attention_map]) + ([] if ffn is None else ffn.take(step, outputs))


def autoregressive(ctx: DecodeContext, hook: TokenHook) -> Iterator[Event]:
    """Prefill, then one forward per token on a KV cache that rolls back to whatever prefix a hook left valid.

    The runner stops the generator on EOS, stop strings or cancel; this loop only bounds the length.
    """
    yield from hook.start(ctx)
    own = PrefixCache(ctx.model)
    context = list(ctx.prompt_ids)
    for position in range(ctx.max_new_tokens):
        began = time.perf_counter()
        cache = hook.cache(own)
        feed = cache.sync(context)
        out, captured = captured_forward(
            ctx, lambda: cache.forward(feed, inputs=ctx.prompt_inputs if position == 0 else None, keep=1), step=position,
            queries=list(range(len(context) - len(feed), len(context))), steer=hook.steer(len(context)),
        )
        context_ids = torch.tensor([context]) if hook.stages else None  # read by repetition_penalty only
        step = Step(position, context, out.logits[0, -1], process(out.logits[:, -1, :], hook.stages, context_ids), cache)
        seconds = time.perf_counter() - began  # a hook's own work (a look-ahead) is timed on its own events
        token = hook.choose(step)
        yield from captured  # before the token: the runner may stop right after it
        yield from hook.report(step, token)
        event = token_event(step.processed, token, step=position, position=position, top_k=ctx.record_top_k,
                            seconds=seconds, model_calls=hook.model_calls, **hook.fields())
        hook.advance(event)
        context.append(token)
        yield event


@dataclass
class Tally:
    """A run compared step by step with a teacher-forced companion on the same tokens (the full cache beside a
    compressed one, a base model beside its variant): each step's KL and top-1 agreement, and the run's summary.

    ``prefix`` names the metrics; ``reference`` and ``compared`` name the two distributions in their descriptions
    (p_reference is the companion's), ``who`` the companion in words."""

    prefix: str
    reference: str
    compared: str
    who: str
    kls: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    divergence: int = -1

    def add(
        self, position: int, reference_logits: torch.Tensor, logits: torch.Tensor, token: int
    ) -> tuple[float, int, bool]:
        """Compare one step's next-token logits [V] (the companion's, then the run's own, which chose ``token``):
        KL(p_reference || p_compared) in nats, the companion's top-1 token, and whether both top-1 tokens agree."""
        kl = kl_divergence(reference_logits, logits)
        top = int(reference_logits.argmax())
        agree = top == int(logits.argmax())
        self.kls.append(kl)
        self.agree.append(agree)
        if self.divergence < 0 and top != token:
            self.divergence = position
        return kl, top, agree

    def metrics(self) -> list[DecoderMetric]:
        """The run's summary (none before the first step has been compared)."""
        if not self.kls:
            return []
        return [
            DecoderMetric(f"{self.prefix}_mean_kl", sum(self.kls) / len(self.kls),
                          f"mean KL(p_{self.reference} || p_{self.compared}) per step, nats"),
            DecoderMetric(f"{self.prefix}_top1_agreement", sum(self.agree) / len(self.agree),
                          "share of steps where both top-1 tokens agree"),
            DecoderMetric(f"{self.prefix}_first_divergence", self.divergence,
                          f"first step where the {self.who}'s top-1 differs from the chosen token (-1: none)"),
        ]


class Rows:
    """N continuations of one prompt as the rows of one batch (best-of-N samples, SMC particles): the prompt runs
    once, then one forward per step extends every row. ``logits`` are the rows' next-token logits [N, V]."""

    def __init__(self, ctx: DecodeContext, n: int) -> None:
        self.model, self.cache = ctx.model, ctx.model.new_cache()
        self.logits = self.model.forward(torch.tensor([ctx.prompt_ids]), self.cache, keep=1).logits[:, -1, :].expand(n, -1)
        if n > 1:
            self.cache.batch_repeat_interleave(n)

    def extend(self, tokens: Sequence[int]) -> torch.Tensor:
        """Run one token per row (a finished row idles on any token); the rows' next logits."""
        self.logits = self.model.forward(torch.tensor(tokens)[:, None], self.cache).logits[:, -1, :]
        return self.logits

    def reorder(self, ancestors: Sequence[int]) -> None:
        """Row i continues row ``ancestors[i]`` (a resampling)."""
        self.cache.reorder_cache(torch.tensor(ancestors))
