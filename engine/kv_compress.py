"""KV-cache compression policies, applied to a decoder's own DynamicCache while a full-cache twin runs beside it.

Eviction policies (h2o, snapkv, streaming, ems) never delete: they hide cache positions per (layer, KV head) with
the explorer attention function's ``key_mask`` hook. transformers caches post-RoPE keys, so a hidden position is
numerically the same as a dropped one, and positions (and ``cache_position``) stay correct. Their scores come from
the ``observe`` hook (post-softmax weights). Element-wise policies (mustafar, gear) rewrite the cache's key and value
tensors in place outside a dense recent window / buffer after each forward. Scores and masks are kept per KV head (the
unit a cache stores): the query heads of a GQA group share one eviction decision, made on their mean attention.

Sliding-window layers (Gemma 3) keep only their window: the keys a forward sees are always the last ``K`` positions
of the sequence, so masks and rewrites are mapped by absolute position, and positions that already left a sliding
layer's window are left to the model's own mask.

Sources: H2O ``h2o_hf/utils_real_drop/modify_llama.py::H2OKVCache_LayerWise``; SnapKV
``snapkv/monkeypatch/snapkv_utils.py::SnapKVCluster.update_kv``; StreamingLLM (sinks + recent window); Mustafar
``dh_prune_key / dh_prune_value``; GEAR ``GEARLM/Simulated/compress_function.py::gearslkivi_tokenQ_new``. EMS
(arXiv 2412.08521) has no public code: its score and merge here are a reconstruction (see docs/kv_compression.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from engine.attention import AttentionHooks
from engine.models.handle import LoadedModel
from engine.params import ParamError

POLICIES = ("h2o", "snapkv", "streaming", "mustafar", "gear", "ems")
GEAR_LOOPS = 3  # GEAR's power-iteration loop count
GEAR_SEED = 0  # power iteration starts from a seeded random basis, so runs reproduce


@dataclass(frozen=True)
class CacheShape:
    """Layer count and head counts of a model's attention (query heads and the KV heads the cache stores)."""

    layers: int
    heads: int
    kv_heads: int

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, model: LoadedModel) -> "CacheShape":
        cfg = model.model.config.get_text_config()
        heads = int(cfg.num_attention_heads)
        return cls(int(cfg.num_hidden_layers), heads, int(getattr(cfg, "num_key_value_heads", None) or heads))


class CachePolicy:
    """A compression policy for one run. Per forward: :meth:`hooks` (for the forward over a sequence of ``length``
    positions), then :meth:`evicted` (what that forward saw), then :meth:`update` (compress for the next one)."""

    name = ""

    def __init__(self, shape: CacheShape) -> None:
        self.shape = shape

    def hooks(self, length: int) -> AttentionHooks | None:
        return None

    def update(self, cache: DynamicCache, length: int) -> None:
        raise NotImplementedError

    def evicted(self, length: int) -> np.ndarray:
        """Per position: the share of (layer, KV head) slots hiding it, or the share of its elements approximated."""
        raise NotImplementedError

    @property
    def error(self) -> float:
        """Relative reconstruction error ||X - X̂|| / ||X|| over everything compressed so far (0 for masks)."""
        return 0.0


# ---------------------------------------------------------------- eviction by masking


