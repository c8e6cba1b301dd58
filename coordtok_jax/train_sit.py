"""Train the triplane SiT on a frozen tokenizer's latents: `python -m coordtok_jax.train_sit` (console script coordtok-train-sit).

The tool lives in coordtok_jax/generation/train_sit.py; its --help shows that module's documentation.
"""

from coordtok_jax.generation.train_sit import run

if __name__ == "__main__":
    run()
