"""Prompt formats a model folder can declare: the prompts it was trained on travel with its weights.

A folder's ``config.json`` names its format (``"prompt_format": "parallelbench-waiting-line"``); wherever the folder
is loaded from, the app fills in the format's example, sets its chat flag, and warns when a prompt is in another
format (a small task model answers such prompts with garbage, silently).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.models.waitline_prompt import PREAMBLE, TEMPLATES, render_prompt

CONFIG_KEY = "prompt_format"


@dataclass(frozen=True)
class PromptFormat:
    """The prompt a model was trained on; other formats give it inputs it never saw."""

    name: str
    chat: bool  # whether the chat template applies
    note: str
    example: str
    fits: Callable[[str], bool]  # exactly, whitespace included: the tokenizer reads a trimmed prompt differently
    fits_trimmed: Callable[[str], bool] = lambda _: False  # the format but for the whitespace around the prompt

    def mismatch(self, model: str, prompt: str, chat: bool) -> str | None:
        """Why ``prompt`` (with or without the chat template) is not in this format, or None if it is."""
        if chat != self.chat:
            return (f"{model} was trained {'with' if self.chat else 'without'} chat formatting; its output may be "
                    "garbage in this format")
        if self.fits(prompt):
            return None
        if self.fits_trimmed(prompt):
            return (f"this prompt differs from {model}'s format ({self.name}) only in the whitespace around it, which "
                    "its tokenizer reads as part of the instruction: type it as the example is, final line break "
                    "included. Its output may be garbage.")
        return f"this prompt is not in {model}'s format ({self.name}): {self.note} Its output may be garbage."


def _waitline_patterns(trimmed: bool = False) -> list[re.Pattern[str]]:
    fields = {"context": r"\[.*\]", "word": r'[^"\n]*', "index": r"\d+"}
    patterns = []
    for template in TEMPLATES.values():
        parts = re.split(r"\{(\w+)\}", (PREAMBLE + template).strip() if trimmed else PREAMBLE + template)
        patterns.append(re.compile("".join(fields[part] if i % 2 else re.escape(part) for i, part in enumerate(parts))))
    return patterns


_WAITLINE = _waitline_patterns()
_TRIMMED_WAITLINE = _waitline_patterns(trimmed=True)

PROMPT_FORMATS = {
    "parallelbench-waiting-line": PromptFormat(
        "parallelbench-waiting-line", True,
        "ParallelBench's waiting-line instructions in their own wording (one of copy, reverse, sort, shuffle, "
        "insert/remove/replace at an index or at random), the list as JSON; the chat template on, which for one "
        "turn is the plain prompt after <s>.",
        render_prompt("reverse", ["James Smith", "Mary Jones", "Robert Brown", "Linda Davis"]),
        lambda prompt: any(pattern.fullmatch(prompt) for pattern in _WAITLINE),
        # a trimmed prompt loses the final line break, which is part of the instruction's one token as trained
        lambda prompt: any(pattern.fullmatch(prompt.strip()) for pattern in _TRIMMED_WAITLINE),
    ),
}


def declared_format(folder: Path) -> PromptFormat | None:
    """The format a model folder's config declares (None for none, or a folder without a config)."""
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return format_named(json.loads(config.read_text()).get(CONFIG_KEY))
    except (OSError, ValueError):
        return None


def format_named(name: object) -> PromptFormat | None:
    """The format a config's ``prompt_format`` value names (None for none, or a name this version does not know)."""
    return PROMPT_FORMATS.get(name) if isinstance(name, str) else None
