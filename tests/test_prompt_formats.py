"""A model folder's declared prompt format: read wherever the folder goes, applied by default, checked with a warning."""

from __future__ import annotations

import json
import shutil

import pytest

from cli.main import main
from engine.models import load_model, prompt_format
from engine.models.cache import ASSET_MODELS_DIR
from engine.models.prompt_formats import PROMPT_FORMATS, declared_format
from engine.models.waitline_prompt import OPERATIONS
from engine.offline.parallelbench import task_rows
from engine.offline.waitline_data import WaitlineGenerator, prompt_text
from storage import TraceStore

WAITLINE = PROMPT_FORMATS["parallelbench-waiting-line"]


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_waiting_line_prompt_fits_and_near_misses_do_not(operation):
    generator = WaitlineGenerator(3, split="held_out")
    for _ in range(5):
        prompt = generator.example(operation).prompt
        assert WAITLINE.fits(prompt) and WAITLINE.mismatch("m", prompt, chat=True) is None
        # the final line break is part of the instruction's one token as trained: without it the built-ins answer
        # garbage, so a trimmed or padded prompt is flagged, with what differs
        for near in {prompt.strip(), f"  {prompt}\n\n"} - {prompt}:
            assert not WAITLINE.fits(near) and WAITLINE.fits_trimmed(near)
            assert "only in the whitespace around it" in WAITLINE.mismatch("m", near, chat=True)
        assert not WAITLINE.fits(prompt.replace("waiting line at a customer", "queue at a"))
        assert not WAITLINE.fits(prompt + "Answer in French.\n")
    row = task_rows(operation, 1, seed=5)[0]  # a ParallelBench test-file row, rendered as the eval renders it
    assert WAITLINE.fits(prompt_text(row, operation))


def test_mismatch_names_the_chat_flag_or_the_format():
    assert WAITLINE.mismatch("m", WAITLINE.example, chat=True) is None
    assert "trained with chat formatting" in WAITLINE.mismatch("m", WAITLINE.example, chat=False)
    assert "not in m's format (parallelbench-waiting-line)" in WAITLINE.mismatch("m", "Sort: Bo, Al", chat=True)


def test_the_format_travels_with_the_folder(tmp_path):
    assert prompt_format("waitline-ar") is WAITLINE and prompt_format(" waitline-mdlm ") is WAITLINE
    copy = tmp_path / "my-waitline"
    shutil.copytree(ASSET_MODELS_DIR / "waitline-ar", copy)
    assert prompt_format(str(copy)) is WAITLINE and load_model(str(copy)).prompt_format is WAITLINE
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "prompt_format": "no-such-format"}))
    assert declared_format(copy) is None and prompt_format(str(copy)) is None
    assert prompt_format("tiny-random-llama") is None and prompt_format(str(tmp_path / "missing")) is None
    assert load_model("tiny-random-llama").prompt_format is None


def test_record_uses_the_declared_chat_flag_and_warns_on_another_format(capsys, tmp_path):
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    argv = ["record", "--model", "waitline-ar", "--max-new-tokens", "2", "--db", db, "--json"]
    assert main([*argv, "--prompt", WAITLINE.example]) == 0
    out = capsys.readouterr()
    assert TraceStore(db).load(json.loads(out.out)["run_id"]).info.chat and "warning" not in out.err
    assert main([*argv, "--prompt", "Sort: Bo, Al"]) == 0
    out = capsys.readouterr()
    assert "warning: this prompt is not in waitline-ar's format" in out.err and len(json.loads(out.out)["output_token_ids"]) == 2
    assert main([*argv, "--prompt", WAITLINE.example, "--no-chat"]) == 0
    assert "trained with chat formatting" in capsys.readouterr().err
