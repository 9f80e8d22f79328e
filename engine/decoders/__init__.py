"""Decoder registry. Adding a decoder = adding one module to a family package below; it registers itself."""

import importlib
import pkgutil

from engine.decoders import diffusion, speculative, token
from engine.context import DecodeContext
from engine.decoders.base import DecoderSpec, all_decoders, get_decoder, param_defaults, register

for _family in (token, speculative, diffusion):
    for _module in sorted(pkgutil.iter_modules(_family.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_family.__name__}.{_module.name}")

__all__ = ["DecodeContext", "DecoderSpec", "all_decoders", "get_decoder", "param_defaults", "register"]
