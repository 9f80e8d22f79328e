"""Diffusion language models' decoding: the unmasking loop, its commit rules, caches and the Learn2PD filter."""
