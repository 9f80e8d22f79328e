"""Drafting with a second model, shared by every decoder that drafts with one (speculative, SpecDec++, DySpec,
PEARL, RSD, RAPID, LayerSkip, EAD, DiffuSpec, cross-tokenizer): the draft-model drafter with its draft-length
schedules, the parameters that pick its model, and the process-wide cache of draft models loaded by name, each
loaded in its target's dtype and on its target's device.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Protocol

import torch

from engine.context import DecodeContext
from engine.events import r7
from engine.models import canonical_name, load_model
from engine.models.handle import ForwardResult, LoadedModel, ModelError
from engine.params import Param, ParamError
from engine.speculative.cache import PrefixCache
from engine.speculative.rounds import NO_DRAFT, Draft, Drafter, Outcome, Sampling
from engine.speculative.skip import SharedSkipCache, layer_skipped_model
from engine.speculative.truncated import truncated_model

# Draft models by (name, dtype, device), kept so repeated runs (benchmarks, the app) do not reload them.
_DRAFT_MODELS: OrderedDict[tuple[str, str, str], LoadedModel] = OrderedDict()
MAX_DRAFT_MODELS = 8  # the least recently used is dropped: names typed per request do not pile up in memory
TOKENIZER_PROBES = 1024  # token ids compared to tell another tokenizer of the same size (it differs at most ids)


SCHEDULES = ("constant", "heuristic", "confidence")
SCHEDULE_HELP = (
    "Draft length: constant k; heuristic (transformers: all accepted -> k + 2, else max(1, k - 1)); "
    "confidence (stop once the draft's p(token) < confidence_threshold)."
)

# A stop rule sees the draft probabilities of the tokens drafted so far and says whether to stop drafting now.
StopRule = Callable[[list[float]], bool]


class DraftCache(Protocol):
    """What a :class:`DraftModelDrafter` needs of its cache: a :class:`PrefixCache`, or one sharing the target's."""

    def sync(self, context: list[int]) -> list[int]: ...

    def forward(self, tokens: list[int], keep: int = 0) -> ForwardResult: ...


