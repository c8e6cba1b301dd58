"""Encode clips once into a latent cache for SiT training: `python -m coordtok_jax.encode_latents` (console script coordtok-encode-latents).

The tool lives in coordtok_jax/generation/encode_latents.py; its --help shows that module's documentation.
"""

from coordtok_jax.generation.encode_latents import run

if __name__ == "__main__":
    run()
