r"""Full-video decoding: time and memory by mode, and how far joint decoding scales.

    python benchmarks/decode.py [--sizes=tiny,medium] [--batch=1] [--repeats=3] [--points_per_call=1024]
    python benchmarks/decode.py --memory_only --sizes=L       # compile only: XLA's memory estimate

Modes per config:
* all / xla: every patch in one joint decoder pass, plain attention (logits (B, H, N, N));
* all / chunked: the same pass with attention_impl='chunked' (query chunks of 1024);
* chunks: the official slicing into contiguous calls of --points_per_call patches.

Columns: compile seconds, median decode ms, patches/s, and XLA's estimate of the temporary
memory of the compiled decode (`compiled.memory_analysis().temp_size_in_bytes`), which is what
bounds how many points one joint pass can take on a device. `medium` is the S model on 32x64x64.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "medium"], "Configs: tiny, medium, or a configs/coordtok.py size.")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls after the compiling one.")
_PPC = flags.DEFINE_integer("points_per_call", 1024, "Patches per call in 'chunks' mode.")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Compile and report memory; do not run.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMPLS = flags.DEFINE_list("attention", ["xla", "chunked"], "Attention for mode 'all': xla, chunked, cudnn (GPU).")


def model_config(name):
    import coordtok

    cfg = coordtok.model_config("S" if name == "medium" else name)
    if name == "medium":
        cfg.video_shape = (32, 64, 64)
    cfg.dtype = _DTYPE.value
    return cfg


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from coordtok_jax.models import CoordTok
    from coordtok_jax.models.decode_video import decode_video

    dev = jax.devices()[0]
    print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}, jax {jax.__version__}, {_DTYPE.value}, "
          f"batch {_BATCH.value}")
    print("| config | patches/video | mode | attention | compile s | decode ms (median) | patches/s | temp memory GiB |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for name in _SIZES.value:
        runs = [("all", None if a == "xla" else a) for a in _IMPLS.value] + [("chunks", None)]
        for mode, impl in runs:
            cfg = model_config(name)
            cfg.attention_impl = impl
            abstract = nnx.eval_shape(lambda: CoordTok(cfg, rngs=nnx.Rngs(0)))
            graphdef, state = nnx.split(abstract)
            g = abstract.geometry
            n = g.dec_grid[0] * g.dec_grid[1] * g.dec_grid[2]
            ppc = _PPC.value if mode == "chunks" else None
            fn = jax.jit(lambda s, p: decode_video(nnx.merge(graphdef, s), p, None, ppc, mode=mode))
            planes = tuple(jax.ShapeDtypeStruct((_BATCH.value,) + s, jnp.float32) for s in g.plane_shapes)
            start = time.perf_counter()
            compiled = fn.lower(state, planes).compile()
            compile_s = time.perf_counter() - start
            mem = compiled.memory_analysis()
            temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
            temp_s = f"{temp / 2**30:.2f}" if temp is not None else "n/a"
            label = "xla" if impl is None else impl
            if _MEMORY_ONLY.value:
                print(f"| {name} | {n} | {mode} | {label if mode == 'all' else '-'} | {compile_s:.1f} | - | - | {temp_s} |",
                      flush=True)
                continue
            params = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).standard_normal(x.shape) * 0.02,
                                                        x.dtype), state)
            rng = np.random.default_rng(1)
            real = tuple(jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)) for p in planes)
            jax.block_until_ready(compiled(params, real))
            times = []
            for _ in range(_REPEATS.value):
                start = time.perf_counter()
                jax.block_until_ready(compiled(params, real))
                times.append(time.perf_counter() - start)
            dt = statistics.median(times)
            print(f"| {name} | {n} | {mode}{f' ({ppc})' if ppc else ''} | {label if mode == 'all' else '-'} | "
                  f"{compile_s:.1f} | {dt * 1e3:.1f} | {n * _BATCH.value / dt:,.0f} | {temp_s} |", flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
