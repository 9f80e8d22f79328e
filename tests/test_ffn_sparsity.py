"""FFN activation sparsity capture (BlockFFN's token- and chunk-level measures): the recorded numbers against a
numpy computation from activations observed by hooks of this test's own, tokens unchanged, hooks gone after the run,
storage round trip, the command line's flags and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli.main import _ffn_capture, _parser
from engine import RunSettings, record
from engine.events import FfnSparsity, TokenStep
from engine.ffn import FfnCapture, ffn_projections
from engine.models import load_model
from engine.params import ParamError
from storage import TraceStore
from tests.helpers import assert_escaped, fig_strings, make_trace
from ui.figures.common import WINDOW
from ui.figures.ffn import ffn_sparsity_figure
from ui.views import view_values

PROMPT = "The fox lives in the old mill by the river"


@pytest.fixture(scope="module")
def gpt2():
    return load_model("tiny-random-gpt2")


def _intermediate(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The FFN's intermediate vector recomputed from its input with the MLP's own parts (gated or GPT-2's)."""
    if hasattr(mlp, "gate_proj"):
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return mlp.act(mlp.c_fc(x))


def _recorded_with_own_hooks(model, capture: FfnCapture, tokens: int):
    """Record a greedy run with ``capture`` while hooks of this test keep every layer's intermediate activation at
    each forward's last position (the one that predicts the step's token): [layers, tokens, neurons]."""
    decoder = model.model.get_decoder()
    layers = decoder.layers if hasattr(decoder, "layers") else decoder.h
    seen: list[list[np.ndarray]] = [[] for _ in layers]

    def keep(index: int):
        def hook(mlp, inputs):
            seen[index].append(_intermediate(mlp, inputs[0][0]).detach().float().numpy()[-1])
        return hook

    handles = [layer.mlp.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        trace = record(model, "greedy", PROMPT, settings=RunSettings(max_new_tokens=tokens, ignore_eos=True, ffn=capture))
    finally:
        for handle in handles:
            handle.remove()
    return trace, np.stack([np.stack(rows) for rows in seen])


def _expected(activations: np.ndarray, threshold: float, relative: bool, chunk: int):
    """TLS per (token, layer) and CLS per (chunk, layer), straight from the definitions."""
    magnitude = np.abs(activations)  # [layers, tokens, neurons]
    limit = threshold * magnitude.max(axis=-1, keepdims=True) if relative else threshold
    off = magnitude <= limit
    tls = off.mean(axis=-1).T  # [tokens, layers]
    chunks = activations.shape[1] // chunk
    active = ~off[:, : chunks * chunk].reshape(off.shape[0], chunks, chunk, -1)
    cls = 1.0 - active.any(axis=2).mean(axis=-1).T  # [chunks, layers]
    return tls, cls


@pytest.mark.parametrize("name,threshold,relative", [("llama", 0.05, True), ("gpt2", 0.02, False), ("llama", 0.0, True)])
def test_recorded_sparsity_equals_a_direct_computation(request, name, threshold, relative):
    model = request.getfixturevalue(name)
    chunk, tokens = 3, 8
    trace, activations = _recorded_with_own_hooks(model, FfnCapture(threshold, relative, chunk), tokens)
    events = [e for e in trace.events if isinstance(e, FfnSparsity)]
    assert [e.position for e in events] == [e.step for e in events] == list(range(tokens))
    tls, cls = _expected(activations, threshold, relative, chunk)
    assert tls.shape == (tokens, model.num_layers)
    for event in events:
        assert event.token_level == pytest.approx(tls[event.position].tolist(), abs=1e-6)
    completing = [e for e in events if e.chunk_level is not None]
    assert [e.position for e in completing] == [2, 5]  # fixed chunks [0, 3), [3, 6); the partial [6, 8) has none
    for index, event in enumerate(completing):
        assert event.chunk_level == pytest.approx(cls[index].tolist(), abs=1e-6)
    if threshold == 0.0:  # smooth activations: BlockFFN's exact-zero rule finds (almost) nothing inactive
        assert max(max(e.token_level) for e in events) < 0.05
    else:  # a chunk is at most as sparse as its sparsest token, and something is inactive
        assert 0 < np.mean(tls) < 1
        for index, event in enumerate(completing):
            assert np.all(cls[index] <= tls[index * chunk:(index + 1) * chunk].min(axis=0) + 1e-9)
    assert trace.info.settings["ffn"] == {"threshold": threshold, "relative": relative, "chunk": chunk,
                                          "max_steps": FfnCapture().max_steps}


def _token_steps(trace):
    return [(e.token_id, e.logprob) for e in trace.events if isinstance(e, TokenStep)]


@pytest.mark.parametrize("decoder,params", [("greedy", {}), ("top_p", {"top_p": 0.9}), ("kv_compress", {"budget": 6})])
def test_the_capture_changes_no_token_and_leaves_no_hook(llama, decoder, params):
    settings = dict(max_new_tokens=6, seed=5, ignore_eos=True)
    plain = record(llama, decoder, PROMPT, params, RunSettings(**settings))
    captured = record(llama, decoder, PROMPT, params, RunSettings(**settings, ffn=FfnCapture()))
    assert _token_steps(captured) == _token_steps(plain)
    assert len([e for e in captured.events if isinstance(e, FfnSparsity)]) == 6
    assert all(not module._forward_pre_hooks for module in llama.model.modules())


def test_forced_records_one_event_per_forced_token(llama):
    trace = record(llama, "forced", PROMPT, {"continuation": " and the mill by the sea"},
                   RunSettings(max_new_tokens=5, ffn=FfnCapture(chunk=2)))
    events = [e for e in trace.events if isinstance(e, FfnSparsity)]
    assert [e.position for e in events] == list(range(5)) and {e.step for e in events} == {0}
    assert [e.position for e in events if e.chunk_level is not None] == [1, 3]


def test_the_token_budget_bounds_the_events(llama):
    trace = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=6, ignore_eos=True,
                                                                  ffn=FfnCapture(max_steps=4)))
    assert [e.position for e in trace.events if isinstance(e, FfnSparsity)] == [0, 1, 2, 3]


