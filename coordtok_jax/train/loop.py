"""The training loop shared by the tokenizer and SiT trainers: resume, steps, logging, evals,
checkpoints, signals, the NaN guard.

A trainer builds a `Task` (its state plan, its compiled step, its input iterator and how to turn
a host batch into global arrays) and calls `run(config, workdir, task)` under its mesh:

* resume: the latest checkpoint of WORKDIR/checkpoints (state + grain iterator) restored into
  the plan's shardings if any, else the fresh state created sharded, passed through `task.init`
  (e.g. parameters from config.init_from);
* every step: `state, metrics = task.step(state, task.global_batch(next(data_iter)))`;
* every `log_every`: scalars to TensorBoard and the progress bar (loss, items/s, step time,
  skipped files, MFU when the device's peak is known);
* every `eval_every` (and at the end): `task.evaluate(step, state)` -> scalars;
* every `save_every`, at the end and on SIGTERM/SIGINT: an Orbax save of state, iterator and
  config; a non-finite loss (recorded on device in state.first_nonfinite) stops the run with
  the step number before anything past it is saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from coordtok_jax.data.pipeline import distinct_count
from coordtok_jax.errors import UserError
from coordtok_jax.models import ConfigError
from coordtok_jax.io.checkpoint import Checkpointer, is_params_only, resolve_step
from coordtok_jax.train.state import StatePlan


class NonFiniteLoss(UserError, RuntimeError):
    pass


@dataclasses.dataclass
class Task:
    """What a trainer hands to `run`."""

    plan: StatePlan  # the state's structure and shardings (train/state.py): restored into, or created
    step: Callable  # compiled (state, global batch) -> (state, metrics dict of scalars)
    data_iter: Iterator  # grain iterator (checkpointable) of host-local batches
    global_batch: Callable[[dict], dict]  # host batch -> global jax arrays
    items_per_step: int  # e.g. videos per step, for throughput
    item_name: str = "videos"
    flops_per_step: float = 0.0
    init: Optional[Callable[[Any], Any]] = None  # fresh state -> initial state (no checkpoint yet)
    evaluate: Optional[Callable[[int, Any], dict]] = None  # (step, state) -> scalars
    counters: tuple = ("decode_failures",)  # metrics summed over steps instead of logged as is


def refuse_params_only(workdir: epath.Path) -> None:
    """A workdir written by `convert torch-import` holds parameters only: it starts runs, it is not one."""
    try:
        params_only = is_params_only(str(workdir))
    except FileNotFoundError:  # no checkpoint yet
        return
    if params_only:
        raise ConfigError(
            f"{workdir}/checkpoints holds parameters only (written by `coordtok_jax.convert torch-import`), "
            f"not a run to resume: start from it with --config.init_from={workdir} and a new --workdir")


@contextlib.contextmanager
def prepared_workdir(workdir, config) -> Iterator[tuple[epath.Path, bool]]:
    """(workdir, is_main), before anything is written: refuses a parameters-only workdir and a
    resume whose config changes what the checkpoint holds (every process); takes the workdir lock
    and writes config.json atomically (process 0). The lock is released when the block exits, by
    any path (finished run, error, signal)."""
    from coordtok_jax.io.checkpoint import config_to_json
    from coordtok_jax.remote import check_reachable
    from coordtok_jax.train.workdir import Lock, WorkdirError, check_config, write_text_atomic

    check_reachable(workdir, "workdir")
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    refuse_params_only(workdir)
    requested = config_to_json(config)
    try:
        resolve_step(str(workdir))
        has_checkpoint = True
    except FileNotFoundError:
        has_checkpoint = False
    accepted = check_config(workdir, requested, has_checkpoint)
    if is_main:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}") from e
        lock = Lock(workdir).acquire()
        try:
            if accepted:
                print(f"{workdir}: resuming with changed settings: " + "; ".join(accepted))
            write_text_atomic(workdir / "config.json", json.dumps(requested, indent=2))
            yield workdir, is_main
        finally:
            lock.release()
    else:
        yield workdir, is_main


def finished(workdir: epath.Path, config) -> Optional[dict]:
    """A run already at config.total_steps: says so (and how to continue) and returns a summary,
    before anything is compiled or written (no new TensorBoard file); None otherwise."""
    try:
        _, step = resolve_step(str(workdir))
    except FileNotFoundError:
        return None
    if step < config.total_steps:
        return None
    if jax.process_index() == 0:
        print(f"{workdir} is already at step {step} (config.total_steps={config.total_steps}): nothing to train. "
              f"To train longer, run the same command with --config.total_steps=N, N > {step}.")
    return {"first_step": step, "last_step": step, "finished": True}


def every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def run(config, workdir: epath.Path, task: Task, *, peak_flops: Optional[float] = None) -> dict:
    """Trains until config.total_steps (or a signal); returns a summary dict."""
    is_main = jax.process_index() == 0

    # --- checkpoint / resume (restored straight into the plan's shardings) -------------------
    ckpt = Checkpointer(str(workdir), config.keep_last, config.keep_every)
    restored = ckpt.restore_latest(task.plan.abstract, task.data_iter, log=print if is_main else (lambda _: None))
    if restored is not None:
        state, start = restored
        if is_main:
            print(f"resumed from {workdir}/checkpoints/{start}")
    else:
        state = task.plan.create()
        if task.init is not None:
            state = task.init(state)
    first_step = int(state.step)

    # --- logging ----------------------------------------------------------------------------
    from coordtok_jax.train.workdir import Lock

    # held since prepared_workdir (which releases it); acquiring again checks this process holds it,
    # and gives the object refreshed at each log
    lock = Lock(workdir).acquire() if is_main else None
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(workdir / "tb"))

    def check_finite(where):
        bad = int(state.first_nonfinite)
        if bad >= 0:
            raise NonFiniteLoss(f"non-finite loss at step {bad + 1} ({where}); nothing past step {bad} was saved")

    stop = {"signal": None}

    def on_signal(signum, frame):
        del frame
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # --- loop -------------------------------------------------------------------------------
    from tqdm import tqdm

    bar = tqdm(total=config.total_steps, initial=first_step, unit="step", dynamic_ncols=True, disable=not is_main,
               file=sys.stdout, mininterval=1.0)
    summary = {"first_step": first_step}
    t_log, steps_since = time.perf_counter(), 0
    counters = {k: jnp.zeros((), jnp.int32) for k in task.counters}  # summed on device (no per-step sync)
    rate_key = f"{task.item_name}_per_s"
    step = first_step
    bad_files: set = set()
    try:
        while step < config.total_steps:
            local = next(task.data_iter)
            if "failed_records" in local:  # distinct bad files of this host (the count per clip is in the batch)
                bad_files.update(int(i) for i in np.ravel(local["failed_records"]) if i >= 0)
            state, metrics = task.step(state, task.global_batch(local))
            for k in counters:
                if k in metrics:
                    counters[k] = counters[k] + metrics[k]
            step += 1
            steps_since += 1
            bar.update(1)
            if step == first_step + 1:  # do not count compilation in the throughput
                jax.block_until_ready(state.step)
                t_log, steps_since = time.perf_counter(), 0

            if every(step, config.log_every) or step == config.total_steps:
                if lock is not None:
                    lock.refresh()
                ckpt.check()  # a failed asynchronous save stops the run here, with its cause
                metrics = jax.device_get(metrics)
                check_finite("log")
                dt = (time.perf_counter() - t_log) / max(steps_since, 1)
                scalars = {k: float(v) for k, v in metrics.items() if k not in counters}
                scalars.update(step_time=dt, **{rate_key: task.items_per_step / dt})
                if "decode_failures" in counters:  # loads that failed (a bad file drawn twice counts twice)
                    scalars["skipped_loads"] = int(counters["decode_failures"])
                    scalars["skipped_files"] = distinct_count(bad_files)
                if peak_flops and task.flops_per_step:
                    scalars["mfu"] = task.flops_per_step / dt / (peak_flops * jax.device_count())
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", **{rate_key[:3] + "_s": f"{scalars[rate_key]:.1f}"})
                if writer:
                    for k, v in scalars.items():
                        writer.add_scalar(f"train/{k}", v, step)
                summary["loss"] = scalars["loss"]
                t_log, steps_since = time.perf_counter(), 0

            if task.evaluate is not None and (every(step, config.eval_every) or step == config.total_steps):
                check_finite("eval")
                t_eval = time.perf_counter()
                results = task.evaluate(step, state)
                for k, v in results.items():
                    summary[f"eval_{k}"] = v
                    if writer:
                        writer.add_scalar(f"eval/{k}", v, step)
                if is_main and results:
                    bar.write(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
                t_log += time.perf_counter() - t_eval  # evals do not count in the training throughput

            if every(step, config.save_every) or step == config.total_steps or stop["signal"]:
                check_finite("save")
                ckpt.save(step, state, task.data_iter, config, force=True)

            if config.debug.kill_at_step and step == config.debug.kill_at_step:
                ckpt.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop["signal"]:
                bar.write(f"received signal {stop['signal']}: saved step {step}, exiting")
                summary["stopped_by_signal"] = int(stop["signal"])
                break
    finally:
        bar.close()
        ckpt.close()
        if writer:
            writer.close()
        for s, h in previous.items():
            signal.signal(s, h)
    summary.update(last_step=step, params=state.params, state=state)
    return summary
