"""Fuzzing what a user can send: every decoder's parameters, the run settings, the app's record API and the command
line's options. Whatever the input, the answer is the value accepted (and within its schema) or one line that says
what is wrong: never a traceback. Examples are derandomized, so a run is reproducible and CI sees the same cases."""

from __future__ import annotations

import json
import math
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.bench_reliability import BAD_RECORD_API, BAD_RECORD_ARGV
from cli.main import main
from engine.decoders import all_decoders
from engine.params import Param, ParamError
from engine.run import RunSettings

FUZZ = settings(derandomize=True, database=None, deadline=timedelta(seconds=5),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
MODEL = "tiny-random-llama"

# Text as an attacker or a careless paste sends it: lone surrogates (what undecodable argv bytes become), NUL,
# Markdown and HTML, option look-alikes, numbers the parsers might take.
HOSTILE = ["", " ", "\x00", "a\x00b", "\ud800", "x\udcff", "![p](http://evil.example/p.png)", "[a](javascript:x)",
           "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "two\nlines", "\u202eevil", "😀", "-", "--json",
           "%s%n{0}", "'\"\\", "nan", "-inf", "1e400", "1" + "0" * 400, "9" * 5000, "1" + "0" * 5000, "0x10", "1_000", " 3 "]
TEXT = st.one_of(st.sampled_from(HOSTILE),
                 st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=20))
