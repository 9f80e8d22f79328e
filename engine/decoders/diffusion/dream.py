"""Dream v0 sampling (Ye et al. 2025, HKUNLP/Dream ``diffusion_generate``): a continuous-time unmasking schedule.

Timesteps run ``linspace(1, eps, steps + 1)``; step ``i`` goes from time ``t`` to ``s``. ``origin`` (absorbing
D3PM) unmasks each masked position independently with probability ``1 - s/t``. The confidence algorithms
(``maskgit_plus`` = top-1 probability, ``topk_margin`` = top-1 minus top-2, ``entropy`` = negative entropy) commit
``n = int(masked * (1 - s/t))`` positions: the ``n`` most confident, or ``n`` drawn without replacement from
``softmax(confidence / alg_temp)``. ``int`` floors, so some steps commit nothing (a model call all the same, as in
Dream); the last step commits whatever is left. Dream is AR-initialised: its logits move one position right.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.unmask import (
    CANVAS_PARAMS, CommitRule, StepView, blocks, canvas_settings, one_step_per_position, predictor_for,
    top_k_positions, unmask,
)
from engine.events import Event
from engine.params import Param

EPS = 1e-3  # Dream's generation config: the last timestep, so 1 - s/t < 1 until the final step
# the engine's confidence kind each algorithm ranks by (its "entropy" is already the negative entropy);
# origin ignores it, the probability is only shown
ALG_CONFIDENCE = {"origin": "probability", "maskgit_plus": "probability", "topk_margin": "margin", "entropy": "entropy"}
ALGORITHMS = tuple(ALG_CONFIDENCE)
SHIFT = {"auto": None, "on": True, "off": False}


def dream(ctx: DecodeContext) -> Iterator[Event]:
    predictor = predictor_for(ctx.model, SHIFT[ctx.params["shift"]])
    alg = ctx.params["alg"]
    settings = canvas_settings(ctx, one_step_per_position, confidence=ALG_CONFIDENCE[alg])
    # every block ends at its last timestep, so this bound is never what stops the loop
    settings.max_steps = max(settings.steps, len(blocks(settings.gen_length, settings.block_length)))
    return unmask(ctx, predictor, dream_rule(alg, ctx.params["alg_temp"], ctx.generator), settings)


def dream_rule(alg: str, alg_temp: float, generator: torch.Generator | None) -> CommitRule:
    """Dream's commit rule; the step's times come from the view's place in its block's schedule."""

    def rule(view: StepView) -> Tensor:
        if view.step_in_block >= view.block_steps - 1:
            return view.eligible  # Dream's final step: p = 1 / n = all that is still masked
        keep = unmask_fraction(view.step_in_block, view.block_steps)
        if alg == "origin":
            return view.eligible & (torch.rand(view.eligible.shape, generator=generator) < keep)
        count = int(view.eligible.sum().float() * keep)  # float32 and a floor, as Dream computes it
        if not alg_temp:
            return top_k_positions(view.confidence, count)
        return sample_positions(view.confidence, count, alg_temp, generator)

    return rule


def unmask_fraction(step: int, steps: int) -> Tensor:
    """``1 - s/t`` for step ``step`` of ``steps`` on Dream's float32 grid ``linspace(1, eps, steps + 1)``."""
    times = torch.linspace(1, EPS, steps + 1)
    return 1 - times[step + 1] / times[step]


def sample_positions(scores: Tensor, count: int, alg_temp: float, generator: torch.Generator | None) -> Tensor:
    """``count`` positions drawn without replacement from ``softmax(scores / alg_temp)`` (-inf = never drawn).

    Gumbel-top-k is that draw exactly (Kool et al. 2019) and, unlike ``torch.multinomial``, cannot fail when a
    small ``alg_temp`` underflows some probabilities to zero.
    """
    noise = torch.rand(scores.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return top_k_positions(scores.double() / alg_temp - torch.log(-torch.log(noise)), count)


SPEC = register(
    DecoderSpec(
        name="dream",
        family="diffusion",
        summary="Dream v0: unmask on the timestep grid 1 -> eps, randomly (origin) or by confidence "
                "(maskgit_plus, topk_margin, entropy).",
        params=(
            *CANVAS_PARAMS,
            Param("steps", "int", 0, "Denoising steps over the whole canvas; 0 = gen_length.", 0, 4096,
                  sets_parallelism=True),
            Param("alg", "choice", "entropy", "origin: each mask unmasked with probability 1 - s/t; otherwise the "
                  "confidence ranking (Dream's generation config defaults to origin, its README uses entropy).",
                  choices=ALGORITHMS),
            Param("alg_temp", "float", 0.0, "0 = commit the most confident; > 0 = draw the positions from "
                  "softmax(confidence / alg_temp).", 0.0, 10.0),
            Param("shift", "choice", "auto", "Move logits one position right (AR-initialised models such as "
                  "Dream); auto = from the model's config.", choices=tuple(SHIFT)),
        ),
        run=dream,
    )
)
