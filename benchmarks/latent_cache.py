r"""SiT training input: encoding clips on the fly vs reading the latent cache, side by side.

    python benchmarks/latent_cache.py [--pairs=tiny:tiny,S:S/2] [--batch=8] [--steps=5]

For each tokenizer:SiT pair (configs/coordtok.py : configs/sit.py, random weights), one device:
* encode: the frozen tokenizer's jitted encode of one batch of uint8 clips (what encode_latents
  pays once per clip, and on-the-fly training pays every step);
* on-the-fly step: train_sit's fused step (encode + normalise + flow-matching loss + AdamW + EMA);
* cache step: the SiT step alone on latents (what a cached run pays on the device);
* cache read: host time per batch of the grain latent reader (data.latents) over a temporary
  cache of the pair's plane shapes (overlaps the device step in training);
* speedup = on-the-fly step / cache step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_PAIRS = flags.DEFINE_list("pairs", ["tiny:tiny", "S:S/2"], "tokenizer config : SiT size pairs.")
_BATCH = flags.DEFINE_integer("batch", 8, "Clips per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls after the compiling one.")


def _timed(fn, repeats):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return out, first, statistics.median(times)


def main(argv):
    del argv
    import coordtok
    import jax
    import jax.numpy as jnp
    import numpy as np
    import sit
    from flax import nnx

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.convert.torch_io import model_from_params
    from coordtok_jax.generation import latent_cache
    from coordtok_jax.data.shards import ShardWriter
    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.diffusion.latent_stats import normalize
    from coordtok_jax.models.coordtok import CoordTok
    from coordtok_jax.train.state import make_optimizer
    from coordtok_jax.diffusion.transport import make_transport
    from coordtok_jax.generation.frozen_tokenizer import check_plane_shapes
    from coordtok_jax.generation.train_sit import make_sit_update, sit_state

    dev = jax.devices()[0]
    B = _BATCH.value
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, batch {B}")
    print("| tokenizer : SiT | video | planes | encode ms | on-the-fly step ms | cache step ms | speedup | "
          "cache read ms/batch | KB/clip |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for pair in _PAIRS.value:
        tok_name, sit_name = pair.split(":")
        tok_config = coordtok.get_config(tok_name)
        rng = np.random.default_rng(0)
        abstract = nnx.eval_shape(lambda: CoordTok(tok_config.model, rngs=nnx.Rngs(0)))
        params = jax.tree.map(lambda x: (rng.standard_normal(x.shape) * 0.02).astype(np.float32),
                              nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
        tokenizer = model_from_params(params, tok_config.model)
        tok_graphdef, tok_params = nnx.split(tokenizer)
        g = tokenizer.geometry
        config = sit.get_config(sit_name)
        check_plane_shapes(config, g.plane_shapes, f"configs/coordtok.py:{tok_name}")

        def encode(tp, video, n):
            return nnx.merge(tok_graphdef, tp).encode(to_model_input(video, n, -3.0), n)

        video = jnp.asarray(rng.integers(0, 256, (B,) + tuple(g.video_shape) + (3,), dtype=np.uint8))
        n_frames = jnp.full((B,), g.video_shape[0], jnp.int32)
        enc = jax.jit(encode)
        planes, _, enc_s = _timed(lambda: enc(tok_params, video, n_frames), _STEPS.value)

        mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=[dev])
        tx = make_optimizer(config)
        c = config.model.in_channels
        mean, std = np.zeros((3, c)), np.ones((3, c))
        plan = sit_state(config, mesh, tx, (mean, std))
        graphdef, buffers, state = plan.graphdef, plan.buffers, plan.create()
        update = make_sit_update(graphdef, buffers, make_transport(config), tx, config.ema_decay)
        y = jnp.zeros((B,), jnp.int32)
        fused = jax.jit(lambda s, tp, v, n: update(s, normalize(encode(tp, v, n), s.latent_mean, s.latent_std), y))
        cached = jax.jit(lambda s, x: update(s, normalize(x, s.latent_mean, s.latent_std), y))
        holder = {"s": state}

        def run_fused():
            holder["s"], m = fused(holder["s"], tok_params, video, n_frames)
            return m

        def run_cached():
            holder["s"], m = cached(holder["s"], planes)
            return m

        _, _, fused_s = _timed(run_fused, _STEPS.value)
        _, _, cached_s = _timed(run_cached, _STEPS.value)

        with tempfile.TemporaryDirectory() as tmp:
            w = ShardWriter(tmp, latent_cache.shard_name(0, 1))
            host_planes = [np.asarray(z) for z in planes]
            n_records = 4 * B
            for k in range(n_records):
                w.write(latent_cache.encode_planes([z[k % B] for z in host_planes], -1, k))
            w.finish()
            kb = os.path.getsize(os.path.join(tmp, latent_cache.shard_name(0, 1))) / n_records / 1024
            meta = dict(plane_shapes=[list(s) for s in g.plane_shapes], num_clips=n_records, num_shards=1)
            with open(os.path.join(tmp, "metadata.json"), "w") as f:
                json.dump(meta, f)
            it = iter(latent_cache.make_latent_dataset(tmp, B, seed=0, process_index=0, process_count=1))
            next(it)
            start = time.perf_counter()
            reads = 10 * _STEPS.value
            for _ in range(reads):
                next(it)
            read_s = (time.perf_counter() - start) / reads
        shapes = " ".join("x".join(map(str, s)) for s in g.plane_shapes)
        print(f"| {tok_name} : {sit_name} | {'x'.join(map(str, g.video_shape))} | {shapes} | {enc_s * 1e3:.1f} | "
              f"{fused_s * 1e3:.1f} | {cached_s * 1e3:.1f} | {fused_s / cached_s:.1f}x | {read_s * 1e3:.2f} | "
              f"{kb:.1f} |", flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
