r"""Train CoordTok: python -m coordtok_jax.train --config=configs/coordtok.py:SIZE[,stage=N] --workdir=DIR

Re-running the same command on the same workdir resumes from its latest checkpoint; see
coordtok_jax/train/trainer.py.
"""

from coordtok_jax import entry
from coordtok_jax.train import trainer

if __name__ == "__main__":
    entry.run(trainer.__name__, trainer.define_flags, trainer.main)
