"""DiffuSpec (Li et al., arXiv 2510.02358): a diffusion LM drafts, the autoregressive target verifies.

Each round the drafter (a diffusion LM with the target's tokenizer) fills ``[context | MASK x k]`` in ONE pass,
giving a distribution per draft position (the token lattice). Position i's row is the left-to-right proxy
``q(v | context, MASK^(i-1))`` the paper verifies with: every later in-block position is masked in that pass.
CPS (:mod:`engine.diffusion.lattice_path`) searches the lattice for a left-to-right coherent path, scored by the
dLLM and a causal trigram of the text so far; without CPS the draft is the per-position argmax (or draw). The
target verifies the chain with the shared verifier, so the output is the target's own (lossless). ADL adapts k:
``k_{t+1} = clip(L~gen + delta * 1[L~acc >= L~gen], k_min, k_max)`` over EMAs of the raw draft's length before
its first EOS and the accepted prefix length.

Sampling (temperature > 0): without CPS each draft token is drawn from its processed lattice row, which the
verifier gets as q. A beam-searched path is not a draw from any q we can state, so with CPS the draft is
deterministic (q = one-hot, as prompt lookup): the verifier accepts a token with probability p(token) and the
output still follows the processed target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, register
from engine.diffusion.lattice_path import NgramProxy, build_lattice, search_path
from engine.diffusion.unmask import MaskPredictor, predictor_for
from engine.events import DecoderMetric, Event
from engine.params import Param, ParamError
from engine.speculative.drafts import same_tokenizer_model
from engine.speculative.rounds import SAMPLING_PARAMS, Draft, Drafter, Outcome, Sampling, speculative_rounds


@dataclass
class AdaptiveLength:
    """DiffuSpec's ADL. ``rho`` weighs the history in both EMAs (the first round sets them); k is rounded half up."""

    k_min: int
    k_max: int
    delta: int
    rho: float
    k: int = field(init=False)
    generated: float | None = field(default=None, init=False)  # EMA of L_gen
    accepted: float | None = field(default=None, init=False)  # EMA of L_acc

    def __post_init__(self) -> None:
        self.k = self.k_max  # k_1 = k_max

    def update(self, generated: int, accepted: int) -> int:
        """Fold in one round's ``L_gen`` and ``L_acc``; returns the next round's k."""
        self.generated = generated if self.generated is None else self.rho * self.generated + (1 - self.rho) * generated
        self.accepted = accepted if self.accepted is None else self.rho * self.accepted + (1 - self.rho) * accepted
        bonus = self.delta if self.accepted >= self.generated else 0
        self.k = min(self.k_max, max(self.k_min, math.floor(self.generated + bonus + 0.5)))
        return self.k


def length_before_eos(tokens: list[int], eos: int | None) -> int:
    """``L_gen = min(first_EOS - 1, k)``: the raw draft's tokens before its first EOS."""
    return tokens.index(eos) if eos in tokens else len(tokens)


@dataclass(frozen=True)
class Search:
    """CPS settings: lattice truncation (``tau``, ``m_max``), beam width and the dLLM's weight ``lam``."""

    tau: float
    m_max: int
    beam: int
    lam: float


class DiffuSpecDrafter(Drafter):
    """One dLLM pass per round, then CPS (or the per-position argmax/draw) for the chain; ADL in ``observe``."""

    source = "diffuspec"

    def __init__(self, predictor: MaskPredictor, sampling: Sampling, length: AdaptiveLength, adaptive: bool,
                 search: Search | None, vocab_size: int, answer_end: int = 0) -> None:
        self.predictor = predictor
        self.answer_end = answer_end  # context length at which the drafter's trained canvas ends (0 = none)
        self.sampling = sampling
        self.length = length
        self.adaptive = adaptive
        self.search = search
        self.vocab_size = vocab_size  # the target's
        self.proxy = NgramProxy(vocab_size)
        self.raw_length = 0  # this round's L_gen, for observe
        self.rounds = self.drafted_k = self.positions = self.candidates = 0  # running totals for the metrics

    def propose(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.length.k, max_depth)
        self.raw_length = 0
        if k <= 0:
            return Draft([], [])
        # A fixed-canvas dLLM (trained on [prompt | answer padded to N]) sees the room it was trained with.
        masks = max(k, self.answer_end - len(context))
        canvas = torch.tensor(context + [self.predictor.mask_id] * masks)
        # only the target's ids: a drafter's own padding tokens after them are never drafted
        logits = self.predictor.logits(canvas)[len(context): len(context) + k, : self.vocab_size]
        logq = logits.float().cpu().log_softmax(-1)
        eos = self.predictor.eos_id
        self.raw_length = length_before_eos(logq.argmax(-1).tolist(), eos)
        self.rounds += 1
        self.drafted_k += k
        if self.search is None:
            return self._plain_draft(logq, k, eos)
        return self._searched_draft(self.search, logq, context, k, eos)

    def _plain_draft(self, logq: Tensor, k: int, eos: int | None) -> Draft:
        """The per-position argmax (greedy) or independent draws from the processed rows, cut after the first EOS."""
        rows = logq if self.sampling.greedy else self.sampling.process(logq).logprobs
        tokens: list[int] = []
        for row in rows:
            tokens.append(self.sampling.choose(row))
            if tokens[-1] == eos:
                break
        probs = [float(rows[i, token].exp()) for i, token in enumerate(tokens)]
        logprobs = None if self.sampling.greedy else rows[: len(tokens)]
        return Draft(tokens, probs, logprobs, calls=1, mode=f"k={k} · per-position {'argmax' if self.sampling.greedy else 'draw'}")

    def _searched_draft(self, search: Search, logq: Tensor, context: list[int], k: int, eos: int | None) -> Draft:
        lattice = build_lattice(logq, search.tau, search.m_max, eos)
        self.proxy.fit(context)
        path = search_path(lattice, context, self.proxy, search.lam, search.beam, eos)
        width = sum(len(c) for c in lattice)
        self.positions += len(lattice)
        self.candidates += width
        argmax = [c[0][0] for c in lattice]
        # Greedy: the draft probability shown is the dLLM's; sampling: the verifier's q is one-hot (see the docstring).
        probs = [float(logq[i, t].exp()) if self.sampling.greedy else 1.0 for i, t in enumerate(path.tokens)]
        return Draft(
            path.tokens, probs, None, calls=1, scores=path.scores,
            sources=["diffuspec:argmax" if t == argmax[i] else "diffuspec:cps" for i, t in enumerate(path.tokens)],
            mode=f"k={k} · lattice {len(lattice)} positions, {width} candidates · path score {path.mean_score:.3f}/token",
        )

    def observe(self, outcome: Outcome) -> None:
        if self.adaptive and outcome.draft.tokens:
            self.length.update(self.raw_length, outcome.verdict.accepted)

    def metrics(self) -> list[DecoderMetric]:
        """Means over the rounds drafted: the run's summary."""
        found = [DecoderMetric("diffuspec_mean_k", self.drafted_k / max(1, self.rounds), "Mean draft length k_t")]
        if self.positions:
            found.append(DecoderMetric("diffuspec_mean_lattice_width", self.candidates / self.positions,
                                       "Mean CPS candidates kept per lattice position"))
        return found


