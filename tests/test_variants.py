"""Model variants (``models derive``): exact pruning, bounded quantisation, per-layer profiles, and saved folders
that reload to the very model the same transformation gives in memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli.main import main
from engine.models import ModelError, list_models, load_model
from engine.models.prune import prune_weight
from engine.models.quantize import dequantize, error_bound, quantize
from engine.models.registry import model_names
from engine.models.variant_spec import VariantSpec, spec_from_profile
from engine.models.variants import (
    apply_variant,
    calibration_texts,
    decoder_linears,
    derive,
    input_norms,
    save_variant,
    weight_matrix,
)
from engine.params import ParamError
from tests.helpers import greedy_ids

IDS = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DECODING_EXPLORER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(name) for name in ("tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2")}


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.model(input_ids=IDS).logits


def matrices(model) -> list[dict[str, torch.Tensor]]:
    return [{name: weight_matrix(m).detach().clone() for name, m in layer.items()}
            for layer in decoder_linears(model.model)]


@pytest.mark.parametrize("name, spec", [
    ("tiny-random-llama", VariantSpec(quantize="int8")),
    ("tiny-random-llama", VariantSpec(prune="wanda", sparsity=0.5, quantize="int4", group_size=32)),
    ("tiny-random-gemma3", VariantSpec(quantize="int4")),
    ("tiny-random-gpt2", VariantSpec(prune="wanda", pattern="2:4")),
    ("tiny-random-gemma3", VariantSpec(prune="magnitude", layer_profile={1: 0.6})),
])
def test_a_saved_variant_reloads_to_the_in_memory_transformation(tiny, name, spec):
    base = tiny[name]
    before = logits(base)
    in_memory = apply_variant(base, spec)
    folder = derive(name, spec)
    reloaded = load_model(str(folder))
    assert torch.equal(logits(base), before)  # the base is untouched
    assert torch.equal(logits(reloaded), logits(in_memory))
    assert not torch.allclose(logits(in_memory), before, atol=1e-3)  # and the variant is another model
    assert reloaded.name == in_memory.name == f"{name}~{spec.tag}" == folder.name
    record = json.loads((folder / "variant.json").read_text())
    assert record["base"] == name and record["size_bytes"] == (folder / "delta.safetensors").stat().st_size
    assert record["size_bytes"] < record["settings"]["dense_linear_bytes"] / 3  # only what differs, compactly
    assert (folder / "README.md").read_text().startswith(f"# {folder.name}")


def test_pruning_meets_the_sparsity_exactly_per_group():
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    norm = torch.rand(40, generator=torch.Generator().manual_seed(1)) + 0.1
    magnitude = prune_weight(weight, sparsity=0.3)  # one group: the whole matrix
    assert int((magnitude == 0).sum()) == math.floor(0.3 * weight.numel())
    assert weight[magnitude == 0].abs().max() <= weight[magnitude != 0].abs().min()
    wanda = prune_weight(weight, sparsity=0.3, method="wanda", input_norm=norm)  # groups: output rows
    assert ((wanda == 0).sum(dim=1) == math.floor(0.3 * 40)).all()
    score = weight.abs() * norm
    for row in range(weight.shape[0]):
        assert score[row][wanda[row] == 0].max() <= score[row][wanda[row] != 0].min()
    assert torch.equal(wanda[wanda != 0], weight[wanda != 0])


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_an_n_m_pattern_keeps_the_n_largest_of_every_m(method):
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    norm = torch.rand(32, generator=torch.Generator().manual_seed(3)) + 0.1
    pruned = prune_weight(weight, pattern=(2, 4), method=method, input_norm=norm if method == "wanda" else None)
    groups = pruned.reshape(-1, 4)
    assert ((groups != 0).sum(dim=1) == 2).all()
    score = (weight.abs() * (norm if method == "wanda" else 1)).reshape(-1, 4)
    kept = groups != 0
    assert (torch.where(kept, score, math.inf).amin(1) >= torch.where(kept, -math.inf, score).amax(1)).all()


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 64), (4, 16)])
def test_quantised_weights_dequantise_within_half_a_step(bits, group_size):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(4)) * 0.1
    tensors = quantize(weight, bits, group_size)
    restored = dequantize(tensors, bits, group_size, tuple(weight.shape))
    error = (weight - restored).abs()
    assert (error <= error_bound(tensors, tuple(weight.shape)) * (1 + 1e-5) + 1e-8).all()
    assert 0 < error.max() < weight.abs().max() / (20 if bits == 4 else 200)
    assert tensors["q"].numel() == weight.numel() * bits // 8  # int4 packs two per byte


def test_layer_profiles_apply_per_layer(tiny):
    base = tiny["tiny-random-llama"]
    dense = matrices(base)
    pruned = matrices(apply_variant(base, spec_from_profile({"method": "wanda", "levels": {"0": 0.25}})))
    for name, matrix in pruned[0].items():
        assert ((matrix == 0).sum(dim=1) == math.floor(0.25 * matrix.shape[1])).all(), name
    assert all(torch.equal(pruned[1][name], dense[1][name]) for name in dense[1])
    mixed = matrices(apply_variant(base, spec_from_profile({"method": "int", "levels": {"0": 4, "1": 16}})))
    assert all(not torch.equal(mixed[0][name], dense[0][name]) for name in dense[0])
    assert all(torch.equal(mixed[1][name], dense[1][name]) for name in dense[1])
    with pytest.raises(ModelError, match="layer profile names layer"):
        apply_variant(base, VariantSpec(prune="magnitude", layer_profile={5: 0.5}))


def test_input_norms_cover_every_linear_and_add_up_over_texts(tiny):
    model = tiny["tiny-random-llama"]
    texts = calibration_texts()[:1]
    norms = input_norms(model, texts, max_tokens=64)
    assert set(norms) == {f"{i}.{name}" for i, layer in enumerate(decoder_linears(model.model)) for name in layer}
    assert norms["0.mlp.down_proj"].shape == (128,) and (norms["0.mlp.down_proj"] > 0).all()
    twice = input_norms(model, texts * 2, max_tokens=64)  # ||X||_2 over twice the same tokens: sqrt(2) times
    assert torch.allclose(twice["1.self_attn.o_proj"], norms["1.self_attn.o_proj"] * math.sqrt(2), rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "needs --quantize"),
    ({"quantize": "int3"}, "not int8 or int4"),
    ({"quantize": "int8", "group_size": 32}, "int4 only"),
    ({"prune": "wanda"}, "exactly one of"),
    ({"prune": "wanda", "sparsity": 0.5, "pattern": "2:4"}, "exactly one of"),
    ({"prune": "magnitude", "sparsity": 1.0}, "outside"),
    ({"prune": "magnitude", "pattern": "4:2"}, "N:M"),
    ({"prune": "random", "sparsity": 0.5}, "not one of"),
    ({"sparsity": 0.5, "quantize": "int8"}, "needs a pruning method"),
    ({"prune": "wanda", "layer_profile": {0: 1.5}}, "outside"),
    ({"quantize": "int", "layer_profile": {0: 5}}, "bits"),
    ({"prune": "wanda", "sparsity": 0.5, "calibration": "nope"}, "calibration"),
])
def test_bad_specs_say_what_is_wrong(kwargs, message):
    with pytest.raises(ParamError, match=message):
        VariantSpec(**kwargs)


def test_int4_needs_a_group_dividing_every_matrix(tiny):
    with pytest.raises(ParamError, match="dividing"):
        apply_variant(tiny["tiny-random-llama"], VariantSpec(quantize="int4", group_size=48))


def test_saved_variants_are_listed_and_load_by_name(tiny):
    folder = derive("tiny-random-llama", VariantSpec(prune="magnitude", sparsity=0.5))
    name = folder.name
    entry = next(e for e in list_models() if e.name == name)
    assert entry.kind == "variant" and entry.ready and "tiny-random-llama" in entry.description
    assert name in model_names()
    loaded = load_model(name)
    assert loaded.name == name and loaded.source == "variant"
    zeros = sum(int((weight_matrix(m) == 0).sum()) for layer in decoder_linears(loaded.model) for m in layer.values())
    total = sum(weight_matrix(m).numel() for layer in decoder_linears(loaded.model) for m in layer.values())
    assert zeros >= total // 2 - len(decoder_linears(loaded.model)) * 7  # each matrix rounds its half down


def test_a_replacement_variant_ships_whole_tensors_and_a_changed_base_is_refused(tiny, tmp_path):
    base = tiny["tiny-random-llama"]
    key = "model.layers.1.mlp.up_proj.weight"
    new = torch.full_like(dict(base.model.named_parameters())[key], 0.5, dtype=torch.bfloat16)
    folder = save_variant("tiny-random-llama", "tiny-random-llama~tuned", replace={key: new}, method="fine-tuning",
                          card="Trained on nothing.", out=tmp_path / "tuned")
    loaded = load_model(str(folder))
    assert (dict(loaded.model.named_parameters())[key] == 0.5).all()
    assert "Trained on nothing." in (folder / "README.md").read_text()
    pruned = derive("tiny-random-llama", VariantSpec(prune="magnitude", sparsity=0.5), out=tmp_path / "pruned")
    record = json.loads((pruned / "variant.json").read_text())
    record["base"] = "tiny-random-llama:seed=7"  # another model's weights under the mask
    (pruned / "variant.json").write_text(json.dumps(record))
    with pytest.raises(ModelError, match="differs from the one"):
        load_model(str(pruned))


def test_cli_models_derive_end_to_end(tmp_path, capsys):
    assert main(["models", "derive", "tiny-random-llama", "--quantize", "int4", "--group-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "tiny-random-llama~int4-g32: int4 quantisation" in out and "--model tiny-random-llama~int4-g32" in out
    assert load_model("tiny-random-llama~int4-g32").source == "variant"
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"method": "magnitude", "levels": {"0": 0.5, "1": 0.25}}))
    assert main(["models", "derive", "tiny-random-gpt2", "--layer-profile", str(profile), "--out",
                 str(tmp_path / "v")]) == 0
    assert json.loads((tmp_path / "v" / "variant.json").read_text())["settings"]["layer_profile"] == {"0": 0.5,
                                                                                                     "1": 0.25}
    assert main(["models", "derive", "tiny-random-llama", "--prune", "wanda"]) == 2
    assert "exactly one of a sparsity" in capsys.readouterr().err
    assert main(["models", "derive", "tiny-random-llama", "--layer-profile", str(profile), "--prune", "wanda"]) == 2
    assert main(["models", "list"]) == 0
    assert "tiny-random-llama~int4-g32" in capsys.readouterr().out


@pytest.mark.real_model
def test_int8_smollm2_greedy_mostly_agrees_with_the_base(real_model):
    variant = apply_variant(real_model, VariantSpec(quantize="int8"))
    prompts = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain."]
    agree = sum(a == b for prompt in prompts
                for a, b in zip(greedy_ids(real_model, prompt, 8), greedy_ids(variant, prompt, 8)))
    assert agree >= 0.75 * 8 * len(prompts)
    assert not torch.equal(logits(variant), logits(real_model))
