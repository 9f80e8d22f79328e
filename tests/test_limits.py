"""Bounded resources per request: the operator's limits, a cancel that stops the engine within one model call (in
the engine, the UI's stream and the app's API), the per-session concurrency limit and the model pool's budget."""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

import pytest

from engine import Run, RunSettings, load_model
from engine.attention import AttentionCapture
from engine.decoders import all_decoders
from engine.limits import Limits, add_arguments, check_request
from engine.models import canonical_name
from engine.models.handle import LoadedModel
from engine.params import ParamError
from storage import TraceStore
from ui.session import LiveRun

MODELS = {"diffusion": "waitline-mdlm", "diffuspec": "waitline-ar"}  # decoders that need a particular model
PROMPTS = {"gift": "Context: the fox lives in the mill. Question: where?",
           "exact_extract": "Context: the fox lives in the mill. Question: where?"}
PARAMS = {"assisted_cross_tokenizer": {"draft_model": "tiny-random-gpt2"}}  # not the real model it drafts with


@pytest.fixture(scope="module")
def models():
    loaded: dict[str, LoadedModel] = {}
    return lambda name: loaded.setdefault(name, load_model(name))


@pytest.fixture
def forwards(monkeypatch):
    """The start time of every model call that ran, and a hook called after each one."""
    started: list[float] = []
    after: list = []
    real = LoadedModel.forward

    def forward(self, *args, **kwargs):
        begin = time.monotonic()
        out = real(self, *args, **kwargs)  # a stopped run raises before calling the model: not counted
        started.append(begin)
        for hook in after:
            hook(len(started))
        return out

    monkeypatch.setattr(LoadedModel, "forward", forward)
    return started, after


def _model_for(spec) -> str:
    return MODELS.get(spec.name, MODELS.get(spec.family, "tiny-random-llama"))


# ---------------------------------------------------------------- the operator's limits


def test_limits_come_from_the_environment_then_the_command_line():
    env = {"DECODING_EXPLORER_BEAMS_LIMIT": "none", "DECODING_EXPLORER_RUN_SECONDS_LIMIT": "30"}
    assert Limits.from_env(False, {}) == Limits.local() and Limits.from_env(True, {}) == Limits.public()
    limits = Limits.from_env(True, env)
    assert limits.beams is None and limits.run_seconds == 30.0 and limits.samples == Limits.public().samples
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-new-tokens-limit", "100", "--session-runs-limit", "none"])
    assert Limits.from_args(args, public=True) == Limits(**{**Limits.public().__dict__, "max_new_tokens": 100,
                                                            "session_runs": None})
    for text, message in (("x", "must be a whole number"), ("2.5", "must be a whole number"), ("-1", "must be above 0")):
        with pytest.raises(ParamError, match=f"DECODING_EXPLORER_BEAMS_LIMIT {message}"):
            Limits.from_env(False, {"DECODING_EXPLORER_BEAMS_LIMIT": text})
    with pytest.raises(ParamError, match="RUN_SECONDS_LIMIT must be above 0"):
        Limits.from_env(False, {"DECODING_EXPLORER_RUN_SECONDS_LIMIT": "nan"})


def test_every_parameter_tag_names_a_limit_and_every_default_passes_the_public_ones():
    names = {f.name for f in fields(Limits)}
    tagged = {(spec.name, p.name): p.limit for spec in all_decoders() for p in spec.params if p.limit}
    assert set(tagged.values()) <= names
    assert {("beam", "num_beams"), ("self_certainty", "n"), ("dyspec", "tree_size"), ("llada", "gen_length")} <= set(tagged)
    for spec in all_decoders():
        check_request(spec, spec.validate({}), RunSettings(), prompt_tokens=100, limits=Limits.public())


@pytest.mark.parametrize("decoder,params,settings,limit", [
    ("beam", {"num_beams": 16}, RunSettings(), "--beams-limit"),
    ("self_certainty", {"n": 12}, RunSettings(), "--samples-limit"),
    ("token_recycling", {"tree_size": 80}, RunSettings(), "--draft-tokens-limit"),
    ("greedy", {}, RunSettings(max_new_tokens=600), "--max-new-tokens-limit"),
    ("greedy", {}, RunSettings(record_top_k=200), "--record-top-k-limit"),
    ("greedy", {}, RunSettings(attention=AttentionCapture(max_bytes=64 * 2**20)), "--attention-mb-limit"),
])
def test_a_request_over_a_limit_is_refused_before_any_model_call(models, forwards, decoder, params, settings, limit):
    limits = Limits(**{**Limits.public().__dict__, "draft_tokens": 64})
    with pytest.raises(ParamError, match=f"above this server's limit .*{limit}"):
        Run(models("tiny-random-llama"), decoder, "Hello", params, settings, limits=limits)
    started, _ = forwards
    assert started == []


