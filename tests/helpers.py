"""Helpers shared by several test modules: runs and draft rounds of the speculative tests, hand-built traces for
the figures and storage tests, tiny models built from a config. Test modules import from here, never from each other."""

from __future__ import annotations

import functools
import json
import random
import struct
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from plotly.basedatatypes import BaseTraceType
from safetensors.torch import save_file
from scipy.stats import chisquare
from transformers import PreTrainedTokenizerFast

from engine import RunSettings, record
from engine.events import (
    AttentionMap,
    BeamNode,
    BeamStep,
    BenchPoint,
    CacheStep,
    Candidate,
    ConstraintStep,
    DecoderMetric,
    DiffusionStep,
    DraftNode,
    DraftRound,
    Event,
    FfnSparsity,
    Output,
    PromptPassages,
    Rerank,
    Resampling,
    RunFinished,
    RunStarted,
    ScoredCandidate,
    SearchGeneration,
    SpanScores,
    StageReport,
    Steering,
    SuperposedStep,
    TokenStep,
    VariantStep,
)
from engine.models.cache import ASSET_MODELS_DIR
from engine.models.handle import LoadedModel
from engine.recorder import Recorder
from engine.trace import RunInfo, Trace, dumps, new_run_id
from ui.figures.common import escape_token

INF = float("inf")
NAN = float("nan")


# ---------------------------------------------------------------- recorded runs of the decoders


PROMPTS = [
    "The quick brown fox",
    "One two three four five six seven eight nine ten one two three four five six seven eight nine ten",
    "a b a b a b a b a b a b",  # repeats: prompt lookup drafts in most rounds
]

# facts that repeat: retrieval drafters find the continuation in the prompt
LONG_PROMPT = " ".join(f"item {i % 7} is {['red', 'green', 'blue'][i % 3]}." for i in range(40)) + " So item 3 is"


def run_ignoring_eos(model: LoadedModel, decoder: str, prompt: str, params: dict | None = None, max_new_tokens: int = 45,
                     **settings: object) -> Trace:
    """A recorded run that ignores EOS, so its length is the budget."""
    return record(model, decoder, prompt, params or {}, RunSettings(max_new_tokens=max_new_tokens, ignore_eos=True, **settings))


_GREEDY: dict[tuple[str, str, int], list[int]] = {}


def greedy_ids(model, prompt: str, max_new_tokens: int) -> list[int]:
    """Plain greedy output (EOS ignored), computed once per model, prompt and length across test files."""
    key = (model.name, prompt, max_new_tokens)
    if key not in _GREEDY:
        _GREEDY[key] = run_ignoring_eos(model, "greedy", prompt, max_new_tokens=max_new_tokens).output_token_ids
    return _GREEDY[key]


def rounds_of(trace: Trace) -> list[DraftRound]:
    return [e for e in trace.events if isinstance(e, DraftRound)]


def assert_round_totals(trace: Trace, rounds: list[DraftRound], tokens: int) -> None:
    """The rounds commit the whole output, one target call each; the run's metrics add them up."""
    assert sum(len(r.committed) for r in rounds) == len(trace.output_token_ids) == tokens
    metrics = trace.metrics
    assert metrics["model_calls"] == metrics["rounds"] == len(rounds)
    assert metrics["mean_accepted_tokens"] == round(tokens / len(rounds), 4)
    assert metrics["draft_calls"] == sum(r.draft_calls for r in rounds)


def assert_cut_trees_stay_lossless(model: LoadedModel, decoder: str, params: dict, prompt: str) -> None:
    """Run ``decoder`` with verifying made dear (the caller patches the cost fit) and check that the adaptive length
    cut its trees to fewer nodes than drafted (each round's mode says so) and the output is still greedy's."""
    trace = run_ignoring_eos(model, decoder, prompt, params, max_new_tokens=45)
    assert trace.output_token_ids == greedy_ids(model, prompt, 45)
    cut = [r for r in rounds_of(trace) if "verified" in r.mode]
    assert cut and all(0 < len(r.nodes) < int(r.mode.split(" of ")[1].split()[0]) for r in cut)


