"""Train CoordTok (the tokenizer): `python -m coordtok_jax.train` (console script coordtok-train).

The tool lives in coordtok_jax/train/trainer.py; its --help shows that module's documentation.
"""

from coordtok_jax.train.trainer import run

if __name__ == "__main__":
    run()
