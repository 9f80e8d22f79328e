"""FFN activation sparsity per generated token: BlockFFN's token-level and chunk-level measures (Song et al. 2025).

The activation is each decoder layer's FFN intermediate vector, the input of its down projection: act(gate(x)) *
up(x) in a gated MLP (Llama, Gemma, Qwen), act(fc(x)) in GPT-2's. BlockFFN counts a unit as active when its
activation is non-zero (its router is a ReLU); SiLU and GELU almost never give exact zeros, so here a neuron is
inactive for a token when |a| <= threshold, the threshold either absolute or (the default) a share of that token's
largest |a| in the layer, which makes it comparable across layers and models. ``threshold=0`` is BlockFFN's own rule.

Token-level sparsity (TLS): the share of a layer's neurons inactive for one token. L-token chunk-level sparsity
(CLS): the share inactive for every token of a chunk of L consecutive tokens (1 - |union of active| / neurons),
the output split into fixed chunks [0, L), [L, 2L), ... as BlockFFN's statistics split a sequence; a partial last
chunk has none. A step's activations are those of the position that predicts its token (the forward's last row
in the token loop), so the measures describe the computation that produced each output token.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from torch import Tensor, nn

from engine.events import FfnSparsity
from engine.params import Param, ParamError

FFN_THRESHOLD = Param("ffn_threshold", "float", 0.01, "a neuron is inactive when |activation| <= this (a share of "
                      "the token's largest |activation| in the layer unless absolute)", min=0.0, max=1e6)
FFN_CHUNK = Param("ffn_chunk", "int", 8, "tokens per chunk of the chunk-level sparsity (BlockFFN reports 8)",
                  min=1, max=4096)
FFN_MAX_STEPS = Param("ffn_max_steps", "int", 4096, "most tokens whose sparsity a run records", min=0, max=1_000_000)
_MLP_NAMES = ("mlp", "feed_forward", "ffn")  # a decoder layer's FFN
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")  # the FFN's output projection, in it

_ACTIVE: ContextVar[FfnCapture | None] = ContextVar("decoding_explorer_ffn_capture", default=None)


def ffn_projections(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's FFN output projection, in layer order: its input is the layer's intermediate activation.

    Raises ParamError for a model whose layers have no dense FFN of a known shape (a mixture of experts, say)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = next((getattr(decoder, n) for n in ("layers", "h") if isinstance(getattr(decoder, n, None), nn.ModuleList)),
                  None)
    if layers is None:
        raise ParamError(f"FFN capture cannot find the decoder layers of {type(model).__name__}")
    found = []
    for index, layer in enumerate(layers):
        mlp = next((getattr(layer, n) for n in _MLP_NAMES if isinstance(getattr(layer, n, None), nn.Module)), None)
        down = next((getattr(mlp, n) for n in _DOWN_NAMES if isinstance(getattr(mlp, n, None), nn.Module)), None)
        if down is None:
            raise ParamError(f"FFN capture needs a dense feed-forward with a down projection ({', '.join(_DOWN_NAMES)}); "
                             f"layer {index} of {type(model).__name__} ({type(mlp or layer).__name__}) has none")
        found.append(down)
    return found


def inactive(activations: Tensor, threshold: float, relative: bool) -> Tensor:
    """Bool mask, True where a neuron is inactive: |a| <= threshold, times the row's largest |a| when relative."""
    magnitude = activations.abs().float()
    limit = threshold * magnitude.amax(dim=-1, keepdim=True) if relative else threshold
    return magnitude <= limit