def first_token_inside_a_draft(trace: Trace) -> int:
    """A token whose first occurrence in the output is an accepted draft with more committed tokens after it."""
    output: list[int] = []
    for r in rounds_of(trace):
        for j, token in enumerate(r.committed):
            if j < len(r.committed) - 1 and token not in output:
                return token
            output.append(token)
    raise AssertionError("no round accepted a new token before its last committed one")


def assert_follows(counts: np.ndarray, p: torch.Tensor) -> None:
    """``counts`` never leave p's support and pass a chi-square test against p (p-value above 1e-3)."""
    expected = p.numpy() * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token outside p's support was emitted"
    keep = expected > 0
    assert chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def assert_first_two_tokens_follow_target(model: LoadedModel, decoder: str, params: dict, prompt: str,
                                          draws: int = 1200, max_new_tokens: int = 3) -> None:
    """For drafters whose first token comes from the prefill and the second from the first verified tree: over
    ``draws`` seeds the pair follows the processed target's p(t1) p(t2 | t1) (temperature 0.9, top-k 6), and some
    second tokens were accepted drafts."""
    params = {**params, "temperature": 0.9, "top_k": 6}
    ids = model.encode(prompt)

    def law(context: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model.model(torch.tensor([context])).logits[0, -1].double() / 0.9
        top = logits.topk(6)
        p = torch.zeros(model.vocab_size, dtype=torch.float64)
        p[top.indices] = torch.softmax(top.values, -1)
        return p

    first = law(ids)
    traces = [record(model, decoder, prompt, params, RunSettings(max_new_tokens=max_new_tokens, seed=s, ignore_eos=True))
              for s in range(draws)]
    # Some second tokens were accepted drafts, so the law covers that path too. How many depends on the CPU's
    # rounding during the tiny head's training: 10-20 % on an Intel CPU, 3 % (PPD) on an AMD EPYC.
    assert sum(bool(rounds_of(t)[1].accepted_path) for t in traces) > draws / 60
    pairs = Counter(tuple(t.output_token_ids[:2]) for t in traces)
    support = first.nonzero().flatten().tolist()
    expected = torch.cat([first[t] * law(ids + [t]) for t in support])
    observed = np.zeros(len(expected))
    for (t1, t2), n in pairs.items():
        observed[support.index(t1) * model.vocab_size + t2] += n
    assert_follows(observed, expected)


def first_token_law(model: LoadedModel, decoder: str, params: dict, prompt: str, draws: int = 300,
                    max_new_tokens: int = 2) -> tuple[np.ndarray, torch.Tensor]:
    """Observed first tokens over seeds 0..draws-1 at temperature 0.9 and top-k 6, and the processed target's law
    for that first token, computed directly from the target's logits (for :func:`assert_follows`)."""
    params = {**params, "temperature": 0.9, "top_k": 6}
    with torch.inference_mode():
        logits = model.model(torch.tensor([model.encode(prompt)])).logits[0, -1].double() / 0.9
    top = logits.topk(6)
    expected = torch.zeros(model.vocab_size, dtype=torch.float64)
    expected[top.indices] = torch.softmax(top.values, -1)
    settings = [RunSettings(max_new_tokens=max_new_tokens, seed=seed, ignore_eos=True) for seed in range(draws)]
    counts = Counter(record(model, decoder, prompt, params, s).output_token_ids[0] for s in settings)
    observed = np.zeros(model.vocab_size)
    for token, n in counts.items():
        observed[token] = n
    return observed, expected


# ---------------------------------------------------------------- tiny models built from a config


def eager_attention(model: LoadedModel, ids: list[int], **inputs: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention [heads, queries, keys] (float64) from an eager forward with ``output_attentions``: an
    independent reference for everything computed inside the explorer's attention function."""
    model.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model.model(input_ids=torch.tensor([ids]), output_attentions=True, **inputs)
    finally:
        model.use_explorer_attention()
    return [a[0].double() for a in out.attentions]


def shipped_waitline_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer the shipped waitline models were trained with."""
    return PreTrainedTokenizerFast.from_pretrained(ASSET_MODELS_DIR / "waitline-ar")


def tiny_waitline_model(causal: bool = False, seed: int = 0, name: str = "", vocab_size: int | None = None,
                        **config: object) -> LoadedModel:
    """A random 2-layer Llama on the waitline tokenizer: bidirectional with mask id 3 (a tiny waitline-mdlm), or
    causal (its AR twin). ``config`` adds or overrides config fields (``diffusion_gen_length``...). The tokenizer is
    the shipped models' (build_tokenizer's corpus moves with the name pool): a shipped dLLM can draft for it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = shipped_waitline_tokenizer()
    fields = {"is_causal": causal, "mask_token_id": None if causal else 3, **config}
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    return LoadedModel(name or ("tiny-ar" if causal else "tiny-mdlm"), LlamaForCausalLM(cfg).eval(), tokenizer,
                       "random")


# ---------------------------------------------------------------- hand-built traces for the figures


HOSTILE_TEXTS = ["<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "![x](http://evil.example/a.png)",
                 "[a](javascript:x)"]
RAW_FRAGMENTS = ["<script", "<img", "](", "!["]

HOSTILE_TOKENS = {10: "<script>alert(1)</script>", 11: "<b>x</b>", 12: "\x1b[31m", 13: "<img src=x onerror=alert(1)>"}
PROMPT_IDS = [1, 2]


def make_trace(events: list[Event], vocab: dict[int, str] | None = None) -> Trace:
    """A trace of hand-made events over words w0..w199 with HOSTILE_TOKENS at 10-13 and a hostile prompt."""
    words = {i: f"w{i}" for i in range(200)}
    words.update(HOSTILE_TOKENS)
    words.update(vocab or {})
    return Trace(
        run_id="t",
        info=RunInfo(model="m", decoder="d", params={}, prompt="<i>prompt</i>"),
        events=[RunStarted(prompt_token_ids=PROMPT_IDS), *events],
        vocab=words,
        prompt_token_ids=PROMPT_IDS,
    )


def by_name(fig: go.Figure, name: str) -> BaseTraceType:
    """The one trace of ``fig`` named ``name``."""
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, f"{name!r}: {[t.name for t in fig.data]}"
    return matches[0]


def strings_of(value: object) -> list[str]:
    """Every string in a JSON value (the figure as the browser receives it)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [s for v in value for s in strings_of(v)]
    return []


def assert_escaped(texts: list[str], ids: list[int]) -> None:
    """No raw hostile token in ``texts``; the escaped forms of HOSTILE_TOKENS[ids] are there."""
    joined = "\n".join(texts)
    for raw in HOSTILE_TOKENS.values():
        assert raw not in joined
    assert "<script" not in joined and "<img" not in joined and "<i>" not in joined and "\x1b" not in joined
    for i in ids:
        assert escape_token(HOSTILE_TOKENS[i]) in joined


def fig_strings(fig: go.Figure) -> list[str]:
    """Every string the browser receives for ``fig``."""
    return strings_of(json.loads(fig.to_json()))


def build_beam_trace(beams: int, steps: int) -> Trace:
    """Beam search as the decoder records it: 2*beams candidates a step from the live beams, the best
    ``beams`` live (finished at the last step), the rest pruned; scores fall with every step."""
    rng = random.Random(0)
    events, live, next_id = [], [(-1, 0.0, [])], 0
    for step in range(steps):
        cands = []
        for j in range(2 * beams):
            parent, score, tokens = live[j % len(live)]
            logprob = -rng.uniform(0.1, 3.0)
            token = 10 + (j + step) % 40  # hostile tokens (10-13) appear throughout
            cands.append((score + logprob, logprob, parent, tokens + [token]))
        cands.sort(key=lambda c: -c[0])
        nodes, new_live = [], []
        for rank, (score, logprob, parent, tokens) in enumerate(cands):
            status = "pruned" if rank >= beams else ("finished" if step == steps - 1 else "live")
            norm = score / len(tokens) if status == "finished" else None
            nodes.append(BeamNode(next_id, parent, tokens[-1], logprob, score, status, norm))
            if status != "pruned":
                new_live.append((next_id, score, tokens))
            next_id += 1
        events.append(BeamStep(step=step, nodes=nodes))
        live = new_live
    events.append(Output(token_ids=live[0][2], score=live[0][1] / steps))
    return make_trace(events)


def hand_rounds() -> list[DraftRound]:
    """Round 1: a tree with a duplicate sibling token and a correction; round 2: a chain fully accepted + bonus."""
    tree = [
        DraftNode(0, -1, 11, 1, 0.6, target_prob=0.7, accepted=True, draw=0.2, ratio=1.1667),
        DraftNode(1, -1, 21, 1, 0.3),
        DraftNode(2, -1, 11, 1, 0.1),  # same token as node 0: a distinct node
        DraftNode(3, 0, 22, 2, 0.5, target_prob=0.2, accepted=False, draw=0.9, ratio=0.4),
        DraftNode(4, 0, 10, 2, 0.4, target_prob=0.5, accepted=True, draw=0.1, ratio=1.25),
        DraftNode(5, 4, 23, 3, 0.7, target_prob=0.1, accepted=False, draw=0.5, ratio=0.1429),
        DraftNode(6, 4, 24, 3, 0.2, target_prob=0.05, accepted=False, draw=0.6, ratio=0.25),
        DraftNode(7, 3, 25, 3, 0.9),
    ]
    chain = [DraftNode(i, i - 1, 30 + i, i + 1, 0.8, target_prob=0.9, accepted=True, draw=0.3, ratio=1.125)
             for i in range(4)]
    return [
        DraftRound(step=1, nodes=tree, accepted_path=[0, 4], committed=[11, 10, 13], bonus_token=13,
                   bonus_is_correction=True, residual_top=[Candidate(13, 0.2, 0.6), Candidate(12, 0.1, 0.3)],
                   draft_calls=3),
        DraftRound(step=2, nodes=chain, accepted_path=[0, 1, 2, 3], committed=[30, 31, 32, 33, 34], bonus_token=34,
                   draft_calls=4),
    ]


def build_diffusion_trace(length: int = 32, steps: int = 16, block: int = 8, mask_id: int = 0) -> Trace:
    """LLaDA-style semi-autoregressive unmasking: per step, commit the 2 most confident masked positions of
    the current block; positions right of the block get -inf confidence."""
    rng = random.Random(1)
    per_step = length // steps
    steps_per_block = steps * block // length
    canvas = [mask_id] * length
    events = []
    for step in range(steps):
        start = step // steps_per_block * block
        proposals, confidence = [], []
        for p in range(length):
            if canvas[p] != mask_id:
                proposals.append([])
                confidence.append(float("-inf"))
                continue
            probs = sorted((rng.random() for _ in range(3)), reverse=True)
            total = sum(probs) * 1.2
            proposals.append([Candidate(10 + (p + k) % 50, q / total, q / total) for k, q in enumerate(probs)])
            confidence.append(probs[0] / total if start <= p < start + block else float("-inf"))
        chosen = sorted(range(length), key=lambda p: -confidence[p])[:per_step]
        for p in chosen:
            canvas[p] = proposals[p][0].token_id
        events.append(DiffusionStep(step=step, canvas=list(canvas), mask_id=mask_id, committed_positions=sorted(chosen),
                                    confidence=confidence, proposals=proposals, block=[start, start + block]))
    return make_trace(events, {0: "[mask]"})


def hand_trace(events: list[Event], vocab: dict[int, str], decoder: str = "sample", status: str | None = "finished") -> Trace:
    """A trace recorded from hand-made events, the way a run records them."""
    trace = Trace(run_id=f"hand{len(events)}{decoder}", info=RunInfo(model="hand", decoder=decoder, params={}, prompt="p"))
    recorder = Recorder(trace, lambda t: vocab.get(t, f"<{t}>"))
    for event in events:
        recorder.record(event)
    if status is not None:
        recorder.record(RunFinished(status=status))
    return trace


def hand_step(position: int, token_id: int, probs: dict[int, float], stages: Sequence[StageReport] = (), **extra: Any) -> TokenStep:
    """A token step whose candidates are ``probs`` (raw = processed unless stages say otherwise)."""
    candidates = [Candidate(t, p, p) for t, p in sorted(probs.items(), key=lambda kv: -kv[1])]
    p = probs.get(token_id, 1e-4)
    rank = 1 + sum(q > p for q in probs.values())
    return TokenStep(
        step=position, position=position, token_id=token_id, logprob=float(np.log(p)), raw_logprob=float(np.log(p)),
        rank=rank, entropy_raw=1.0, entropy=0.5, candidates=candidates, stages=list(stages), **extra,
    )


# ---------------------------------------------------------------- hand-built traces for storage


def same(a: Trace, b: Trace) -> bool:
    """Field-for-field equality that also sees NaN, -0.0 and int-vs-float (plain == does not)."""
    return dumps(a) == dumps(b) and [repr(e) for e in a.events] == [repr(e) for e in b.events]


def info(**kw: object) -> RunInfo:
    """Run info of a sampled tiny run; ``kw`` overrides fields."""
    base = {"model": "tiny-random", "decoder": "sample", "params": {"temperature": 0.7}, "prompt": "Hello", "seed": 7}
    return RunInfo(**{**base, **kw})


def token_step(pos: int, token_id: int = 5, **kw: object) -> TokenStep:
    """A sampled token step with two candidates and a top-p cut; ``kw`` overrides fields."""
    base = {
        "step": pos,
        "position": pos,
        "token_id": token_id,
        "logprob": -0.25,
        "raw_logprob": -0.5,
        "rank": 1,
        "entropy_raw": 1.5,
        "entropy": 1.25,
        "candidates": [Candidate(token_id, 0.6, 0.75), Candidate(9, 0.4, 0.25)],
        "stages": [StageReport("top_p", 2, 0.9, 0b11, 0.9)],
        "seconds": 0.01,
    }
    return TokenStep(**{**base, **kw})


ATTENTION = AttentionMap(
    step=4,
    layers=[-1],
    head_reduction="mean",
    layer_reduction="mean",
    query_positions=[3],
    shape=[1, 1, 3],
    data=struct.pack("<3e", 0.25, 0.5, 0.25) + b"\x00\xff",
)


def every_kind_trace() -> Trace:
    """One event of every kind, with NaN, infinities, -0.0, huge ints and hostile text where they fit."""
    events = [
        RunStarted(prompt_token_ids=[1, 2, 3]),
        token_step(0, entropy=NAN, logprob=-INF, seconds=-0.0),
        token_step(1, token_id=2**70, candidates=[Candidate(2**70, 1.0, 1.0)], stages=[]),
        BeamStep(
            step=2,
            nodes=[
                BeamNode(0, -1, 5, -0.1, -0.1, "live", normalized_score=-0.05),
                BeamNode(1, -1, 9, -INF, -INF, "pruned"),
                BeamNode(2, 0, 2, -0.2, -0.3, "finished", NAN),
            ],
        ),
        DraftRound(
            step=3,
            nodes=[
                DraftNode(0, -1, 5, 1, 0.8, target_prob=0.7, accepted=True, draw=0.1, ratio=0.875),
                DraftNode(1, 0, 9, 2, 0.5, source="ngram", target_prob=0.0, accepted=False, draw=0.9, ratio=0.0),
            ],
            accepted_path=[0],
            committed=[5, 7],
            bonus_token=7,
            bonus_is_correction=True,
            residual_top=[Candidate(7, 0.5, 0.9)],
            cache_slots_kept=[0, 1, 2, 3],
            draft_calls=2,
            model_calls=1,
            draft_seconds=0.004,
            seconds=0.02,
            mode="post-verify",
            simulated_seconds=0.015,
        ),
        DecoderMetric("simulated_to_measured", 0.75, "détail <b>"),
        DiffusionStep(
            step=4,
            canvas=[99, 5, 99],
            mask_id=99,
            committed_positions=[1],
            confidence=[0.1, 0.9, NAN],
            proposals=[[Candidate(5, 0.9, 0.9)], [], [Candidate(7, 0.2, 0.2), Candidate(8, 0.1, 0.1)]],
            block=[0, 3],
            model_calls=1,
        ),
        Rerank(step=5, position=2, method="adadec", part_names=["log p", "look-ahead"], label="paused",
               candidates=[ScoredCandidate(5, -0.5, [-0.2, -0.3], tokens=[7, 8], token_scores=[-0.1, -INF], label="<b>"),
                           ScoredCandidate(9, -INF)], chosen=0, baseline=1, threshold=1.5, value=NAN, model_calls=4),
        SuperposedStep(step=6, drafts=[ScoredCandidate(5, -1.0, [0.7], tokens=[5])],
                       candidates=[ScoredCandidate(7, -1.2, [-0.1, -0.1], label="draft 0")], kept=[0], finished=[]),
        SpanScores(step=7, starts=[3, 4], max_length=2, nll=struct.pack("<4f", 1.0, INF, 0.5, NAN), best_start=4,
                   best_length=1, greedy_token_ids=[5]),
        ConstraintStep(step=8, particle=1, method="awrs", proposals=[9, 5], accepted=5, checks=3,
                       log_weight_increment=-0.25, log_weight=-INF),
        Resampling(step=8, ess=1.5, log_weights=[-0.1, -INF], ancestors=[0, 0]),
        CacheStep(step=9, policy="h2o", kl=0.01, top1_agree=False, kept_fraction=0.5, evicted=b"\x00\x3c\x00\x00"),
        VariantStep(step=9, variant="<b>v</b>", kl=INF, top1_agree=False, base_top=3, variant_top=2**40, base_top_rank=2,
                    token_base_rank=314, token_base_logprob=-INF, base_entropy=NAN, variant_entropy=0.5),
        Steering(step=10, layers=[1], context_heads=[[0, 1]], query_heads=[[2]], ratios=[1.5],
                 context_mass_before=[0.2], context_mass_after=[0.4], plain_token_id=9, kl_from_plain=0.05),
        PromptPassages(passages=[[0, 1], [1, 2]], question=[2, 3], passage_marker="<b>P", question_marker="Q:"),
        FfnSparsity(step=11, position=3, token_level=[0.25, NAN], chunk_level=[-0.0, 1.0]),
        SearchGeneration(generation=2, best_fitness=INF, profile=[0.5, -0.0], mean_sparsity=0.25, stage_tokens=[2**40],
                         stage_fitnesses=[[NAN, 0.1]], accepted=True, seconds=1.5),
        BenchPoint(task="sort", setting="<b>llada</b>:steps=2", decoder="llada", model="m", rows=2**40, accuracy=NAN,
                   tokens_per_call=INF, model_calls=0, seconds=-0.0),
        ATTENTION,
        Output(token_ids=[5, 7], score=-INF),
        RunFinished(status="finished", reason="end of sequence"),
    ]
    return Trace(
        run_id=new_run_id(),
        info=info(prompt="Héllo <script>alert(1)</script>", seed=2**64 + 1, chat=True, versions={"engine": "0.1"}),
        events=events,
        vocab={1: "<s>", 2: " wörld", 3: "<script>alert('x')</script>", 5: "日本", 7: "\n\t\"", 9: "", 2**40: "🙂"},
        status="finished",
        reason="end of sequence",
        prompt_token_ids=[1, 2, 3],
        output_token_ids=[5, 7],
        output_text="日本\n",
        metrics={"model_calls": 5, "decode_seconds": 0.05, "odd": NAN},
    )


# ---------------------------------------------------------------- drafter heads


@functools.cache
def random_eagle_head(model_name: str = "tiny-random-llama") -> Path:
    """A folder holding an untrained EAGLE head for a tiny model, so the `eagle` decoder runs without a trained one."""
    from engine.speculative.feature_head import FeatureHead

    return _untrained_head(FeatureHead, model_name)


@functools.cache
def random_fspad_head(model_name: str = "tiny-random-llama") -> Path:
    """A folder holding an untrained FSPAD head for a tiny model, so the `fspad` decoder runs without a trained one."""
    from engine.speculative.fspad_head import FspadHead

    return _untrained_head(FspadHead, model_name)


def random_medusa_head(model_name: str = "tiny-random-llama") -> Path:
    """A folder holding untrained Medusa heads for a tiny model, so the `medusa` decoders run without trained ones."""
    from engine.speculative.medusa_heads import MedusaHeads

    return _untrained_head(MedusaHeads, model_name)


def random_ppd_head(model_name: str = "tiny-random-llama") -> Path:
    """A folder holding untrained PPD prompt tokens for a tiny model, so the `ppd` decoder runs without trained ones."""
    from engine.speculative.ppd_prompts import PromptTokens

    return _untrained_head(PromptTokens, model_name)


def random_falcon_head(model_name: str = "tiny-random-llama") -> Path:
    """A folder holding an untrained Falcon head for a tiny model, so the `falcon` decoder runs without a trained one."""
    from engine.speculative.falcon_head import FalconHead

    return _untrained_head(FalconHead, model_name)


def _untrained_head(kind: type, model_name: str) -> Path:
    from engine.models import load_model
    from engine.speculative.feature_head import save_head

    folder = Path(tempfile.mkdtemp(prefix=f"{kind.kind}-head-"))
    torch.manual_seed(0)
    save_head(kind(load_model(model_name)), folder, {}, f"# an untrained {kind.title} head for tests")
    return folder


# ---------------------------------------------------------------- drafter training data (tests of trained heads)

ANSWER_TOKENS = 40
TRAIN_PROMPTS = [*PROMPTS, "Hello there", "Once upon a time", "The weather today is", "In the beginning",
                 "My favourite colour", "Numbers: 1 2 3", "The cat sat on", "Why is the sky blue?"]


def hidden_states(model: LoadedModel, ids: list[int]) -> list[torch.Tensor]:
    """Every layer's hidden states for ``ids`` (transformers' ``output_hidden_states``: embeddings first)."""
    with torch.inference_mode():
        return list(model.model(torch.tensor([ids]), output_hidden_states=True).hidden_states)


def write_shards(model: LoadedModel, folder: Path, per_shard: int = 4) -> Path:
    """A drafter data folder in the shard format: each prompt with its greedy answer and the target's hidden states."""
    records = []
    for prompt in TRAIN_PROMPTS:
        ids = model.encode(prompt)
        answer = run_ignoring_eos(model, "greedy", prompt, max_new_tokens=ANSWER_TOKENS).output_token_ids
        states = hidden_states(model, ids + answer)
        records.append((ids + answer, len(ids), {"low": states[1], "mid": states[1], "last": states[-1]}))
    names = []
    for start in range(0, len(records), per_shard):
        chunk = records[start: start + per_shard]
        lengths = torch.tensor([len(r[0]) for r in chunk])
        tensors = {
            "input_ids": torch.tensor([t for r in chunk for t in r[0]], dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
            "answer_start": torch.tensor([r[1] for r in chunk], dtype=torch.long),
            **{f"hidden_{k}": torch.cat([r[2][k][0] for r in chunk]).half() for k in ("low", "mid", "last")},
        }
        names.append(f"shard-{len(names):05d}.safetensors")
        save_file(tensors, str(folder / names[-1]))
    manifest = {"model": model.name, "hidden_size": model.model.config.hidden_size,
                "layers": {"low": 1, "mid": 1, "last": 2}, "shards": names, "sequences": len(records)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def train_tiny_head(head: str, model: LoadedModel, tmp: Path, steps: int, lr: float, out: str = "out",
                    **options: Any) -> tuple[Any, dict]:
    """A ``head`` (a train_drafter HEADS kind) trained quietly on the shards in ``tmp / "data"``: the module and its run."""
    from engine.offline.drafter_data import DrafterShards
    from engine.offline.train_drafter import Settings, train

    settings = Settings(head, str(tmp / "data"), steps=steps, minutes=0, batch_size=4, lr=lr, warmup=5,
                        held_out=0.1, log_every=10, **options)
    return train(settings, DrafterShards(settings.data), model, tmp / out, log=lambda _: None)
