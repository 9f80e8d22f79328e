"""The first UI: builds offline, and never renders token text as markup."""

from __future__ import annotations

import gradio as gr

from engine.events import Candidate, TokenStep
from ui.app import build, token_html


def test_token_text_is_escaped():
    hostile = '<script>alert(1)</script><img src=x onerror=alert(2)>"'
    step = TokenStep(step=0, position=0, token_id=7, logprob=-0.1, raw_logprob=-0.1, rank=1, entropy_raw=0.5, entropy=0.5,
                     candidates=[Candidate(7, 0.9, 0.9)])
    rendered = token_html([step], {7: hostile})
    assert "<script>" not in rendered and "<img" not in rendered
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered


def test_app_builds_without_loading_a_model(tmp_path):
    demo = build("tiny-random-llama", f"sqlite:///{tmp_path / 'ui.db'}")
    assert isinstance(demo, gr.Blocks)