def diffuspec(ctx: DecodeContext) -> Iterator[Event]:
    params = ctx.params
    if not params["drafter"]:
        raise ParamError("drafter must name a diffusion LM with the target's tokenizer, e.g. waitline-mdlm")
    if params["k_min"] > params["k_max"]:
        raise ParamError(f"k_min={params['k_min']} must not exceed k_max={params['k_max']}")
    drafter_model = same_tokenizer_model(ctx, params["drafter"], 0, "drafter", "drafter", extra_specials=True)
    predictor = predictor_for(drafter_model)
    sampling = Sampling.of(ctx)
    length = AdaptiveLength(params["k_min"], params["k_max"], params["delta"], params["rho"])
    search = Search(params["tau"], params["m_max"], params["beam"], params["lam"]) if params["cps"] else None
    trained_canvas = getattr(predictor.model.model.config, "diffusion_gen_length", 0) if params["answer_canvas"] else 0
    drafter = DiffuSpecDrafter(predictor, sampling, length, params["adl"], search, ctx.model.vocab_size,
                               len(ctx.prompt_ids) + trained_canvas if trained_canvas else 0)
    ctx.on_finish(drafter.metrics)
    yield from speculative_rounds(ctx, drafter, sampling)


SPEC = register(
    DecoderSpec(
        name="diffuspec",
        family="speculative",
        summary="DiffuSpec: a diffusion LM drafts a block in one pass, a path search makes it causal, the target verifies.",
        params=(
            Param("drafter", "str", "waitline-mdlm", "Diffusion LM that drafts; it must share the target's tokenizer.",
                  loads_files=True),
            # The paper's 20-30 (delta 10) suit 7B models on long answers; waitline answers in <= 72 tokens.
            Param("k_max", "int", 24, "Longest draft (k_1, and k always without ADL); the paper's 30 is for 7B "
                  "models, 24 is a third of the built-in pair's 72-token answers.", 1, 256, limit="draft_tokens"),
            Param("k_min", "int", 4, "ADL: shortest draft (paper 20; 4 keeps short answers from over-drafting).", 1, 256, limit="draft_tokens"),
            Param("delta", "int", 4, "ADL: extra tokens once accepted length keeps up with drafted length (paper 10, "
                  "scaled down with k).", 0, 256),
            Param("rho", "float", 0.5, "ADL: EMA weight of the past rounds (paper 0.5).", 0.0, 1.0),
            Param("adl", "bool", True, "Adaptive draft length; off = always k_max tokens."),
            Param("answer_canvas", "bool", True, "Mask up to the drafter's trained answer canvas (config "
                  "diffusion_gen_length, e.g. waitline-mdlm's 72) rather than only k positions; the draft is still "
                  "the first k. Off, or a drafter without that setting = k masks, as in the paper."),
            Param("cps", "bool", True, "Causal-consistency path search; off = the per-position argmax (or draw)."),
            Param("tau", "float", 0.8, "CPS: keep the smallest top-m candidate set with this mass per position.", 0.0, 1.0),
            Param("m_max", "int", 15, "CPS: most candidates per position (EOS is always added).", 1, 256),
            Param("beam", "int", 3, "CPS: beam width of the left-to-right path search.", 1, 64, limit="beams"),
            Param("lam", "float", 0.5, "CPS: weight of the dLLM's log q against the trigram's log p (1 = dLLM only).",
                  0.0, 1.0),
            *SAMPLING_PARAMS,
        ),
        run=diffuspec,
        lossless=True,
    )
)
