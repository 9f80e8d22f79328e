"""The canvas engine every diffusion decoder shares: ``[prompt | MASK x L]`` unmasked step by step.

One step = one denoiser call: the model proposes a token ``x0`` for every position (Gumbel-max in float64, or
argmax at temperature 0), each masked position gets a confidence score, and the decoder's *commit rule* picks
which masked positions of the active block keep their proposal; the rest stay masked ("remasking" in LLaDA's
words). Blocks run left to right (semi-autoregressive when ``block_length < gen_length``). Decoders differ only
in the rule (top-k by schedule, thresholds, anchors, a learnt filter, revision) and in how the logits are
computed (full forward, prefix or dual KV cache, delayed cache): both are small objects passed to ``unmask``.

References: LLaDA ``generate.py`` (schedule, Gumbel noise, low-confidence remasking, CFG), Dream's
``diffusion_generate`` (logits shift, confidence kinds), ParallelBench (decoding order vs left to right).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import torch
from torch import Tensor

from engine.context import DecodeContext
from engine.events import Candidate, DecoderMetric, DiffusionStep, Event, Output
from engine.models.handle import LoadedModel
from engine.params import Param, ParamError

CONFIDENCE_KINDS = ("probability", "margin", "entropy", "random")
DIFFUSION_MODEL_TYPES = ("llada", "dream", "mdlm", "bd3lm", "a2d-qwen3", "a2d-qwen2", "a2d-llama", "lladamoe")


@dataclass(frozen=True)
class MaskPredictor:
    """A diffusion LM seen as ``canvas -> logits per position``, with the ids and conventions it needs.

    ``shift``: AR-initialised models (Dream, DiffuGPT) predict token i+1 at position i, so logits move one right.
    """

    model: LoadedModel
    mask_id: int
    eos_id: int | None
    shift: bool = False

    @torch.inference_mode()
    def logits(self, canvas: Tensor, cache: object | None = None, position_ids: Tensor | None = None) -> Tensor:
        """float32 logits ``[tokens, vocab]`` for the fed ``canvas`` (1-D), the mask token never proposed."""
        out = self.model.forward(canvas.view(1, -1), cache, position_ids=position_ids).logits[0]
        if self.shift:
            out = torch.cat([out[:1], out[:-1]], dim=0)
        out[:, self.mask_id] = -math.inf  # MDLM's SUBS parameterisation: a position never "predicts" MASK
        return out


def predictor_for(model: LoadedModel, shift: bool | None = None) -> MaskPredictor:
    """The mask predictor of a loaded diffusion LM; a clear error for an autoregressive model."""
    config = model.model.config
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(model.tokenizer, "mask_token_id", None)
    architectures = getattr(config, "architectures", None) or [type(model.model).__name__]
    bidirectional = (
        getattr(config, "is_causal", True) is False
        or any(name.endswith("ForMaskedLM") for name in architectures)
        or getattr(config, "model_type", "") in DIFFUSION_MODEL_TYPES
    )
    if mask_id is None or not bidirectional:
        raise ParamError(
            f"{model.name} is not a diffusion (masked) LM: it needs bidirectional attention and a mask token. "
            "Load waitline-mdlm, a ModernBERT chat model, LLaDA or Dream, or use an autoregressive decoder"
        )
    if shift is None:
        shift = bool(getattr(config, "diffusion_shift_logits", getattr(config, "model_type", "") == "dream"))
    eos = model.tokenizer.eos_token_id
    return MaskPredictor(model, int(mask_id), None if eos is None else int(eos), shift)


# --- proposals and confidences -------------------------------------------------------------------------------


def propose(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """x0 per position: argmax at temperature 0, else Gumbel-max in float64 (= a draw from softmax(logits/T)).

    LLaDA's form: ``exp(logits) / (-log U) ** T``; low precision would bias the draw, hence float64.
    """
    if temperature <= 0:
        return logits.argmax(-1)
    noise = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    scaled = logits.double() / temperature - torch.log(-torch.log(noise))  # log of exp(l/T) / (-log U)
    return scaled.argmax(-1)


def confidence(probs: Tensor, x0: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """Score per position of its proposal: probability (MaskGIT top-1), top-1 minus top-2 margin, negative
    entropy (Dream's ``entropy``), or uniform noise (LLaDA's ``random`` remasking)."""
    if kind == "probability":
        return probs.gather(-1, x0[:, None])[:, 0]
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        return (probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
    if kind == "random":
        return torch.rand(probs.shape[0], generator=generator, dtype=torch.float64).float()
    raise ParamError(f"confidence must be one of {', '.join(CONFIDENCE_KINDS)}, not {kind!r}")


def transfer_counts(masked: int, steps: int) -> list[int]:
    """LLaDA's linear schedule: ``masked`` tokens over ``steps`` steps, the remainder going to the first steps."""
    base, extra = divmod(masked, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def blocks(gen_length: int, block_length: int) -> list[tuple[int, int]]:
    """Block boundaries over the generated part, left to right; the last block may be shorter."""
    return [(start, min(start + block_length, gen_length)) for start in range(0, gen_length, block_length)]


# --- one step as a commit rule sees it -----------------------------------------------------------------------


@dataclass
class StepView:
    """The state a commit rule decides on; every tensor is over the generated positions.

    ``confidence`` is ``-inf`` where a position cannot be committed (not masked, or outside the active block).
    ``quota`` is the schedule's count for this step (rules without a schedule may ignore it); ``block_steps`` is
    how many steps the schedule gives the active block (Dream's timesteps and Mask-Predict's iterations need it).
    """

    step: int
    block: tuple[int, int]
    step_in_block: int
    quota: int
    proposals: Tensor
    probs: Tensor
    confidence: Tensor
    masked: Tensor
    canvas: Tensor
    block_steps: int = 1

    @property
    def eligible(self) -> Tensor:
        return torch.isfinite(self.confidence)


class CommitRule(Protocol):
    def __call__(self, view: StepView) -> Tensor:
        """Bool over generated positions: which eligible positions keep their proposal this step."""


def top_k_rule(view: StepView) -> Tensor:
    """LLaDA: the ``quota`` most confident eligible positions."""
    return top_k_positions(view.confidence, view.quota)


def top_k_positions(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` highest finite scores (fewer if fewer are finite)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    k = min(k, int(torch.isfinite(scores).sum()))
    if k > 0:
        chosen[scores.topk(k).indices] = True
    return chosen


def at_least_top_one(view: StepView, chosen: Tensor) -> Tensor:
    """Threshold rules always commit the most confident position, so every call makes progress."""
    return chosen | top_k_positions(view.confidence, 1)


# --- how logits are obtained --------------------------------------------------------------------------------


@dataclass
class Denoised:
    logits: Tensor  # [gen_length, vocab] over the generated part
    calls: int = 1
    cache: str = ""  # "" = full forward; otherwise what was reused (shown per step)


class Denoiser(Protocol):
    def __call__(self, canvas: Tensor, prompt_length: int, view_block: tuple[int, int], fresh: Tensor) -> Denoised:
        """Logits for the generated part of the full ``canvas``. ``fresh`` marks generated positions committed
        in the previous step (caches that delay by one step use it)."""


@dataclass
class FullForward:
    """Recompute the whole canvas each step; optional unsupervised classifier-free guidance (SMDM / LLaDA):
    ``un + (w + 1)(cond - un)`` with the unconditional pass seeing the prompt masked."""

    predictor: MaskPredictor
    cfg_scale: float = 0.0

    def __call__(self, canvas: Tensor, prompt_length: int, view_block: tuple[int, int], fresh: Tensor) -> Denoised:
        cond = self.predictor.logits(canvas)[prompt_length:]
        if self.cfg_scale <= 0:
            return Denoised(cond)
        blind = canvas.clone()
        blind[:prompt_length] = self.predictor.mask_id
        un = self.predictor.logits(blind)[prompt_length:]
        guided = un + (self.cfg_scale + 1) * (cond - un)
        guided[:, self.predictor.mask_id] = -math.inf
        return Denoised(guided, calls=2)


# --- the loop -----------------------------------------------------------------------------------------------


@dataclass
class UnmaskSettings:
    gen_length: int
    block_length: int
    steps: int  # total schedule steps (LLaDA); threshold rules loop until the block is full
    temperature: float = 0.0
    confidence: str = "probability"
    end_at_eos: bool = False  # Learn2PD's end-of-text prediction: a committed EOS ends the canvas there
    stop_when_settled: bool = False  # stop once the answer can no longer change (_settled)
    max_steps: int = 0  # safety bound for rules that may commit nothing; 0 = 4 x gen_length


@dataclass
class _Canvas:
    ids: Tensor
    prompt_length: int
    mask_id: int
    order: dict[int, int] = field(default_factory=dict)  # generated position -> step it was committed

    @property
    def generated(self) -> Tensor:
        return self.ids[self.prompt_length:]

    def masked(self) -> Tensor:
        return self.generated == self.mask_id


def unmask(
    ctx: DecodeContext,
    predictor: MaskPredictor,
    rule: CommitRule,
    settings: UnmaskSettings,
    denoiser: Denoiser | None = None,
    revise: Callable[[StepView], Tensor] | None = None,
) -> Iterator[Event]:
    """Run the blocks, one ``DiffusionStep`` per denoiser call, then the final ``Output``; the order metric is the
    run's summary.

    ``revise`` (Mask-Predict) may send committed positions back to MASK after a step's commits.
    """
    _check(settings)
    denoiser = denoiser or FullForward(predictor)
    prompt = torch.tensor(ctx.prompt_ids, dtype=torch.long)
    canvas = _Canvas(torch.cat([prompt, torch.full((settings.gen_length,), predictor.mask_id)]), len(prompt),
                     predictor.mask_id)
    ctx.on_finish(lambda: _order_metric(canvas))
    all_blocks = blocks(settings.gen_length, settings.block_length)
    steps_per_block = max(1, settings.steps // len(all_blocks))
    fresh = torch.zeros(settings.gen_length, dtype=torch.bool)
    step, limit = 0, settings.max_steps or 4 * settings.gen_length
    for block in all_blocks:
        in_block = torch.zeros(settings.gen_length, dtype=torch.bool)
        in_block[block[0]: block[1]] = True
        schedule = transfer_counts(int((canvas.masked() & in_block).sum()), steps_per_block)
        step_in_block = 0
        while bool((canvas.masked() & in_block).any()):
            if ctx.cancel.is_set() or step >= limit:
                break
            started = time.perf_counter()
            denoised = denoiser(canvas.ids, canvas.prompt_length, block, fresh)
            view = _view(ctx, canvas, denoised.logits, settings, block, in_block, step, step_in_block, schedule)
            chosen = rule(view) & view.eligible
            remasked = revise(view) if revise is not None else torch.zeros_like(chosen)
            fresh = _commit(canvas, view, chosen, remasked, step)
            truncated = _end_at_eos(canvas, predictor, step) if settings.end_at_eos else []
            yield _step_event(ctx, canvas, view, denoised, chosen, remasked, block, started, truncated)
            step, step_in_block = step + 1, step_in_block + 1
            if settings.stop_when_settled and _settled(canvas, predictor):
                yield _output(canvas, predictor)
                return
    yield _output(canvas, predictor)


def _check(settings: UnmaskSettings) -> None:
    if settings.gen_length < 1 or settings.block_length < 1:
        raise ParamError("gen_length and block_length must be at least 1")
    if settings.steps < 1:
        raise ParamError("steps must be at least 1")


def _view(ctx: DecodeContext, canvas: _Canvas, logits: Tensor, settings: UnmaskSettings, block: tuple[int, int],
          in_block: Tensor, step: int, step_in_block: int, schedule: list[int]) -> StepView:
    probs = logits.softmax(-1)
    proposals = propose(logits, settings.temperature, ctx.generator)
    masked = canvas.masked()
    scores = confidence(probs, proposals, settings.confidence, ctx.generator)
    scores = scores.masked_fill(~(masked & in_block), -math.inf)
    quota = schedule[step_in_block] if step_in_block < len(schedule) else int((masked & in_block).sum())
    return StepView(step, block, step_in_block, max(1, quota), proposals, probs, scores, masked,
                    canvas.generated.clone(), len(schedule))


def _commit(canvas: _Canvas, view: StepView, chosen: Tensor, remasked: Tensor, step: int) -> Tensor:
    generated = canvas.generated
    generated[chosen] = view.proposals[chosen]
    generated[remasked] = canvas.mask_id
    for position in chosen.nonzero().flatten().tolist():
        canvas.order.setdefault(position, step)
    return chosen


def _first_eos(canvas: _Canvas, predictor: MaskPredictor) -> int | None:
    """The generated position of the first committed end of text, if there is one."""
    if predictor.eos_id is None:
        return None
    hits = (canvas.generated == predictor.eos_id).nonzero().flatten()
    return int(hits[0]) if len(hits) else None


def _end_at_eos(canvas: _Canvas, predictor: MaskPredictor, step: int) -> list[int]:
    """After the first committed EOS everything is end of text: fill those masks without a model call."""
    generated, first = canvas.generated, _first_eos(canvas, predictor)
    if first is None:
        return []
    after = torch.arange(len(generated)) > first
    filled = (after & (generated == canvas.mask_id)).nonzero().flatten().tolist()
    generated[filled] = predictor.eos_id
    for position in filled:
        canvas.order.setdefault(position, step)
    return filled


def _settled(canvas: _Canvas, predictor: MaskPredictor) -> bool:
    """An end of text is committed and nothing before it is masked: as committed tokens are never revised, the answer
    is final, and later steps would only fill the padding after it."""
    first = _first_eos(canvas, predictor)
    return first is not None and not bool(canvas.masked()[:first].any())


def _step_event(ctx: DecodeContext, canvas: _Canvas, view: StepView, denoised: Denoised, chosen: Tensor,
                remasked: Tensor, block: tuple[int, int], started: float, truncated: list[int]) -> DiffusionStep:
    top = view.probs.topk(min(ctx.record_top_k, view.probs.shape[-1]), dim=-1)
    proposals = [
        [Candidate(int(t), p, p) for t, p in zip(ids, ps)] if masked else []
        for ids, ps, masked in zip(top.indices.tolist(), top.values.tolist(), view.masked.tolist())
    ]
    return DiffusionStep(
        step=view.step,
        canvas=canvas.generated.tolist(),
        mask_id=canvas.mask_id,
        committed_positions=chosen.nonzero().flatten().tolist() + truncated,
        confidence=[c if math.isfinite(c) else -math.inf for c in view.confidence.tolist()],
        proposals=proposals,
        block=[block[0], block[1]],
        model_calls=denoised.calls,
        seconds=time.perf_counter() - started,
        cache=denoised.cache,
        remasked_positions=remasked.nonzero().flatten().tolist(),
    )


def _output(canvas: _Canvas, predictor: MaskPredictor) -> Output:
    generated = canvas.generated.tolist()
    if predictor.eos_id is not None and predictor.eos_id in generated:
        generated = generated[: generated.index(predictor.eos_id) + 1]
    return Output([t for t in generated if t != canvas.mask_id])


def _order_metric(canvas: _Canvas) -> list[DecoderMetric]:
    order = [canvas.order[p] for p in sorted(canvas.order)]
    return [DecoderMetric("order_kendall_tau", kendall_tau(order),
                          "Kendall tau between the commit order and left to right (1 = strictly left to right)")]


def kendall_tau(order: list[int]) -> float:
    """Kendall tau-b between commit steps (ties = same step) and positions 0..n-1, as ParallelBench reports."""
    n = len(order)
    concordant = discordant = tied = 0
    for i in range(n):
        for j in range(i + 1, n):
            if order[i] == order[j]:
                tied += 1
            elif order[i] < order[j]:
                concordant += 1
            else:
                discordant += 1
    pairs = n * (n - 1) / 2
    denominator = math.sqrt(pairs * (pairs - tied)) if pairs else 0.0
    return (concordant - discordant) / denominator if denominator else 1.0


# --- parameters shared by the decoders ----------------------------------------------------------------------

CANVAS_PARAMS = (
    Param("gen_length", "int", 0, "Canvas length (masked positions); 0 = the run's max new tokens.", 0, 4096, limit="max_new_tokens"),
    Param("block_length", "int", 0, "Semi-autoregressive block length; 0 = one block over the whole canvas.", 0, 4096),
    Param("temperature", "float", 0.0, "0 = argmax proposals; > 0 = Gumbel-max sampling in float64.", 0.0, 5.0),
    Param("stop_when_settled", "bool", False, "Stop once an end of text is committed with every position before it "
          "committed: the answer is final (committed tokens are never revised), so the calls that would fill the "
          "padding after it are saved. Off = every step of the schedule, as the reference implementations run."),
)


def canvas_lengths(ctx: DecodeContext) -> tuple[int, int]:
    """(gen_length, block_length) from the parameters, defaulting to the run's length and one block."""
    gen_length = ctx.params.get("gen_length") or ctx.max_new_tokens
    block_length = ctx.params.get("block_length") or gen_length
    return gen_length, min(block_length, gen_length)


def one_step_per_position(gen_length: int, block_length: int) -> int:
    """LLaDA's default schedule: as many steps as canvas positions."""
    return gen_length


def canvas_settings(ctx: DecodeContext, default_steps: Callable[[int, int], int], **own) -> UnmaskSettings:
    """UnmaskSettings from the shared parameters (CANVAS_PARAMS, and ``steps`` where a decoder offers it, 0 meaning
    ``default_steps(gen_length, block_length)``); ``own`` sets the decoder's other fields."""
    gen_length, block_length = canvas_lengths(ctx)
    return UnmaskSettings(
        gen_length=gen_length, block_length=block_length,
        steps=ctx.params.get("steps") or default_steps(gen_length, block_length),
        temperature=ctx.params["temperature"], stop_when_settled=ctx.params.get("stop_when_settled", False), **own,
    )
