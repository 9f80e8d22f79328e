"""Every registered decoder keeps the run protocol: a few tokens on a tiny model end on the budget, a stop string,
EOS and a cancel as the runner defines them, record the summary metrics, and survive a storage round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import Run, RunSettings, load_model, record
from engine.decoders import all_decoders
from engine.decoders.base import DecoderSpec
from engine.events import DecoderMetric, RunFinished, RunStarted
from engine.models.handle import LoadedModel
from engine.trace import Trace, trace_to_dict
from storage import TraceStore
from tests.helpers import (
    random_eagle_head,
    random_falcon_head,
    random_fspad_head,
    random_medusa_head,
    random_ppd_head,
    tiny_waitline_model,
)

BUDGET = 6
MEDUSA_HEAD = random_medusa_head()
PROMPTS = {"gift": "Context: the fox lives in the mill. Question: where?",
           "exact_extract": "Context: the fox lives in the mill. Question: where?"}
PARAMS = {"assisted_cross_tokenizer": {"draft_model": "tiny-random-llama"},
          "adadec": {"threshold": 1.0},  # no learned threshold for the tiny model
          "forced": {"continuation": " and then the fox ran away"},
          "eagle": {"drafter": str(random_eagle_head())},  # no head is shipped for the tiny model
          "falcon": {"drafter": str(random_falcon_head())},
          "fspad": {"drafter": str(random_fspad_head())},
          "medusa": {"drafter": str(MEDUSA_HEAD)},
          "medusa_typical": {"drafter": str(MEDUSA_HEAD)},
          "ppd": {"drafter": str(random_ppd_head())},
          "token_recycling": {"reset_matrix": True}}  # not what earlier tests in this process taught the matrix
DECODERS = sorted(spec.name for spec in all_decoders())

# Decoders whose output is chosen among whole candidates (beams, samples, spans): an EOS in one candidate does not
# put it in the output, so making the first token EOS need not end the run on it.
EOS_NOT_REDRAWN = {"beam", "self_certainty", "exact_extract"}


def tiny_model(spec: DecoderSpec) -> LoadedModel:
    """A private tiny model (the EOS test changes its config): a masked-diffusion one for the diffusion family, its
    causal twin for diffuspec (whose default drafter is a waitline-tokenizer dLLM), a random Llama for the rest."""
    if spec.name == "diffuspec":
        return tiny_waitline_model(causal=True)
    if spec.family == "diffusion":
        return tiny_waitline_model()
    return load_model("tiny-random-llama")


def run(spec: DecoderSpec, model: LoadedModel, **settings: object) -> Trace:
    # the cost-aware draft length follows the machine's timing: fixed drafts make two runs of a decoder comparable
    pinned = {"draft_length": "fixed"} if any(p.name == "draft_length" for p in spec.params) else {}
    return record(model, spec.name, PROMPTS.get(spec.name, "Hello there"), {**pinned, **PARAMS.get(spec.name, {})},
                  RunSettings(max_new_tokens=BUDGET, **settings))


def summary_names(trace: Trace) -> set[str]:
    return {e.name for e in trace.events if isinstance(e, DecoderMetric)}


@pytest.fixture(params=DECODERS)
def decoder(request) -> tuple[DecoderSpec, LoadedModel, Trace]:
    """A decoder, its tiny model and a run of it that only the budget ends."""
    spec = next(s for s in all_decoders() if s.name == request.param)
    model = tiny_model(spec)
    return spec, model, run(spec, model, ignore_eos=True)


def test_the_budget_ends_the_run_and_the_summary_is_recorded(decoder):
    _, _, trace = decoder
    assert trace.status == "finished", trace.reason
    assert trace.reason in ("max_new_tokens reached", "decoder finished")
    assert 0 < len(trace.output_token_ids) <= BUDGET
    assert trace.metrics["model_calls"] > 0 and trace.metrics["new_tokens"] == len(trace.output_token_ids)
    assert isinstance(trace.events[0], RunStarted) and isinstance(trace.events[-1], RunFinished)


def first_visible_character(model: LoadedModel, ids: list[int]) -> str:
    return next(c for c in model.decode(ids) if not c.isspace() and c != "\ufffd")


def test_a_stop_string_ends_the_run_where_it_first_appears(decoder):
    spec, model, budget = decoder
    stop = first_visible_character(model, budget.output_token_ids)
    trace = run(spec, model, ignore_eos=True, stop=[stop])
    assert trace.status == "finished" and trace.reason == f"stop string {stop!r}"
    text = model.decode(trace.output_token_ids)
    assert stop in text and len(model.decode(trace.output_token_ids[:-1])) < text.index(stop) + len(stop)


def test_the_summary_is_the_same_whichever_end(decoder):
    """The runner asks for the summary whatever ended the run: a stop string records what the budget does."""
    spec, model, budget = decoder
    stopped = run(spec, model, ignore_eos=True, stop=[first_visible_character(model, budget.output_token_ids)])
    assert summary_names(stopped) == summary_names(budget)
    assert set(stopped.metrics) == set(budget.metrics)


def test_eos_ends_the_run_like_the_runner_says(decoder):
    """The budget run's first token becomes EOS: the same seed draws it again, and the run ends on it."""
    spec, model, budget = decoder
    eos = budget.output_token_ids[0]
    model.model.generation_config.eos_token_id = [eos]
    trace = run(spec, model)
    assert trace.status == "finished"
    assert not set(trace.output_token_ids[:-1]) & model.eos_token_ids  # the runner cuts at the first EOS
    if spec.name in EOS_NOT_REDRAWN and trace.reason != "end of sequence":
        assert not set(trace.output_token_ids) & model.eos_token_ids
    else:
        assert trace.reason == "end of sequence" and trace.output_token_ids[-1] in model.eos_token_ids


def test_a_cancel_keeps_the_events_so_far(decoder):
    spec, model, _ = decoder
    run_ = Run(model, spec.name, PROMPTS.get(spec.name, "Hello there"), PARAMS.get(spec.name),
               RunSettings(max_new_tokens=BUDGET, ignore_eos=True))
    seen = []
    for event in run_:
        seen.append(event)
        if len(seen) == 2:  # the first step after RunStarted
            run_.cancel()
    trace = run_.trace
    assert trace.status == "cancelled" and trace.reason == "stopped by the user"
    assert trace.events[: len(seen) - 1] == seen[:-1] and isinstance(trace.events[-1], RunFinished)


def test_storage_round_trip(decoder, tmp_path: Path):
    _, _, trace = decoder
    with TraceStore(f"sqlite:///{tmp_path / 'traces.db'}") as store:
        assert equal_traces(store.load(store.save(trace)), trace)
        exported = store.export_file(trace.run_id, tmp_path / "run.json.gz")
        with TraceStore(f"sqlite:///{tmp_path / 'other.db'}") as other:
            assert equal_traces(other.load(other.import_file(exported)), trace)


def equal_traces(a: Trace, b: Trace) -> bool:
    """Equal values (an int metric may come back as the float its field declares, as ``same`` would tell)."""
    return trace_to_dict(a) == trace_to_dict(b)
