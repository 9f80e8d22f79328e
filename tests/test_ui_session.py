"""Live runs driven the way the UI drives them: one model call per Step, Pause, Stop."""

from __future__ import annotations

import pytest

from engine import Run, RunSettings, load_model
from engine.events import TokenStep
from ui.session import LiveRun


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random-llama")


def live(model, tokens=20):
    return LiveRun(Run(model, "greedy", "Hello", settings=RunSettings(max_new_tokens=tokens, ignore_eos=True)))


def test_step_advances_one_model_call(tiny):
    run = live(tiny)
    first = run.step()
    assert [e.kind for e in first] == ["run_started", "token"]
    second = run.step()
    assert [e.kind for e in second] == ["token"]
    assert run.trace.metrics["model_calls"] == 2 and not run.done


def test_pause_then_resume_then_finish(tiny):
    run = live(tiny)
    for i, _ in enumerate(run.play()):
        if i == 4:
            run.pause()
    assert len(run.trace.output_token_ids) == 5 and not run.done
    for _ in run.play():
        pass
    assert run.done and run.trace.status == "finished" and len(run.trace.output_token_ids) == 20


def test_stop_keeps_the_partial_trace(tiny):
    run = live(tiny)
    run.step()
    run.step()
    run.stop()
    assert run.done and run.trace.status == "cancelled"
    assert len([e for e in run.trace.events if isinstance(e, TokenStep)]) in (2, 3)


def test_a_paused_run_is_stored_as_far_as_it_got(tiny, tmp_path):
    from storage import TraceStore

    store = TraceStore(f"sqlite:///{tmp_path / 'p.db'}")
    run = LiveRun(Run(tiny, "greedy", "Hello", settings=RunSettings(max_new_tokens=50, ignore_eos=True),
                      sinks=[store.sink()]))
    for steps, _ in enumerate(run.play(), start=1):
        if steps == 7:
            run.pause()  # as the Pause button does, from another thread, while play() is stepping
    stored = store.load(run.trace.run_id)
    assert run.paused and stored.status == "running"
    assert stored.output_token_ids == run.trace.output_token_ids and len(stored.output_token_ids) == 7