def test_a_long_prompt_is_refused_by_the_prompt_limit(models, forwards):
    prompt = "the cat sat on the mat " * 40  # about 400 tokens: within the model's 1024 positions
    with pytest.raises(ParamError, match="the prompt's token count is .* limit of 100 .*--prompt-tokens-limit"):
        Run(models("tiny-random-llama"), "greedy", prompt, limits=Limits(prompt_tokens=100))
    assert Run(models("tiny-random-llama"), "greedy", prompt, limits=Limits.local()).prompt_ids  # no limit locally
    assert forwards[0] == []


def test_the_time_limit_counts_compute_not_pauses(models):
    model = models("tiny-random-gpt2")
    settings = RunSettings(max_new_tokens=1000, ignore_eos=True)
    trace = Run(model, "greedy", "Hello", settings=settings, limits=Limits(run_seconds=0.3)).to_end()
    assert trace.status == "cancelled" and "--run-seconds-limit" in trace.reason
    assert 0 < len(trace.output_token_ids) < 1000
    live = LiveRun(Run(model, "greedy", "Hello", settings=settings, limits=Limits(run_seconds=0.5)))
    for _ in range(3):  # a person stepping slowly: the waits between steps are not the run's compute
        live.step()
        time.sleep(0.3)
    assert not live.done and live.trace.status == "running"


# ---------------------------------------------------------------- cancel: within one model call


@pytest.mark.parametrize("spec", all_decoders(), ids=lambda spec: spec.name)
def test_every_decoder_stops_within_one_model_call_of_a_cancel(models, forwards, spec):
    """Cancel right after the second model call: no model call runs after it, even inside a decoder's round,
    a draft or a layer search (the check sits in LoadedModel.forward)."""
    run = Run(models(_model_for(spec)), spec.name, PROMPTS.get(spec.name, "Hello there"), PARAMS.get(spec.name),
              RunSettings(max_new_tokens=40, ignore_eos=True))
    started, after = forwards
    after.append(lambda calls: run.cancel() if calls == 2 else None)
    trace = run.to_end()
    assert len(started) <= 2, f"{len(started) - 2} model calls after the cancel"
    if len(started) == 2:  # a decoder done in fewer calls finished first
        assert trace.status == "cancelled" and trace.reason == "stopped by the user"


def test_a_closed_stream_stops_its_run(models, forwards):
    """Gradio closes a streaming handler's generator (on its event loop) when its client cancels or the page goes
    away: no model call after that, and the run's end is recorded without blocking the close."""
    from ui.run_tab import stream

    run = Run(models("tiny-random-gpt2"), "greedy", "Hello", settings=RunSettings(max_new_tokens=1000, ignore_eos=True))
    live = LiveRun(run)
    updates = stream(live, "probability")
    next(updates)
    next(updates)
    updates.close()
    calls = len(forwards[0])
    deadline = time.monotonic() + 30
    while not live.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.done and run.trace.status == "cancelled" and run.trace.reason == "stopped by the user"
    assert len(forwards[0]) == calls < 1000


def test_cancel_on_the_real_model_stops_within_one_model_call(real_model, forwards):
    run = Run(real_model, "greedy", "Tell me a long story.", settings=RunSettings(max_new_tokens=2000, ignore_eos=True))
    started, after = forwards
    after.append(lambda calls: run.cancel() if calls == 5 else None)
    trace = run.to_end()
    assert len(started) == 5 and trace.status == "cancelled" and len(trace.output_token_ids) <= 5


