r"""Train the triplane SiT on a frozen CoordTok's latents.

    python -m coordtok_jax.train_sit --config=configs/sit.py:tiny --config.tokenizer=TOKENIZER_WORKDIR \
        --workdir=DIR

Sections as the tokenizer trainer, whose loop it reuses (train/loop.py: resume, logging, Orbax
saves of state + grain iterator + config, signals, NaN guard): mesh, frozen tokenizer, input,
latent statistics, SiT state (planned from abstract shapes by the shared builder, created
sharded), step (compiled ahead of time, its per-chip memory printed as `compile` does), loop.

* Latents are encoded on the fly by the frozen tokenizer (its latest checkpoint in
  config.tokenizer, sharded by the same rules as the SiT) from the tokenizer's data pipeline, or
  read from a latent cache
  (--config.latents=DIR written by `python -m coordtok_jax.encode_latents`; its data config
  and tokenizer are adopted, and the tokenizer is loaded only for the sampling evals).
* Latent statistics (per plane and channel mean / std over config.stats_num_clips clips, pooled
  exactly over devices and hosts) are computed once, saved as WORKDIR/latent_stats.json and
  carried in the train state, so every checkpoint holds them.
* Step: normalise the planes, the transport's flow-matching loss (official: linear path,
  velocity prediction, t ~ U[0, 1)), AdamW (lr 1e-4, no weight decay), EMA 0.9999 of the
  parameters every step (initialised to the model). Sampling uses the EMA.
* Every config.eval_every steps: config.eval_num_videos samples from the EMA (fixed noise) ->
  WORKDIR/samples/step_0000000N.gif, the sampled normalised latents' std, and gFVD with config.eval_i3d.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from flax import nnx
from ml_collections import config_flags

from coordtok_jax import cli
from coordtok_jax import sharding as sharding_lib
from coordtok_jax.generation.latent_cache import DATA_IO_KEYS, make_latent_dataset, make_sampled_latents, read_metadata
from coordtok_jax.data.pipeline import make_dataset, make_sampled_dataset
from coordtok_jax.diffusion.latent_stats import LatentStats, compute_latent_stats, load_stats, normalize, save_stats
from coordtok_jax.diffusion.transport import Transport, make_transport
from coordtok_jax.generation.frozen_tokenizer import FrozenTokenizer, check_plane_shapes, frozen_tokenizer
from coordtok_jax.models import ConfigError
from coordtok_jax.models.sit import PLANES, TriplaneSiT, validate_sit
from coordtok_jax.train import flops as flops_lib
from coordtok_jax.train import loop
from coordtok_jax.train.aot import Program
from coordtok_jax.io.checkpoint import config_to_json
from coordtok_jax.train.state import StatePlan, make_optimizer, plan_state
from coordtok_jax.train.trainer import compile_step, maybe_initialize_distributed

FLAGS = flags.FLAGS


@flax.struct.dataclass
class SiTState:
    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array
    first_nonfinite: jax.Array
    latent_mean: jax.Array  # (3, C)
    latent_std: jax.Array  # (3, C)


def define_flags():
    config_flags.DEFINE_config_file("config", None, "configs/sit.py:SIZE", lock_config=True)
    flags.DEFINE_string("workdir", None, "Checkpoints, logs, latent_stats.json (local or gs://). Re-use it to resume.")


def sit_state(config, mesh, tx, stats=None) -> StatePlan:
    """The SiT trainer's state plan: the shared builder (train/state.py) with the EMA (sharded like
    the parameters) and the latent statistics (replicated; None = zeros, for `compile`)."""
    rules = sharding_lib.rules_of(config)
    c = config.model.in_channels
    mean, std = (np.zeros((3, c), np.float32), np.ones((3, c), np.float32)) if stats is None else stats

    def make(params, opt_state):
        return SiTState(step=jnp.zeros((), jnp.int32), params=params, ema=params, opt_state=opt_state,
                        rng=jax.random.PRNGKey(config.seed), first_nonfinite=jnp.full((), -1, jnp.int32),
                        latent_mean=jnp.asarray(mean, jnp.float32), latent_std=jnp.asarray(std, jnp.float32))

    build = lambda: TriplaneSiT(config.model, rngs=nnx.Rngs(config.seed), axis_rules=rules)
    return plan_state(build, mesh, rules, tx, make)


def make_sit_update(graphdef, buffers, transport: Transport, tx, ema_decay: float):
    """(state, x1 normalised planes, y labels) -> (state, metrics): loss, grads, AdamW, EMA."""

    def update(state: SiTState, x1, y):
        key = jax.random.fold_in(state.rng, state.step)
        drop_key = jax.random.fold_in(key, 1)  # label dropout (class_dropout_prob > 0: the CFG null class)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, buffers)
            out = transport.training_losses(
                lambda xt, t, y: tuple(model(tuple(xt), t, y, train=True, dropout_key=drop_key)), tuple(x1), key,
                model_kwargs={"y": y})
            return jnp.mean(out["loss"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, step_size=1.0 - ema_decay)
        bad = ~jnp.isfinite(loss)
        first = jnp.where((state.first_nonfinite < 0) & bad, state.step, state.first_nonfinite)
        new = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state, first_nonfinite=first)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return update


def _labels(config, label):
    """Official unconditional model: every label is 0; class-conditional: the dataset's labels."""
    if config.model.num_classes <= 1:
        return jnp.zeros_like(label)
    return jnp.clip(label, 0, config.model.num_classes - 1)


