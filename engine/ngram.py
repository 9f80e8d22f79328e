"""Token n-gram counts (n = 2..6) and the bundled corpus in a model's tokens, shared by the n-gram decoders.

The corpus is ``assets/corpus/assistant_answers.txt`` (about 22 KB of self-written assistant-style English), split
into paragraphs, each a document; it is tokenised with the run's tokenizer once per model. ADED builds its tri-gram
table from these documents, superposed decoding its interpolated n-gram model.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

CORPUS = Path(__file__).resolve().parents[1] / "assets" / "corpus" / "assistant_answers.txt"
ORDERS = (2, 3, 4, 5, 6)

_DOCUMENTS: dict[tuple[str, int], list[list[int]]] = {}  # the corpus per (model name, vocabulary size)


def corpus_documents(model_name: str, vocab_size: int, tokenizer) -> list[list[int]]:
    """The bundled corpus's paragraphs in this model's tokens, tokenised once per model."""
    key = (model_name, vocab_size)
    if key not in _DOCUMENTS:
        paragraphs = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        _DOCUMENTS[key] = [tokenizer.encode(p, add_special_tokens=False) for p in paragraphs]
    return _DOCUMENTS[key]


class NgramModel:
    """Maximum-likelihood n-gram counts: ``P_n(v | c) = count(c + v) / count(c + anything)`` for each order n."""

    def __init__(self, documents: Iterable[Sequence[int]], orders: Sequence[int] = ORDERS) -> None:
        if not orders or min(orders) < 2:
            raise ValueError(f"n-gram orders must be >= 2, got {list(orders)}")
        self.orders = tuple(orders)
        self.counts: dict[int, dict[tuple[int, ...], Counter[int]]] = {n: {} for n in self.orders}
        for ids in documents:
            ids = list(ids)
            for n in self.orders:
                table = self.counts[n]
                for end in range(n - 1, len(ids)):
                    table.setdefault(tuple(ids[end - n + 1 : end]), Counter())[ids[end]] += 1
        self.totals = {n: {key: sum(c.values()) for key, c in table.items()} for n, table in self.counts.items()}

    def prob(self, n: int, context: Sequence[int], token: int) -> float | None:
        """``P_n(token | last n-1 tokens of context)``, or None where that context was never seen (or is too short)."""
        if len(context) < n - 1:
            return None
        key = tuple(context[len(context) - n + 1 :])
        total = self.totals[n].get(key)
        return None if total is None else self.counts[n][key][token] / total

    def mixture(self, context: Sequence[int], tokens: Sequence[int], weights: Sequence[float]) -> list[float]:
        """``sum_n w_n P_n(v | context)`` per token over the orders whose context was seen (the weights, one per
        order, are used as given: superposed decoding's do not sum to 1)."""
        if len(weights) != len(self.orders):
            raise ValueError(f"need one weight per order {self.orders}, got {len(weights)}")
        mixed = [0.0] * len(tokens)
        for n, w in zip(self.orders, weights):
            for i, token in enumerate(tokens):
                p = self.prob(n, context, token)
                if p is not None:
                    mixed[i] += w * p
        return mixed
