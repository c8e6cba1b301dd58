"""CoordTok training: `python -m coordtok_jax.train --config=configs/coordtok.py:ARG --workdir=DIR`."""
