"""Token-level decoders: one token per model call (beam search: one step of all beams per call)."""
