"""Speculative decoders: a drafter proposes several tokens, the target verifies them in one forward per round."""
