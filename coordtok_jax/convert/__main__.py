"""Convert checkpoints to and from the official PyTorch format: `python -m coordtok_jax.convert` (console script coordtok-convert).

The tool lives in coordtok_jax/convert/commands.py; its --help shows that module's documentation.
"""

from coordtok_jax.convert.commands import run

if __name__ == "__main__":
    run()
