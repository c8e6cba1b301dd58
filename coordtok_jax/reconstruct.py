"""Reconstruct a video file through a trained tokenizer: `python -m coordtok_jax.reconstruct` (console script coordtok-reconstruct).

The tool lives in coordtok_jax/evaluate/reconstruct.py; its --help shows that module's documentation.
"""

from coordtok_jax.evaluate.reconstruct import run

if __name__ == "__main__":
    run()
