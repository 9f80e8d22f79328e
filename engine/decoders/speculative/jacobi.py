"""Jacobi decoding (Santilli et al., ACL 2023; speculative.md §5a): the target refines its own window of guesses.

A window of ``window`` guesses follows the committed text, initialised with pad tokens, tokens copied from the
prompt or random tokens (the run's generator). Each round is ONE target forward over the last committed token and
the guesses, verified as a deterministic chain draft: the matching prefix plus one token is committed. The same
forward's outputs at the positions after the first rejected guess become the next guesses (they are the
Jacobi update ``y_i = argmax p(. | x, y_<i)`` computed from the old guesses), and fresh init tokens fill the rest.
Lossless: greedy output equals greedy decoding; under sampling, a guess is accepted with probability p(guess)
and the correction is drawn from p with the rejected guess removed (the deterministic-draft rule), so the output
follows the processed target.

``refine="sample"`` is Speculative Jacobi Decoding (spec_jacobi.py): the next guesses are sampled from the
forward's processed distributions, which they keep as their draft distributions.
"""

from __future__ import annotations

from typing import Iterator

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.events import Event
from engine.params import Param
from engine.speculative.jacobi import INIT_CHOICES, INIT_HELP, jacobi_rounds
from engine.speculative.rounds import SAMPLING_PARAMS


def jacobi(ctx: DecodeContext) -> Iterator[Event]:
    return jacobi_rounds(ctx, "argmax", "jacobi")


SPEC = register(
    DecoderSpec(
        name="jacobi",
        family="speculative",
        summary="Jacobi decoding: the target refines a window of guesses in parallel; the matching prefix is kept.",
        params=(
            Param("window", "int", 8, "Guesses refined per forward.", 1, 128, limit="draft_tokens"),
            Param("init", "choice", "random", INIT_HELP, choices=INIT_CHOICES),
            *SAMPLING_PARAMS,
        ),
        run=jacobi,
        lossless=True,
    )
)
