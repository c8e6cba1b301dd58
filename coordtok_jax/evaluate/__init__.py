"""Evaluating a trained tokenizer: the paper's protocol over a dataset (run; `python -m
coordtok_jax.evaluate`) and reconstructing one video file (reconstruct)."""
