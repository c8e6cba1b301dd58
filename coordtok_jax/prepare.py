"""Write videos as ArrayRecord shards: `python -m coordtok_jax.prepare` (console script coordtok-prepare).

The tool lives in coordtok_jax/data/prepare_shards.py; its --help shows that module's documentation.
"""

from coordtok_jax.data.prepare_shards import run

if __name__ == "__main__":
    run()
