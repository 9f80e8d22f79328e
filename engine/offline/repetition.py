"""How repetitive a long generated text is, on its token ids: the measures the hyperfitting paper reports for greedy
long-form text (Carlsson et al., ICLR 2025: type-token ratio over 96-token windows) and the usual distinct-n."""

from __future__ import annotations

from collections.abc import Sequence


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[int], n: int) -> float:
    """Distinct n-grams over all n-grams (1.0 for a text without any repeated n-gram; 0.0 when it has none)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float:
    """The share of n-gram positions whose n-gram already occurred earlier in the text."""
    grams = ngrams(tokens, n)
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for gram in grams:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(grams) if grams else 0.0


def longest_repeated_span(tokens: Sequence[int]) -> int:
    """The length of the longest token span that occurs at two different places (the two may overlap)."""
    best = 0
    previous = [0] * (len(tokens) + 1)
    for i in range(1, len(tokens) + 1):  # longest common suffix of tokens[:i] and tokens[:j], j < i
        current = [0] * (len(tokens) + 1)
        for j in range(1, i):
            if tokens[i - 1] == tokens[j - 1]:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def rolling_ttr(tokens: Sequence[int], window: int = 96) -> float:
    """The mean type-token ratio over every ``window``-token window (the whole text's when it is shorter)."""
    if not tokens:
        return 0.0
    if len(tokens) <= window:
        return len(set(tokens)) / len(tokens)
    counts: dict[int, int] = {}
    for token in tokens[:window]:
        counts[token] = counts.get(token, 0) + 1
    ratios = [len(counts) / window]
    for start in range(1, len(tokens) - window + 1):
        gone, new = tokens[start - 1], tokens[start + window - 1]
        counts[gone] -= 1
        if not counts[gone]:
            del counts[gone]
        counts[new] = counts.get(new, 0) + 1
        ratios.append(len(counts) / window)
    return sum(ratios) / len(ratios)
