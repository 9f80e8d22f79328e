"""Benchmarks that print ratios measured in one run (this machine is noisy; absolute numbers drift)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.decoders import DecodeContext, get_decoder
from engine.models.handle import LoadedModel
from engine.run import Run, RunSettings


def overhead(model: LoadedModel, tokens: int = 128, repeats: int = 3, prompt: str = "Explain entropy.") -> dict[str, float]:
    """Greedy, ``tokens`` new tokens: model.generate vs our bare loop vs our loop with full recording.

    The three are interleaved within each repeat and the median tokens/s of each is reported, so drift
    of the machine's speed affects all three alike.
    """
    from storage import TraceStore

    prompt_ids = model.encode(prompt, chat=model.has_chat_template)
    timings: dict[str, list[float]] = {"generate": [], "loop": [], "recorded": []}
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(f"sqlite:///{Path(tmp) / 'bench.db'}")
        _generate(model, prompt_ids, tokens)  # warm-up: first calls allocate and pick kernels
        for _ in range(repeats):
            timings["generate"].append(_generate(model, prompt_ids, tokens))
            timings["loop"].append(_bare_loop(model, prompt_ids, tokens))
            timings["recorded"].append(_recorded(model, prompt, tokens, store))
    rate = {name: tokens / statistics.median(values) for name, values in timings.items()}
    print(f"model {model.name}, greedy, {tokens} new tokens, median of {repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    for name, label in (("generate", "model.generate"), ("loop", "our loop, no recording"), ("recorded", "our loop, full recording to SQLite")):
        print(f"  {label:36} {rate[name]:8.2f} tok/s")
    ratios = {
        "recording_cost": 1 - rate["recorded"] / rate["loop"],
        "loop_vs_generate": rate["loop"] / rate["generate"],
        "recorded_vs_generate": rate["recorded"] / rate["generate"],
    }
    print(f"  recording cost vs our bare loop      {ratios['recording_cost'] * 100:6.1f} %  (goal <= 10 %)")
    print(f"  our loop / generate                  {ratios['loop_vs_generate']:6.3f}x  (goal >= 1)")
    print(f"  recorded / generate                  {ratios['recorded_vs_generate']:6.3f}x")
    return {**rate, **ratios}


def _generate(model: LoadedModel, prompt_ids: list[int], tokens: int) -> float:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == tokens
    return elapsed


def _bare_loop(model: LoadedModel, prompt_ids: list[int], tokens: int) -> float:
    ctx = DecodeContext(
        model=model, prompt_ids=prompt_ids, params={}, max_new_tokens=tokens, eos_token_ids=set(), generator=torch.Generator()
    )
    start = time.perf_counter()
    count = sum(1 for _ in get_decoder("greedy").run(ctx))
    elapsed = time.perf_counter() - start
    assert count == tokens
    return elapsed


def _recorded(model: LoadedModel, prompt: str, tokens: int, store) -> float:
    settings = RunSettings(max_new_tokens=tokens, chat=model.has_chat_template, ignore_eos=True)
    start = time.perf_counter()
    trace = Run(model, "greedy", prompt, {}, settings, sinks=[store.sink()]).to_end()
    elapsed = time.perf_counter() - start
    assert len(trace.output_token_ids) == tokens, trace.reason
    return elapsed


def storage_size(model: LoadedModel, tokens: int = 1000, prompt: str = "Write a long story about a lighthouse.") -> dict[str, float]:
    """Bytes a ``tokens``-token top-p sampling run (top-20 candidates, no attention) takes in SQLite."""
    from storage import TraceStore

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "size.db"
        store = TraceStore(f"sqlite:///{path}")
        settings = RunSettings(max_new_tokens=tokens, seed=0, chat=model.has_chat_template, ignore_eos=True, record_top_k=20)
        trace = Run(model, "top_p", prompt, {"top_p": 0.9}, settings, sinks=[store.sink()]).to_end()
        store.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("size.db*"))
    per_token = size / len(trace.output_token_ids)
    print(f"model {model.name}, top_p sampling, {len(trace.output_token_ids)} tokens, top-20 candidates, no attention")
    print(f"  SQLite file size {size / 2**20:.3f} MiB ({per_token:.0f} bytes per token; goal <= 2 MB per 1,000 tokens)")
    return {"bytes": size, "bytes_per_token": per_token}


def replay(model: LoadedModel, steps: int = 2000, moves: int = 20) -> dict[str, float]:
    """Open a ``steps``-token trace from SQLite and move the step slider: what the Library tab does."""
    import random

    from storage import TraceStore
    from ui.views import view_values

    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(f"sqlite:///{Path(tmp) / 'replay.db'}")
        settings = RunSettings(max_new_tokens=steps, seed=0, ignore_eos=True)
        run_id = Run(model, "top_p", "Once upon a time", {"top_p": 0.9}, settings, sinks=[store.sink()]).to_end().run_id
        start = time.perf_counter()
        trace = store.load(run_id)
        loaded = time.perf_counter() - start
        view_values(trace, 0, "probability")
        opened = time.perf_counter() - start
        positions = random.Random(0).sample(range(steps), moves)
        move_times = []
        for position in positions:
            t = time.perf_counter()
            view_values(trace, position, "probability")
            move_times.append(time.perf_counter() - t)
        store.close()
    result = {
        "load_seconds": loaded,
        "open_seconds": opened,
        "move_median_seconds": statistics.median(move_times),
        "move_max_seconds": max(move_times),
    }
    print(f"model {model.name}, top_p trace of {steps} tokens (top-20 candidates), stored in SQLite")
    print(f"  load from SQLite            {loaded:6.3f} s")
    print(f"  open (load + all views)     {opened:6.3f} s  (goal < 2 s)")
    print(f"  slider move (all views)     median {result['move_median_seconds'] * 1000:.0f} ms, max {result['move_max_seconds'] * 1000:.0f} ms over {moves} random steps")
    return result


def first_step(model: LoadedModel, repeats: int = 5) -> float:
    """Seconds from pressing Run (a new run on a loaded model) to the first step's views being ready."""
    from ui.session import LiveRun
    from ui.views import view_values

    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        live = LiveRun(Run(model, "top_p", "Explain entropy in one sentence.", {"top_p": 0.9}, RunSettings(seed=seed, chat=model.has_chat_template)))
        live.step()
        view_values(live.trace, None, "probability")
        times.append(time.perf_counter() - start)
        live.stop()
    median = statistics.median(times)
    print(f"model {model.name}: Run pressed -> first step shown: median {median * 1000:.0f} ms, max {max(times) * 1000:.0f} ms over {repeats} runs (goal < 1 s)")
    return median