class MaskPolicy(CachePolicy):
    """Hidden positions per layer: ``hidden[layer]`` is a bool [kv_heads, n] over absolute positions 0..n-1."""

    observes = False

    def __init__(self, shape: CacheShape, budget: int) -> None:
        super().__init__(shape)
        self.budget = budget
        self.hidden: dict[int, Tensor] = {}
        self._length = 0

    def hooks(self, length: int) -> AttentionHooks | None:
        self._length = length
        return AttentionHooks(key_mask=self._key_mask, observe=self._observe if self.observes else None)

    def hidden_at(self, layer: int, length: int) -> Tensor:
        """The layer's hidden mask grown (with visible positions) to ``length``."""
        hidden = self.hidden.get(layer, torch.zeros(self.shape.kv_heads, 0, dtype=torch.bool))
        if hidden.shape[1] < length:
            hidden = F.pad(hidden, (0, length - hidden.shape[1]))
        self.hidden[layer] = hidden
        return hidden

    def _key_mask(self, layer: int, keys: int) -> Tensor | None:
        hidden = self.hidden.get(layer)
        if hidden is None or not bool(hidden.any()):
            return None
        visible_keys = self.hidden_at(layer, self._length)[:, self._length - keys :]
        return visible_keys.repeat_interleave(self.shape.groups, dim=0)[None, :, None, :]

    def _observe(self, layer: int, weights: Tensor) -> None:
        """Weights [1, heads, queries, keys] -> the group-mean [kv_heads, queries, keys] for :meth:`observe`."""
        w = weights[0].float()
        per_kv = w.view(self.shape.kv_heads, self.shape.groups, *w.shape[1:]).mean(1)
        self.observe(layer, per_kv, self._length - w.shape[-1])

    def observe(self, layer: int, weights: Tensor, first_key: int) -> None:
        """``weights`` [kv_heads, queries, keys]; key 0 is absolute position ``first_key``."""

    def evicted(self, length: int) -> np.ndarray:
        if not self.hidden:
            return np.zeros(length)
        hidden = torch.stack([self.hidden_at(layer, length)[:, :length] for layer in range(self.shape.layers)])
        return hidden.float().mean(dim=(0, 1)).numpy()


class H2O(MaskPolicy):
    """Heavy hitters: keep the last ``recent`` positions and the ``heavy`` older ones with the largest attention
    accumulated over every query so far (prefill rows included); evicted positions never come back."""

    name = "h2o"
    observes = True

    def __init__(self, shape: CacheShape, budget: int, heavy_ratio: float) -> None:
        super().__init__(shape, budget)
        self.heavy = round(budget * heavy_ratio)
        self.recent = budget - self.heavy
        self.scores: dict[int, Tensor] = {}

    def observe(self, layer: int, weights: Tensor, first_key: int) -> None:
        scores = self.scores.get(layer, torch.zeros(self.shape.kv_heads, 0))
        end = first_key + weights.shape[-1]
        if scores.shape[1] < end:
            scores = F.pad(scores, (0, end - scores.shape[1]))
        scores[:, first_key:end] += weights.sum(1)  # hidden keys get weight 0: their scores stay frozen
        self.scores[layer] = scores

    @torch.inference_mode()
    def update(self, cache: DynamicCache, length: int) -> None:
        if self.budget == 0 or length <= self.budget:
            return
        for layer, scores in self.scores.items():
            hidden = self.hidden_at(layer, length)
            older = torch.zeros_like(hidden)
            older[:, : length - self.recent] = True
            candidates = older & ~hidden
            ranked = scores[:, :length].masked_fill(~candidates, -math.inf)
            keep = torch.zeros_like(hidden)
            if self.heavy:
                keep.scatter_(1, ranked.topk(self.heavy, dim=1).indices, True)
            self.hidden[layer] = hidden | (candidates & ~keep)


class Streaming(MaskPolicy):
    """StreamingLLM: the first ``sinks`` positions and the last ``budget - sinks``, the same in every layer and head."""

    name = "streaming"

    def __init__(self, shape: CacheShape, budget: int, sinks: int) -> None:
        super().__init__(shape, budget)
        self.sinks = sinks

    @torch.inference_mode()
    def update(self, cache: DynamicCache, length: int) -> None:
        if self.budget == 0 or length <= self.budget:
            return
        recent = self.budget - self.sinks
        for layer in range(self.shape.layers):
            self.hidden_at(layer, length)[:, self.sinks : length - recent] = True


class PrefillSelection(MaskPolicy):
    """Policies that choose once, after the prefill forward; decode positions are appended without eviction."""

    observes = True

    def __init__(self, shape: CacheShape, budget: int, window: int) -> None:
        super().__init__(shape, budget)
        self.window = window
        self.done = False

    def hooks(self, length: int) -> AttentionHooks | None:
        hooks = super().hooks(length)
        return hooks if not self.done else AttentionHooks(key_mask=hooks.key_mask)

    @torch.inference_mode()
    def update(self, cache: DynamicCache, length: int) -> None:
        if self.done:
            return
        self.done = True
        if self.budget == 0 or length <= self.budget:
            return
        for layer in range(self.shape.layers):
            score = self.prompt_scores(layer, length)  # [kv_heads, length - window]
            keep = score.topk(self.budget - self.window, dim=1).indices
            hidden = self.hidden_at(layer, length)
            hidden[:, : length - self.window] = True
            hidden.scatter_(1, keep, False)
            self.after_selection(cache, layer, length)

    def prompt_scores(self, layer: int, length: int) -> Tensor:
        raise NotImplementedError

    def after_selection(self, cache: DynamicCache, layer: int, length: int) -> None:
        """Hook for EMS's merge."""


