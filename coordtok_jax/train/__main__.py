r"""Train CoordTok: python -m coordtok_jax.train --config=configs/coordtok.py:SIZE[,stage=N] --workdir=DIR

Re-running the same command on the same workdir resumes from its latest checkpoint; see
coordtok_jax/train/trainer.py.
"""

from absl import app, flags

from coordtok_jax.train import trainer

if __name__ == "__main__":
    trainer.define_flags()
    flags.adopt_module_key_flags(trainer)  # list the trainer's flags under --help
    app.run(trainer.main)
