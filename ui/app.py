"""A first Gradio front end: pick a decoder, fill its generated form, watch tokens stream in.

The full explorer (views, library, compare) builds on this; the UI only wires engine and storage.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterator

import gradio as gr

from engine import Run, RunSettings, load_model
from engine.decoders import all_decoders, get_decoder
from engine.events import TokenStep
from engine.params import Param, ParamError
from storage import TraceStore

DEFAULT_MODEL = "smollm2-135m-instruct"


def token_html(steps: list[TokenStep], vocab: dict[int, str]) -> str:
    """Tokens coloured by the probability of the chosen token; all token text is escaped."""
    spans = []
    for step in steps:
        p = math.exp(step.raw_logprob)
        text = html.escape(vocab.get(step.token_id, "")).replace("\n", "↵<br>")
        title = html.escape(f"p={p:.3f} rank={step.rank} H={step.entropy_raw:.2f} nats")
        hue = int(120 * p)  # red (unlikely) to green (likely)
        spans.append(f'<span title="{title}" style="background:hsla({hue},70%,50%,0.35);border-radius:3px">{text}</span>')
    return f'<div style="font-family:monospace;white-space:pre-wrap;line-height:1.8">{"".join(spans)}</div>'


def _component(param: Param) -> gr.components.Component:
    if param.type == "bool":
        return gr.Checkbox(value=param.default, label=param.name, info=param.help)
    if param.type == "choice":
        return gr.Dropdown(choices=list(param.choices or ()), value=param.default, label=param.name, info=param.help)
    if param.type in ("int", "float") and param.min is not None and param.max is not None and param.max - param.min <= 100:
        step = 1 if param.type == "int" else 0.01
        return gr.Slider(param.min, param.max, value=param.default, step=step, label=param.name, info=param.help)
    if param.type in ("int", "float"):
        return gr.Number(value=param.default, label=param.name, info=param.help, precision=0 if param.type == "int" else None)
    return gr.Textbox(value=param.default, label=param.name, info=param.help)


def build(model_name: str = DEFAULT_MODEL, db_url: str | None = None) -> gr.Blocks:
    store = TraceStore(db_url)
    model = load_model(model_name)  # at start-up, so the first Run streams at once

    def generate(prompt: str, decoder: str, chat: bool, seed: float, max_tokens: float, *values: Any) -> Iterator[tuple[str, str]]:
        spec = get_decoder(decoder)
        params = dict(zip((p.name for p in spec.params), values))
        try:
            run = Run(model, decoder, prompt, params, RunSettings(max_new_tokens=int(max_tokens), seed=int(seed), chat=chat), [store.sink()])
        except (ParamError, ValueError) as exc:
            raise gr.Error(str(exc)) from None
        steps: list[TokenStep] = []
        for event in run:
            if isinstance(event, TokenStep):
                steps.append(event)
                yield token_html(steps, run.trace.vocab), f"{len(steps)} tokens…"
        trace = run.trace
        m = trace.metrics
        summary = f"{trace.status} ({trace.reason}); {m['new_tokens']} tokens, {m['model_calls']} model calls, {m['tokens_per_second']} tok/s; run {trace.run_id}"
        yield token_html(steps, trace.vocab) if steps else html.escape(trace.output_text), html.escape(summary)

    with gr.Blocks(title="Decoding Explorer") as demo:
        gr.Markdown(f"# Decoding Explorer\nModel: `{model_name}` · traces saved to `{store.url}`")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value="Explain entropy in one sentence.", lines=3)
                with gr.Row():
                    chat = gr.Checkbox(value=True, label="Chat formatting")
                    seed = gr.Number(value=0, label="Seed", precision=0)
                    max_tokens = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
                decoder = gr.Dropdown([s.name for s in all_decoders()], value="top_p", label="Decoder")

                @gr.render(inputs=decoder)
                def form(name: str) -> None:  # the decoder's parameter form, built from its schema
                    components = [_component(p) for p in get_decoder(name).params]
                    run_button.click(generate, [prompt, decoder, chat, seed, max_tokens, *components], [output, status])

                run_button = gr.Button("Run", variant="primary")
            with gr.Column(scale=3):
                output = gr.HTML(label="Tokens (colour = probability; hover for rank and entropy)")
                status = gr.Markdown()

    return demo
