"""Diffusion language models: the built-in waiting-line data, its tokenizer and the training script."""
