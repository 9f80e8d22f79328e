"""Linear layers routed by row count (engine.models.cpu_linear): the same products, the choice, its cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from engine import load_model
from engine.models import cpu_linear
from engine.models.cpu_linear import (
    RowKernelLinear, by_row_count, choose, columns_for, linear_product, plain_linear, row_kernels, use_row_kernels,
)
from tests.helpers import PROMPTS, run_ignoring_eos

# every row count up to 32 through W @ x^T, padded to the next timed count (odd counts padded by one or more)
ALL_WEIGHT_FIRST = {rows: max(rows, 2) for rows in cpu_linear.ROW_COUNTS}


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 16])
@pytest.mark.parametrize("columns", [0, "rows", 32])
@pytest.mark.parametrize("bias", [False, True])
def test_both_products_compute_x_times_w_transposed(rows, columns, bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(48, 24), torch.randn(1, rows, 24)
    b = torch.randn(48) if bias else None
    out = linear_product(x, weight, b, max(rows, 2) if columns == "rows" else columns)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_choice_pads_to_a_faster_count_and_keeps_f_linear_where_it_is_not_beaten():
    timings = {  # seconds as (F.linear, W @ x^T of that many columns)
        1: (0.040, 0.020), 2: (0.060, 0.019), 3: (0.075, 0.030), 4: (0.058, 0.022),
        5: (0.050, 0.049), 6: (0.050, 0.045), 8: (0.052, 0.050), 12: (0.058, 0.070),
        16: (0.063, 0.055), 24: (0.077, 0.074), 32: (0.090, 0.084),
    }
    table = choose(timings)
    assert table[1] == 2  # one column would take the matrix-vector path: padded to two
    assert table[3] == 4  # 4 columns beat 3 and stay within twice the rows
    assert table[5] == 6  # 6 columns (0.045 s) are the fastest of 5-10 and beat F.linear's 0.050 s by 5 %
    assert table[8] == 0  # 8-16 columns: 0.050 s at best against F.linear's 0.052: inside the margin
    assert table[12] == 16  # 16 columns (0.055 s) beat F.linear (0.058 s) by 5 %
    assert table[24] == 0  # 0.074 against 0.077: inside the noise margin, F.linear stays
    near_tie = choose({2: (0.060, 0.0200), 3: (0.070, 0.0201), 4: (0.080, 0.0200)})
    assert near_tie[3] == 3  # equal within the margin: the fewest columns


def test_the_lookup_takes_the_next_timed_count_and_f_linear_beyond():
    table = {1: 2, 2: 2, 3: 4, 4: 4, 8: 8, 32: 0}
    assert [columns_for(table, rows) for rows in (1, 2, 3, 4, 7, 8, 20, 32, 33, 600)] == [2, 2, 4, 4, 8, 8, 0, 0, 0, 0]
    assert columns_for({}, 3) == 0


def test_the_choice_is_timed_once_per_machine_and_model_shape(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    assert row_kernels(model, tmp_path / "untouched.json") == {}  # weights this small stay on F.linear, untimed
    assert not (tmp_path / "untouched.json").exists()
    monkeypatch.setattr(cpu_linear, "MIN_WEIGHT_BYTES", 0)
    calls = []
    monkeypatch.setattr(cpu_linear, "measure_row_kernels",
                        lambda layers: calls.append(len(layers)) or {r: (1.0, 0.5) for r in cpu_linear.ROW_COUNTS})
    cache = tmp_path / "row-kernels.json"
    first = row_kernels(model, cache)
    assert calls == [2] and first[1] == 2 and first[3] == 3 and json.loads(cache.read_text())
    assert row_kernels(model, cache) == first and calls == [2]  # recalled, not timed again
    row_kernels(torch.nn.Sequential(torch.nn.Linear(16, 8)), cache)
    assert calls == [2, 1]  # another shape is timed on its own
    cache.write_text("{not json")
    assert row_kernels(model, cache) == first and calls == [2, 1, 2]  # a damaged file is timed again, not fatal


def test_a_loaded_model_is_routed_and_plain_linear_restores_its_table(monkeypatch):
    monkeypatch.setattr(cpu_linear, "row_kernels", lambda model, cache=None, progress=None: dict(ALL_WEIGHT_FIRST))
    model = load_model("tiny-random-llama")
    layers = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(isinstance(m, RowKernelLinear) for m in layers)
    assert model.details["row_kernels"] == ALL_WEIGHT_FIRST
    with plain_linear(model.model):
        assert all(m.row_kernels == {} for m in layers)
    assert all(m.row_kernels == by_row_count(ALL_WEIGHT_FIRST) for m in layers)
    assert layers[0].row_kernels[7] == 8 and 33 not in layers[0].row_kernels  # 33 rows and more: F.linear
    assert not any(isinstance(m, RowKernelLinear) for m in load_model("tiny-random-llama", tune_linear=False).model.modules())


@pytest.mark.parametrize("decoder,params", [("prompt_lookup", {"max_ngram": 1, "num_draft_tokens": 8}),
                                            ("speculative", {"draft_layers": 1, "num_draft_tokens": 5})])
def test_speculation_on_weight_first_products_still_equals_greedy(decoder, params):
    """Verify forwards of 2-9 tokens take W @ x^T (padded), greedy's one-token steps take it padded to two: the
    tokens stay greedy's, and greedy's logits stay F.linear's to float32 rounding."""
    model = load_model("tiny-random-llama", tune_linear=False)
    plain = run_ignoring_eos(model, "greedy", PROMPTS[0], max_new_tokens=40)
    use_row_kernels(model.model, dict(ALL_WEIGHT_FIRST))
    greedy = run_ignoring_eos(model, "greedy", PROMPTS[0], max_new_tokens=40)
    assert greedy.output_token_ids == plain.output_token_ids
    trace = run_ignoring_eos(model, decoder, PROMPTS[0], params, max_new_tokens=40)
    assert trace.status == "finished", trace.reason
    assert trace.output_token_ids == greedy.output_token_ids


def test_a_model_under_the_size_floor_keeps_plain_layers():
    model = load_model("tiny-random-llama")  # a few MB of weights: untimed, nothing routed
    assert model.details["row_kernels"] == {}
    assert not any(isinstance(m, RowKernelLinear) for m in model.model.modules())