def step_program(config, plan: StatePlan, tx, tokenizer: Optional[FrozenTokenizer]) -> Program:
    """The SiT train step as the trainer runs it and `compile` compiles it (state donated, batch
    split by 'activation_batch'): with a frozen tokenizer, (state, tokenizer params, {'video',
    'n_frames', 'label'}) encoding clips on the fly; without, (state, {'xy', 'yt', 'xt', 'label'})
    from the latent cache."""
    mesh, rules = plan.mesh, sharding_lib.rules_of(config)
    update = make_sit_update(plan.graphdef, plan.buffers, make_transport(config), tx, config.ema_decay)
    b = int(config.batch_size)
    if tokenizer is None:
        shapes = {name: ((b,) + tuple(shape), np.float32)
                  for name, shape in zip(PLANES, validate_sit(config.model).plane_shapes)}
    else:
        shapes = {"video": ((b,) + tuple(tokenizer.geometry.video_shape) + (3,), np.uint8),
                  "n_frames": ((b,), np.int32)}
    shapes["label"] = ((b,), np.int32)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.batch_sharding(mesh, rules, shape))
             for k, (shape, dtype) in shapes.items()}
    batch_sh = {k: v.sharding for k, v in batch.items()}
    replicated = sharding_lib.replicated(mesh)
    flops = flops_lib.sit_train_flops_per_step(config, None if tokenizer is None else tokenizer.config.model)

    if tokenizer is None:
        def step_fn(state, batch):
            x1 = normalize((batch["xy"], batch["yt"], batch["xt"]), state.latent_mean, state.latent_std)
            return update(state, x1, _labels(config, batch["label"]))

        jitted = jax.jit(step_fn, in_shardings=(plan.shardings, batch_sh), out_shardings=(plan.shardings, replicated),
                         donate_argnums=0)
        return Program("sit_train_step", jitted, (plan.abstract, batch), mesh, flops)

    def step_fn(state, tok_params, batch):
        planes = jax.lax.stop_gradient(tokenizer.encode(tok_params, batch["video"], batch["n_frames"]))
        x1 = normalize(planes, state.latent_mean, state.latent_std)
        return update(state, x1, _labels(config, batch["label"]))

    tok_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                tokenizer.params)
    tok_sh = jax.tree.map(lambda x: x.sharding, tok_abstract)
    jitted = jax.jit(step_fn, in_shardings=(plan.shardings, tok_sh, batch_sh),
                     out_shardings=(plan.shardings, replicated), donate_argnums=0)
    return Program("sit_train_step", jitted, (plan.abstract, tok_abstract, batch), mesh, flops)


def _adopt_cache(config):
    """Cache mode: a copy of config whose data (and, if unset, tokenizer) are the cache's, so
    config.json says what the SiT was trained on; checks the planes."""
    meta = read_metadata(config.latents)
    check_plane_shapes(config, meta["plane_shapes"], f"the latent cache {config.latents}")
    io = {k: config.data[k] for k in DATA_IO_KEYS if k in config.data}  # this run's reader settings
    config = ml_collections.ConfigDict(config_to_json(config))
    if config.tokenizer and str(config.tokenizer) != meta["tokenizer"]:
        logging.warning("config.tokenizer=%s, but the cache %s was encoded by %s (step %s): sampling and evals "
                        "use config.tokenizer", config.tokenizer, config.latents, meta["tokenizer"],
                        meta["tokenizer_step"])
    config.tokenizer = config.tokenizer or meta["tokenizer"]
    config.data = ml_collections.ConfigDict({**meta["data"], **io})
    return config, meta


def validate_sit_config(config, mesh, num_processes: int) -> None:
    """Checks a SiT run against the mesh it will run on; ConfigError names the field."""
    from coordtok_jax.train.trainer import check_batch

    validate_sit(config.model)
    if config.eval_every > 0 and config.eval_num_videos <= 0:
        raise ConfigError(f"config.eval_num_videos must be positive when config.eval_every > 0, "
                          f"got {config.eval_num_videos}")
    check_batch(config, mesh, num_processes)