class DraftModelDrafter(Drafter):
    """Drafts up to ``num_draft_tokens`` tokens autoregressively with its own rolled-back cache.

    ``num_draft_tokens`` is k, the next round's draft length, which the ``heuristic`` schedule moves after each
    round. ``stop_rule`` (SpecDec++) and the ``confidence`` schedule end a draft early; a round's chain length is
    the k it used. With a :class:`SharedSkipCache` it drafts only once the target's cache is ready (from the round
    after the prompt's) and crops its draft back before the target verifies.
    """

    partial_verify = True  # its cache follows the committed context, whatever was verified

    def __init__(
        self,
        model: LoadedModel,
        source: str,
        sampling: Sampling,
        num_draft_tokens: int = 4,
        schedule: str = "constant",
        confidence_threshold: float = 0.4,
        stop_rule: StopRule | None = None,
        cache: DraftCache | None = None,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ParamError(f"schedule={schedule!r} is not one of {list(SCHEDULES)}")
        self.cache = cache if cache is not None else PrefixCache(model)
        self.source = source
        self.sampling = sampling
        self.num_draft_tokens = num_draft_tokens
        self.schedule = schedule
        self.confidence_threshold = confidence_threshold
        self.stop_rule = stop_rule

    def propose(self, context: list[int], max_depth: int) -> Draft:
        if not isinstance(self.cache, SharedSkipCache):
            return self._chain(context, max_depth)
        if not self.cache.ready(context):  # the prompt's round: the target holds nothing to draft from yet
            return NO_DRAFT
        try:
            return self._chain(context, max_depth)
        finally:
            self.cache.release()  # the target verifies from its own verified context

    def _chain(self, context: list[int], max_depth: int) -> Draft:
        k = min(self.num_draft_tokens, max_depth)
        tokens: list[int] = []
        probs: list[float] = []
        rows: list[torch.Tensor] = []
        feed = self.cache.sync(context) if k else []
        while len(tokens) < k and not (tokens and self._stops(probs)):
            out = self._forward(feed, first=not tokens)
            logprobs = self.sampling.process(out.logits[0, -1]).logprobs
            token = self.sampling.choose(logprobs)
            tokens.append(token)
            probs.append(r7(logprobs[token].exp()))  # rounded here too: the stop rule reads these
            rows.append(logprobs)
            feed = [token]
        return Draft(tokens, probs, torch.stack(rows) if rows else None, calls=len(tokens))

    def _forward(self, feed: list[int], first: bool) -> ForwardResult:
        """One draft forward extending the cache: the context's new tokens (``first``), then each drafted token."""
        return self.cache.forward(feed, keep=1)

    def observe(self, outcome: Outcome) -> None:
        drafted = len(outcome.draft.tokens)
        if self.schedule == "heuristic" and drafted:
            all_accepted = outcome.verdict.accepted == drafted
            self.num_draft_tokens = self.num_draft_tokens + 2 if all_accepted else max(1, self.num_draft_tokens - 1)

    def _stops(self, probs: list[float]) -> bool:
        """Whether to stop after the tokens drafted so far (their rounded draft probs, as the round records them)."""
        if self.schedule == "confidence" and probs[-1] < self.confidence_threshold:
            return True
        return self.stop_rule is not None and self.stop_rule(probs)


def draft_model_drafter(
    ctx: DecodeContext, sampling: Sampling, num_draft_tokens: int = 4, target: PrefixCache | None = None,
    **options: Any,
) -> DraftModelDrafter:
    """The drafter the ``draft_model``/``draft_layers`` parameters describe (DRAFTER_PARAMS).

    ``options`` go to :class:`DraftModelDrafter` (``schedule``, ``confidence_threshold``, ``stop_rule``). Given the
    round loop's ``target`` cache, a draft made of the target's first layers drafts in it (:class:`SharedSkipCache`):
    the target's KV of those layers is the draft's own, so the draft never runs the prompt or catches up on
    committed tokens (on a 600-token prompt its prefill had cost a tenth of a 32-token run). The chain drafter's
    ``propose`` keeps to the shared cache's terms; a caller that drafts on the cache itself (DySpec's tree grower)
    drafts only when it is ``ready`` and crops its draft back before the target verifies (``sync``/``release``).
    """
    name, layers = ctx.params["draft_model"], ctx.params["draft_layers"]
    model = same_tokenizer_model(ctx, name, layers, "draft_model", "draft_layers")
    cache = None
    if target is not None and not name:
        model = layer_skipped_model(ctx.model, range(layers, ctx.model.num_layers))
        cache = SharedSkipCache(model, target)
    return DraftModelDrafter(model, "draft_model" if name else f"draft_layers:{layers}", sampling, num_draft_tokens,
                             cache=cache, **options)


def same_tokenizer_model(ctx: DecodeContext, name: str, layers: int, name_param: str, layers_param: str,
                         extra_specials: bool = False) -> LoadedModel:
    """The model ``name`` (which must share the target's vocabulary; ``extra_specials``: see :func:`tokenizer_twin`),
    or without a name the target's first ``layers``."""
    if not name:
        try:
            return truncated_model(ctx.model, layers)
        except ValueError as error:
            raise ParamError(str(error).replace("num_layers", layers_param)) from None
    return tokenizer_twin(name, ctx.model, name_param, extra_specials)


def tokenizer_twin(name: str, target: LoadedModel, name_param: str, extra_specials: bool = False) -> LoadedModel:
    """The model ``name`` loaded beside ``target`` (:func:`load_draft_model`), refused unless its token ids mean the
    target's tokens: the same vocabulary size, and the same tokens at TOKENIZER_PROBES ids spread over it.

    ``extra_specials``: it may also have special tokens after the target's last id (a dLLM's padding tokens, as
    waitline-mdlm's Rainbow Padding adds to the AR twin's vocabulary); the caller then reads only the target's ids."""
    model = load_draft_model(name, target, role=name_param)
    extended = extra_specials and model.vocab_size > target.vocab_size and _specials_from(model, target.vocab_size)
    if model.vocab_size != target.vocab_size and not extended:
        raise ParamError(
            f"{name_param} {name!r} has a vocabulary of {model.vocab_size}, the target {target.vocab_size}: "
            "it needs the target's tokenizer"
        )
    compared = len(target.tokenizer) if extended else None  # an extended vocabulary: only the target's ids
    if model.tokenizer is not target.tokenizer and _probed_tokens(model, compared) != _probed_tokens(target):
        raise ParamError(
            f"{name_param} {name!r} has the target's vocabulary size but another tokenizer (its token ids stand for "
            "other tokens): it needs the target's tokenizer"
        )
    return model


def _specials_from(model: LoadedModel, first: int) -> bool:
    """Whether every id of ``model`` from ``first`` on is one of its tokenizer's special tokens."""
    return set(range(first, model.vocab_size)) <= set(model.tokenizer.all_special_ids)


def _probed_tokens(model: LoadedModel, size: int | None = None) -> tuple[int, list[str]]:
    """The tokenizer's length (or ``size``: its first ``size`` ids) and its tokens at TOKENIZER_PROBES ids spread
    evenly (comparing all ~0.1 s per 50k)."""
    size = size or len(model.tokenizer)
    return size, model.tokenizer.convert_ids_to_tokens(list(range(0, size, max(1, size // TOKENIZER_PROBES))))


def load_draft_model(name: str, target: LoadedModel, role: str = "draft model") -> LoadedModel:
    """The model ``name`` in ``target``'s dtype and on its device (a draft's forwards run beside the target's), kept
    loaded while it is among the MAX_DRAFT_MODELS used last (runs reuse it round after round); ``role`` names it in
    errors."""
    if not name:
        raise ParamError("draft_model must name a model: a built-in, a local folder or a Hub id")
    key = (canonical_name(name), target.dtype_name, str(target.device))
    model = _DRAFT_MODELS.get(key)
    if model is None:
        try:
            model = load_model(key[0], dtype=key[1], device=key[2])
        except ModelError as error:
            raise ParamError(f"cannot load {role} {name!r}: {error}") from None
    _DRAFT_MODELS[key] = model
    _DRAFT_MODELS.move_to_end(key)
    while len(_DRAFT_MODELS) > MAX_DRAFT_MODELS:  # a run still drafting keeps its model: only the cache lets go
        _DRAFT_MODELS.popitem(last=False)
    return model


# The parameters that pick a draft model, shared by every decoder that drafts with one.
DRAFTER_PARAMS = (
    Param("draft_model", "str", "", "Draft model with the target's tokenizer (empty = the target's first draft_layers "
          "layers).", loads_files=True),
    Param("draft_layers", "int", 2, "Without draft_model: draft with the target's first N layers plus its head.", 1, 1000),
)
