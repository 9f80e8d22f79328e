"""Fixtures shared across test modules."""

from __future__ import annotations

import pytest
import torch

from engine import hot_start, load_model
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


@pytest.fixture(autouse=True)
def blank_hot_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts from blank decoder memories (engine.hot_start), whatever earlier tests in its worker ran."""
    monkeypatch.setattr(hot_start, "_STORES", {})


# The two longest files start first: pytest-xdist hands whole files to workers in collection order, and a long file
# handed out last leaves the other worker idle (test_speculative_real.py alone took the last 5 minutes).
SLOWEST_FIRST = ("test_browser_journeys.py", "test_speculative_real.py")


# Driving a browser takes minutes; so does the real model. `-m "not slow"` leaves them out (CI runs everything).
BROWSER_MODULES = ("test_browser_journeys.py", "test_e2e.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in SLOWEST_FIRST)  # stable: each file keeps its own order
    for item in items:
        real = item.get_closest_marker("real_model") or {"real_model", "smollm2"} & set(getattr(item, "fixturenames", ()))
        if real or item.path.name in BROWSER_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    """A browser test that fails reports where its pages stood (status lines, toasts, pending updates, the app's last
    traceback): under CI's load a timeout alone cannot tell a slow page from a lost update."""
    report = yield
    if report.failed and call.when == "call":
        from tests.browser import page_state

        pages = [value for value in getattr(item, "funcargs", {}).values() if type(value).__name__ == "Page"]
        for state in map(page_state, pages):
            if state not in report.longreprtext:  # a wait_text failure quotes it already
                report.sections.append(("page state", state))
    return report
