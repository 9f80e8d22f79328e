"""The Jacobi drafter, shared by Jacobi decoding and Speculative Jacobi Decoding (engine/decoders/speculative/
jacobi.py and spec_jacobi.py): a window of guesses the target refines in parallel, refined by argmax or sampled.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.events import Event
from engine.speculative.rounds import Draft, Drafter, Outcome, Sampling, speculative_rounds

INIT_CHOICES = ("random", "pad", "copy")
INIT_HELP = "How fresh guesses start: random vocabulary tokens, the pad token, or tokens copied at random from the prompt."


class JacobiDrafter(Drafter):
    """Keeps the window of guesses; ``refine`` "argmax" (Jacobi) or "sample" (SJD, guesses keep their q)."""

    def __init__(self, ctx: DecodeContext, sampling: Sampling, window: int, init: str, refine: str, source: str) -> None:
        self.sampling = sampling
        self.window = window
        self.init = init
        self.refine = refine
        self.source = source
        self.generator = ctx.generator
        self.prompt = torch.tensor(ctx.prompt_ids)
        self.vocab_size = ctx.model.vocab_size
        tokenizer = ctx.model.tokenizer
        self.pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        self.guesses: list[int] = []
        self.refined: list[bool] = []  # False: a fresh init token
        self.rows: list[Tensor | None] = []  # SJD: each guess's draft distribution (logprobs); None: one-hot
        self._fill()

    def propose(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.window, max_depth)
        tokens, refined, rows = self.guesses[:k], self.refined[:k], self.rows[:k]
        mode = f"{sum(refined)} refined + {k - sum(refined)} fresh ({self.init}) guesses"
        sources = [f"{self.source}:{'refined' if r else self.init}" for r in refined]
        probs = [1.0 if row is None else float(row[token].exp()) for token, row in zip(tokens, rows)]
        logprobs = None
        if any(row is not None for row in rows):
            one_hot = [_one_hot_logprobs(token, self.vocab_size) for token in tokens]
            logprobs = torch.stack([hot if row is None else row for hot, row in zip(one_hot, rows)])
        return Draft(tokens, probs, logprobs, sources=sources, mode=mode)

    def observe(self, outcome: Outcome) -> None:
        # Row u + 1 is the target's distribution after guess u. With m guesses accepted the verifier drew the last
        # committed token from row m; rows m + 1, ... (after the first unaccepted guess) refine the positions after it.
        rows = outcome.target_logprobs[outcome.verdict.accepted + 1 :]
        if self.refine == "sample":
            self.guesses = [self.sampling.choose(row) for row in rows]
            self.rows = list(rows)
        else:
            self.guesses = rows.argmax(-1).tolist()
            self.rows = [None] * len(rows)
        self.refined = [True] * len(rows)
        self._fill()

    def _fill(self) -> None:
        """Top the window up with fresh init tokens (one-hot draft distributions: the deterministic rule)."""
        missing = self.window - len(self.guesses)
        if missing > 0:
            self.guesses += self._fresh(missing)
            self.refined += [False] * missing
            self.rows += [None] * missing

    def _fresh(self, count: int) -> list[int]:
        if self.init == "pad":
            return [self.pad] * count
        if self.init == "copy":
            picks = torch.randint(len(self.prompt), (count,), generator=self.generator)
            return self.prompt[picks].tolist()
        return torch.randint(self.vocab_size, (count,), generator=self.generator).tolist()


def _one_hot_logprobs(token: int, vocab_size: int) -> Tensor:
    row = torch.full((vocab_size,), float("-inf"))
    row[token] = 0.0
    return row


def jacobi_rounds(ctx: DecodeContext, refine: str, source: str) -> Iterator[Event]:
    """The shared round loop of Jacobi and SJD; each DraftRound's ``mode`` says how many guesses were refined."""
    sampling = Sampling.of(ctx)
    drafter = JacobiDrafter(ctx, sampling, ctx.params["window"], ctx.params["init"], refine, source)
    return speculative_rounds(ctx, drafter, sampling)
