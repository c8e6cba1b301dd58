"""Orbax checkpoints of the train state, the grain iterator state and the config.

WORKDIR/checkpoints/STEP holds three items: `state` (params, optimizer state, step, rng; restored
directly into the current shardings), `data` (each host's grain iterator state) and `config`
(JSON). Saves are asynchronous; keep the last `keep_last`, plus every `keep_every`-th step.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    def __init__(self, workdir: str, keep_last: int, keep_every: int = 0, async_save: bool = True):
        self.directory = epath.Path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max(1, int(keep_last)),
            keep_period=int(keep_every) if keep_every else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_to_json(config)),
        )
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """State restored into abstract_state's shardings; the iterator's position set in place."""
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
        return restored["state"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str, abstract_params) -> Any:
    """Model parameters from a checkpoint written by this trainer (or by convert torch-import).

    `path` is a workdir (its latest checkpoint), a workdir's `checkpoints` folder, or one step
    folder `.../checkpoints/STEP`. Only `state.params` is read, into abstract_params' shardings.
    """
    p = epath.Path(path)
    if (p / "checkpoints").exists():
        p = p / "checkpoints"
    if (p / "state").exists():
        directory, step = p.parent, int(p.name)
    else:
        directory, step = p, None
    manager = ocp.CheckpointManager(directory, item_names=("state",), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"config.init_from={path!r}: no checkpoint found there")
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract_params)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args={"params": restore_args}, partial_restore=True)),
    )
    manager.close()
    return restored["state"]["params"], step
