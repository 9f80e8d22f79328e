"""Speculative Jacobi Decoding (SJD; Teng et al., ICLR 2025, arXiv 2410.01699; speculative.md §5c).

Jacobi decoding (jacobi.py) whose guesses are SAMPLED: each guess keeps the distribution q it was drawn from,
the previous forward's processed target distribution at its position (a fresh random init token has a one-hot q).
Each round is ONE target forward over the last committed token and the window; guess i is accepted with
probability min(1, p(x_i)/q(x_i)) (the "probabilistic convergence criterion"), the first rejection is replaced by
a draw from norm(max(p - q, 0)) (the shared verifier's chain rule), and the positions after it take tokens newly
sampled from this forward's p, with p as their q, as the next drafts. Lossless: this is chain speculative
sampling with the previous iteration as the drafter, so sampled output follows the processed target; greedy
(temperature 0) refines by argmax and equals greedy decoding, like Jacobi.
"""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param
from engine.speculative.jacobi import INIT_CHOICES, INIT_HELP, jacobi_rounds
from engine.speculative.rounds import SAMPLING_PARAMS


def spec_jacobi(ctx: DecodeContext) -> Iterator[Event]:
    return jacobi_rounds(ctx, "sample", "sjd")


SPEC = register(
    DecoderSpec(
        name="spec_jacobi",
        family="speculative",
        summary="Speculative Jacobi decoding: sampled Jacobi guesses keep their distributions and are verified with min(1, p/q).",
        params=(
            Param("window", "int", 16, "Guesses refined per forward (the paper's L).", 1, 128, limit="draft_tokens"),
            Param("init", "choice", "random", INIT_HELP, choices=INIT_CHOICES),
            *SAMPLING_PARAMS,
        ),
        run=spec_jacobi,
        lossless=True,
    )
)
