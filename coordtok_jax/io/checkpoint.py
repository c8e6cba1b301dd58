"""Orbax checkpoints of the train state, the grain iterator state and the config.

WORKDIR/checkpoints/STEP holds three items: `state` (params, optimizer state, step, rng; restored
directly into the current shardings), `data` (each host's grain iterator state) and `config`
(JSON). Saves are asynchronous; keep the last `keep_last`, plus every `keep_every`-th step.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Any, Callable, Optional

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath


from coordtok_jax.errors import UserError

_HANDLER_SET = False
UNREADABLE = ".unreadable"  # suffix of a step folder that could not be restored, kept for inspection


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or none could be read; the message names the path and the
    cause (e.g. 'No space left on device') and what is still intact."""


def root_cause(e: BaseException) -> BaseException:
    """The innermost exception of a chain (Orbax wraps the OSError of a failed write several times)."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ or e.__context__
        if nxt is None:
            break
        e = nxt
    return e


def describe(e: BaseException) -> str:
    """'No space left on device' for an OSError, else 'Type: first line of the message'."""
    cause = root_cause(e)
    for err in (cause, e):
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT):
            where = f" ({err.filename})" if err.filename else ""
            return f"{err.strerror or errno.errorcode.get(err.errno)}{where}"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


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
        self._pending: Optional[int] = None  # step of the last save started

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def _saved(self) -> Optional[int]:
        """The newest step folder that was finalized (what a failed save leaves intact)."""
        self.manager.reload()
        return self.manager.latest_step()

    def _failed(self, step: int, e: BaseException) -> "CheckpointError":
        for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*") if self.directory.exists() else []:
            try:  # the half-written folder of the failed save; finished steps are never touched
                tmp.rmtree() if tmp.is_dir() else tmp.unlink()
            except OSError:
                pass
        try:
            intact = self._saved()
        except Exception:  # noqa: BLE001 - the directory itself may be unreadable
            intact = None
        kept = f"checkpoints/{intact} is intact" if intact is not None else "no earlier checkpoint exists"
        return CheckpointError(f"saving {self.directory}/{step} failed: {describe(e)}; {kept}")

    def save(self, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
        """Starts an asynchronous save; an error of the previous one is raised here (one line:
        the path and the cause) instead of Orbax's traceback."""
        self.check()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(config_to_json(config)),
        )
        self._pending = int(step)
        try:
            return self.manager.save(int(step), args=args, force=force)
        except Exception as e:  # noqa: BLE001 - reported with its cause
            raise self._failed(step, e) from e

    def check(self) -> None:
        """Raises CheckpointError if the last asynchronous save failed (called at every log, so a
        full disk stops training at once instead of at the next save)."""
        pending = self._pending
        if pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            self._pending = None
            raise self._failed(pending, e) from e

    def restore_latest(self, abstract_state, data_iterator, log: Callable[[str], None] = print):
        """(state, step) of the newest step that restores, or None when there is no checkpoint.

        A step that cannot be read (torn write, garbage in a file, missing item) is renamed to
        STEP.unreadable (kept for inspection, out of Orbax's way) and the previous step is tried;
        one line per skipped step says what was wrong. Raises CheckpointError when steps exist and
        none restores.
        """
        from jax.experimental import multihost_utils

        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state, data_iterator), step
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped
                reason = describe(e)
                failures.append(f"{step}: {reason}")
                aside = self.directory / f"{step}{UNREADABLE}"
                if jax.process_index() == 0:
                    if aside.exists():
                        aside = self.directory / f"{step}{UNREADABLE}.{int(time.time())}"
                    (self.directory / str(step)).rename(aside)
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices(f"checkpoint_fallback_{step}")
                self.manager.reload()
                log(f"{self.directory}/{step} cannot be restored ({reason}); moved to {aside.name}, "
                    f"trying the previous step")
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} can be restored: " + "; ".join(failures))
        return None

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
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(self._pending or 0, e) from e
        self.check()

    def close(self):
        try:
            self.wait()
        finally:
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


KINDS = {
    "tokenizer": ("a CoordTok tokenizer run (coordtok_jax.train)",
                  "reconstruct / evaluate / convert torch-export read it; sample and convert sit-export need a "
                  "train_sit workdir"),
    "sit": ("a SiT run (coordtok_jax.train_sit)",
            "sample / convert sit-export read it; reconstruct / evaluate / convert torch-export need a tokenizer "
            "workdir (its config.tokenizer)"),
}


def run_kind(config) -> str:
    """'sit' for a train_sit config (its model has in_channels, the tokenizer's planes), else 'tokenizer'."""
    model = config.get("model") or {}
    return "sit" if "in_channels" in model and "enc_embed_dim" not in model else "tokenizer"


def require_kind(config, want: str, workdir, command: str) -> None:
    """A ValueError naming what the workdir holds and which commands read it, when `command` needs
    the other kind of run (instead of a missing-field error deep inside)."""
    have = run_kind(config)
    if have != want:
        what, readers = KINDS[have]
        raise ValueError(f"{workdir} holds {what}, not {KINDS[want][0]}: {command} cannot read it ({readers})")


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
