"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
import torch

from engine import load_model
from engine.diffusion.tokenizer import build_tokenizer
from engine.models.handle import LoadedModel
from tests.workers import cores_per_worker

# The tests' models are tiny: one thread avoids thread-pool overhead that dominates such small kernels
# (measured 4.6 ms vs 67 ms per forward of tiny-random-llama on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def real_model(smollm2):
    """The real model with this worker's share of the cores (they help a real model, unlike the tiny ones)."""
    torch.set_num_threads(cores_per_worker())
    yield smollm2
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct. The first use on a machine converts its GGUF into the user data dir
    (or DECODING_EXPLORER_HOME) once, about 30 s; later sessions load the cache in about a second."""
    from engine.models import ModelError

    try:
        return load_model("smollm2-135m-instruct", progress=print)
    except ModelError as error:
        if "pip install" in str(error):
            pytest.skip(str(error))
        raise


# Tiny random models for the decoder mechanics, one per test module (some tests change a model's settings).
@pytest.fixture(scope="module")
def llama():
    return load_model("tiny-random-llama")


@pytest.fixture(scope="module")
def gemma():
    return load_model("tiny-random-gemma3")


def eager_attention(model: LoadedModel, ids: list[int], **inputs: torch.Tensor) -> list[torch.Tensor]:
    """Per-layer attention [heads, queries, keys] (float64) from an eager forward with ``output_attentions``: an
    independent reference for everything computed inside the explorer's attention function."""
    model.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model.model(input_ids=torch.tensor([ids]), output_attentions=True, **inputs)
    finally:
        model.use_explorer_attention()
    return [a[0].double() for a in out.attentions]


def tiny_waitline_model(causal: bool = False, seed: int = 0, name: str = "", vocab_size: int | None = None,
                        **config: object) -> LoadedModel:
    """A random 2-layer Llama on the waitline tokenizer: bidirectional with mask id 3 (a tiny waitline-mdlm), or
    causal (its AR twin). ``config`` adds or overrides config fields (``diffusion_gen_length``...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    fields = {"is_causal": causal, "mask_token_id": None if causal else 3, **config}
    cfg = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    return LoadedModel(name or ("tiny-ar" if causal else "tiny-mdlm"), LlamaForCausalLM(cfg).eval(), tokenizer,
                       "random")


# The two longest files start first: pytest-xdist hands whole files to workers in collection order, and a long file
# handed out last leaves the other worker idle (test_speculative_real.py alone took the last 5 minutes).
SLOWEST_FIRST = ("test_browser_journeys.py", "test_speculative_real.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in SLOWEST_FIRST)  # stable: each file keeps its own order
