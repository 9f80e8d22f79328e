"""Tiny random-weight models built entirely in code: no file, no network, loaded in milliseconds.

They exercise every code path (KV cache, attention weights, chat template, EOS) at test speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIALS = (PAD, BOS, EOS)  # ids 0, 1, 2; byte tokens follow, then merges

# A few English merges ("_" stands for a space), so that common words take fewer tokens than bytes.
MERGES = """
    _+t h+e i+n e+r a+n o+n _+a r+e e+n a+t o+u e+d i+s o+r e+s _+s _+w i+t _+o n+d _t+he in+g _+b _+c _+f
    _+m _+p _+d _+h _+i l+l a+r a+l l+e s+t _a+nd _o+f _t+o _i+n _i+s _i+t o+w e+l c+h l+y _t+h _th+at
    H+e He+ll Hell+o _w+or _wor+l _worl+d u+s a+s
""".split()

CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

# Larger than the usual 0.02 so that next-token distributions are peaked enough for decoders to differ.
INIT_STD = 0.25
SHAPE = {"hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "kv_heads": 2, "positions": 1024}

LLAMA = {
    "model_type": "llama",
    "hidden_size": SHAPE["hidden"],
    "intermediate_size": SHAPE["ffn"],
    "num_hidden_layers": SHAPE["layers"],
    "num_attention_heads": SHAPE["heads"],
    "num_key_value_heads": SHAPE["kv_heads"],
    "max_position_embeddings": SHAPE["positions"],
    "tie_word_embeddings": False,
}
# One sliding and one global layer, like Gemma 3's mix; the window is small enough to matter in tests.
GEMMA3 = {
    **LLAMA,
    "model_type": "gemma3_text",
    "head_dim": SHAPE["hidden"] // SHAPE["heads"],
    "query_pre_attn_scalar": SHAPE["hidden"] // SHAPE["heads"],
    "sliding_window": 32,
    "layer_types": ["sliding_attention", "full_attention"],
    "tie_word_embeddings": True,
}
GPT2 = {
    "model_type": "gpt2",
    "n_embd": SHAPE["hidden"],
    "n_inner": SHAPE["ffn"],
    "n_layer": SHAPE["layers"],
    "n_head": SHAPE["heads"],
    "n_positions": SHAPE["positions"],
}

ARCHITECTURES = {"tiny-random-llama": LLAMA, "tiny-random-gemma3": GEMMA3, "tiny-random-gpt2": GPT2}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: any text round-trips exactly, and common English pieces merge."""
    to_unicode = bytes_to_unicode()  # GPT-2's byte -> printable character map, which ByteLevel uses
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for byte in range(256):
        vocab[to_unicode[byte]] = len(vocab)
    merges = []
    for pair in MERGES:
        left, right = pair.replace("_", to_unicode[ord(" ")]).split("+")
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    return wrap_byte_level(byte_level_bpe(models.BPE(vocab=vocab, merges=merges)), SPECIALS, CHAT_TEMPLATE)


def byte_level_bpe(bpe: models.BPE) -> Tokenizer:
    """A tokenizer over ``bpe`` that splits and joins text as bytes, so any text round-trips exactly."""
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def wrap_byte_level(
    backend: Tokenizer, specials: Sequence[str], chat_template: str, **roles: str
) -> PreTrainedTokenizerFast:
    """``backend`` for transformers: ``specials`` (which include ``<pad>``, ``<s>``, ``</s>``) are special tokens,
    ``<s>`` opens every text, and ``roles`` name further special tokens (``mask_token="<mask>"``)."""
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        **roles,
    )


def build_tiny(
    name: str, seed: int = 0, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
) -> tuple[Any, PreTrainedTokenizerFast]:
    """Model and tokenizer for one of ``ARCHITECTURES``; the same seed always gives the same weights."""
    tokenizer = build_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    settings = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(
        settings.pop("model_type"), vocab_size=len(tokenizer), initializer_range=INIT_STD, **ids, **settings
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without disturbing the caller's random state
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    model.generation_config = GenerationConfig(**ids)
    return model.to(dtype).eval(), tokenizer

