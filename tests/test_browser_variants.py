"""A person compares a model variant with its base in the app: picks the base model and the variant_compare decoder,
types the name of a derived variant, runs, and sees the variant's KL per step beside the base."""

from __future__ import annotations

import pytest

from engine.events import VariantStep
from engine.models.variants import VariantSpec, derive
from storage import TraceStore
from tests.browser import (
    chromium,
    open_page,
    pick,
    settled,
    shot,
    start_app,
    type_into,
    wait_text,
)

pytestmark = pytest.mark.slow  # a browser: left out of the fast suite, like the other journeys

BASE = "tiny-random-llama"
TOKENS = 8


@pytest.fixture(scope="module")
def variant_home(tmp_path_factory):
    """A data home holding one derived variant of the tiny base (30% magnitude pruning): the name the app lists."""
    home = tmp_path_factory.mktemp("variants")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DECODING_EXPLORER_HOME", str(home))
        folder = derive(BASE, VariantSpec(prune="magnitude", sparsity=0.3))
    return home, folder.name


@pytest.fixture(scope="module")
def app(variant_home):
    yield from start_app(variant_home[0])


@pytest.fixture(scope="module")
def browser():
    yield from chromium()


def test_pick_a_base_and_a_variant_and_watch_both(app, browser, variant_home):
    variant = variant_home[1]
    page = open_page(browser, app.url)
    page.wait_for_selector("#run-button")
    pick(page, "model", BASE)
    pick(page, "decoder", "variant_compare", option="· variant_compare —")
    page.wait_for_selector("#param-variant")
    type_into(page, "param-variant", variant)
    type_into(page, "prompt", "The fox <b>said</b>")
    type_into(page, "max-new-tokens", str(TOKENS))
    page.click("#stop-button")
    page.click("#run-button")
    wait_text(page, "run-status", "finished", timeout=120_000)

    run = TraceStore(app.db_url).list_runs(limit=1)[0]
    trace = TraceStore(app.db_url).load(run.run_id)
    assert (trace.info.model, trace.info.decoder, trace.info.params["variant"]) == (BASE, "variant_compare", variant)
    steps = [e for e in trace.events if isinstance(e, VariantStep)]
    assert [s.step for s in steps] == list(range(TOKENS)) and {s.variant for s in steps} == {variant}
    assert trace.metrics["variant_mean_kl"] > 0  # a pruned variant: its distributions differ from the base's

    settled(page, "live-primary", "live-extra")
    page.wait_for_function("document.querySelector('#live-primary .js-plotly-plot .gtitle')")
    title = page.locator("#live-primary .gtitle").first.text_content()
    assert f"variant {variant} vs base {BASE}" in title and "KL per step" in title
    kl = page.evaluate("document.querySelector('#live-primary .js-plotly-plot').data[0]")
    assert kl["name"] == "KL(base ‖ variant)" and kl["y"] == pytest.approx([s.kl for s in steps])
    assert "Entropy per step" in page.locator("#live-extra .gtitle").first.text_content()
    page.locator("#live-primary").scroll_into_view_if_needed()
    shot(page, "variant-compare")
    assert page.outside_requests == []
    page.close()
