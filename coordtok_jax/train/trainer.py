r"""Train CoordTok.

    python -m coordtok_jax.train --config=configs/coordtok.py:tiny --workdir=/tmp/coordtok_tiny
    python -m coordtok_jax.train --config=configs/coordtok.py:L,stage=1 --workdir=gs://BUCKET/coordtok_L_s1
    python -m coordtok_jax.train --config=configs/coordtok.py:L,stage=2 --workdir=gs://BUCKET/coordtok_L_s2 \
        --config.init_from=gs://BUCKET/coordtok_L_s1 --config.lpips.vgg_path=... --config.lpips.lin_path=...

Re-running the same command on the same workdir resumes from its latest checkpoint. The workdir
gets config.json, checkpoints/ (Orbax), tb/ (TensorBoard) and samples/ (original | reconstruction
mp4s and PSNR of held-out clips every eval_every steps).

Sections: distributed set-up, mesh, input, model + optimizer state (planned from abstract
shapes, created sharded), the step compiled ahead of time (its per-chip memory printed: the same
program and line as `python -m coordtok_jax.compile`), evaluation, loop (checkpoint/resume).
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from coordtok_jax import cli
from coordtok_jax import sharding as sharding_lib
from coordtok_jax.data.pipeline import ClipLoader, make_dataset
from coordtok_jax.data.sources import make_source
from coordtok_jax.data.video import to_model_input
from coordtok_jax.metrics.quality import video_psnr
from coordtok_jax.models import ConfigError, validate
from coordtok_jax.models.decode_video import decode_video
from coordtok_jax.train import aot
from coordtok_jax.train import flops as flops_lib
from coordtok_jax.train import loop
from coordtok_jax.io.checkpoint import restore_params
from coordtok_jax.train.state import make_optimizer, tokenizer_state
from coordtok_jax.train.step import step_program

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program, so importing this module defines no flags."""
    config_flags.DEFINE_config_file("config", None, "configs/coordtok.py:SIZE[,stage=N]", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs, samples (local or gs://). Re-use it to resume.")


def maybe_initialize_distributed(mode: str) -> None:
    """Join a multi-process JAX system when asked to.

    'auto' initialises on TPU VMs (they describe themselves), under SLURM with more than one task
    (JAX reads the SLURM variables), and when JAX_COORDINATOR_ADDRESS is set; in that case
    JAX_NUM_PROCESSES and JAX_PROCESS_ID (set by launch/multinode.sh) give the process layout.
    'on' always initialises (auto-detection), 'off' never.
    """
    if mode == "off" or jax.distributed.is_initialized():
        return
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
        return
    # A Cloud TPU VM (TPU devices present); JAX finds the other workers through the metadata server.
    on_tpu_pod = "TPU_WORKER_HOSTNAMES" in env or os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))
    on_slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    if mode == "on" or on_tpu_pod or on_slurm or "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize()