# ---------------------------------------------------------------- the app: cancel through the API, sessions


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app in this process on a free port, one queue slot: a second request starts only once the first ends."""
    from cli.bench_ui import free_port
    from ui.app import build

    db_url = f"sqlite:///{tmp_path_factory.mktemp('limits-app') / 'app.db'}"
    demo = build("tiny-random-gpt2", db_url, limits=Limits.local())
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port,
                                                   prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", TraceStore(db_url)
    demo.close()


def test_a_cancelled_api_call_stops_its_run_and_frees_the_queue(app, forwards):
    """A 1000-token beam run (11 s uncancelled on this model) cancelled through gradio_client: the engine stops within
    a poll interval and the next request gets the slot."""
    from gradio_client import Client

    url, store = app
    started, _ = forwards
    job = Client(url, verbose=False).submit("tiny-random-gpt2", "beam", "Hello", {"num_beams": 16}, 0, 1000, False,
                                            api_name="/record")
    deadline = time.monotonic() + 60
    while not job.outputs() and time.monotonic() < deadline:  # the first progress line: the run is going
        time.sleep(0.02)
    run_id = job.outputs()[0]["run_id"]
    cancelled_at = time.monotonic()
    job.cancel()
    second = Client(url, verbose=False).predict("tiny-random-gpt2", "greedy", "Hi", {}, 0, 2, False, api_name="/record")
    second_done = time.monotonic() - cancelled_at
    while store.load(run_id).status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    trace = store.load(run_id)
    after_cancel = [t for t in started if t > cancelled_at][: -second["metrics"]["model_calls"]]  # the first run's
    stopped = max(after_cancel, default=cancelled_at) - cancelled_at
    print(f"cancel -> engine stopped: {stopped:.3f} s, {len(after_cancel)} model calls after the cancel; "
          f"cancel -> next request done: {second_done:.3f} s")
    assert trace.status == "cancelled" and trace.metrics["model_calls"] < 1000
    assert stopped < 2 and second["status"] == "finished" and second_done < 5  # not the ~10 s the run had left


def test_one_session_runs_one_request_at_a_time(tmp_path, models):
    from ui.context import AppContext
    from ui.pool import ModelPool

    app = AppContext(TraceStore(f"sqlite:///{tmp_path / 's.db'}"), ModelPool(), "tiny-random-llama", False)
    with app.request_slot("a"):
        with pytest.raises(ParamError, match="already has 1 run.*--session-runs-limit"), app.request_slot("a"):
            pass
        with app.request_slot("b"):  # another session is not held up
            pass
    with app.request_slot("a"):  # the slot came back
        pass
    app.limits = Limits(session_runs=2)
    with app.request_slot("a"), app.request_slot("a"):
        pass


# ---------------------------------------------------------------- the model pool


def test_canonical_names():
    assert canonical_name(" tiny-random-llama ") == canonical_name("tiny-random-llama:seed=0") == "tiny-random-llama"
    assert canonical_name("tiny-random-llama:seed=007") == "tiny-random-llama:seed=7"
    assert canonical_name("smollm2-135m-instruct\t") == "smollm2-135m-instruct"
    assert canonical_name("assets/../assets") == canonical_name("assets")


def test_the_same_model_under_another_spelling_loads_nothing_new(monkeypatch):
    import ui.pool

    loads: list[str] = []
    monkeypatch.setattr(ui.pool, "load_model", lambda name, progress: loads.append(name) or load_model(name))
    pool = ui.pool.ModelPool()
    first = pool.get("tiny-random-llama")
    assert pool.get("tiny-random-llama ") is first and pool.get(" tiny-random-llama:seed=0") is first
    assert loads == ["tiny-random-llama"]


def test_the_pool_stays_under_its_memory_budget_and_keeps_models_in_use():
    from ui.pool import ModelPool, model_bytes

    size = model_bytes(load_model("tiny-random-llama"))
    held: list[LoadedModel] = []
    pool = ModelPool(max_models=10, budget_bytes=int(2.5 * size), in_use=lambda: held)
    held.append(pool.get("tiny-random-llama:seed=1"))
    for seed in range(2, 7):
        pool.get(f"tiny-random-llama:seed={seed}")
        assert sum(pool.loaded().values()) <= 2.5 * size
    assert list(pool.loaded()) == ["tiny-random-llama:seed=1", "tiny-random-llama:seed=6"]  # in use, and the newest
    held.clear()
    pool.get("tiny-random-llama:seed=7")
    assert list(pool.loaded()) == ["tiny-random-llama:seed=6", "tiny-random-llama:seed=7"]



def test_draft_models_named_per_request_do_not_pile_up():
    from engine.speculative.drafts import (
        _DRAFT_MODELS,
        MAX_DRAFT_MODELS,
        load_draft_model,
    )

    target = load_model("tiny-random-llama")
    first = load_draft_model("tiny-random-llama:seed=11", target)
    assert load_draft_model(" tiny-random-llama:seed=11 ", target) is first
    for seed in range(12, 12 + MAX_DRAFT_MODELS + 2):
        load_draft_model(f"tiny-random-llama:seed={seed}", target)
    assert len(_DRAFT_MODELS) == MAX_DRAFT_MODELS
    assert ("tiny-random-llama:seed=11", "float32", "cpu") not in _DRAFT_MODELS


def test_a_draft_model_loads_in_its_targets_dtype_and_is_cached_per_dtype():
    from engine.speculative.drafts import _DRAFT_MODELS, load_draft_model

    half = load_model("tiny-random-llama", dtype="bfloat16")
    draft = load_draft_model("tiny-random-llama:seed=21", half)
    assert (draft.dtype_name, draft.device.type) == ("bfloat16", "cpu")
    assert load_draft_model("tiny-random-llama:seed=21", load_model("tiny-random-llama")).dtype_name == "float32"
    assert {key for key in _DRAFT_MODELS if key[0] == "tiny-random-llama:seed=21"} == {
        ("tiny-random-llama:seed=21", "bfloat16", "cpu"), ("tiny-random-llama:seed=21", "float32", "cpu")}