class _Layer(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.down_proj = torch.nn.Linear(width, 2)


class _Model(torch.nn.Module):
    """Two layers whose FFNs differ in width, found as a transformers model's are."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([_Layer(4), _Layer(6)])

    def get_decoder(self) -> torch.nn.Module:
        return self.decoder


def test_hand_counted_token_and_chunk_sparsity_on_layers_of_different_widths():
    model, capture = _Model(), FfnCapture(threshold=0.5, chunk=2)
    capture.check(model)
    tokens = [([1.0, 0.1, -0.6, -0.2], [1.0, 0, 0, 0, 0, 0]), ([0.1, -1.0, 0.2, 0.9], [0, 2.0, 0, 0, 0.5, 0])]
    events = []
    for position, activations in enumerate(tokens):
        with capture.observing(model, [0]):
            for layer, values in zip(model.decoder.layers, activations):
                layer.mlp.down_proj(torch.tensor([[values]]))
        events += capture.take(position, [position])
    assert events[0].token_level == pytest.approx([2 / 4, 5 / 6]) and events[0].chunk_level is None
    assert events[1].token_level == pytest.approx([2 / 4, 5 / 6])  # |a| <= half the token's largest is inactive
    assert events[1].chunk_level == pytest.approx([0.0, 4 / 6])  # active in either token: all four; two of six
    assert all(not down._forward_pre_hooks for down in ffn_projections(model))


def test_bad_settings_and_models_are_refused():
    with pytest.raises(ParamError, match="share of the largest"):
        FfnCapture(threshold=2.0)
    with pytest.raises(ParamError, match="ffn_chunk"):
        FfnCapture(chunk=0)
    FfnCapture(threshold=2.0, relative=False)  # an absolute threshold may exceed 1
    with pytest.raises(ParamError, match="decoder layers"):
        ffn_projections(torch.nn.Linear(2, 2))


def test_the_trace_stores_and_reloads(llama, tmp_path):
    with TraceStore(f"sqlite:///{tmp_path / 'ffn.db'}") as store:
        trace = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=5, ignore_eos=True,
                                                                      ffn=FfnCapture(chunk=2)), sinks=[store.sink()])
        loaded = store.load(trace.run_id)
    stored = [e for e in loaded.events if isinstance(e, FfnSparsity)]
    assert stored == [e for e in trace.events if isinstance(e, FfnSparsity)] and len(stored) == 5
    assert loaded.info.settings["ffn"]["chunk"] == 2


def test_the_record_flags_build_the_capture():
    parser = _parser()
    args = parser.parse_args(["record", "--prompt", "x", "--ffn-sparsity", "--ffn-threshold", "0.5", "--ffn-absolute",
                              "--ffn-chunk", "4"])
    capture = _ffn_capture(args)
    assert (capture.threshold, capture.relative, capture.chunk) == (0.5, False, 4)
    assert _ffn_capture(parser.parse_args(["record", "--prompt", "x"])) is None
    with pytest.raises(ParamError, match="need --ffn-sparsity"):
        _ffn_capture(parser.parse_args(["record", "--prompt", "x", "--ffn-chunk", "4"]))


def _hand_events(count: int, layers: int = 3, chunk: int = 4) -> list:
    events = []
    for p in range(count):
        done = p % chunk == chunk - 1
        events.append(TokenStep(step=p, position=p, token_id=10 + p % 4, logprob=-1.0, raw_logprob=-1.0, rank=1,
                                entropy_raw=1.0, entropy=1.0, candidates=[], stages=[]))
        events.append(FfnSparsity(step=p, position=p, token_level=[(p % 10) / 10] * layers,
                                  chunk_level=[0.25] * layers if done else None))
    return events


def test_the_figure_draws_both_measures_escaped_and_windowed():
    trace = make_trace(_hand_events(10))
    trace.output_token_ids = [e.token_id for e in trace.events if isinstance(e, TokenStep)]
    trace.info.settings["ffn"] = {"threshold": "<b>0.01</b>", "relative": True, "chunk": 4}  # an imported file's
    fig = ffn_sparsity_figure(trace, selected=5)
    tls, cls = fig.data[0], fig.data[1]
    assert np.asarray(tls.z).shape == (3, 10) and np.asarray(tls.z)[0, 7] == pytest.approx(0.7)
    chunk_row = np.asarray(cls.z, dtype=float)[0]
    assert np.allclose(chunk_row[:8], 0.25) and np.isnan(chunk_row[8:]).all()  # two chunks, then a partial one
    assert_escaped(fig_strings(fig), [10, 11, 12, 13])
    assert "&lt;b&gt;0.01&lt;/b&gt;" in fig.layout.title.text

    long = make_trace(_hand_events(WINDOW + 50))
    assert list(ffn_sparsity_figure(long).data[0].x) == list(range(50, WINDOW + 50))  # the last WINDOW tokens
    moved = list(ffn_sparsity_figure(long, selected=3).data[0].x)
    assert 3 in moved and len(moved) == WINDOW
    assert "showing tokens" in ffn_sparsity_figure(long).layout.title.text


def test_the_views_show_the_figure_only_for_runs_that_captured(llama):
    plain = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=3))
    captured = record(llama, "greedy", PROMPT, settings=RunSettings(max_new_tokens=3, ffn=FfnCapture()))
    assert view_values(plain, 1, "probability")[7]["visible"] is False
    shown = view_values(captured, 1, "probability")[7]
    assert shown["visible"] is True and "FFN activation sparsity" in shown["value"].layout.title.text
