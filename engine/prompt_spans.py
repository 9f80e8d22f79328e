"""Find the marked parts of a prompt (a passage, a question) as token index ranges.

Decoders that treat a prompt as context + query (GIFT, exact-extract) mark the parts with plain text markers such
as "Context:" and "Question:"; a run capturing attention finds retrieved passages ("Passage 1: ..." lines) before
a question the same way. The markers are found in the decoded prompt and mapped back to tokens through the
lengths of decoded prefixes, which works for any tokenizer and keeps chat-template tokens out of the spans.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.events import PromptPassages
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
    special = _special_ids(model) - {image_token}
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
    query = _marked_range(prompt_ids, ends, query_char, special)
    query_start = query.start
    context_char = text.rfind(context_marker, 0, query_char) if context_marker else -1
    if context_char >= 0:
        context_start = _token_at(ends, context_char + len(context_marker) - 1) + 1
    else:
        context_start = 1 + max((i for i in range(query_start) if prompt_ids[i] in special), default=-1)
    if context_start >= query_start:
        raise ParamError("the prompt has no passage before its question: put the context text before the query marker")
    return PromptSpans(context=range(context_start, query_start), query=query)


def prompt_passages(
    model: LoadedModel, prompt_ids: list[int], passage_marker: str, question_marker: str
) -> PromptPassages | None:
    """The passages and the question of a prompt marked for retrieval-augmented answering, or None without a
    passage marker at the start of a line (blanks before it allowed).

    Each passage runs from its marker's line to the next passage's marker, or to the question: from the last
    ``question_marker`` (included) to the end of the user's text. Without a question marker the question is empty
    and the last passage ends with the user's text.
    """
    text = model.tokenizer.decode(prompt_ids, skip_special_tokens=False)
    if not passage_marker or passage_marker not in text:  # most prompts: no per-token decoding
        return None
    ends = _prefix_ends(model, prompt_ids)
    special = _special_ids(model)
    question_char = text.rfind(question_marker) if question_marker else -1
    body = _specials_as_breaks(text[: question_char] if question_char >= 0 else text, prompt_ids, ends, special)
    marks = [m.start(1) for m in re.finditer(rf"(?:^|\n)[ \t]*({re.escape(passage_marker)})", body)]
    starts = sorted({_token_at(ends, char) for char in marks})
    if not starts:
        return None
    if question_char >= 0:
        question = _marked_range(prompt_ids, ends, question_char, special)
    else:
        end = _end_of_text(prompt_ids, starts[-1], special)
        question = range(end, end)
    bounds = [*starts, question.start]
    return PromptPassages(passages=[[a, b] for a, b in zip(bounds, bounds[1:]) if b > a],
                          question=[question.start, question.stop], passage_marker=passage_marker,
                          question_marker=question_marker)


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


def _specials_as_breaks(text: str, ids: list[int], ends: list[int], special: set[int]) -> str:
    """``text`` with each special token's characters turned into line breaks: a marker right after a BOS or a
    chat header starts a line."""
    chars = list(text)
    for i, token in enumerate(ids):
        if token in special:
            start = ends[i - 1] if i else 0
            chars[start:ends[i]] = "\n" * len(chars[start:ends[i]])
    return "".join(chars)


def _special_ids(model: LoadedModel) -> set[int]:
    return set(getattr(model.tokenizer, "all_special_ids", []) or [])


def _marked_range(ids: list[int], ends: list[int], char: int, special: set[int]) -> range:
    """From the token holding character ``char`` to the end of the user's text."""
    start = _token_at(ends, char)
    return range(start, _end_of_text(ids, start, special))


def _end_of_text(ids: list[int], start: int, special: set[int]) -> int:
    """The first special token after ``start`` (a chat template's end of turn), or the prompt's end."""
    return next((i for i in range(start + 1, len(ids)) if ids[i] in special), len(ids))


def _prefix_ends(model: LoadedModel, ids: list[int]) -> list[int]:
    """Character length of the decoded prompt after each token."""
    return [len(model.tokenizer.decode(ids[: i + 1], skip_special_tokens=False)) for i in range(len(ids))]


def _token_at(ends: list[int], char: int) -> int:
    """Index of the token whose decoded text covers character ``char``."""
    return next(i for i, end in enumerate(ends) if end > char)
