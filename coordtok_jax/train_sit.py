r"""Train the triplane SiT on a frozen CoordTok's latents.

    python -m coordtok_jax.train_sit --config=configs/sit.py:tiny --config.tokenizer=TOKENIZER_WORKDIR \
        --workdir=DIR

Sections as the tokenizer trainer, whose loop it reuses (train/loop.py: resume, logging, Orbax
saves of state + grain iterator + config, signals, NaN guard): mesh, frozen tokenizer, input,
latent statistics, SiT state (created sharded), step, loop.

* Latents are encoded on the fly by the frozen tokenizer (its latest checkpoint in
  config.tokenizer, replicated) from the tokenizer's data pipeline.
* Latent statistics (per plane and channel mean / std over config.stats_num_clips clips, pooled
  exactly over devices and hosts) are computed once, saved as WORKDIR/latent_stats.json and
  carried in the train state, so every checkpoint holds them.
* Step: normalise the planes, the transport's flow-matching loss (official: linear path,
  velocity prediction, t ~ U[0, 1)), AdamW (lr 1e-4, no weight decay), EMA 0.9999 of the
  parameters every step (initialised to the model). Sampling uses the EMA.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.data.pipeline import make_dataset, make_sampled_dataset
from coordtok_jax.data.video import to_model_input
from coordtok_jax.diffusion.latent_stats import LatentStats, load_stats, normalize, save_stats
from coordtok_jax.diffusion.transport import Transport
from coordtok_jax.evaluate.loading import load_tokenizer
from coordtok_jax.models import ConfigError
from coordtok_jax.models.sit import TriplaneSiT, validate_sit
from coordtok_jax.train import loop
from coordtok_jax.train.checkpoint import config_to_json
from coordtok_jax.train.loop import NonFiniteLoss
from coordtok_jax.train.state import opt_state_shardings, param_shardings, make_optimizer
from coordtok_jax.train.trainer import maybe_initialize_distributed

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


def make_transport(config) -> Transport:
    t = config.transport
    return Transport(path=str(t.path).lower(), prediction=str(t.prediction).lower(), loss_weight=t.loss_weight,
                     train_eps=t.train_eps, sample_eps=t.sample_eps)


def split_sit(config):
    """(graphdef, abstract Param tree (pure dict), constant buffers state, abstract model)."""
    build = lambda: TriplaneSiT(config.model, rngs=nnx.Rngs(config.seed))
    abstract = nnx.eval_shape(build)
    graphdef, params, buffers = nnx.split(abstract, nnx.Param, ...)
    concrete = nnx.state(nnx.jit(build)(), nnx.Not(nnx.Param))  # the fixed sin-cos table
    return graphdef, nnx.to_pure_dict(params), concrete, abstract, build


def create_sit_state(config, mesh, tx, stats):
    """(graphdef, buffers, state, state_shardings), built directly in the shardings."""
    graphdef, abstract_params, buffers, abstract, build = split_sit(config)
    param_sh = param_shardings(abstract_params, abstract, mesh, config.logical_axis_rules)
    mean, std = (jnp.asarray(a, jnp.float32) for a in stats)

    def init():
        params = nnx.to_pure_dict(nnx.state(build(), nnx.Param))
        return SiTState(step=jnp.zeros((), jnp.int32), params=params, ema=params, opt_state=tx.init(params),
                        rng=jax.random.PRNGKey(config.seed), first_nonfinite=jnp.full((), -1, jnp.int32),
                        latent_mean=mean, latent_std=std)

    abstract_state = jax.eval_shape(init)
    replicated = NamedSharding(mesh, P())
    state_sh = SiTState(
        step=replicated, params=param_sh, ema=param_sh,
        opt_state=opt_state_shardings(abstract_state.opt_state, abstract_params, param_sh, replicated),
        rng=replicated, first_nonfinite=replicated, latent_mean=replicated, latent_std=replicated)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=state_sh)()
    return graphdef, jax.device_put(buffers, replicated), state, state_sh


def make_sit_update(graphdef, buffers, transport: Transport, tx, ema_decay: float):
    """(state, x1 normalised planes, y labels) -> (state, metrics): loss, grads, AdamW, EMA."""

    def update(state: SiTState, x1, y):
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params, buffers)
            out = transport.training_losses(lambda xt, t, y: tuple(model(tuple(xt), t, y)), tuple(x1), key,
                                            model_kwargs={"y": y})
            return jnp.mean(out["loss"])

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, step_size=1.0 - ema_decay)
        bad = ~jnp.isfinite(loss)
        first = jnp.where((state.first_nonfinite < 0) & bad, state.step, state.first_nonfinite)
        new = state.replace(step=state.step + 1, params=params, ema=ema, opt_state=opt_state, first_nonfinite=first)
        return new, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return update


def _labels(config, label):
    """Official unconditional model: every label is 0; class-conditional: the dataset's labels."""
    if config.model.num_classes <= 1:
        return jnp.zeros_like(label)
    return jnp.clip(label, 0, config.model.num_classes - 1)