def check_labels(config, labels) -> None:
    """A class-conditional SiT (config.model.num_classes > 1) trains on labels in [0, num_classes):
    a clip without a label (-1) or with one out of range is a ConfigError naming where the labels
    come from (the unconditional official model ignores labels)."""
    k = int(config.model.num_classes)
    labels = np.asarray(labels)
    bad = labels[(labels < 0) | (labels >= k)] if k > 1 else labels[:0]
    if bad.size:
        unlabelled_synthetic = config.data.source == "synthetic" and not config.data.get("synthetic_labels", False)
        if config.get("latents"):
            where = f"the latent cache {config.latents}"
            hint = ": encode it again with configs/sit.py:SIZE,classes=shapes" if unlabelled_synthetic else ""
        else:
            where = f"config.data (source {config.data.source!r})"
            hint = (": set config.data.synthetic_labels=True (configs/sit.py:SIZE,classes=shapes)"
                    if unlabelled_synthetic else "")
        raise ConfigError(f"config.model.num_classes={k} needs every clip's label in [0, {k}), but {where} gave "
                          f"label {int(bad[0])}{hint}")


def train_sit(config, workdir: str) -> dict:
    # --- distributed, mesh, config, workdir -------------------------------------------------
    maybe_initialize_distributed(config.get("distributed", "auto"))
    cache = bool(config.get("latents"))
    if not cache and not config.tokenizer:
        raise ConfigError("config.tokenizer must name the tokenizer's workdir (a trainer run or a torch-import), "
                          "or config.latents a latent cache (coordtok_jax.encode_latents)")
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    validate_sit_config(config, mesh, jax.process_count())
    if cache:
        config, meta = _adopt_cache(config)
    if config.data.source == "synthetic" and not config.data.get("synthetic_labels", False):
        check_labels(config, [-1])  # unlabelled synthetic clips: refused before anything is loaded
    with loop.prepared_workdir(workdir, config) as (workdir, is_main):
        done = loop.finished(workdir, config)
        if done:
            return done
        with jax.set_mesh(mesh):
            return _train_sit(config, workdir, is_main, mesh, cache)


def _train_sit(config, workdir, is_main, mesh, cache: bool) -> dict:
    local_batch = config.batch_size // jax.process_count()

    # --- frozen tokenizer (on-the-fly encoding, and in-loop sampling evals) -----------------
    tok = None
    if not cache or config.eval_every > 0:
        tok = frozen_tokenizer(config, mesh)

    # --- input: clips encoded on the fly, or the latent cache --------------------------------
    if cache:
        data_iter = iter(make_latent_dataset(config.latents, local_batch, seed=config.data.seed,
                                             data_options=config.data))
    else:
        data_iter = iter(make_dataset(config.data, tok.geometry.video_shape, local_batch))
    rules = sharding_lib.rules_of(config)

    def global_batch(local):
        check_labels(config, local["label"])
        return {k: jax.make_array_from_process_local_data(sharding_lib.batch_sharding(mesh, rules, np.shape(v)),
                                                          np.asarray(v))
                for k, v in local.items() if k in keys}

    # --- latent statistics (once per run; also carried in every checkpoint) ----------------
    keys = ("xy", "yt", "xt", "label") if cache else ("video", "n_frames", "label")
    stats_path = workdir / "latent_stats.json"
    if stats_path.exists():
        stats = load_stats(stats_path)
    else:
        if cache:
            stats = cached_latent_statistics(config, local_batch, is_main)
        else:
            stats = latent_statistics(config, tok, global_batch, local_batch, is_main)
        if is_main:
            save_stats(stats, stats_path)
            print(f"latent statistics over {stats.clips} clips -> {stats_path}")
        stats = (stats.mean, stats.std)

    # --- SiT state (planned from abstract shapes, created sharded), step compiled ahead ------
    tx = make_optimizer(config)
    plan = sit_state(config, mesh, tx, stats)
    program = step_program(config, plan, tx, None if cache else tok)
    compiled = compile_step(program, is_main)
    step = compiled if cache else (lambda s, b: compiled(s, tok.params, b))

    # --- evals: samples from the EMA (grid gif, sampled latent spread, gFVD) ---------------
    evaluate = None
    if config.eval_every > 0:
        evaluate = sampling_eval(config, workdir, plan.graphdef, plan.buffers, tok, sharding_lib.replicated(mesh),
                                 is_main)

    # --- loop (train/loop.py) ---------------------------------------------------------------
    if is_main:
        what = f"the latent cache {config.latents}" if cache else f"tokenizer {config.tokenizer} (step {tok.step})"
        n = sum(int(x.size) for x in jax.tree.leaves(plan.abstract.params))
        print(f"SiT {config.get('size', '')} on {what}: {n:,} parameters")
    task = loop.Task(plan=plan, step=step, data_iter=data_iter, global_batch=global_batch,
                     items_per_step=config.batch_size, flops_per_step=program.flops, evaluate=evaluate, counters=())
    summary = loop.run(config, workdir, task, peak_flops=flops_lib.peak_flops(jax.devices()[0]))
    if is_main:
        print(where_to_look(workdir, summary))
    return summary


