r"""The trainer's step on 8 simulated CPU devices, by mesh: data parallel, hybrid, FSDP, tensor.

    python benchmarks/sharding.py [--size=tiny] [--steps=10] [--meshes=8x1,4x2,1x8,2x2x2]

Compiles the real step (train/trainer.py build_step, the same program the trainer runs) for each
mesh, times --steps steps after a warm-up, and prints per-chip memory from XLA's buffer
assignment and the collectives of the optimized HLO (train/aot.py). The ratio column is each
mesh's step time over the data-parallel (8, 1) step measured in the same run. The simulated
devices share the host's cores, so absolute times say little; the ratio and the HLO do.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZE = flags.DEFINE_string("size", "tiny", "configs/coordtok.py size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after one warm-up step.")
_MESHES = flags.DEFINE_list("meshes", ["8x1", "4x2", "1x8", "2x2x2"], "Mesh shapes (data x fsdp [x tensor]).")


def main(argv):
    del argv
    import coordtok
    import jax
    import numpy as np

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.train import aot
    from coordtok_jax.train.trainer import build_step

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, size {_SIZE.value}")
    print("| mesh (data x fsdp [x tensor]) | compile s | step ms (median) | ratio to 8x1 | args MiB | temps MiB "
          "| all-gather ops / MiB | all-reduce ops / MiB | all-to-all ops |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = None
    for spec in _MESHES.value:
        shape = tuple(int(s) for s in spec.split("x"))
        axes = ("data", "fsdp", "tensor")[:len(shape)]
        config = coordtok.get_config(_SIZE.value)
        with config.unlocked():
            config.mesh.shape, config.mesh.axes = shape, axes
        mesh = sharding_lib.make_mesh(shape, axes)
        plan, _, program = build_step(config, mesh)
        compiled, seconds = aot.compile_program(program)
        batch_sh = {k: v.sharding for k, v in program.args[1].items()}
        rng = np.random.default_rng(0)
        g = program.args[1]["video"].shape
        batch = {"video": rng.integers(0, 256, size=g, dtype=np.uint8),
                 "n_frames": np.full((g[0],), g[1], np.int32), "decode_failures": np.zeros((g[0],), np.int32)}
        batch = {k: jax.device_put(v, batch_sh[k]) for k, v in batch.items()}
        times = []
        with jax.set_mesh(mesh):
            state = plan.create()
            state, m = compiled(state, batch, None)
            jax.block_until_ready(m["loss"])
            for _ in range(_STEPS.value):
                t0 = time.perf_counter()
                state, m = compiled(state, batch, None)
                jax.block_until_ready(m["loss"])
                times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        base = base or ms
        mem = aot.memory(compiled)
        c = aot.collectives(compiled.as_text())
        get = lambda k: c.get(k, {"ops": 0, "bytes": 0.0})
        print(f"| {spec} | {seconds:.1f} | {ms:.1f} | {ms / base:.2f} | {mem['arguments'] * 1024:.2f} | "
              f"{mem['temporaries'] * 1024:.2f} | {get('all-gather')['ops']} / {get('all-gather')['bytes'] / 2**20:.2f} "
              f"| {get('all-reduce')['ops']} / {get('all-reduce')['bytes'] / 2**20:.2f} | {get('all-to-all')['ops']} |",
              flush=True)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