HUGE = [2**63, -(2**63) - 1, 2**70, 10**400]
GIANT = st.integers(4301, 5000).map(lambda digits: 10**digits)  # more digits than int() and str() take
JUNK = st.one_of(st.none(), st.booleans(), TEXT, st.sampled_from(HUGE), GIANT, st.integers(),
                 st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def numbers(param: Param) -> st.SearchStrategy:
    """In range, on and just past each bound, and anything an int or float can be."""
    bounds = [b for b in (param.min, param.max) if b is not None]
    edges = [b + step for b in bounds for step in (-1, -1e-9, 0, 1e-9, 1)]
    inside = (st.integers(math.ceil(param.min), int(param.max)) if param.type == "int"
              else st.floats(param.min, param.max))
    return st.one_of(inside, st.sampled_from(edges + HUGE), GIANT, st.integers(),
                     st.floats(allow_nan=True, allow_infinity=True))


def values(param: Param) -> st.SearchStrategy:
    if param.type in ("int", "float"):
        typed = numbers(param)
    elif param.type == "choice":
        typed = st.sampled_from(param.choices)
    elif param.type == "bool":
        typed = st.one_of(st.booleans(), st.sampled_from(["yes", "off", "2", "TRUE"]))
    else:
        typed = TEXT
    return st.one_of(typed, JUNK)


@st.composite
def param_dicts(draw: st.DrawFn, params: tuple[Param, ...]) -> dict:
    names = draw(st.lists(st.sampled_from(params), unique=True)) if params else []
    given = {p.name: draw(values(p)) for p in names}
    if draw(st.integers(0, 9)) == 9:  # now and then a name the decoder does not have
        given[draw(st.one_of(TEXT, st.integers()))] = draw(JUNK)
    return given


def assert_one_line(message: str, max_length: float = math.inf) -> None:
    assert message.strip() and "\n" not in message and len(message) <= max_length, message


def assert_within(param: Param, value: object) -> None:
    """An accepted value has the schema's type and lies in its range."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str, "choice": str}
    assert isinstance(value, kinds[param.type]) and (param.type == "bool" or not isinstance(value, bool)), value
    if param.type in ("int", "float"):
        assert math.isfinite(value)
        assert param.min is None or value >= param.min
        assert param.max is None or value <= param.max
    if param.type == "choice":
        assert value in param.choices
    if isinstance(value, str):
        assert not re.search("[\ud800-\udfff]", value)


@settings(FUZZ, max_examples=400)
@given(data=st.data())
def test_every_decoder_accepts_in_schema_or_refuses_in_one_line(data):
    spec = data.draw(st.sampled_from(all_decoders()), label="decoder")
    given = data.draw(param_dicts(spec.params), label="params")
    try:
        params = spec.validate(given)
    except ParamError as exc:
        assert_one_line(str(exc), max_length=500)
        return
    for param in spec.params:
        assert_within(param, params[param.name])


RUN_NUMBERS = [Param("max_new_tokens", "int", 64, "", min=1, max=100_000), Param("seed", "int", 0, "", min=0, max=2**63 - 1),
               Param("record_top_k", "int", 20, "", min=1, max=1000)]


@settings(FUZZ, max_examples=200)
@given(numbers=st.tuples(*map(values, RUN_NUMBERS)), stop=st.lists(TEXT, max_size=3))
def test_run_settings_accept_in_range_or_refuse_in_one_line(numbers, stop):
    max_new_tokens, seed, top_k = numbers
    run_settings = RunSettings(max_new_tokens=max_new_tokens, seed=seed, record_top_k=top_k, stop=stop)
    try:
        run_settings.check()
    except ParamError as exc:
        assert_one_line(str(exc), max_length=500)
        return
    assert 1 <= run_settings.max_new_tokens <= 100_000 and 1 <= run_settings.record_top_k <= 1000
    assert run_settings.seed is None or 0 <= run_settings.seed < 2**63


def _decode_time_parsers() -> dict:
    """Text parameters a decoder parses when it starts (their schema type is str)."""
    from engine.constraints import build_constraint
    from engine.decoders.speculative.layer_skip import parse_layers
    from engine.decoders.speculative.rsd import parse_branching
    from engine.decoders.token.gift import layer_list

    return {"gift layers": lambda text: layer_list(text, 12, "enhance_layers"),
            "layer_skip layers": lambda text: parse_layers(text, 12), "rsd branching": parse_branching,
            "awrs regex": lambda text: build_constraint("regex", text),
            "awrs JSON shape": lambda text: build_constraint("json", text)}


PARSERS = _decode_time_parsers()
JSON_TEXT = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.sampled_from(["string", "integer"]), TEXT),
                         lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                         max_leaves=8).map(json.dumps)


@settings(FUZZ, max_examples=300)
@given(parser=st.sampled_from(sorted(PARSERS)),
       text=st.one_of(TEXT, st.from_regex(r"[0-9]{1,13}([-,][0-9]{1,13}){0,3}", fullmatch=True), JSON_TEXT))
def test_decode_time_text_parameters_parse_or_refuse_in_one_line(parser, text):
    try:
        PARSERS[parser](text)
    except ParamError as exc:
        assert_one_line(str(exc))


# ---------------------------------------------------------------- the app's record API (no server)


@pytest.fixture(scope="module")
def api_record(tmp_path_factory):
    gr = pytest.importorskip("gradio")
    from storage import TraceStore
    from ui.context import AppContext, api_record
    from ui.pool import ModelPool

    store = TraceStore(f"sqlite:///{tmp_path_factory.mktemp('api') / 'api.db'}")
    record = api_record(AppContext(store, ModelPool(), MODEL, replay_only=False))
    # the endpoint streams progress, then the summary
    return gr.Error, lambda *args, **kwargs: list(record(*args, request=SimpleNamespace(session_hash="fuzz"), **kwargs))[-1]


# issue 17's values (the bench counts them too), then more of the kind: (decoder, prompt, params, seed, max_new_tokens)
API_CASES = [*BAD_RECORD_API.values(), ("top_p", "x", {"temperature": "1" + "0" * 400}, 0, 2),
             ("top_p", "x", {"top_k": "9" * 5000}, 0, 2), ("greedy", None, {}, 0, 2), ("greedy", "x", ["top_p"], 0, 2),
             ("greedy", "x", {}, -1, 2), ("greedy", "x", {}, 0, 10**400), ("greedy", "x", {}, 0, "2.5")]


@pytest.mark.parametrize("decoder, prompt, params, seed, tokens", API_CASES)
def test_api_record_refuses_bad_values_in_one_line(api_record, decoder, prompt, params, seed, tokens):
    error, record = api_record
    with pytest.raises(error) as refused:
        record(MODEL, decoder, prompt, params, seed_value=seed, max_new_tokens=tokens)
    assert_one_line(refused.value.message, max_length=500)


def test_api_record_types_numbers_it_was_sent_as_text(api_record):
    _, record = api_record
    summary = record(MODEL, "greedy", "x", {}, seed_value="3", max_new_tokens="2")
    assert summary["status"] == "finished" and len(summary["output_token_ids"]) == 2


# ---------------------------------------------------------------- the command line


def run_cli(capsys, argv: list[str]) -> int:
    """Run the CLI; a failure must be one error line (argparse's: a usage, then one error line), no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    if code != 0:
        errors = [line for line in err.splitlines() if re.match(r"(decoding-explorer[\w ]*: )?error: ", line)]
        assert len(errors) == 1, (argv, err[-2000:])
        assert_one_line(errors[0])
    return code


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A database holding one run, its exported file, and a folder for files the fuzz writes."""
    folder = tmp_path_factory.mktemp("cli")
    db = f"sqlite:///{folder / 'fuzz.db'}"
    assert main(["record", "--model", MODEL, "--prompt", "hello", "--max-new-tokens", "3", "--db", db]) == 0
    from storage import TraceStore

    run_id = TraceStore(db).list_runs()[0].run_id
    assert main(["runs", "export", run_id, str(folder / "run.json.gz"), "--db", db]) == 0
    (folder / "garbage.json").write_bytes(b"\x1f\x8b\x00garbage")
    (folder / "empty.json").write_bytes(b"")
    return SimpleNamespace(db=db, run_id=run_id, folder=folder)


# cheap decoders that load no second model: a drawn draft-model name must not reach the Hub
RECORD_DECODERS = ["greedy", "sample", "top_p", "top_k", "beam", "forced", "momentum", "prompt_lookup", "jacobi"]
SPECS = {spec.name: spec for spec in all_decoders()}
# file names in the fuzz's folder (argv cannot hold NUL: the OS ends an argument at one; \udcff is the byte 0xFF)
PATHS = ["out.json.gz", "run.json.gz", "garbage.json", "empty.json", "missing.json", ".", "no/such/dir/x.gz", "\udcff.gz"]
VALID_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
BAD_INTEGERS = st.one_of(st.sampled_from(["-1", "0", "100001", "1024", str(2**63), str(2**70), "9" * 5000]), TEXT)


def mostly(valid: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """Three valid values to one bad one, so that most cases run and the bad ones meet a run being set up."""
    return st.integers(0, 3).flatmap(lambda pick: bad if pick == 3 else valid)


def integers(low: int, high: int) -> st.SearchStrategy:
    return mostly(st.integers(low, high).map(str), BAD_INTEGERS)


def option_values(stored: SimpleNamespace) -> dict[str, st.SearchStrategy]:
    branch = st.tuples(mostly(st.sampled_from([stored.run_id, stored.run_id[:8]]), st.sampled_from(["zzzz", "", "\ud800"])),
                       integers(0, 3), integers(0, 313))
    return {
        "--prompt": mostly(VALID_TEXT, TEXT), "--seed": integers(0, 2**63 - 1), "--max-new-tokens": integers(1, 6),
        "--record-top-k": integers(1, 1000), "--stop": mostly(VALID_TEXT, TEXT),
        "--attention": mostly(st.sampled_from(["last", "mean", "all", "0", "1,0", "7"]), TEXT),
        "--attention-heads": mostly(st.sampled_from(["mean", "max", "0", "3", "4", "99"]), TEXT),
        "--attention-max-mb": mostly(st.floats(0, 1000).map(str), st.one_of(st.sampled_from(["nan", "inf", "-1"]), TEXT)),
        "--image": st.sampled_from(PATHS).map(lambda name: str(stored.folder / name)),
        "--device": mostly(st.just("cpu"), st.sampled_from(["meta", "nope", "cuda:99", "\udcff"])),
        "--dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
        "--branch-from": branch.map(lambda b: [b[0], "--at", b[1], "--token", b[2]]), "--at": integers(0, 3),
    }


def param_text(param: Param) -> st.SearchStrategy:
    """Mostly a value the schema takes, written as on a command line."""
    if param.type in ("int", "float"):
        valid = numbers(param).filter(lambda v: param.min <= v <= param.max)
    elif param.type == "choice":
        valid = st.sampled_from(param.choices)
    elif param.type == "bool":
        valid = st.sampled_from(["true", "false", "1", "0", "yes", "off"])
    else:
        valid = VALID_TEXT
    bad = values(param).filter(lambda v: not (isinstance(v, int) and v.bit_length() > 10_000))
    return mostly(valid, bad).map(str)


@st.composite
def record_argv(draw: st.DrawFn, stored: SimpleNamespace) -> list[str]:
    decoder = draw(mostly(st.sampled_from(RECORD_DECODERS), TEXT))
    argv = ["record", "--model", MODEL, "--no-save", "--db", stored.db, "--decoder", decoder]
    options = option_values(stored)
    for option in draw(st.lists(st.sampled_from(sorted(options)), unique=True, max_size=4)):
        value = draw(options[option])
        argv += [option, *value] if isinstance(value, list) else [option, value]
    if "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", "2"]
    if "--prompt" not in argv and "--branch-from" not in argv:
        argv += ["--prompt", "hi"]
    params = SPECS[decoder].params if decoder in SPECS else ()
    for param in draw(st.lists(st.sampled_from(params), unique=True, max_size=3)) if params else []:
        argv += ["--param", f"{param.name}={draw(param_text(param))}"]
    if draw(st.integers(0, 9)) == 9:
        argv += ["--param", draw(TEXT)]
    argv += draw(st.lists(st.sampled_from(["--json", "--chat", "--no-chat", "--trust-remote-code"]), unique=True, max_size=2))
    return argv


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_record_options_end_in_a_run_or_one_error_line(capsys, stored, data):
    argv = data.draw(record_argv(stored), label="argv")
    code = run_cli(capsys, argv)
    assert code in (0, 2), argv  # 1 would be a run that failed on input it should have refused


@st.composite
def runs_argv(draw: st.DrawFn, stored: SimpleNamespace) -> list[str]:
    run_ids = mostly(st.sampled_from([stored.run_id, stored.run_id[:6]]), st.one_of(st.sampled_from(["", "%", "_"]), TEXT))
    in_folder = lambda names: st.sampled_from(names).map(lambda name: str(stored.folder / name))
    command = draw(st.sampled_from(["list", "show", "export", "import", "delete"]))
    argv = ["runs", command]
    if command == "list":
        for option in draw(st.lists(st.sampled_from(["--model", "--decoder", "--search", "--status"]), unique=True)):
            argv += [option, draw(mostly(st.sampled_from([MODEL, "greedy", "finished", "hel"]), TEXT))]
        if draw(st.booleans()):
            argv += ["--limit", draw(integers(0, 100))]
    elif command == "show":
        argv += [draw(run_ids)] + draw(st.lists(st.sampled_from(["--steps", "--json"]), unique=True))
    elif command == "export":
        argv += [draw(run_ids), draw(mostly(in_folder(["out.json.gz", "out.json"]), in_folder(PATHS)))]
    elif command == "import":
        argv += [draw(mostly(in_folder(["run.json.gz"]), in_folder(PATHS)))]
        argv += draw(st.lists(st.sampled_from(["--new-id", "--replace"]), unique=True))
    else:  # not the stored run: the other commands need it
        argv += draw(st.lists(st.one_of(st.sampled_from(["zzzz", "%", "*"]), TEXT), min_size=1, max_size=2))
    return argv + ["--db", stored.db]


@settings(FUZZ, max_examples=200)
@given(data=st.data())
def test_runs_commands_succeed_or_say_one_line(capsys, stored, data):
    run_cli(capsys, data.draw(runs_argv(stored), label="argv"))


# What the fuzz found (with other seeds, or before its fix), kept as fixed cases: (argv, expected exit code).
FOUND = [
    (["record", "--decoder", "forced", "--prompt", "hi"], 2),  # the decoder's own refusal, once running
    # below the sampling pipeline's minimum temperature: refused when the run builds its pipeline
    (["record", "--decoder", "jacobi", "--param", "init=random", "--param", "temperature=1e-300", "--prompt", "hi"], 2),
    (["record", "--branch-from", "", "--at", "0", "--token", "0", "--db", "{db}"], 2),  # crashed on no store
    (["record", "--device", "meta", "--prompt", "hi"], 2),
    (["record", "--attention", "last", "--attention-heads", "4", "--prompt", "hi"], 2),  # tiny-random-llama: 4 heads
    (["record", "--attention", "7", "--prompt", "hi"], 2),  # 2 layers
    (["runs", "delete", "zzzz", "yyyy", "--db", "{db}"], 1),  # one line for both
    (["runs", "import", "{folder}/run.json.gz", "--new-id", "--replace", "--db", "{db}"], 2),
    (["runs", "list", "--limit", str(2**63), "--db", "{db}"], 2),
    (["runs", "show", "\ud800", "--db", "{db}"], 2),
    (["runs", "show", "9" * 5000, "--db", "{db}"], 2),
    (["runs", "export", "{run_id}", "{folder}/no/such/dir/x.gz", "--db", "{db}"], 2),
    (["runs", "export", "{run_id}", "{folder}", "--db", "{db}"], 2),
    (["runs", "import", "{folder}/\udcff.gz", "--db", "{db}"], 2),
]


@pytest.mark.parametrize("argv, code", FOUND)
def test_what_the_fuzz_found_stays_fixed(capsys, stored, argv, code):
    argv = [arg.format(db=stored.db, folder=stored.folder, run_id=stored.run_id) for arg in argv]
    if argv[0] == "record":
        argv += ["--model", MODEL, "--no-save", "--max-new-tokens", "2"]
    assert run_cli(capsys, argv) == code


def test_the_issues_bad_record_inputs_each_end_in_one_line(capsys):
    for argv in BAD_RECORD_ARGV.values():
        assert run_cli(capsys, ["record", "--model", MODEL, "--no-save", "--max-new-tokens", "2", *argv]) == 2, argv