def validate_training_config(config, mesh, num_processes: int, weights: bool = True):
    """Checks the run against the mesh it will run on (this host's, or a TPU topology's for
    `compile`); returns the model geometry. ConfigError names the field. weights=False: the
    LPIPS weight files are not needed (`compile` uses the network's shapes only)."""
    geometry = validate(config.model)
    if config.stage not in (1, 2):
        raise ConfigError(f"config.stage must be 1 or 2, got {config.stage}")
    for name, lo in (("total_steps", 1), ("log_every", 1), ("save_every", 0), ("eval_every", 0)):
        v = config[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            zero = " (0 = only at the last step)" if lo == 0 else ""
            raise ConfigError(f"config.{name} must be an integer >= {lo}{zero}, got {v!r}")
    check_batch(config, mesh, num_processes)
    if config.stage == 2 and config.num_frames * geometry.dec_patch[0] > geometry.video_shape[0]:
        raise ConfigError(f"config.num_frames={config.num_frames} exceeds the clip's temporal patches")
    if weights and config.stage == 2 and config.lpips_weight > 0 and not (config.lpips.vgg_path and
                                                                          config.lpips.lin_path):
        raise ConfigError(
            "config.lpips_weight > 0 needs the LPIPS weights: set --config.lpips.vgg_path to torchvision's "
            "vgg16 ImageNet state_dict (vgg16-397923af.pth) and --config.lpips.lin_path to the LPIPS linear "
            "layers (vgg.pth), or --config.lpips_weight=0")
    return geometry


def check_batch(config, mesh, num_processes: int) -> None:
    """The global batch splits over processes, micro-batches and the mesh's batch axes."""
    accum = int(config.get("grad_accum_steps", 1))
    if config.batch_size % (num_processes * accum):
        raise ConfigError(f"config.batch_size={config.batch_size} must be divisible by processes ({num_processes}) x "
                          f"config.grad_accum_steps={accum}")
    shards = sharding_lib.batch_shards(mesh, sharding_lib.rules_of(config))
    micro = config.batch_size // accum
    if micro % shards:
        axes = dict(sharding_lib.rules_of(config))[sharding_lib.BATCH]
        raise ConfigError(f"config.batch_size / grad_accum_steps = {micro} must be divisible by the {shards} chips "
                          f"the batch is split over (mesh axes {axes} of config.mesh.shape={tuple(mesh.shape.values())})")


def load_lpips_network(config, abstract: bool = False):
    """(graphdef, state) of the frozen LPIPS network of stage 2 (None without LPIPS); abstract:
    shapes only (for compiling without the weight files)."""
    if not (config.stage == 2 and config.lpips_weight > 0):
        return None
    from coordtok_jax.metrics.lpips import LPIPS, load_lpips

    if abstract:  # random weights of the right shapes (60 MB on the host), kept as shapes only
        graphdef, state = nnx.split(LPIPS.random(jax.random.key(0)))
        return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return nnx.split(load_lpips(config.lpips.vgg_path, config.lpips.lin_path))


def build_step(config, mesh, *, abstract_lpips: bool = False):
    """(plan, optimizer, step program): what `train` runs and `compile` compiles."""
    tx = make_optimizer(config)
    plan = tokenizer_state(config, mesh, tx)
    return plan, tx, step_program(config, plan, tx, load_lpips_network(config, abstract_lpips))


def compile_step(program, is_main: bool):
    """Compiles the step ahead of time and prints its per-chip memory (the `compile` CLI's line)."""
    compiled, seconds = aot.compile_program(program)
    if is_main:
        hbm = aot.device_memory_gib(jax.devices()[0])
        print(aot.memory_line(program.name, aot.memory(compiled), hbm) + f"; compiled in {seconds:.1f} s", flush=True)
    return compiled


def _eval_clips(config, shape):
    """Held-out clips: the eval split of the source (synthetic: another seed), first eval_videos."""
    source = make_source(config.data, shape, train=False)
    load = ClipLoader(source, 0, 0, config.data.get("max_consecutive_failures", 64))  # a broken clip is named, replaced
    clips = [load(i, i) for i in range(min(config.eval_videos, len(source)))]
    return np.stack([c["video"] for c in clips]), np.array([c["n_frames"] for c in clips], np.int32)


def train(config, workdir: str) -> dict:
    # --- distributed, mesh, config, workdir ---------------------------------------------------
    maybe_initialize_distributed(config.distributed)
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    geometry = validate_training_config(config, mesh, jax.process_count())
    with loop.prepared_workdir(workdir, config) as (workdir, is_main):
        done = loop.finished(workdir, config)
        if done:
            return done
        logging.info("devices: %d (%s), processes: %d", jax.device_count(), jax.devices()[0].platform, jax.process_count())
        with jax.set_mesh(mesh):
            return _train(config, workdir, is_main, mesh, geometry)


def _train(config, workdir, is_main, mesh, geometry) -> dict:
    # --- input ------------------------------------------------------------------------------
    local_batch = config.batch_size // jax.process_count()
    data_iter = iter(make_dataset(config.data, geometry.video_shape, local_batch))

    # --- model + optimizer state plan (sharded from abstract shapes), step compiled ahead -----
    plan, tx, program = build_step(config, mesh)
    lpips_state = program.args[2]
    if lpips_state is not None:
        lpips_state = jax.device_put(load_lpips_network(config)[1], sharding_lib.replicated(mesh))
    compiled = compile_step(program, is_main)
    batch_sh = {k: v.sharding for k, v in program.args[1].items()}

    def init(fresh):  # no checkpoint in workdir yet: optionally start from another run's parameters
        if not config.init_from:
            return fresh
        params, from_step = restore_params(config.init_from, plan.abstract.params)
        if is_main:
            print(f"initialised parameters from {config.init_from} (step {from_step}); fresh optimizer")
        return fresh.replace(params=params)  # fresh optimizer (official stage 2)

    # --- evaluation: every patch of held-out clips, batch split over the mesh ----------------
    eval_frames, eval_n = _eval_clips(config, geometry.video_shape) if config.eval_videos > 0 else (None, None)
    replicated = sharding_lib.replicated(mesh)

    def _eval(params, frames, n):
        model = plan.model(params)
        planes = model.encode(to_model_input(frames, n, config.data.pad_value), n)
        video = decode_video(model, planes, points_per_call=config.eval_points_per_call)
        return jnp.clip((video + 1) / 2, 0, 1)

    eval_fn = jax.jit(_eval, out_shardings=replicated)

    def evaluate(step, state):
        recon = np.asarray(eval_fn(state.params, eval_frames, eval_n))
        target = eval_frames.astype(np.float32) / 255.0
        psnr = float(np.asarray(video_psnr(recon, target, eval_n)).mean())
        if is_main:
            write_eval_pictures(workdir, step, eval_frames, eval_n, recon, psnr)
        return {"psnr": psnr}

    # --- loop (checkpoints, resume, logging, signals: train/loop.py) ------------------------
    task = loop.Task(
        plan=plan, step=lambda s, b: compiled(s, b, lpips_state), data_iter=data_iter,
        global_batch=lambda local: {k: jax.make_array_from_process_local_data(batch_sh[k], local[k]) for k in batch_sh},
        items_per_step=config.batch_size, flops_per_step=program.flops, init=init,
        evaluate=evaluate if config.eval_videos > 0 else None)
    summary = loop.run(config, workdir, task,
                       peak_flops=flops_lib.peak_flops(jax.devices()[0], config.peak_flops_per_device))
    if is_main:
        print(where_to_look(workdir, summary, config))
    return summary


def write_eval_pictures(workdir, step: int, frames: np.ndarray, n_frames: np.ndarray, recon: np.ndarray,
                        psnr: float) -> None:
    """samples/step_N.mp4 (original | reconstruction, clips stacked), samples/step_N.png (a
    contact sheet of a few frames per clip) and psnr.png (held-out PSNR against step, from
    samples/psnr.json). Frames past a clip's length show the original's padding on both sides."""
    import json

    from coordtok_jax import pictures
    from coordtok_jax.data.video_io import write_video
    from coordtok_jax.train.workdir import write_text_atomic

    valid = np.arange(frames.shape[1])[None, :] < np.asarray(n_frames)[:, None]
    shown = np.where(valid[:, :, None, None, None], (recon * 255 + 0.5).astype(np.uint8), frames)
    samples = workdir / "samples"
    side = np.concatenate([frames, shown], axis=3)  # (B, T, H, 2W, 3)
    write_video(samples / f"step_{step:08d}.mp4", np.concatenate(list(side), axis=1))  # clips stacked vertically
    pictures.contact_sheet(frames, shown, n_frames, samples / f"step_{step:08d}.png")
    history_file = samples / "psnr.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    history = [h for h in history if h[0] < step] + [[step, psnr]]  # a resumed run rewrites what it repeats
    write_text_atomic(history_file, json.dumps(history))
    pictures.line_plot([("held-out PSNR", [h[0] for h in history], [h[1] for h in history])], workdir / "psnr.png",
                       title=f"held-out PSNR (dB), {len(frames)} clips, every patch decoded", xlabel="step")


def where_to_look(workdir, summary: dict, config) -> str:
    """The end-of-run message: the final numbers and the files to open."""
    step = summary["last_step"]
    if "stopped_by_signal" in summary:
        return f"stopped at step {step} (saved): re-run the same command to resume"
    lines = [f"done: step {step}" + (f", held-out PSNR {summary['eval_psnr']:.2f} dB ({config.eval_videos} clips, "
                                     "every patch decoded)" if "eval_psnr" in summary else "")]
    if "eval_psnr" in summary:
        lines += [f"  samples:     {workdir}/samples/step_{step:08d}.mp4 and .png (original | reconstruction)",
                  f"  PSNR curve:  {workdir}/psnr.png"]
    lines += [f"  TensorBoard: tensorboard --logdir {workdir}/tb",
              f"  checkpoints: {workdir}/checkpoints (re-run the same command to resume; "
              "--config.total_steps=N to train longer)"]
    return "\n".join(lines)


def main(argv):
    train(FLAGS.config, FLAGS.workdir)


def run():
    cli.run(__name__, define_flags, main, required=("config", "workdir"), log_level="warning")
