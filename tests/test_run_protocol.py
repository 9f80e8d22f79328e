"""The runner owns the end of a run: every stop reason (budget, stop string, cancel, error) records the decoder's
summary metrics, after its last step and before RunFinished."""

from __future__ import annotations

import pytest

from engine import load_model
from engine.events import DecoderMetric, RunFinished, RunStarted, TokenStep
from engine.models.handle import LoadedModel
from engine.run import Run, RunSettings
from engine.speculative.drafts import _DRAFT_MODELS
from engine.trace import Trace
from tests.helpers import tiny_waitline_model

BUDGET = 6
LLAMA_PROMPT = "The quick brown fox"
WAITLINE_PROMPT = "Ann Lee"

# decoder, its params, the model it runs on, and the summary metrics it must record
CASES = [
    ("adadec", {"threshold": 1e-6, "lookahead_beam_size": 2, "lookahead_length": 2}, "llama",
     {"paused_steps", "threshold"}),
    ("kv_compress", {"policy": "streaming", "budget": 6}, "llama",
     {"cache_mean_kl", "cache_top1_agreement", "cache_first_divergence", "cache_mean_kept_fraction"}),
    ("momentum", {}, "llama", {"graph_nodes", "graph_edges", "overridden_steps"}),
    ("ead", {"small_layers": 1, "tau": 1.0}, "llama",
     {"large_model_share", "switches", "first_divergence", "token_agreement"}),
    ("pearl", {"draft_layers": 1, "gamma": 2}, "llama", {"simulated_seconds", "simulated_to_measured"}),
    ("lookahead", {}, "llama", {"ngram_pool_size"}),
    ("llada", {"block_length": 3}, "mdlm", {"order_kendall_tau"}),
    ("diffuspec", {"k_max": 3, "k_min": 2}, "ar",
     {"diffuspec_mean_k", "diffuspec_mean_lattice_width", "peak_rss_mb", "kv_cache_bytes_max"}),  # + the round loop's
    ("superposed", {"n_drafts": 2}, "llama", {"draft_1_score", "draft_2_score"}),
    ("awrs", {"constraint": "[ab]{20}", "particles": 2}, "llama",
     {"constraint_checks", "checks_per_token", "mean_z_hat", "resamplings", "constraint_satisfied"}),
]
IDS = [case[0] for case in CASES]


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModel]:
    drafter = tiny_waitline_model(False, 1, "tiny-mdlm-protocol", mask_token_id=3)
    _DRAFT_MODELS[(drafter.name, "float32", "cpu")] = drafter  # loadable by name, as diffuspec's drafter
    return {"llama": load_model("tiny-random-llama"), "mdlm": tiny_waitline_model(),
            "ar": tiny_waitline_model(True, 0, "tiny-ar-protocol"), "drafter": drafter}


def _run(models: dict[str, LoadedModel], case: tuple, stop: tuple[str, ...] = ()) -> Run:
    decoder, params, model, _ = case
    if decoder == "diffuspec":
        params = {**params, "drafter": models["drafter"].name}
    prompt = LLAMA_PROMPT if model == "llama" else WAITLINE_PROMPT
    return Run(models[model], decoder, prompt, params, RunSettings(max_new_tokens=BUDGET, ignore_eos=True, stop=stop))


def _summary(trace: Trace) -> dict[str, float]:
    """The decoder metrics, checked to come after every step event, once each, right before RunFinished."""
    names = [i for i, e in enumerate(trace.events) if isinstance(e, DecoderMetric)]
    tail = trace.events[len(trace.events) - 1 - len(names):-1]
    assert all(isinstance(e, DecoderMetric) for e in tail), "summary metrics must close the run"
    assert isinstance(trace.events[-1], RunFinished)
    metrics = {e.name: e.value for e in tail}
    assert len(metrics) == len(names)  # each recorded once
    return metrics


def _stop_string(models: dict[str, LoadedModel], case: tuple, trace: Trace) -> str:
    """A stop string that the same run meets before its budget: the text of its first two tokens."""
    return models[case[2]].decode(trace.output_token_ids[:2])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_budget_and_stop_string_record_the_same_summary(models, case):
    by_budget = _run(models, case).to_end()
    assert by_budget.status == "finished" and by_budget.reason == "max_new_tokens reached", by_budget.reason
    stop = _stop_string(models, case, by_budget)
    by_stop = _run(models, case, stop=(stop,)).to_end()
    assert by_stop.status == "finished" and by_stop.reason.startswith("stop string"), by_stop.reason
    budget_summary, stop_summary = _summary(by_budget), _summary(by_stop)
    assert set(budget_summary) == set(stop_summary) == case[3]
    assert all(by_budget.metrics[name] == value for name, value in budget_summary.items())


def test_summary_values_describe_the_whole_run(models):
    adadec = CASES[0]
    for stop in ((), ("\x00never",)):  # every step pauses at a near-zero threshold, whatever ends the run
        trace = _run(models, adadec, stop).to_end()
        steps = [e for e in trace.events if isinstance(e, TokenStep)]
        assert _summary(trace) == {"paused_steps": len(steps), "threshold": 1e-6}


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("adadec", "momentum", "kv_compress", "lookahead",
                                                                 "superposed", "awrs")], ids=lambda c: c[0])
def test_cancel_records_the_summary(models, case):
    run = _run(models, case)
    for event in run:
        if not isinstance(event, RunStarted):  # after the first step
            run.cancel()
    assert run.trace.status == "cancelled"
    chosen_output = {"constraint_satisfied"}  # awrs: no particle was drawn as the output
    assert set(_summary(run.trace)) == case[3] - chosen_output


def test_cancel_leaves_out_the_summary_metrics_that_need_a_model_call(models):
    ead = CASES[3]
    run = _run(models, ead)
    for event in run:
        if isinstance(event, TokenStep):
            run.cancel()
    assert run.trace.status == "cancelled"
    assert set(_summary(run.trace)) == {"large_model_share", "switches"}  # the large model's own run is skipped


def test_a_decoder_error_keeps_the_summary_so_far(models, monkeypatch):
    llama = models["llama"]
    forward, calls = llama.forward, []

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    monkeypatch.setattr(llama, "forward", failing_forward)
    trace = _run(models, CASES[2]).to_end()  # momentum: one forward per token
    assert trace.status == "failed" and "device lost" in trace.reason
    steps = [e for e in trace.events if isinstance(e, TokenStep)]
    assert len(steps) == 3
    assert _summary(trace)["graph_nodes"] > 0 and set(_summary(trace)) == CASES[2][3]


def test_a_summary_that_raises_fails_the_run_and_still_finishes_it(models, monkeypatch):
    def broken(*_):
        raise ValueError("bad tally")

    monkeypatch.setattr("engine.decoders.token.momentum._metrics", broken)
    trace = _run(models, CASES[2]).to_end()
    assert trace.status == "failed" and trace.reason == "ValueError: bad tally"
    assert isinstance(trace.events[-1], RunFinished)
    assert len([e for e in trace.events if isinstance(e, TokenStep)]) == BUDGET  # the steps are all kept
