"""Decoder registry. Adding a decoder = adding one module below and importing it here."""

from engine.decoders.base import DecodeContext, DecoderSpec, all_decoders, get_decoder, register
from engine.decoders.token import beam, forced, greedy, sample  # noqa: F401  (registers them)
from engine.decoders.speculative import draft_model, dyspec, prompt_lookup  # noqa: F401  (registers them)

__all__ = ["DecodeContext", "DecoderSpec", "all_decoders", "get_decoder", "register"]
