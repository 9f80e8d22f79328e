"""DiffuSpec: lossless against the target's greedy decoding, its sampling law, CPS on hand-made lattices, ADL."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from engine import RunSettings, record
from engine.decoders.diffusion.diffuspec import AdaptiveLength
from engine.diffusion.lattice_path import NgramProxy, build_lattice, search_path
from engine.models.handle import LoadedModel
from engine.offline.waitline_tokenizer import with_rainbow_pads
from engine.speculative.drafts import _DRAFT_MODELS
from tests.helpers import (
    PROMPTS,
    assert_follows,
    first_token_law,
    greedy_ids,
    rounds_of,
    run_ignoring_eos,
    shipped_waitline_tokenizer,
    tiny_waitline_model,
)

TOKENIZER = shipped_waitline_tokenizer()
MASK, EOS = 3, 2


def _llama(name: str, causal: bool, seed: int, vocab_size: int | None = None) -> LoadedModel:
    return tiny_waitline_model(causal, seed, name, vocab_size, mask_token_id=MASK)


def _offer(model: LoadedModel) -> str:
    """Make ``model`` loadable by name as a drafter (the draft-model cache diffuspec loads through)."""
    _DRAFT_MODELS[(model.name, "float32", "cpu")] = model
    return model.name


class Oracle(torch.nn.Module):
    """A "diffusion LM" that fills the masks after the context with the target's greedy continuation: right for
    the first ``right`` masks, then a wrong token, EOS at mask ``eos_at``; ``sharpness`` is its logit margin over a
    small ramp on the other tokens (so top-k processing changes q a lot: a verifier given the raw q would be off)."""

    def __init__(self, target: LoadedModel, right: int = 1000, eos_at: int = 1000, sharpness: float = 30.0) -> None:
        super().__init__()
        self.target, self.right, self.eos_at, self.sharpness = target, right, eos_at, sharpness
        self.head = torch.nn.Linear(1, target.vocab_size, bias=False)
        self.config = SimpleNamespace(is_causal=False, mask_token_id=MASK, architectures=["Oracle"], model_type="oracle")

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        ids = input_ids[0].tolist()
        start = next(i for i in range(len(ids)) if all(t == MASK for t in ids[i:]))
        text = ids[:start]
        logits = torch.linspace(0.0, 0.5, self.target.vocab_size).repeat(1, len(ids), 1)
        for i in range(len(ids) - start):
            best = int(self.target.model(torch.tensor([text])).logits[0, -1].argmax())
            token = EOS if i == self.eos_at else best if i < self.right else (4 if best != 4 else 5)
            logits[0, start + i, token] += self.sharpness
            text.append(best)
        return SimpleNamespace(logits=logits)


FIXED = {"draft_length": "fixed"}  # the drafts as DiffuSpec sizes them, not capped by the cost-aware draft length


@pytest.fixture(scope="module")
def target() -> LoadedModel:
    return _llama("tiny-ar-diffuspec", causal=True, seed=0)


@pytest.fixture(scope="module")
def drafters(target) -> dict[str, str]:
    oracle = {
        "oracle": Oracle(target),
        "oracle_right2": Oracle(target, right=2),
        "oracle_eos3": Oracle(target, eos_at=3),
        "soft_oracle": Oracle(target, sharpness=8.0),  # q(right token) about 0.6: drafts drawn from q vary
    }
    names = {key: _offer(LoadedModel(f"{key}-{target.name}", model, TOKENIZER, "test")) for key, model in oracle.items()}
    names["random"] = _offer(_llama("tiny-mdlm-diffuspec", causal=False, seed=1))
    return names


# ---------------------------------------------------------------- losslessness (greedy)

SETTINGS = [
    {},
    {"adl": False, "k_max": 4},
    {"cps": False},
    {"cps": False, "adl": False, "k_max": 7},
    {"lam": 0.0, "beam": 1, "k_min": 2, "k_max": 9, "delta": 1},
    {"lam": 1.0, "tau": 0.5, "m_max": 2},
]


@pytest.mark.parametrize("drafter", ["random", "oracle", "oracle_right2", "oracle_eos3"])
@pytest.mark.parametrize("params", SETTINGS)
@pytest.mark.parametrize("prompt,max_new_tokens", [(PROMPTS[0], 30), (PROMPTS[2], 23)])  # 23: ends inside drafts
def test_greedy_equals_target_greedy(target, drafters, drafter, params, prompt, max_new_tokens):
    trace = run_ignoring_eos(target, "diffuspec", prompt, {"drafter": drafters[drafter], **params}, max_new_tokens=max_new_tokens)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(target, prompt, max_new_tokens)


def test_eos_inside_a_draft_stops_like_greedy(drafters):
    model = _llama("tiny-ar-diffuspec-eos", causal=True, seed=0)  # the target's twin, its EOS changed below
    free = greedy_ids(model, PROMPTS[0], 30)
    eos = next(t for i, t in enumerate(free) if t not in free[:i] and i % 6 not in (0, 5))  # inside a 5-token draft
    model.model.generation_config.eos_token_id = [eos]
    params = {"drafter": drafters["oracle"], "adl": False, "k_max": 5, "draft_length": "fixed"}  # whole drafts
    expected = record(model, "greedy", PROMPTS[0], settings=RunSettings(max_new_tokens=30))
    trace = record(model, "diffuspec", PROMPTS[0], params, RunSettings(max_new_tokens=30))
    assert trace.reason == expected.reason == "end of sequence"
    assert trace.output_token_ids == expected.output_token_ids and trace.output_token_ids[-1] == eos
    assert sum(len(r.committed) for r in rounds_of(trace)) > len(trace.output_token_ids)  # cut inside a round


# ---------------------------------------------------------------- acceptance accounting


@pytest.mark.parametrize("cps", [True, False])
def test_a_perfect_drafter_is_accepted_whole(target, drafters, cps):
    trace = run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": drafters["oracle"], "adl": False, "k_max": 5, "cps": cps, **FIXED},
                 max_new_tokens=24)
    rounds = rounds_of(trace)
    assert [len(r.nodes) for r in rounds] == [5, 5, 5, 5]
    assert [len(r.accepted_path) for r in rounds] == [5, 5, 5, 5]
    assert all(not r.bonus_is_correction for r in rounds)
    assert trace.metrics["model_calls"] == 4 and trace.metrics["tokens_per_call"] == 6  # 24 tokens, 4 target calls
    assert trace.metrics["draft_calls"] == 4  # one dLLM pass per round


def test_a_drafter_right_twice_commits_three_per_round(target, drafters):
    trace = run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": drafters["oracle_right2"], "adl": False, "k_max": 6, **FIXED},
                 max_new_tokens=24)
    rounds = rounds_of(trace)
    assert [len(r.accepted_path) for r in rounds] == [2] * 8
    assert [r.bonus_is_correction for r in rounds] == [True] * 7 + [False]  # the last draft is cut to the budget: 2
    assert trace.metrics["tokens_per_call"] == 3 and trace.metrics["mean_accepted_tokens"] == 3


def test_adl_follows_the_drafts_end_of_text(target, drafters):
    """The drafter ends every draft with EOS after 3 right tokens: L_gen = L_acc = 3, so k = 3 + delta after round 1."""
    params = {"drafter": drafters["oracle_eos3"], "k_min": 2, "k_max": 8, "delta": 2, "rho": 0.5, **FIXED}
    trace = run_ignoring_eos(target, "diffuspec", PROMPTS[0], params, max_new_tokens=20)
    rounds = rounds_of(trace)
    # the last round has 4 tokens of budget left: a draft of at most 3, cut before the drafter's EOS
    assert [r.mode.split(" ")[0] for r in rounds] == ["k=8", "k=5", "k=5", "k=5", "k=3"]
    assert [[n.token_id for n in r.nodes][-1] == EOS for r in rounds] == [True] * 4 + [False]
    assert [len(r.accepted_path) for r in rounds] == [3] * 5
    assert trace.metrics["diffuspec_mean_k"] == pytest.approx((8 + 5 * 3 + 3) / 5)


# ---------------------------------------------------------------- CPS on hand-made lattices

VOCAB = 10


def _rows(*rows: dict[int, float]) -> torch.Tensor:
    """Log-probabilities over VOCAB tokens; the mass a row leaves spread evenly over its unnamed tokens."""
    out = []
    for named in rows:
        rest = (1 - sum(named.values())) / (VOCAB - len(named))
        out.append([math.log(named.get(t, rest)) for t in range(VOCAB)])
    return torch.tensor(out, dtype=torch.float64)


def test_lattice_keeps_the_smallest_set_reaching_tau_plus_eos():
    logq = _rows({5: 0.5, 6: 0.35, 7: 0.1}, {8: 0.9, 2: 0.05}, {7: 0.4, 6: 0.3, 5: 0.2})
    tokens = lambda lattice: [[t for t, _ in c] for c in lattice]  # noqa: E731
    assert tokens(build_lattice(logq, 0.8, 15, EOS)) == [[5, 6, 2], [8, 2], [7, 6, 5, 2]]
    assert tokens(build_lattice(logq, 0.8, 2, EOS)) == [[5, 6, 2], [8, 2], [7, 6, 2]]
    assert tokens(build_lattice(logq, 0.3, 15, EOS)) == [[5, 2], [8, 2], [7, 2]]
    scores = build_lattice(logq, 0.8, 15, EOS)[1]
    assert scores == [(8, pytest.approx(math.log(0.9))), (2, pytest.approx(math.log(0.05)))]


def test_lattice_stops_after_the_first_eos():
    logq = _rows({5: 0.9}, {2: 0.6, 7: 0.3}, {6: 0.9}, {2: 0.9})
    assert [[t for t, _ in c] for c in build_lattice(logq, 0.8, 15, EOS)] == [[5, 2], [2, 7]]


def test_ngram_proxy_probability_by_hand():
    proxy = NgramProxy(VOCAB)
    proxy.fit([5, 6, 7, 5, 6])
    unigram = (1 + 0.5) / (5 + 0.5 * VOCAB)  # c(7) = 1, N = 5
    bigram = (1 + unigram) / (1 + 1)  # c(6 7) = 1, "6" continued once
    assert proxy.logprob([5, 6], 7) == pytest.approx(math.log((1 + bigram) / (1 + 1)))  # c(5 6 7) = 1
    assert proxy.logprob([9], 7) == pytest.approx(math.log(unigram))  # unseen history: the unigram
    proxy.fit([5, 6, 7, 5, 6, 8])  # grows: N = 6, "6" and "5 6" now continued twice
    assert proxy.logprob([5, 6], 7) == pytest.approx(math.log((1 + (1 + 1.5 / 11) / 3) / 3))


HISTORY = [5, 6, 7, 5, 6, 7, 5, 6]  # the trigram expects 7 after "5 6", then 5 after "6 7"
LATTICE = _rows({4: 0.6, 7: 0.35}, {4: 0.6, 5: 0.35})


@pytest.mark.parametrize("lam,beam,expected", [(1.0, 3, [4, 4]), (0.0, 3, [7, 5]), (1.0, 1, [4, 4]), (0.0, 1, [7, 5])])
def test_path_search_weighs_dllm_against_ngram(lam, beam, expected):
    proxy = NgramProxy(VOCAB)
    proxy.fit(HISTORY)
    path = search_path(build_lattice(LATTICE, 0.9, 15, EOS), HISTORY, proxy, lam, beam, EOS)
    assert path.tokens == expected
    first = lam * math.log({4: 0.6, 7: 0.35}[expected[0]]) + (1 - lam) * proxy.logprob(HISTORY, expected[0])
    assert path.scores[0] == pytest.approx(first)


def test_beam_finds_what_greedy_misses():
    """The dLLM prefers 4 (0.6 vs 0.3), the trigram 7 and then, much more surely, 5 after "6 7": at lam = 0.9 the
    first position alone favours 4, both together 7 5; beam 2 keeps 7 alive and finds it."""
    lattice = build_lattice(_rows({4: 0.6, 7: 0.3}, {8: 0.34, 9: 0.33, 5: 0.31}), 0.95, 15, EOS)
    proxy = NgramProxy(VOCAB)
    proxy.fit(HISTORY)
    greedy = search_path(lattice, HISTORY, proxy, 0.9, 1, EOS)
    beamed = search_path(lattice, HISTORY, proxy, 0.9, 2, EOS)
    assert greedy.tokens == [4, 5] and beamed.tokens == [7, 5]
    assert beamed.scores[-1] > greedy.scores[-1]


def test_path_ends_at_eos_and_an_early_eos_does_not_win_by_brevity():
    proxy = NgramProxy(VOCAB)
    proxy.fit(HISTORY)
    ends = build_lattice(_rows({8: 0.9}, {2: 0.9}, {8: 0.9}), 0.8, 15, EOS)
    assert search_path(ends, HISTORY, proxy, 1.0, 3, EOS).tokens == [8, 2]
    # EOS is kept at position 0 with q = 0.01: summing one term would beat two; the mean per token does not.
    long = build_lattice(_rows({8: 0.5, 2: 0.01}, {9: 0.5}), 0.4, 15, EOS)
    assert search_path(long, HISTORY, proxy, 1.0, 3, EOS).tokens == [8, 9]


# ---------------------------------------------------------------- ADL


@pytest.mark.parametrize(
    "rho,rounds,expected",
    [
        (0.5, [(24, 24), (10, 3), (8, 8), (2, 2), (0, 0), (0, 0), (6, 6)], [24, 17, 13, 7, 4, 4, 4]),
        (0.5, [(10, 10), (14, 14), (16, 10)], [14, 16, 14]),
        (0.0, [(5, 5), (5, 4), (30, 30), (1, 0)], [9, 5, 24, 4]),  # no memory: k = L_gen + delta * [L_acc >= L_gen]
    ],
)
def test_adl_update(rho, rounds, expected):
    length = AdaptiveLength(k_min=4, k_max=24, delta=4, rho=rho)
    assert length.k == 24
    assert [length.update(gen, acc) for gen, acc in rounds] == expected


# ---------------------------------------------------------------- sampling law and errors


@pytest.mark.slow  # a sampling law over many draws
@pytest.mark.parametrize(
    "drafter,params",
    [
        ("oracle", {}),  # CPS: a deterministic draft (q one-hot), usually right
        ("soft_oracle", {"cps": False}),  # drawn from q, often right
        ("random", {"cps": False}),  # drawn from q, usually wrong: the correction comes from the residual
    ],
)
def test_first_token_follows_the_target(target, drafters, drafter, params):
    """Temperature 0.9, top-k 6 (the shared helper): the first token's law is the processed target's."""
    params = {"drafter": drafters[drafter], **params}
    assert_follows(*first_token_law(target, "diffuspec", params, PROMPTS[0], draws=300))


def test_a_drafter_with_another_vocabulary_is_refused(target):
    other = _offer(_llama("tiny-mdlm-other-vocab", causal=False, seed=1, vocab_size=len(TOKENIZER) + 7))
    _assert_refused(run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": other}, max_new_tokens=4), f"vocabulary of {len(TOKENIZER) + 7}")


class PaddedOracle(Oracle):
    """The oracle with Rainbow Padding's pad tokens after the target's ids, the highest logit always on one of them."""

    def __init__(self, target: LoadedModel, pads: int) -> None:
        super().__init__(target)
        self.pads = pads
        self.head = torch.nn.Linear(1, target.vocab_size + pads, bias=False)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        logits = super().forward(input_ids).logits
        padding = torch.zeros(*logits.shape[:2], self.pads)
        padding[..., 1] = 1e3
        return SimpleNamespace(logits=torch.cat([logits, padding], -1))


def test_a_drafter_whose_own_pad_tokens_follow_the_targets_ids_drafts_only_the_targets_ids(target):
    """waitline-mdlm trained with Rainbow Padding has 7 special pad tokens after the AR twin's ids: it still drafts
    for it, from its distribution over the shared ids (the pads are never drafted, though they win every argmax)."""
    tokenizer = copy.deepcopy(TOKENIZER)
    with_rainbow_pads(tokenizer, 7)
    drafter = _offer(LoadedModel(f"padded-oracle-{target.name}", PaddedOracle(target, 7), tokenizer, "test"))
    trace = run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": drafter, "adl": False, "k_max": 5, **FIXED},
                             max_new_tokens=24)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy_ids(target, PROMPTS[0], 24)
    assert [len(r.accepted_path) for r in rounds_of(trace)] == [5, 5, 5, 5]  # the oracle's drafts, accepted whole


def test_an_autoregressive_drafter_is_refused(target):
    _assert_refused(run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": _offer(target)}, max_new_tokens=4), "not a diffusion")


def test_bad_lengths_are_refused(target, drafters):
    trace = run_ignoring_eos(target, "diffuspec", PROMPTS[0], {"drafter": drafters["random"], "k_min": 9, "k_max": 8}, max_new_tokens=4)
    _assert_refused(trace, "k_min=9 must not exceed k_max=8")


def _assert_refused(trace, message: str) -> None:
    assert trace.status == "failed" and trace.reason.startswith("ParamError") and message in trace.reason, trace.reason
