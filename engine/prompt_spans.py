"""Find the marked parts of a prompt (a passage, a question) as token index ranges.

Decoders that treat a prompt as context + query (GIFT, exact-extract) mark the parts with plain text markers such
as "Context:" and "Question:". The markers are found in the decoded prompt and mapped back to tokens through the
lengths of decoded prefixes, which works for any tokenizer and keeps chat-template tokens out of the spans.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.handle import LoadedModel
from engine.params import ParamError


@dataclass(frozen=True)
class PromptSpans:
    """Token index ranges of the prompt: the context (passage) and the query (question), query after context."""

    context: range
    query: range


def marked_spans(
    model: LoadedModel, prompt_ids: list[int], context_marker: str, query_marker: str, image_token: int | None = None
) -> PromptSpans:
    """The context runs from after ``context_marker`` to the query; the query from ``query_marker`` (included) to
    the end of the user's text (the first special token after it, such as a chat template's end of turn).

    Without ``context_marker`` in the prompt the context starts after the last special token before the query
    (the chat header), or at the prompt's start. A prompt holding ``image_token`` ids (a VLM's image) has the image
    as its context, and its query runs from the marker, or without one from the first text after the image.
    """
    special = set(getattr(model.tokenizer, "all_special_ids", []) or []) - {image_token}
    images = [i for i, token in enumerate(prompt_ids) if token == image_token] if image_token is not None else []
    if images:
        return _image_spans(model, prompt_ids, images, query_marker, special)
    ends = _prefix_ends(model, prompt_ids)
    text = model.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    query_char = text.rfind(query_marker) if query_marker else -1
    if query_char < 0:
        raise ParamError(
            f"the prompt has no query marker {query_marker!r}: write the passage first, then the question after "
            f"{query_marker!r} (or set the query marker parameter)"
        )
    query_start = _token_at(ends, query_char)
    query_end = _end_of_text(prompt_ids, query_start, special)
    context_char = text.rfind(context_marker, 0, query_char) if context_marker else -1
    if context_char >= 0:
        context_start = _token_at(ends, context_char + len(context_marker) - 1) + 1
    else:
        context_start = 1 + max((i for i in range(query_start) if prompt_ids[i] in special), default=-1)
    if context_start >= query_start:
        raise ParamError("the prompt has no passage before its question: put the context text before the query marker")
    return PromptSpans(context=range(context_start, query_start), query=range(query_start, query_end))


def _image_spans(
    model: LoadedModel, ids: list[int], images: list[int], query_marker: str, special: set[int]
) -> PromptSpans:
    context = range(images[0], images[-1] + 1)
    text_after = model.tokenizer.decode(ids[context.stop:], skip_special_tokens=False)
    marker = text_after.rfind(query_marker) if query_marker else -1
    if marker >= 0:
        start = context.stop + _token_at(_prefix_ends(model, ids[context.stop:]), marker)
    else:
        start = next((i for i in range(context.stop, len(ids)) if ids[i] not in special and model.token_text(ids[i]).strip()),
                     len(ids))
    if start >= len(ids):
        raise ParamError("the prompt has no question after its image")
    return PromptSpans(context=context, query=range(start, _end_of_text(ids, start, special)))


def _end_of_text(ids: list[int], start: int, special: set[int]) -> int:
    """The first special token after ``start`` (a chat template's end of turn), or the prompt's end."""
    return next((i for i in range(start + 1, len(ids)) if ids[i] in special), len(ids))


def _prefix_ends(model: LoadedModel, ids: list[int]) -> list[int]:
    """Character length of the decoded prompt after each token."""
    return [len(model.tokenizer.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]


def _token_at(ends: list[int], char: int) -> int:
    """Index of the token whose decoded text covers character ``char``."""
    return next(i for i, end in enumerate(ends) if end > char)
