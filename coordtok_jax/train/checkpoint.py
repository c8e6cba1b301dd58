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
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


_HANDLER_SET = False


def _whole_array_saves_on_cpu() -> None:
    """On CPU, save each array whole instead of Orbax's replica-parallel slices.

    Replica-parallel saving splits every replicated array into per-replica slices with eager
    ops, each compiled on first use: on CPU (several simulated or real devices, no parallel
    I/O to gain) that is seconds of compilation per first save for nothing. Accelerators keep
    Orbax's default. The files and values are the same either way.
    """
    global _HANDLER_SET
    if _HANDLER_SET or jax.default_backend() != "cpu":
        return
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    _HANDLER_SET = True


def config_to_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


class Checkpointer:
    def __init__(self, workdir: str, keep_last: int, keep_every: int = 0, async_save: bool = True):
        _whole_array_saves_on_cpu()
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


def resolve_step(path: str, step: Optional[int] = None) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a workdir, its `checkpoints` folder or one step folder.

    `step` None means the step folder given, else the latest step. Raises FileNotFoundError
    naming the path when there is no checkpoint.
    """
    p = epath.Path(path)
    if (p / "checkpoints").exists():
        p = p / "checkpoints"
    if (p / "state").exists():
        directory, given = p.parent, int(p.name)
        step = given if step is None else step
    else:
        directory = p
    if step is None:
        steps = [int(c.name) for c in directory.iterdir() if c.name.isdigit() and (c / "state").exists()] \
            if directory.exists() else []
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {path} (expected WORKDIR/checkpoints/STEP/state)")
        step = max(steps)
    if not (directory / str(step) / "state").exists():
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}")
    return directory, int(step)


def read_config(path: str, step: Optional[int] = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was written with (its `config` item), else WORKDIR/config.json."""
    directory, step = resolve_step(path, step)
    candidates = (directory / str(step) / "config" / "metadata", directory.parent / "config.json")
    for f in candidates:
        if f.exists():
            try:
                return ml_collections.ConfigDict(json.loads(f.read_text()))
            except json.JSONDecodeError as e:
                raise ValueError(f"{f} is not valid JSON: {e}") from e
    raise FileNotFoundError(f"no config for {directory}/{step}: looked for {', '.join(map(str, candidates))}")


def is_params_only(path: str, step: Optional[int] = None) -> bool:
    """True for a checkpoint holding only parameters (written by convert torch-import)."""
    directory, step = resolve_step(path, step)
    return not (directory / str(step) / "data").exists()


def save_params(workdir: str, params, config, step: int = 0, *, state_is_dict: bool = False) -> epath.Path:
    """Writes WORKDIR/checkpoints/STEP with `state` = {'params': params} (or `params` itself, a
    dict of state entries, when state_is_dict) and the config.

    Such a checkpoint can start a run (config.init_from=WORKDIR) and be read by
    `restore_params`; it holds no optimizer or data-iterator state, so it cannot be resumed.
    """
    _whole_array_saves_on_cpu()
    directory = epath.Path(workdir) / "checkpoints"
    manager = ocp.CheckpointManager(directory, item_names=("state", "config"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(params if state_is_dict else {"params": params}),
        config=ocp.args.JsonSave(config_to_json(config)),
    ), force=True)
    manager.wait_until_finished()
    manager.close()
    return directory / str(step)


def restore_partial(path: str, item: dict, step: Optional[int] = None) -> tuple[dict, int]:
    """Restores the entries of `item` (a dict of abstract arrays with shardings, a subset of the
    saved `state`, e.g. {'params': ...} or {'ema': ..., 'latent_mean': ...}) from a checkpoint.

    `path` is a workdir (its latest checkpoint, or `step`), a workdir's `checkpoints` folder, or
    one step folder `.../checkpoints/STEP`. Returns (restored dict, step).
    """
    try:
        directory, step = resolve_step(path, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path!r}: {e}") from None
    manager = ocp.CheckpointManager(directory, item_names=("state",), options=ocp.CheckpointManagerOptions(read_only=True))
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), item)
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))
    manager.close()
    return restored["state"], step


def restore_params(path: str, abstract_params, step: Optional[int] = None) -> Any:
    """Model parameters from a checkpoint written by this trainer (or by convert torch-import):
    only `state.params`, into abstract_params' shardings. Returns (params, step)."""
    restored, step = restore_partial(path, {"params": abstract_params}, step)
    return restored["params"], step