def where_to_look(workdir, summary: dict) -> str:
    """The end-of-run message of the SiT trainer."""
    step = summary["last_step"]
    if "stopped_by_signal" in summary:
        return f"stopped at step {step} (saved): re-run the same command to resume"
    lines = [f"done: step {step}" + (f", sampled latent std {summary['eval_sample_latent_std']:.3f} (1 = calibrated)"
                                     if "eval_sample_latent_std" in summary else "")]
    if "eval_sample_latent_std" in summary:
        lines.append(f"  samples:     {workdir}/samples/step_{step:08d}.gif")
    lines += [f"  TensorBoard: tensorboard --logdir {workdir}/tb",
              f"  more videos: python -m coordtok_jax.sample --workdir={workdir} --output={workdir}/videos"]
    return "\n".join(lines)


def latent_statistics(config, tok: FrozenTokenizer, global_batch, local_batch, progress):
    """Per plane / channel stats of the tokenizer's planes over >= config.stats_num_clips random
    training clips (whole global batches). The planes are gathered replicated, so every host
    accumulates the same global batches: the result is exact and identical on all hosts."""
    from tqdm import tqdm

    n_batches = max(1, -(-int(config.stats_num_clips) // config.batch_size))
    clips = make_sampled_dataset(config.data, tok.geometry.video_shape, n_batches * config.batch_size, local_batch,
                                 seed=config.seed + 1, train=True)
    enc = jax.jit(tok.encode, out_shardings=sharding_lib.replicated(jax.sharding.get_mesh()))
    stats = LatentStats(config.model.in_channels)
    for b in tqdm(clips, total=n_batches, unit="batch", desc="latent stats", disable=not progress):
        batch = global_batch({**b, "label": np.zeros(len(b["n_frames"]), np.int32)})
        stats.update([np.asarray(z) for z in enc(tok.params, batch["video"], batch["n_frames"])])
    stats.clips = n_batches * config.batch_size
    return stats


def cached_latent_statistics(config, local_batch, progress) -> LatentStats:
    """The same statistics from config.stats_num_clips random records of the latent cache: each
    host reads its share, the float64 accumulators are summed over hosts (exact)."""
    per_host = -(-int(config.stats_num_clips) // jax.process_count())
    batches = make_sampled_latents(config.latents, config.stats_num_clips, local_batch, seed=config.seed + 1,
                                   data_options=config.data)
    stats = compute_latent_stats(lambda b: (b["xy"], b["yt"], b["xt"]), batches, per_host,
                                 config.model.in_channels, progress=progress)
    stats.clips = per_host * jax.process_count()
    return stats


def sampling_eval(config, workdir, graphdef, buffers, tok, replicated, is_main):
    """(step, state) -> scalars: config.eval_num_videos videos sampled from the EMA with the
    configured sampler (config.eval_sampler_steps steps), decoded; WORKDIR/samples/step_0000000N.gif;
    'sample_latent_std' (the generated normalised planes' std, ~1 when calibrated) and, with
    config.eval_i3d, 'gfvd' against as many random real clips of config.data."""
    from coordtok_jax.generation.sample import GeneratedFVD, make_generator, write_grid_gif

    n = int(config.eval_num_videos)
    batch = max(1, min(n, int(config.batch_size)))
    generate = make_generator(config, graphdef, buffers, tok.graphdef, tok.geometry, batch,
                              steps=config.get("eval_sampler_steps") or None, out_sharding=replicated)
    fvd = GeneratedFVD(config, config.eval_i3d, n, seed=config.seed) if config.get("eval_i3d") else None
    key = jax.random.key(config.seed + 2)  # the same noise every eval: samples comparable across steps

    def evaluate(step, state):
        videos, spread = [], []
        for i in range(-(-n // batch)):
            v, sd = generate(state.ema, tok.params, state.latent_mean, state.latent_std, jax.random.fold_in(key, i))
            videos.append(np.asarray(v))
            spread.append(float(sd))
        videos = np.concatenate(videos)[:n]
        if is_main:
            (workdir / "samples").mkdir(parents=True, exist_ok=True)
            write_grid_gif(videos[:16], workdir / "samples" / f"step_{step:08d}.gif", fps=8)
        scalars = {"sample_latent_std": float(np.mean(spread))}
        if fvd is not None:
            scalars["gfvd"] = fvd(videos)
        return scalars

    return evaluate


def main(argv):
    train_sit(FLAGS.config, FLAGS.workdir)


def run():
    cli.run(__name__, define_flags, main, required=("config", "workdir"), log_level="warning")
