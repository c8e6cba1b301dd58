"""coordtok-jax: CoordTok long-video tokenizer (and its triplane SiT) in JAX/Flax NNX."""

__version__ = "0.1.0"
