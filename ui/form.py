"""The Run form: its values as one typed object, and the decoder parameter widgets built from each schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from engine.attention import AttentionCapture
from engine.decoders import all_decoders, get_decoder
from engine.ffn import FfnCapture
from engine.params import Param, ParamError
from engine.run import BranchPoint, RunSettings

FAMILY_ORDER = ("token", "guided", "speculative", "diffusion")
ATTENTION_CHOICES = ["none", "last", "mean", "all"]
SUMMARY_CHARS = 70  # a picker label's summary is cut here; the full one shows below the picker


@dataclass
class RunForm:
    """Everything the Run tab's form says about the next run."""

    model: str
    decoder: str
    prompt: str
    chat: bool = False
    seed: Any = 0  # as the page sent it: RunSettings.check types and checks it
    max_new_tokens: Any = 64
    attention: str = "none"
    ffn: bool = False  # capture FFN activation sparsity, with the capture's default rule
    image: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def settings(self, branch: BranchPoint | None = None) -> RunSettings:
        if not self.prompt.strip() and branch is None:
            raise ParamError("type a prompt first")
        capture = None if self.attention in ("", "none") else AttentionCapture(layers=self.attention)
        return RunSettings(max_new_tokens=self.max_new_tokens, seed=self.seed, chat=bool(self.chat),
                           attention=capture, ffn=FfnCapture() if self.ffn else None, image=self.image or None,
                           branch=branch)


def family_rank(family: str) -> int:
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)


def decoder_choices() -> list[tuple[str, str]]:
    """(label, name) for every decoder, grouped by family in a fixed order, then by name; the label carries the
    family and summary so typing any word of them filters the list."""
    specs = sorted(all_decoders(), key=lambda s: (family_rank(s.family), s.name))
    return [(f"{s.family} · {s.name} — {_cut(s.summary)}", s.name) for s in specs]


def decoder_description(name: str) -> str:
    """The chosen decoder's whole summary, for the line under the picker (plain text: shown in a Textbox)."""
    spec = get_decoder(name)
    lossless = " Lossless: its greedy output equals plain greedy decoding." if spec.lossless else ""
    return f"[{spec.family}] {spec.summary}{lossless}"


def param_elem_id(name: str) -> str:
    return f"param-{name}"


def param_component(param: Param) -> gr.components.Component:
    """One widget per parameter, chosen from its type and range; always editable."""
    common = {"label": param.name, "info": param.help, "interactive": True, "elem_id": param_elem_id(param.name)}
    if param.type == "bool":
        return gr.Checkbox(value=param.default, **common)
    if param.type == "choice":
        return gr.Dropdown(choices=list(param.choices or ()), value=param.default, **common)
    bounded = param.min is not None and param.max is not None
    if param.type in ("int", "float") and bounded and param.max - param.min <= 100:
        step = 1 if param.type == "int" else 0.01
        return gr.Slider(param.min, param.max, value=param.default, step=step, **common)
    if param.type in ("int", "float"):
        return gr.Number(value=param.default, precision=0 if param.type == "int" else None, **common)
    return gr.Textbox(value=param.default, **common)


def _cut(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"