class SnapKV(PrefillSelection):
    """SnapKV: the last ``window`` prompt rows vote for the earlier keys; votes are average-pooled (kernel, same
    padding, zeros counted) and the top ``budget - window`` kept with the window itself."""

    name = "snapkv"

    def __init__(self, shape: CacheShape, budget: int, window: int, kernel: int) -> None:
        super().__init__(shape, budget, window)
        self.kernel = kernel
        self.votes: dict[int, Tensor] = {}

    def observe(self, layer: int, weights: Tensor, first_key: int) -> None:
        self.votes[layer] = weights[:, -self.window :, :].sum(1)  # prefill: keys start at position 0

    def prompt_scores(self, layer: int, length: int) -> Tensor:
        votes = self.votes[layer][:, : length - self.window]
        return F.avg_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]


class EMS(PrefillSelection):
    """[reconstruction] Evict-then-merge: score = mean attention from every row that sees a key (global) + mean
    attention from the last ``window`` rows (local); evicted keys and values are merged into the most similar kept
    key (cosine), averaged with the scores as weights."""

    name = "ems"

    def __init__(self, shape: CacheShape, budget: int, window: int) -> None:
        super().__init__(shape, budget, window)
        self.scores: dict[int, Tensor] = {}
        self.merged: dict[int, Tensor] = {}  # per layer [kv_heads, length]: the kept position each one went into

    def observe(self, layer: int, weights: Tensor, first_key: int) -> None:
        rows = weights.shape[1]
        seen_by = torch.arange(rows, 0, -1, dtype=torch.float32)  # causal: key j is seen by rows - j rows
        global_score = weights.sum(1) / seen_by
        local = weights[:, -self.window :, :].sum(1) / min(self.window, rows)
        self.scores[layer] = global_score + local

    def prompt_scores(self, layer: int, length: int) -> Tensor:
        return self.scores[layer][:, : length - self.window]

    def after_selection(self, cache: DynamicCache, layer: int, length: int) -> None:
        hidden = self.hidden[layer]
        stored = cache.layers[layer]
        offset = length - stored.keys.shape[-2]  # sliding-window layers hold only their last positions
        target = torch.full((self.shape.kv_heads, length), -1, dtype=torch.long)
        for head in range(self.shape.kv_heads):
            positions = torch.arange(offset, length)
            evicted, kept = positions[hidden[head, offset:]], positions[~hidden[head, offset:]]
            if len(evicted) == 0 or len(kept) == 0:
                continue
            keys, values = stored.keys[0, head], stored.values[0, head]
            similarity = F.normalize(keys[evicted - offset].float(), dim=-1) @ F.normalize(keys[kept - offset].float(), dim=-1).T
            into = kept[similarity.argmax(dim=1)]
            target[head, evicted] = into
            weight = self.scores[layer][head, :length].clamp(min=1e-9)
            for tensor in (keys, values):
                total = tensor.float() * weight[offset:, None]
                total.index_add_(0, into - offset, tensor[evicted - offset].float() * weight[evicted, None])
                mass = weight[offset:].clone().index_add_(0, into - offset, weight[evicted])
                merged = (total / mass[:, None]).to(tensor.dtype)
                tensor[kept - offset] = merged[kept - offset]
        self.merged[layer] = target


# ---------------------------------------------------------------- element-wise rewrites


def kept_per_vector(dim: int, sparsity: float) -> int:
    """Mustafar's ``num_to_keep``: (1 - s) * D entries of a D-vector, at least one."""
    return max(1, int((1 - sparsity) * dim + 1e-9))


