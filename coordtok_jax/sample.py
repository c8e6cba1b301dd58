"""Generate videos with a trained SiT: `python -m coordtok_jax.sample` (console script coordtok-sample).

The tool lives in coordtok_jax/generation/sample.py; its --help shows that module's documentation.
"""

from coordtok_jax.generation.sample import run

if __name__ == "__main__":
    run()
