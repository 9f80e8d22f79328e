"""What a speculative run holds in memory (SpecMemo's question): KV-cache bytes per round and the process's peak RSS.

The KV bytes are the key and value tensors of the target's cache and of every cache a drafter keeps (a draft model's,
a nested drafter's), as they stand after the round's rollback. Peak resident memory is sampled once per round (the
run's own peak as far as round boundaries show it; a forward's transient activations in between are not seen).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psutil
from torch import Tensor
from transformers import Cache

from engine.events import DecoderMetric
from engine.speculative.cache import PrefixCache

MEBIBYTE = 2**20


def cache_bytes(cache: Cache) -> int:
    """Bytes of the key and value tensors of every layer of ``cache``."""
    return sum(
        tensor.nbytes
        for layer in cache.layers
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(tensor, Tensor)
    )


def caches_of(holder: Any, seen: set[int] | None = None) -> Iterator[Cache]:
    """The KV caches ``holder`` keeps in its attributes (directly, in a PrefixCache, or in a wrapped drafter's
    attributes), each once."""
    seen = set() if seen is None else seen
    for value in vars(holder).values():
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, PrefixCache):
            yield value.cache
        elif isinstance(value, Cache):
            yield value
        elif hasattr(value, "propose"):  # a drafter wrapping another (SpecDec++ around the draft model's)
            yield from caches_of(value, seen)


class MemoryMeter:
    """Samples the KV bytes of ``holders``' caches and the process's RSS; keeps the maxima for the run's summary."""

    def __init__(self, *holders: Any) -> None:
        self.holders = holders
        self.process = psutil.Process()
        self.kv_bytes_max = 0
        self.rss_max = self.process.memory_info().rss

    def sample(self) -> int:
        """This moment's KV-cache bytes (the RSS peak is updated too)."""
        caches = {id(cache): cache for holder in self.holders for cache in caches_of(holder)}  # a shared one once
        kv_bytes = sum(map(cache_bytes, caches.values()))
        self.kv_bytes_max = max(self.kv_bytes_max, kv_bytes)
        self.rss_max = max(self.rss_max, self.process.memory_info().rss)
        return kv_bytes

    def summary(self) -> Iterator[DecoderMetric]:
        yield DecoderMetric("peak_rss_mb", round(self.rss_max / MEBIBYTE, 1), "largest resident memory seen at a round's end (MiB)")
        yield DecoderMetric("kv_cache_bytes_max", self.kv_bytes_max, "largest KV cache of target and drafter after a round (bytes)")
