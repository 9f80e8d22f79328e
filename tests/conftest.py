"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
import torch

from engine import load_model

# The tests' models are tiny: one thread avoids thread-pool overhead that dominates such small kernels
# (measured 4.6 ms vs 67 ms per forward of tiny-random-llama on a loaded 2-core machine).
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
