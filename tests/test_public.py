"""Public mode through the app's API, as programs on other machines would call it: each session sees, opens,
exports and deletes its own runs (and opens the samples); model names outside the allow-list are refused without
a look at the server's files."""

from __future__ import annotations

import html
import os

import pytest

from cli.bench_ui import free_port
from engine.trace import read_file, write_file
from storage import TraceStore
from ui.samples import SAMPLES_DIR

gradio_client = pytest.importorskip("gradio_client")
SAMPLE_IDS = frozenset(read_file(path).run_id for path in SAMPLES_DIR.glob("*.json.gz"))
AppError = gradio_client.exceptions.AppError


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    from ui.app import build

    db_url = f"sqlite:///{tmp_path_factory.mktemp('public') / 'app.db'}"
    demo = build("tiny-random-llama", db_url, public=True)
    demo.queue().launch(server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url, db_url
    demo.close()


def session(url: str):
    return gradio_client.Client(url, verbose=False)


def record(client, model: str = "tiny-random-llama") -> dict:
    return client.predict(model, "greedy", "Hello there", {}, 0, 4, False, api_name="/record")


def test_a_session_sees_and_changes_its_own_runs_only(public_app, tmp_path):
    url, db_url = public_app
    alice, mallory = session(url), session(url)
    run_id = record(alice)["run_id"]
    assert run_id in {r["run_id"] for r in alice.predict(200, api_name="/list_runs")}
    listed = {r["run_id"] for r in mallory.predict(200, api_name="/list_runs")}
    assert run_id not in listed and listed <= SAMPLE_IDS
    for api_name, args in (("/delete_run", (run_id,)), ("/export_run", (run_id,)), ("/ask_delete", (run_id,)),
                           ("/open_run", (run_id, "probability"))):
        with pytest.raises(AppError, match="no run with id"):
            mallory.predict(*args, api_name=api_name)
    with pytest.raises(AppError):  # not among the choices this session's Compare picker was given
        mallory.predict([run_id, run_id], api_name="/compare")
    with pytest.raises(AppError, match="no run with id"):  # a prefix does not reach another session's runs either
        mallory.predict(run_id[:6], "probability", api_name="/open_run")
    assert TraceStore(db_url).summary(run_id).run_id == run_id  # nothing was deleted
    exported = alice.predict(run_id, api_name="/export_run")
    assert os.path.getsize(exported) > 0
    alice.predict(run_id, api_name="/delete_run")
    with pytest.raises(KeyError):
        TraceStore(db_url).summary(run_id)


def test_samples_open_for_everyone_and_change_for_no_one(public_app):
    url, _ = public_app
    sample = sorted(SAMPLE_IDS)[0]
    client = session(url)
    client.predict(sample, "probability", api_name="/open_run")
    with pytest.raises(AppError, match="no run with id"):
        client.predict(sample, api_name="/delete_run")


def test_an_import_belongs_to_the_importer(public_app, tmp_path):
    url, _ = public_app
    importer, other = session(url), session(url)
    source = TraceStore(f"sqlite:///{tmp_path / 'src.db'}")
    sample = next(SAMPLES_DIR.glob("*.json.gz"))
    path = tmp_path / "mine.json.gz"
    write_file(read_file(sample), path)
    source.close()
    run_id = importer.predict(gradio_client.handle_file(str(path)), api_name="/import_run")[0]
    assert run_id not in SAMPLE_IDS
    assert run_id in {r["run_id"] for r in importer.predict(200, api_name="/list_runs")}
    assert run_id not in {r["run_id"] for r in other.predict(200, api_name="/list_runs")}


@pytest.mark.parametrize("name", ["/etc/passwd", "/root", "/no/such/folder", "../../etc", "owner/some-model",
                                  "tiny-random-llama:seed=7"])
def test_a_model_off_the_allow_list_is_refused_alike(public_app, name):
    """The same message whether the path exists, is a file or is missing: nothing about the server's files."""
    url, _ = public_app
    with pytest.raises(AppError) as refused:
        record(session(url), model=name)
    message = str(refused.value)
    assert "offers only the listed models" in message and "tiny-random-llama" in message
    assert name not in message.replace("tiny-random-llama", "")


@pytest.mark.parametrize("decoder, param", [("speculative", "draft_model"), ("assisted_cross_tokenizer", "draft_model"),
                                            ("learn2pd", "filter"), ("diffuspec", "drafter")])
def test_a_parameter_that_loads_files_takes_allowed_names_only(public_app, decoder, param):
    url, _ = public_app
    with pytest.raises(AppError) as refused:
        session(url).predict("tiny-random-llama", decoder, "Hi", {param: "/etc"}, 0, 2, False, api_name="/record")
    assert html.unescape(str(refused.value)).startswith(f"{param}: this public app offers only the listed models")


def test_the_app_imports_and_opens_traces_within_the_event_limit(tmp_path):
    from engine.limits import Limits
    from engine.params import ParamError
    from engine.trace import TraceFormatError
    from ui.access import Access
    from ui.context import AppContext
    from ui.pool import ModelPool

    store = TraceStore(f"sqlite:///{tmp_path / 'cap.db'}")
    sample = next(p for p in sorted(SAMPLES_DIR.glob("*.json.gz")) if p.name.startswith("top-p"))
    stored = store.import_file(sample, new_id=True)
    app = AppContext(store, ModelPool(), "tiny-random-llama", True, Access(), limits=Limits(trace_events=5))
    with pytest.raises(TraceFormatError, match="more than 5 events, the most this server takes"):
        app.import_file("visitor", str(sample))
    assert [r.run_id for r in store.list_runs()] == [stored]  # the refused import stored nothing
    with pytest.raises(ParamError, match="more than this server opens"):
        app.load("visitor", stored)
    assert AppContext(store, ModelPool(), "tiny-random-llama", True, Access()).load("visitor", stored).run_id == stored
