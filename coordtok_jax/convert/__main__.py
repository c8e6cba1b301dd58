r"""Convert CoordTok checkpoints between this trainer (Orbax) and the official PyTorch format.

    python -m coordtok_jax.convert torch-export --workdir=DIR [--step=N] --output=FILE.pth
    python -m coordtok_jax.convert torch-import --checkpoint=FILE.pth --config=configs/coordtok.py:ARG --workdir=DIR
    python -m coordtok_jax.convert sit-export --workdir=SIT_DIR [--step=N] --output=FILE.pth
    python -m coordtok_jax.convert sit-import --checkpoint=FILE.pth --config=configs/sit.py:L/2 --latent_stats=S.json --workdir=DIR

See coordtok_jax/convert/cli.py for what each command reads and writes.
"""

from coordtok_jax import entry
from coordtok_jax.convert import cli

if __name__ == "__main__":
    entry.run(cli.__name__, cli.define_flags, cli.main)