def train_sit(config, workdir: str) -> dict:
    # --- distributed, config, workdir -------------------------------------------------------
    maybe_initialize_distributed(config.get("distributed", "auto"))
    validate_sit(config.model)
    if not config.tokenizer:
        raise ConfigError("config.tokenizer must name the tokenizer's workdir (a trainer run or a torch-import)")
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
    loop.refuse_params_only(workdir)

    # --- mesh -------------------------------------------------------------------------------
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes)
    batch_sharding = NamedSharding(mesh, P(tuple(config.mesh.axes)))
    replicated = NamedSharding(mesh, P())

    # --- frozen tokenizer -------------------------------------------------------------------
    tokenizer, tok_config, tok_step = load_tokenizer(config.tokenizer, sharding=replicated)
    g = tokenizer.geometry
    want = ((config.model.latent_resolution_xy,) * 2 + (config.model.in_channels,),
            (config.model.latent_resolution_t, config.model.latent_resolution_xy, config.model.in_channels))
    if g.plane_shapes[0] != want[0] or g.plane_shapes[1] != want[1]:
        raise ConfigError(f"the tokenizer in {config.tokenizer} makes planes {g.plane_shapes[:2]}, config.model "
                          f"expects xy {want[0]} and yt/xt {want[1]} (latent_resolution_xy/t, in_channels)")
    tok_graphdef, tok_params = nnx.split(tokenizer)
    pad_value = float(tok_config.data.get("pad_value", -3.0))

    def encode(tok_params, video, n_frames):
        model = nnx.merge(tok_graphdef, tok_params)
        return model.encode(to_model_input(video, n_frames, pad_value), n_frames)

    # --- input ------------------------------------------------------------------------------
    local_batch = config.batch_size // jax.process_count()
    data_iter = iter(make_dataset(config.data, g.video_shape, local_batch))
    keys = ("video", "n_frames", "label")

    def global_batch(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k])) for k in keys}

    # --- latent statistics (once per run; also carried in every checkpoint) ----------------
    stats_path = workdir / "latent_stats.json"
    if stats_path.exists():
        stats = load_stats(stats_path)
    else:
        stats = latent_statistics(config, g, tok_params, encode, global_batch, local_batch, replicated, is_main)
        if is_main:
            save_stats(stats, stats_path)
            print(f"latent statistics over {stats.clips} clips -> {stats_path}")
        stats = (stats.mean, stats.std)

    # --- SiT state (created sharded) and step -----------------------------------------------
    tx = make_optimizer(config)
    graphdef, buffers, state, state_sh = create_sit_state(config, mesh, tx, stats)
    update = make_sit_update(graphdef, buffers, make_transport(config), tx, config.ema_decay)

    def step_fn(state, tok_params, batch):
        planes = jax.lax.stop_gradient(encode(tok_params, batch["video"], batch["n_frames"]))
        x1 = normalize(planes, state.latent_mean, state.latent_std)
        return update(state, x1, _labels(config, batch["label"]))

    batch_sh = {k: batch_sharding for k in keys}
    train_step = jax.jit(step_fn, in_shardings=(state_sh, replicated, batch_sh),
                         out_shardings=(state_sh, replicated), donate_argnums=0)

    # --- loop (train/loop.py) ---------------------------------------------------------------
    if is_main:
        print(f"SiT {config.get('size', '')} on tokenizer {config.tokenizer} (step {tok_step}): "
              f"{sum(int(x.size) for x in jax.tree.leaves(state.params)):,} parameters")
    task = loop.Task(state=state, state_sharding=state_sh, step=lambda s, b: train_step(s, tok_params, b),
                     data_iter=data_iter, global_batch=global_batch, items_per_step=config.batch_size,
                     counters=())
    return loop.run(config, workdir, task)


def latent_statistics(config, geometry, tok_params, encode, global_batch, local_batch, replicated, progress):
    """Per plane / channel stats of the tokenizer's planes over >= config.stats_num_clips random
    training clips (whole global batches). The planes are gathered replicated, so every host
    accumulates the same global batches: the result is exact and identical on all hosts."""
    from tqdm import tqdm

    n_batches = max(1, -(-int(config.stats_num_clips) // config.batch_size))
    clips = make_sampled_dataset(config.data, geometry.video_shape, n_batches * config.batch_size, local_batch,
                                 seed=config.seed + 1, train=True)
    enc = jax.jit(encode, out_shardings=replicated)
    stats = LatentStats(config.model.in_channels)
    for b in tqdm(clips, total=n_batches, unit="batch", desc="latent stats", disable=not progress):
        batch = global_batch({**b, "label": np.zeros(len(b["n_frames"]), np.int32)})
        stats.update([np.asarray(z) for z in enc(tok_params, batch["video"], batch["n_frames"])])
    stats.clips = n_batches * config.batch_size
    return stats


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required (see --help)")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        train_sit(FLAGS.config, FLAGS.workdir)
    except (ConfigError, NonFiniteLoss, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    define_flags()
    app.run(main)


if __name__ == "__main__":
    define_flags()
    flags.adopt_module_key_flags(sys.modules[__name__])
    app.run(main)
