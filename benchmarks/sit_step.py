r"""SiT train step and sampling time (latents only; the frozen tokenizer's encode/decode excluded).

    python benchmarks/sit_step.py [--sizes=tiny,S/2] [--batch=8] [--steps=5] [--sample_steps=250]

Train step: flow-matching loss + AdamW + EMA on random normalised latents of the config's plane
shapes. Sampling: the official SDE schedule (Euler-Maruyama, --sample_steps model calls, last
step 0.04) for one batch. Runs on one device of whatever backend JAX has.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "S/2"], "configs/sit.py sizes.")
_BATCH = flags.DEFINE_integer("batch", 8, "Latents per step / videos per sampling call.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed train steps after the compiling one.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 250, "SDE steps (model calls) per sample.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import sit
    from flax import nnx

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.diffusion.samplers import make_sample_fn
    from coordtok_jax.models.sit import validate_sit
    from coordtok_jax.train.state import make_optimizer
    from coordtok_jax.diffusion.transport import make_transport
    from coordtok_jax.generation.train_sit import make_sit_update, sit_state

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, {_DTYPE.value}, "
          f"batch {_BATCH.value}")
    print("| config | params | tokens | step compile s | step ms (median) | latents/s | sample compile s | "
          f"sample s ({_SAMPLE_STEPS.value} steps) | s per video |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in _SIZES.value:
        config = sit.get_config(name)
        with config.unlocked():
            config.mesh.shape = (1, 1)
            config.model.dtype = _DTYPE.value
        g = validate_sit(config.model)
        mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=[dev])
        tx = make_optimizer(config)
        c = config.model.in_channels
        plan = sit_state(config, mesh, tx, (np.zeros((3, c)), np.ones((3, c))))
        graphdef, buffers, state = plan.graphdef, plan.buffers, plan.create()
        update = jax.jit(make_sit_update(graphdef, buffers, make_transport(config), tx, config.ema_decay),
                         donate_argnums=0)
        xy, t = config.model.latent_resolution_xy, config.model.latent_resolution_t
        shapes = ((xy, xy, c), (t, xy, c), (t, xy, c))
        rng = np.random.default_rng(0)
        x1 = tuple(jnp.asarray(rng.standard_normal((_BATCH.value,) + s).astype(np.float32)) for s in shapes)
        y = jnp.zeros((_BATCH.value,), jnp.int32)
        start = time.perf_counter()
        state, m = update(state, x1, y)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(_STEPS.value):
            start = time.perf_counter()
            state, m = update(state, x1, y)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
        dt = statistics.median(times)

        sample_fn = make_sample_fn(make_transport(config), None, mode="SDE", num_sampling_steps=_SAMPLE_STEPS.value)

        @jax.jit
        def generate(ema, key):
            model = nnx.merge(graphdef, ema, buffers)
            x0 = tuple(jax.random.normal(jax.random.fold_in(key, k), x.shape) for k, x in enumerate(x1))
            return sample_fn(lambda x, t: tuple(model(tuple(x), t, y)), x0, key)

        start = time.perf_counter()
        jax.block_until_ready(generate(state.ema, jax.random.key(0)))
        sample_first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(generate(state.ema, jax.random.key(1)))
        sample_s = time.perf_counter() - start
        n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
        print(f"| {name} | {n_params:,} | {sum(g.num_tokens)} | {compile_s:.1f} | "
              f"{dt * 1e3:.1f} | {_BATCH.value / dt:.1f} | {sample_first - sample_s:.1f} | {sample_s:.1f} | "
              f"{sample_s / _BATCH.value:.2f} |", flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
