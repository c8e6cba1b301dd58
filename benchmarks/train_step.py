r"""Train-step throughput: step time, videos/s, MFU and peak memory.

    python benchmarks/train_step.py [--sizes=tiny,medium] [--steps=5] [--batch=0] [--dtype=float32]
        [--remat=none] [--attention=default] [--scan_layers=true]

`medium` is the S model (Table 5 Small: width 512, 8 heads, 8/8/8 layers) on 32x64x64 clips with
256 points; other names are configs/coordtok.py sizes (L, B, S, tiny) at their own geometry.
--batch=0 keeps each config's batch (tiny 8, medium 2, others 8 per device). Runs on one device of whatever backend
JAX has; reports the analytic MFU where the device's bf16 peak is known and peak memory (device
stats on GPU/TPU, process max RSS on CPU).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "medium"], "Configs to time.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the compiling one.")
_BATCH = flags.DEFINE_integer("batch", 0, "Videos per step (0 = the config's).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REMAT = flags.DEFINE_string("remat", "none", "config.model.remat_policy.")
_IMPL = flags.DEFINE_enum("attention", "default", ["default", "xla", "cudnn"], "Attention implementation.")
_SCAN = flags.DEFINE_boolean("scan_layers", True, "config.model.scan_layers (false: one parameter tree per layer).")
_STAGE = flags.DEFINE_integer("stage", 1, "Training stage (2 needs no LPIPS weights: lpips_weight is set to 0).")


def make_config(name):
    import coordtok

    if name == "medium":
        config = coordtok.get_config("S")
        with config.unlocked():
            config.model.video_shape = (32, 64, 64)
            config.batch_size, config.num_points = 2, 256
    else:
        config = coordtok.get_config(f"{name},stage={_STAGE.value}")
        if name != "tiny":
            with config.unlocked():
                config.batch_size = 8
    with config.unlocked():
        if _BATCH.value:
            config.batch_size = _BATCH.value
        config.model.dtype = _DTYPE.value
        config.model.remat_policy = _REMAT.value
        config.model.scan_layers = _SCAN.value
        config.model.attention_impl = None if _IMPL.value == "default" else _IMPL.value
        config.lpips_weight = 0.0
        config.mesh.shape = (1, 1)
    return config


def main(argv):
    del argv
    import jax
    import numpy as np

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.models import validate
    from coordtok_jax.train import flops as flops_lib
    from coordtok_jax.train.state import make_optimizer, tokenizer_state
    from coordtok_jax.train.step import make_train_step

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, dtype {_DTYPE.value}, "
          f"remat {_REMAT.value}, attention {_IMPL.value}, scan_layers {_SCAN.value}, stage {_STAGE.value}")
    print("| config | params | batch | points/video | compile s | step ms (median) | videos/s | TFLOP/step | MFU | peak mem GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in _SIZES.value:
        config = make_config(name)
        g = validate(config.model)
        mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=[dev])
        tx = make_optimizer(config)
        plan = tokenizer_state(config, mesh, tx)
        graphdef, state = plan.graphdef, plan.create()
        step = jax.jit(make_train_step(graphdef, g, config, tx), donate_argnums=0)
        T, H, W = g.video_shape
        rng = np.random.default_rng(0)
        batch = {"video": rng.integers(0, 256, size=(config.batch_size, T, H, W, 3), dtype=np.uint8),
                 "n_frames": np.full((config.batch_size,), T, np.int32)}
        batch = jax.device_put(batch, dev)
        start = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(_STEPS.value):
            start = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
        dt = statistics.median(times)
        tflop = flops_lib.train_flops_per_step(config) / 1e12
        peak = flops_lib.peak_flops(dev)
        mfu = f"{tflop * 1e12 / dt / peak:.1%}" if peak else "n/a"
        stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
        mem = (stats or {}).get("peak_bytes_in_use") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        points = config.num_points if config.stage == 1 else config.num_frames * g.dec_grid[1] * g.dec_grid[2]
        n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
        print(f"| {name} | {n_params:,} | {config.batch_size} | {points} | {compile_s:.1f} | {dt * 1e3:.1f} | "
              f"{config.batch_size / dt:.2f} | {tflop:.3f} | {mfu} | {mem / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
