"""Bridges between two tokenizers: a vocabulary map by token string (USD), and text re-encoding with a lookbehind.

Universal Speculative Decoding (Timor et al. 2025; transformers' ``AssistantToTargetTranslator``) maps each draft
token to the target token spelling the same string. Spellings differ in how they mark a leading space (byte-level
BPE's ``Ġ``, SentencePiece's ``▁``), so each token is first turned into the text it stands for: a byte-level
token through GPT-2's byte alphabet (``Ġ`` -> space, ``Ċ`` -> newline), a SentencePiece token by ``▁`` -> space and
ASCII byte-fallback pieces (``<0x41>``) -> their character. Draft tokens with no target twin are suppressed.

Universal Assisted Generation (greedy, transformers' ``AssistedCandidateGeneratorDifferentTokenizers``) moves
drafts as text: new text is re-encoded together with the last committed tokens (the lookbehind window), so a word
split across the boundary is tokenized as the target would tokenize it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers.convert_slow_tokenizer import bytes_to_unicode

from engine.models.handle import LoadedModel

BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")
BYTE_OF = {char: byte for byte, char in bytes_to_unicode().items()}  # the alphabet byte-level BPE tokens are spelt in


def space_sign(model: LoadedModel) -> str:
    """The character a tokenizer spells a leading space with (``Ġ``, ``▁``, or a plain space)."""
    ids = model.tokenizer(" a", add_special_tokens=False)["input_ids"]
    return model.tokenizer.convert_ids_to_tokens(ids[:1])[0][0] if ids else " "


def token_surfaces(model: LoadedModel) -> list[str | None]:
    """The text each token id of ``model``'s output layer stands for; None where it is no whole text."""
    tokenizer = model.tokenizer
    special = set(tokenizer.all_special_tokens)
    sign = space_sign(model)
    size = min(len(tokenizer), model.vocab_size)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    surfaces = [_surface(piece, sign, piece in special) for piece in pieces]
    return surfaces + [None] * (model.vocab_size - size)  # padded output rows: no token at all


def _surface(piece: str | None, sign: str, special: bool) -> str | None:
    if piece is None or special:
        return piece  # special tokens match only by their exact spelling
    if sign == "Ġ":  # byte-level BPE: every character stands for one byte
        if any(char not in BYTE_OF for char in piece):
            return piece  # an added token spelt in plain text
        try:
            return bytes(BYTE_OF[char] for char in piece).decode("utf-8")
        except UnicodeDecodeError:
            return None  # a fragment of a multi-byte character
    fallback = BYTE_FALLBACK.fullmatch(piece)
    if fallback:
        byte = int(fallback.group(1), 16)
        return chr(byte) if byte < 0x80 else None
    return piece.replace(sign, " ") if sign != " " else piece


class VocabMap:
    """Draft token id -> target token id by surface text (-1: absent from the target, suppressed when drafting)."""

    def __init__(self, draft: LoadedModel, target: LoadedModel) -> None:
        target_id: dict[str, int] = {}
        for token, surface in enumerate(token_surfaces(target)):
            if surface is not None:
                target_id.setdefault(surface, token)  # the first spelling wins, as the tokenizer would encode it
        mapped = [target_id.get(s, -1) if s is not None else -1 for s in token_surfaces(draft)]
        self.draft_to_target = torch.tensor(mapped, dtype=torch.long)
        self.present = self.draft_to_target >= 0
        self.target_vocab_size = target.vocab_size
        if not bool(self.present.any()):
            raise ValueError(f"no token of {draft.name} spells the same text as a token of {target.name}")

    def suppress_absent(self, draft_logits: Tensor) -> Tensor:
        """Draft logits with every token the target lacks at -inf, so the draft never proposes one."""
        return draft_logits.masked_fill(~self.present, float("-inf"))

    def to_target(self, draft_logprobs: Tensor) -> Tensor:
        """The draft distribution over the target vocabulary (draft tokens sharing a target twin add up)."""
        probs = torch.zeros(self.target_vocab_size, dtype=torch.float64)
        present = self.present
        probs.index_add_(0, self.draft_to_target[present], draft_logprobs[present].double().exp())
        return probs.log().float()


def decode_continuation(model: LoadedModel, before: list[int], new: list[int], lookbehind: int) -> str:
    """The text ``new`` adds after ``before`` (decoded with the last ``lookbehind`` tokens, which fixes spacing)."""
    window = before[-lookbehind:] if lookbehind else []
    head = model.decode(window, skip_special_tokens=False)
    whole = model.decode(window + new, skip_special_tokens=False)
    text = whole[len(head) :] if whole.startswith(head) else model.decode(new, skip_special_tokens=False)
    # a trailing half of a multi-byte character decodes to U+FFFD; the next round's text completes it
    return text.rstrip("\ufffd")


def encode_continuation(model: LoadedModel, before: list[int], text: str, lookbehind: int) -> list[int]:
    """Token ids that continue ``before`` with ``text``, tokenized as the tokenizer would tokenize the whole.

    The last ``lookbehind`` committed tokens are decoded and re-encoded together with ``text``; if the
    re-encoding starts with exactly those tokens, the rest continues them (the window shrinks from the left
    when its first tokens do not round-trip, e.g. half a character). If no window round-trips (the new text
    merges into the last committed token), ``text`` is encoded on its own.
    """
    window = before[-lookbehind:] if lookbehind else []
    for start in range(len(window)):
        kept = window[start:]
        ids = _encode_plain(model, model.decode(kept, skip_special_tokens=False) + text)
        if ids[: len(kept)] == kept:
            return ids[len(kept) :]
    return _encode_plain(model, text)


def _encode_plain(model: LoadedModel, text: str) -> list[int]:
    return [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]] if text else []