@dataclass
class FfnCapture:
    """How to count a neuron inactive, the chunk length, and how many tokens a run may record (its storage bound).

    Holds the running state of one run: the union of active neurons over the current chunk, per layer.
    """

    threshold: float = FFN_THRESHOLD.default
    relative: bool = True
    chunk: int = FFN_CHUNK.default
    max_steps: int = FFN_MAX_STEPS.default
    recorded: int = 0
    _active: dict[int, Tensor] = field(default_factory=dict, repr=False)  # layer -> [rows, neurons] of one forward
    _rows_back: list[int] = field(default_factory=list, repr=False)  # the rows the hooks keep, from the last
    _union: list[Tensor] | None = field(default=None, repr=False)  # per layer: active somewhere in the chunk
    _chunk_tokens: list[int] = field(default_factory=list, repr=False)  # output positions in the current chunk

    def __post_init__(self) -> None:
        self.threshold = FFN_THRESHOLD.parse(self.threshold)
        if self.relative and self.threshold > 1:
            raise ParamError(f"a relative ffn_threshold is a share of the largest activation (0 to 1), got "
                             f"{self.threshold:g}")
        self.chunk = FFN_CHUNK.parse(self.chunk)
        self.max_steps = FFN_MAX_STEPS.parse(self.max_steps)

    def check(self, model: nn.Module) -> None:
        """Refuse, before any forward, a model without FFNs to observe; start the run's state afresh."""
        ffn_projections(model)
        self.recorded, self._union, self._chunk_tokens, self._active = 0, None, [], {}

    @contextmanager
    def observing(self, model: nn.Module, rows_back: Sequence[int]) -> Iterator[None]:
        """Keep which neurons are active in the forward run inside the block (batch row 0) at the rows ``rows_back``
        counted from its last (0 = the last row).

        The hooks are installed for the block only and act for this capture's context only: a concurrent run in
        another thread on the same model never feeds them."""
        self._active, self._rows_back = {}, list(rows_back)
        token = _ACTIVE.set(self)
        handles = [down.register_forward_pre_hook(self._hook(layer)) for layer, down in enumerate(ffn_projections(model))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            _ACTIVE.reset(token)

    def _hook(self, layer: int):
        def observe(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            if _ACTIVE.get() is self:
                last = inputs[0].shape[1] - 1
                rows = inputs[0][0, [last - back for back in self._rows_back]].detach()
                self._active[layer] = ~inactive(rows, self.threshold, self.relative)
        return observe

    def take(self, step: int, positions: Sequence[int]) -> list[FfnSparsity]:
        """The events of the forward last observed, one per output position of ``positions`` (ascending, one per
        observed row). No event once ``max_steps`` tokens were recorded, or when the forward ran another model."""
        layers = [self._active[layer] for layer in sorted(self._active)]  # [rows, neurons] each: widths may differ
        self._active = {}
        events = []
        for row, position in enumerate(positions if layers else ()):
            if self.recorded >= self.max_steps:
                break
            self.recorded += 1
            active = [mask[row] for mask in layers]
            events.append(FfnSparsity(step=step, position=position, token_level=_inactive_shares(active),
                                      chunk_level=self._chunk_level(position, active)))
        return events

    def _chunk_level(self, position: int, active: list[Tensor]) -> list[float] | None:
        """Fold one token into its chunk; the chunk's sparsity per layer when the token completes it."""
        if self._chunk_tokens and position // self.chunk != self._chunk_tokens[0] // self.chunk:
            self._union, self._chunk_tokens = None, []  # a token of another chunk: the unfinished one is dropped
        self._union = active if self._union is None else [u | a for u, a in zip(self._union, active, strict=True)]
        self._chunk_tokens.append(position)
        if len(self._chunk_tokens) < self.chunk:
            return None
        union, self._union, self._chunk_tokens = self._union, None, []
        return _inactive_shares(union)

    def settings(self) -> dict[str, float | int | bool]:
        """What a trace's settings say about the capture."""
        return {"threshold": self.threshold, "relative": self.relative, "chunk": self.chunk, "max_steps": self.max_steps}


def _inactive_shares(active: list[Tensor]) -> list[float]:
    """Per layer, the share of neurons not active."""
    return [1.0 - float(mask.float().mean()) for mask in active]