def magnitude_prune(x: Tensor, sparsity: float) -> Tensor:
    """Zero all but the (1 - s)·D largest-magnitude entries of every vector along the last dim (exactly that many)."""
    keep = kept_per_vector(x.shape[-1], sparsity)
    if keep >= x.shape[-1]:
        return x.clone()
    index = x.abs().topk(keep, dim=-1).indices
    return torch.zeros_like(x).scatter_(-1, index, x.gather(-1, index))


def fake_quantize(x: Tensor, bits: int, group: int) -> Tensor:
    """Asymmetric uniform quantise-dequantise over groups of ``group`` consecutive entries of the last dim."""
    shape = x.shape
    grouped = x.reshape(*shape[:-1], shape[-1] // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    levels = 2**bits - 1
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is exact at level 0
    codes = ((grouped - low) / scale).round().clamp(0, levels)
    return (codes * scale + low).reshape(shape)


def low_rank(residual: Tensor, rank: int, loops: int, generator: torch.Generator) -> Tensor:
    """Rank-``rank`` approximation of each [tokens, dim] matrix by power iteration (QR on the last loop), as GEAR."""
    *batch, rows, cols = residual.shape
    rank = min(rank, rows, cols)
    p = torch.rand(*batch, cols, rank, generator=generator)
    for i in range(loops):
        last = i == loops - 1
        if last:
            p = torch.linalg.qr(p).Q
        q = residual @ p
        if last:
            q = torch.linalg.qr(q).Q
        p = residual.transpose(-1, -2) @ q
    return q @ p.transpose(-1, -2)


def outlier_count(width: int, outliers: float) -> int:
    """GEAR's ``sparsity_pertoken``: how many largest (and as many smallest) entries of a token stay exact."""
    return int(width * outliers / 2)


def gear_compress(
    x: Tensor, bits: int, rank: int, outliers: float, group: int, generator: torch.Generator, loops: int = GEAR_LOOPS
) -> Tensor:
    """GEAR's X ≈ Q_b(X − S) + S + L for [batch, heads, tokens, dim] (``gearslkivi_tokenQ_new``).

    S: per token (over heads × dim) the ``outliers``/2 largest and smallest entries, kept exactly (replaced by the
    token's mean while quantising, so they do not stretch the range). Q_b: ``bits``-bit token-wise groups of ``group``
    channels within each head. L: rank-``rank`` power-iteration fit of the remaining error per head.
    """
    b, h, t, d = x.shape
    tokens = x.permute(0, 2, 1, 3).reshape(b, t, h * d).float()
    k = outlier_count(h * d, outliers)
    filled = tokens.clone()
    if k:
        low, high = tokens.topk(k, dim=-1, largest=False), tokens.topk(k, dim=-1)
        mean = tokens.mean(-1, keepdim=True).expand(-1, -1, k)
        filled.scatter_(-1, low.indices, mean).scatter_(-1, high.indices, mean)
    quantized = fake_quantize(filled.view(b, t, h, d), bits, group).reshape(b, t, h * d)
    if k:
        quantized.scatter_(-1, low.indices, low.values).scatter_(-1, high.indices, high.values)
    approx = quantized.view(b, t, h, d).permute(0, 2, 1, 3)
    if rank:
        approx = approx + low_rank(x.float() - approx, rank, loops, generator)
    return approx.to(x.dtype)


class ElementPolicy(CachePolicy):
    """Rewrites positions [start, stop) of every layer's keys and values once, when :meth:`span` says so."""

    def __init__(self, shape: CacheShape) -> None:
        super().__init__(shape)
        self.done = 0
        self.approximated = np.zeros(0)  # per position: elements approximated, over all layers, keys and values
        self.elements = 0  # elements per position over all layers, keys and values
        self._err2 = 0.0
        self._norm2 = 0.0

    def span(self, length: int) -> tuple[int, int]:
        raise NotImplementedError

    def compress(self, x: Tensor) -> tuple[Tensor, int]:
        """(reconstruction of [1, kv_heads, tokens, dim], elements approximated per position)."""
        raise NotImplementedError

    @torch.inference_mode()
    def update(self, cache: DynamicCache, length: int) -> None:
        start, stop = self.span(length)
        if self.elements == 0:
            self.elements = sum(2 * layer.keys.shape[1] * layer.keys.shape[-1] for layer in cache.layers)
        if self.approximated.size < length:
            self.approximated = np.pad(self.approximated, (0, length - self.approximated.size))
        if stop <= start:
            return
        for layer in cache.layers:
            offset = length - layer.keys.shape[-2]
            lo, hi = max(start - offset, 0), stop - offset
            if hi <= lo:  # already outside a sliding window
                continue
            for tensor in (layer.keys, layer.values):
                part = tensor[..., lo:hi, :]
                approx, count = self.compress(part)
                self._err2 += float(((part.float() - approx.float()) ** 2).sum())
                self._norm2 += float((part.float() ** 2).sum())
                tensor[..., lo:hi, :] = approx
                self.approximated[offset + lo : offset + hi] += count
        self.done = stop

    def evicted(self, length: int) -> np.ndarray:
        shares = np.zeros(length)
        if self.elements:
            n = min(length, self.approximated.size)
            shares[:n] = self.approximated[:n] / self.elements
        return shares

    @property
    def error(self) -> float:
        return math.sqrt(self._err2 / self._norm2) if self._norm2 > 0 else 0.0


class Mustafar(ElementPolicy):
    """Per-token magnitude pruning of keys and values as they leave the dense window of the last ``residual``."""

    name = "mustafar"

    def __init__(self, shape: CacheShape, sparsity: float, residual: int) -> None:
        super().__init__(shape)
        self.sparsity = sparsity
        self.residual = residual

    def span(self, length: int) -> tuple[int, int]:
        return self.done, max(self.done, length - self.residual)

    def compress(self, x: Tensor) -> tuple[Tensor, int]:
        heads, dim = x.shape[1], x.shape[-1]
        return magnitude_prune(x, self.sparsity), heads * (dim - kept_per_vector(dim, self.sparsity))


class Gear(ElementPolicy):
    """GEAR: the prompt is compressed after prefill; later tokens wait in an exact buffer of ``buffer`` positions
    and are compressed together when it is full."""

    name = "gear"

    def __init__(self, shape: CacheShape, bits: int, rank: int, outliers: float, group: int, buffer: int) -> None:
        super().__init__(shape)
        self.bits, self.rank, self.outliers, self.group, self.buffer = bits, rank, outliers, group, buffer
        self.generator = torch.Generator().manual_seed(GEAR_SEED)
        self.started = False

    def span(self, length: int) -> tuple[int, int]:
        if not self.started:
            self.started = True
            return 0, length
        return (self.done, length) if length - self.done >= self.buffer else (self.done, self.done)

    def compress(self, x: Tensor) -> tuple[Tensor, int]:
        heads, dim = x.shape[1], x.shape[-1]
        group = self.group if dim % self.group == 0 else dim
        approx = gear_compress(x, self.bits, self.rank, self.outliers, group, self.generator)
        return approx, heads * dim - 2 * outlier_count(heads * dim, self.outliers)


# ---------------------------------------------------------------- construction


def make_policy(params: Mapping[str, Any], shape: CacheShape) -> CachePolicy:
    """The policy named by ``params["policy"]``, its settings checked against each other."""
    name, budget = params["policy"], params["budget"]
    if name == "h2o":
        return H2O(shape, budget, params["heavy_ratio"])
    if name == "streaming":
        if budget and budget <= params["sinks"]:
            raise ParamError(f"streaming needs budget > sinks ({params['sinks']}), or budget 0 for no compression")
        return Streaming(shape, budget, params["sinks"])
    if name in ("snapkv", "ems"):
        if budget and budget <= params["window"]:
            raise ParamError(f"{name} needs budget > window ({params['window']}), or budget 0 for no compression")
        if name == "ems":
            return EMS(shape, budget, params["window"])
        if params["kernel"] % 2 == 0:
            raise ParamError(f"snapkv's pooling kernel must be odd (same padding), got {params['kernel']}")
        return SnapKV(shape, budget, params["window"], params["kernel"])
    if name == "mustafar":
        return Mustafar(shape, params["sparsity"], params["residual"])
    if name == "gear":
        return Gear(shape, params["bits"], params["rank"], params["outliers"], params["group"], params["buffer"])
    raise ParamError(f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}")
