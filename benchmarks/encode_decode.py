r"""CoordTok forward timings: encode one batch, and decode every patch of it in one joint pass.

    python benchmarks/encode_decode.py [--sizes=tiny] [--batch=1] [--repeats=10] [--dtype=float32]
        [--points=0] [--attention=default|xla|cudnn]

Prints one row per config: compile times, then the median (and min) wall time of encode and of
decoding all T/pt * H/px * W/py patches of each video in a single decoder call (the paper's
full-video protocol; --points=N decodes the first N patches instead), the patches decoded per
second, and the device's peak memory where the backend reports it (GPU/TPU).
Timings use block_until_ready.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZES = flags.DEFINE_list("sizes", ["tiny"], "configs/coordtok.py variants to time.")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos per call.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls after compilation.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_POINTS = flags.DEFINE_integer("points", 0, "Points decoded per video (0 = every patch, one joint call).")
_IMPL = flags.DEFINE_enum("attention", "default", ["default", "xla", "cudnn"], "Attention implementation.")


def _time(fn, *args, repeats):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, compile_s, statistics.median(times), min(times)


def _peak_gib(device) -> str:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
        return "n/a"
    return f"{stats['peak_bytes_in_use'] / 2**30:.2f}"


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import coordtok
    from coordtok_jax.models import CoordTok, count_params
    from coordtok_jax.models.patches import grid_indices, indices_to_coords

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')} x{jax.device_count()}, "
          f"jax {jax.__version__}, dtype {_DTYPE.value}, batch {_BATCH.value}")
    header = ("config", "params", "patches/video", "enc compile s", "encode ms (median/min)",
              "dec compile s", "decode ms (median/min)", "patches/s", "peak GiB")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for size in _SIZES.value:
        config = coordtok.get_config(size)
        with config.unlocked():
            config.model.dtype = _DTYPE.value
            config.model.attention_impl = None if _IMPL.value == "default" else _IMPL.value
        g = coordtok.validate(config)
        model = CoordTok(config.model, rngs=nnx.Rngs(0))
        T, H, W = g.video_shape
        video = jax.random.uniform(jax.random.key(0), (_BATCH.value, T, H, W, 3), minval=-1, maxval=1)
        n_frames = jnp.full((_BATCH.value,), T, jnp.int32)
        idx = grid_indices(g.dec_grid[0], g.dec_grid)
        if _POINTS.value:
            idx = idx[: _POINTS.value]
        coords = jnp.broadcast_to(indices_to_coords(idx, g.dec_grid), (_BATCH.value,) + idx.shape)
        encode = nnx.jit(lambda m, v, n: m.encode(v, n))
        decode = nnx.jit(lambda m, p, c: m.decode(p, c))
        planes, enc_c, enc_med, enc_min = _time(encode, model, video, n_frames, repeats=_REPEATS.value)
        _, dec_c, dec_med, dec_min = _time(decode, model, planes, coords, repeats=_REPEATS.value)
        row = (size, f"{count_params(model):,}", f"{idx.shape[0]:,}", f"{enc_c:.1f}",
               f"{enc_med * 1e3:.1f} / {enc_min * 1e3:.1f}", f"{dec_c:.1f}",
               f"{dec_med * 1e3:.1f} / {dec_min * 1e3:.1f}", f"{_BATCH.value * idx.shape[0] / dec_med:,.0f}", _peak_gib(dev))
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
