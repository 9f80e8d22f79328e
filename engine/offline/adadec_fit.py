"""AdaDec's entropy threshold, learned per model (He et al. 2025, arXiv 2506.08980; SYSUSELab/AdaDec
``src/learn_threshold``): where does greedy decoding start to rank the right token below first place?

    python -m engine.offline.adadec_fit --model smollm2-135m-instruct --out assets/adadec/thresholds.json

Teacher-force a text, and log per step the entropy H (nats, raw logits) of the next-token distribution and
whether the true next token is the model's top-1. Label y = 1[top-1]; split 80/20 at random; undersample the
training part to equal classes; fit a logistic regression p(y=1 | H) = sigmoid(a H + b) (scikit-learn's default
objective: L2 with C = 1, intercept unpenalised); scan probability cut-offs 0.01..0.99 for the best accuracy on the
held-out part (unbalanced, as the reference does) and turn the best cut-off p* into an entropy:
tau = (logit(p*) - b) / a. The ``adadec`` decoder pauses where H >= tau.

The reference teacher-forces BigCodeBench solutions; offline we teacher-force the bundled
``assets/corpus/assistant_answers.txt`` (self-written assistant-style prose) as one plain-text document.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch

from engine.adadec_threshold import ROOT, THRESHOLDS_FILE
from engine.models.handle import LoadedModel
from engine.processing import entropy

CORPUS = ROOT / "assets" / "corpus" / "assistant_answers.txt"
CUTOFFS = [i / 100 for i in range(1, 100)]
HELD_OUT_SHARE = 0.2
WINDOW, STRIDE = 512, 384  # teacher-forcing windows overlap so every scored token has >= 128 tokens of context


# --------------------------------------------------------------------------- data


def windows(length: int, window: int = WINDOW, stride: int = STRIDE) -> Iterator[tuple[int, int, int]]:
    """(start, stop, first scored index) over a token sequence: each predicted token is scored exactly once."""
    start, scored = 0, 1
    while scored < length:
        stop = min(start + window, length)
        yield start, stop, scored
        scored, start = stop, stop - (window - stride)


def teacher_force(model: LoadedModel, ids: list[int], start: int, stop: int, scored: int) -> tuple[list[float], list[bool]]:
    """Entropy of the distribution predicting each token ids[scored:stop], and whether that token is its top-1."""
    logits = model.forward(torch.tensor([ids[start:stop]])).logits[0]
    predicting = logits[scored - start - 1 : stop - start - 1]  # row i predicts ids[start + i + 1]
    truth = torch.tensor(ids[scored:stop])
    true_logit = predicting.gather(1, truth[:, None])
    top1 = (predicting > true_logit).sum(-1) == 0  # rank 1, counted as token_event does
    return entropy(predicting).tolist(), top1.tolist()


# --------------------------------------------------------------------------- the regression


def balanced_split(
    h: torch.Tensor, y: torch.Tensor, seed: int, held_out: float = HELD_OUT_SHARE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train H, train y, test H, test y): a random split, then the training part undersampled to equal classes."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(h), generator=generator)
    n_test = int(round(len(h) * held_out))
    test, train = order[:n_test], order[n_test:]
    pos, neg = train[y[train]], train[~y[train]]
    n = min(len(pos), len(neg))
    if n == 0:
        raise ValueError("the training data has only one class (every token top-1, or none): nothing to separate")
    keep = torch.cat([pos[torch.randperm(len(pos), generator=generator)[:n]],
                      neg[torch.randperm(len(neg), generator=generator)[:n]]])
    return h[keep], y[keep], h[test], y[test]


def fit_logistic(h: torch.Tensor, y: torch.Tensor, c: float = 1.0) -> tuple[float, float]:
    """(a, b) of p(y=1|h) = sigmoid(a h + b), minimising 0.5 a^2 + c * sum(log-loss) like scikit-learn's default."""
    x, t = h.double(), y.double()
    mean, std = x.mean(), x.std().clamp(min=1e-12)
    z = (x - mean) / std  # standardised for the optimiser; the penalty is written for the raw slope a = w / std
    w = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = 0.5 * (w[0] / std) ** 2 + c * torch.nn.functional.binary_cross_entropy_with_logits(
            w[0] * z + w[1], t, reduction="sum")
        value.backward()
        return value

    optimizer.step(loss)
    slope, intercept = w.detach().tolist()
    a = slope / float(std)
    return a, intercept - a * float(mean)


def best_cutoff(a: float, b: float, h: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(p*, accuracy): the first cut-off in 0.01..0.99 with the best accuracy of ``predict 1 iff p >= cut``."""
    p = torch.sigmoid(a * h.double() + b)
    accuracies = [float(((p >= cut) == y).double().mean()) for cut in CUTOFFS]
    best = max(range(len(CUTOFFS)), key=accuracies.__getitem__)  # first of equals, as the reference's strict >
    return CUTOFFS[best], accuracies[best]


def threshold_from(a: float, b: float, cutoff: float) -> float:
    """The entropy where the fitted p(top-1) equals ``cutoff``."""
    if a == 0:
        raise ValueError("the fitted slope is 0: entropy does not separate top-1 steps from the others here")
    return (math.log(cutoff / (1 - cutoff)) - b) / a


def learn(h: list[float], y: list[bool], seed: int = 0) -> dict[str, float]:
    """The whole recipe on per-step entropies and top-1 flags."""
    h_t, y_t = torch.tensor(h, dtype=torch.float64), torch.tensor(y, dtype=torch.bool)
    train_h, train_y, test_h, test_y = balanced_split(h_t, y_t, seed)
    a, b = fit_logistic(train_h, train_y)
    cutoff, accuracy = best_cutoff(a, b, test_h, test_y)
    return {"threshold": round(threshold_from(a, b, cutoff), 6), "accuracy": round(accuracy, 4),
            "cutoff": cutoff, "slope": round(a, 6), "intercept": round(b, 6),
            "top1_share": round(float(y_t.double().mean()), 4)}


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from tqdm import tqdm

    from engine.models import load_model

    parser = argparse.ArgumentParser(description="Learn AdaDec's entropy threshold for a model by teacher forcing.")
    parser.add_argument("--model", required=True, help="model name, as the decoder will see it")
    parser.add_argument("--out", type=Path, default=THRESHOLDS_FILE, help="JSON file to add the model's entry to")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="plain text to teacher-force")
    parser.add_argument("--max-chars", type=int, default=0, help="use only the first N characters (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the undersampling")
    args = parser.parse_args(argv)

    text = args.corpus.read_text(encoding="utf-8")
    text = text[: args.max_chars] if args.max_chars > 0 else text
    model = load_model(args.model)
    ids = model.encode(text)
    entropies, top1 = [], []
    parts = list(windows(len(ids)))
    for start, stop, scored in tqdm(parts, desc=f"teacher-forcing {len(ids)} tokens", unit="window"):
        h, y = teacher_force(model, ids, start, stop, scored)
        entropies += h
        top1 += y
    entry = learn(entropies, top1, args.seed)
    entry["steps"] = len(entropies)
    corpus = args.corpus.resolve()
    corpus = corpus.relative_to(ROOT) if corpus.is_relative_to(ROOT) else corpus
    entry["data"] = (f"{corpus}: {len(text)} characters teacher-forced as one plain-text document "
                     f"({len(ids)} tokens, windows of {WINDOW} with stride {STRIDE}); seed {args.seed}")
    table = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {}
    table[args.model] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(json.dumps({args.model: entry}, indent=2))
    return entry


if __name__ == "__main__":
    main()
