"""The one parser of the bench commands' ``NAME:KEY=VALUE:...`` settings, and its use by each bench."""

from __future__ import annotations

import pytest

from cli.bench import _spec_variant
from cli.bench_dllm import parse_setting as dllm_setting
from cli.bench_kv import setting_params
from engine.params import ParamError, parse_setting


def test_a_setting_splits_into_its_name_and_parameters():
    assert parse_setting("fast_dllm:rule=factor:factor=1.0") == ("fast_dllm", {"rule": "factor", "factor": "1.0"})
    assert parse_setting(" greedy ") == ("greedy", {})
    assert parse_setting("h2o::budget=16:") == ("h2o", {"budget": "16"})  # empty parts are skipped


@pytest.mark.parametrize("label", ["", ":budget=16", "  :x=1"])
def test_a_setting_without_a_name_is_refused_in_one_line(label):
    with pytest.raises(ParamError, match="NAME:KEY=VALUE") as caught:
        parse_setting(label)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("label, part", [("llada:steps", "'steps'"), ("h2o:=16", "'=16'")])
def test_a_part_without_key_and_value_is_refused_in_one_line(label, part):
    with pytest.raises(ParamError, match=f"{part} is not KEY=VALUE") as caught:
        parse_setting(label)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("parse, label", [
    (dllm_setting, "llada:stepz=4"), (_spec_variant, "speculative:stepz=4"), (setting_params, "h2o:stepz=16"),
])
def test_each_bench_refuses_an_unknown_parameter_before_any_run(parse, label):
    with pytest.raises(ParamError, match="has no parameter 'stepz'"):
        parse(label)


def test_each_bench_keeps_its_own_additions():
    assert _spec_variant("speculative:num_draft_tokens=4") == (
        "speculative", {"temperature": 0.0, "num_draft_tokens": "4"}, False)
    assert _spec_variant("plain:greedy") == ("greedy", {}, True)  # F.linear alone; greedy takes no temperature
    assert setting_params("snapkv:budget=16:window=8") == {"policy": "snapkv", "budget": "16", "window": "8"}
    assert dllm_setting("llada:steps=18").params == {"steps": "18"}
