"""The built-in diffusion models' tokenizer: byte-level BPE trained on waiting-line text, with a mask token.

Every byte is in the vocabulary, so any text encodes and decodes exactly; the merges learnt from the task's text
make each name and instruction word one token (a name list costs 4 tokens per person: `"`-ish, first, last, `,`).
The fixed sentences of the task instructions are also single (added, non-special) tokens: they would otherwise be
two thirds of every training sequence, and a tiny model learns the lists far sooner without them. Text that merely
contains such a sentence still round-trips exactly.
Special tokens: ``<pad>`` 0, ``<s>`` 1 (begin), ``</s>`` 2 (end of text), ``<mask>`` 3 (the diffusion mask); an MDLM
trained with Rainbow Padding adds its padding tokens after the whole vocabulary (:func:`with_rainbow_pads`).
"""

from __future__ import annotations

import re

from tokenizers import AddedToken, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.models.tiny import BOS, EOS, PAD, byte_level_bpe, wrap_byte_level
from engine.offline.names import FIRST_NAMES, LAST_NAMES, split_of
from engine.offline.waitline_data import OPERATIONS, PREAMBLE, TEMPLATES, WaitlineGenerator

MASK = "<mask>"
RAINBOW_PAD = "<pad_{}>"
SPECIALS = (PAD, BOS, EOS, MASK)
VOCAB_SIZE = 2048
NAME_INITIAL_PIECE = re.compile(r" ?([A-Z][a-z]*)")  # a name's first token: after the quote, or a space (last name)
NAME_INNER_PIECE = re.compile(r"[a-z]+")
PHRASE_MIN_CHARS = 20  # shorter template fragments (":\n", '"') stay ordinary text
# A user turn is the prompt as trained; an assistant turn is its answer closed by end of text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def training_corpus(seed: int = 0, per_operation: int = 200) -> list[str]:
    """Prompts and answers of every operation, plus every hand-listed training name in both positions, so each gets
    merged. Held-out names are left out: a token seen only in held-out lists would keep an untrained embedding."""
    firsts, lasts = ([name for name in names if split_of(name) == "train"] for names in (FIRST_NAMES, LAST_NAMES))
    # lists of hand-listed names only: each of the pool's thousands of names is too rare to earn a merge of its own,
    # and together they would crowd the common names' merges out of the vocabulary
    generator = WaitlineGenerator(seed, split="train", names=(tuple(firsts), tuple(lasts)))
    texts = [f'["{first} {last}", "{last}"]' for first in firsts for last in lasts[:3]]
    texts += [f'["{first} {last}"]' for last in lasts for first in firsts[:3]]
    for operation in OPERATIONS:
        for _ in range(per_operation):
            example = generator.example(operation)
            texts += [example.prompt, example.answer_text]
    return texts


def instruction_phrases() -> list[str]:
    """The instructions' fixed fragments (the text between their placeholders), longest first."""
    fragments = {PREAMBLE}
    for template in TEMPLATES.values():
        fragments.update(re.split(r"\{\w+\}", template))
    return sorted((f for f in fragments if len(f) >= PHRASE_MIN_CHARS), key=lambda f: (-len(f), f))


def build_tokenizer(seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the seeded corpus (deterministic) and wrap it for transformers."""
    backend = byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(training_corpus(seed), trainer=trainer)
    backend.add_tokens([AddedToken(phrase, special=False, normalized=False) for phrase in instruction_phrases()])
    return wrap_byte_level(backend, SPECIALS, CHAT_TEMPLATE, mask_token=MASK)


def name_pieces(tokenizer: PreTrainedTokenizerFast) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The vocabulary's name-initial pieces (a capital and lower-case letters, the space dropped) and inner pieces
    (lower-case letters), each sorted and distinct: what ``WaitlineGenerator``'s piece names are glued from."""
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    initials = {m.group(1) for m in map(NAME_INITIAL_PIECE.fullmatch, texts) if m}
    return tuple(sorted(initials)), tuple(sorted(filter(NAME_INNER_PIECE.fullmatch, texts)))


def with_rainbow_pads(tokenizer: PreTrainedTokenizerFast, count: int) -> list[int]:
    """Add Rainbow Padding's ``count`` distinct padding tokens (special, after every other id, so the AR twin's ids
    keep their meaning) and return their ids in cycle order.

    Kim et al. (ICLR 2026): an answer padded with repeated end of text puts nearly all the probability of the far
    canvas on end of text, so most-confident-first decoding commits the padding first, from the back, and fixes a
    wrong length before any content; one end of text then a cycle of distinct pads spreads that mass wherever the
    length is uncertain."""
    tokens = [RAINBOW_PAD.format(index) for index in range(count)]
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(tokens)
