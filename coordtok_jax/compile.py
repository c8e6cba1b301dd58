r"""Compile a training step (or a decode/encode pass) ahead of time for a TPU slice, on any host.

    python -m coordtok_jax.compile --config=configs/coordtok.py:L,stage=1 --topology=v5e-256 \
        [--config.mesh.shape=16,16] [--config.model.dtype=bfloat16] [--config.model.remat_policy=...] \
        [--program=train|encode|decode] [--batch=N] [--json=report.json] [--dump_hlo=DIR]
    python -m coordtok_jax.compile --config=configs/sit.py:L/2 --topology=v5e-64 --config.batch_size=64

The counterpart of MaxText's train_compile: the real program the trainer runs (the same state
plan, step and shardings, train/trainer.py and train_sit.py) is lowered against abstract arrays
carrying their shardings, so nothing of the model is allocated, and compiled by XLA for the named
topology (libtpu's topology description: `pip install -e ".[tpu]"`, which needs no TPU). It
prints per-chip memory (arguments, temporaries, outputs, code, total) against the chip's HBM,
the analytic FLOPs per step, and the collectives of the optimized HLO (count and bytes by kind),
then exits 0 when the program fits and 1 with a one-line verdict when it does not. Without
--topology it compiles for this host's devices, exactly as the trainer does at start-up.

Topologies: v4-N and v5p-N (N TensorCores, 2 per chip: v4-128 = 64 chips), v5e-N / v5litepod-N
and v6e-N (N chips), or a libtpu name such as v5e:16x16. Programs: `train` (the config's
trainer step), `encode` (a batch of clips -> planes) and `decode` (planes -> every patch of the
video in one joint decoder pass, the paper's evaluation; the default batch is one video per
chip). Compiling the L model for a 256-chip slice takes minutes on a small CPU host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
from typing import Optional

from absl import flags
from ml_collections import config_flags

from coordtok_jax import cli
from coordtok_jax.errors import UserError

FLAGS = flags.FLAGS
PROGRAMS = ("train", "encode", "decode")


@dataclasses.dataclass(frozen=True)
class Chip:
    prefix: str  # libtpu topology prefix
    chip_config: str  # 'megacore' for chips whose two TensorCores act as one device
    hbm_gib: float
    usable_gib: float  # what XLA:TPU may allocate (read off its out-of-memory messages, libtpu 0.0.42.1)
    cores_per_chip: int  # Cloud TPU names count cores for v4/v5p, chips for v5e/v6e
    dims: int  # 2D or 3D torus


CHIPS = {
    "v4": Chip("v4", "megacore", 32.0, 30.75, 2, 3),
    "v5p": Chip("v5", "megacore", 95.74, 95.74, 2, 3),
    "v5e": Chip("v5e", "default", 16.0, 15.75, 1, 2),
    "v5litepod": Chip("v5e", "default", 16.0, 15.75, 1, 2),
    "v6e": Chip("v6e", "default", 32.0, 31.25, 1, 2),
}
# chips -> torus shape of the standard slices
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    libtpu_name: str  # e.g. v5e:16x16
    chip: Chip
    chips: int
    host_bounds: tuple  # chips per host


def parse_topology(name: str) -> Topology:
    """'v5e-256' / 'v4-128' / 'v5p-128' / 'v6e-64' / 'v5e:16x16' -> Topology (UserError if unknown)."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.strip().lower())
    if m:
        chip = CHIPS[m.group(1)]
        n = int(m.group(2))
        if n % chip.cores_per_chip:
            raise UserError(f"--topology={name}: {m.group(1)} slices are named by TensorCores ({chip.cores_per_chip} "
                            "per chip), e.g. v4-128 = 64 chips")
        chips = n // chip.cores_per_chip
        shapes = SHAPES_3D if chip.dims == 3 else SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{m.group(1)}-{c * chip.cores_per_chip}" for c in shapes)
            raise UserError(f"--topology={name}: not a standard slice; known: {sizes}")
        shape = shapes[chips]
    else:
        m = re.fullmatch(r"(v4|v5|v5e|v6e):(\d+(?:x\d+){1,2})", name.strip().lower())
        if not m:
            raise UserError(f"--topology={name}: expected e.g. v5e-256, v4-128, v5p-128, v6e-64 or a libtpu name "
                            "such as v5e:16x16 / v4:4x4x8")
        chip = {"v4": CHIPS["v4"], "v5": CHIPS["v5p"], "v5e": CHIPS["v5e"], "v6e": CHIPS["v6e"]}[m.group(1)]
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims:
            raise UserError(f"--topology={name}: {m.group(1)} topologies have {chip.dims} dimensions")
        chips = math.prod(shape)
    single_host = chip.dims == 2 and chips <= 8  # v5e/v6e 1-, 4- and 8-chip slices are one host
    host = shape + (1,) * (3 - len(shape)) if single_host else (2, 2, 1)
    return Topology(name, f"{chip.prefix}:{'x'.join(map(str, shape))}", chip, chips, host)


@contextlib.contextmanager
def _quiet_libtpu(chips: int):
    """On a CPU host, tell libtpu there is no TPU VM to query (else it prints errors about missing
    metadata) and no TPU to lock, for the duration of the topology query only: a process that later trains must not
    look like a TPU VM worker (train/trainer.py detects those by these variables)."""
    on_tpu_vm = os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
    values = {} if on_tpu_vm else {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                                   "TPU_WORKER_ID": "0", "TPU_ACCELERATOR_TYPE": f"v5litepod-{chips}",
                                   # no TPU here to guard: let several compiles load libtpu side by side
                                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


def topology_devices(topo: Topology):
    """The slice's devices (libtpu's topology description; no TPU needed)."""
    from jax.experimental import topologies

    try:
        with _quiet_libtpu(topo.chips):
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                                chip_config_name=topo.chip.chip_config,
                                                chips_per_host_bounds=topo.host_bounds, num_slices=1)
    except Exception as e:  # no libtpu, or a name libtpu refuses
        raise UserError(f"--topology={topo.name} ({topo.libtpu_name}): libtpu could not describe it "
                        f"({str(e).splitlines()[0][:200]}); install it with pip install -e \".[tpu]\"") from None
    return list(desc.devices)


def _load_config(spec: str):
    """A config from 'path.py[:arg]' (for the SiT's tokenizer), as --config reads one."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--tokenizer_config={spec}: no config file {path}")
    module_spec = importlib.util.spec_from_file_location("_tokenizer_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def tokenizer_config_for(config, spec: Optional[str]):
    """The SiT's frozen tokenizer config: --tokenizer_config, else config.tokenizer's saved config,
    else configs/coordtok.py's L (or tiny for a tiny SiT)."""
    if spec:
        return _load_config(spec)
    if config.get("tokenizer"):
        from coordtok_jax.io.checkpoint import read_config

        return read_config(config.tokenizer)
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "coordtok.py")
    return _load_config(f"{here}:{'tiny' if config.get('size') == 'tiny' else 'L'}")


def build_program(config, mesh, num_processes: int, program: str = "train", batch: Optional[int] = None,
                  tokenizer_config: Optional[str] = None):
    """The Program to compile: the trainer's own step for `train`, else an inference pass."""
    import jax
    import numpy as np

    from coordtok_jax import sharding as sharding_lib

    is_sit = "transport" in config
    if batch and program == "train":
        with config.unlocked():
            config.batch_size = int(batch)
    if is_sit:
        if program != "train":
            raise UserError(f"--program={program} is for tokenizer configs; a SiT config compiles its train step")
        from coordtok_jax.generation import train_sit
        from coordtok_jax.generation.frozen_tokenizer import abstract_tokenizer
        from coordtok_jax.train.state import make_optimizer

        train_sit.validate_sit_config(config, mesh, num_processes)
        tx = make_optimizer(config)
        plan = train_sit.sit_state(config, mesh, tx)
        tok = None if config.get("latents") else abstract_tokenizer(
            config, tokenizer_config_for(config, tokenizer_config), mesh)
        return train_sit.step_program(config, plan, tx, tok)
    from coordtok_jax.train import trainer

    if program == "train":
        trainer.validate_training_config(config, mesh, num_processes, weights=False)
        return trainer.build_step(config, mesh, abstract_lpips=True)[2]

    from flax import nnx

    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.io.runs import abstract_params
    from coordtok_jax.models import CoordTok
    from coordtok_jax.models.decode_video import decode_video
    from coordtok_jax.train import flops as flops_lib
    from coordtok_jax.train.aot import Program

    rules = sharding_lib.rules_of(config)
    b = int(batch or sharding_lib.batch_shards(mesh, rules))
    model = sharding_lib.eval_shape(lambda: CoordTok(config.model, rngs=nnx.Rngs(0), axis_rules=rules))
    graphdef, g = nnx.graphdef(model), model.geometry
    params = abstract_params(config.model, mesh=mesh, rules=rules)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.batch_sharding(mesh, rules,
                                                                                                       shape))
    fwd = flops_lib.forward_flops(config.model, g.dec_grid[0] * g.dec_grid[1] * g.dec_grid[2])
    if program == "encode":
        video, n = sds((b,) + g.video_shape + (3,), np.uint8), sds((b,), np.int32)
        pad = float(config.data.get("pad_value", -3.0))
        fn = lambda p, v, n: nnx.merge(graphdef, p).encode(to_model_input(v, n, pad), n)
        return Program("encode", jax.jit(fn), (params, video, n), mesh, b * (fwd["vit3d"] + fwd["cross_self"]))
    planes = tuple(sds((b,) + shape, np.float32) for shape in g.plane_shapes)
    fn = lambda p, planes: decode_video(nnx.merge(graphdef, p), planes, mode="all")
    return Program("decode_video", jax.jit(fn), (params, planes), mesh, b * fwd["decoder"])


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the program is compiled for."""

    devices: list
    where: str  # for messages
    hbm_gib: Optional[float]  # per chip, as sold (None: unknown, e.g. CPU)
    usable_gib: Optional[float]  # what XLA may allocate (the verdict compares with this)


def resolve_target(topology: Optional[str], hbm_gib: Optional[float] = None) -> Target:
    """A TPU topology's devices (described by libtpu), or this host's devices without one;
    `hbm_gib` overrides the memory the verdict compares with (e.g. to keep headroom)."""
    import jax

    from coordtok_jax.train import aot

    if topology:
        topo = parse_topology(topology)
        jax.config.update("jax_platforms", "cpu")  # nothing runs here: the slice is only described
        devices = topology_devices(topo)
        hbm, usable, where = topo.chip.hbm_gib, topo.chip.usable_gib, topo.name
    else:
        devices = jax.devices()
        hbm = usable = aot.device_memory_gib(devices[0])
        where = f"{len(devices)} local {devices[0].platform} devices"
    if hbm_gib:
        hbm = usable = float(hbm_gib)
    return Target(devices, where, hbm, usable)


def prepare(config, target: Target, program: str = "train", batch: Optional[int] = None,
            tokenizer_config: Optional[str] = None):
    """The Program for `target`: the config's mesh over its devices, validated against them."""
    from coordtok_jax import sharding as sharding_lib

    if program not in PROGRAMS:
        raise UserError(f"--program={program}: choose one of {', '.join(PROGRAMS)}")
    processes = len({d.process_index for d in target.devices})
    mesh = sharding_lib.make_mesh(config.mesh.shape, config.mesh.axes, devices=target.devices)
    return build_program(config, mesh, processes, program, batch, tokenizer_config)


def compile_report(config, topology: Optional[str], *, program: str = "train", batch: Optional[int] = None,
                   tokenizer_config: Optional[str] = None, dump_hlo: Optional[str] = None,
                   hbm_gib: Optional[float] = None, progress: bool = True) -> dict:
    """Compiles and returns the report (train/aot.py `report`, plus where and the verdict's inputs)."""
    from coordtok_jax.train import aot

    target = resolve_target(topology, hbm_gib)
    prog = prepare(config, target, program, batch, tokenizer_config)
    mesh_shape = {str(k): int(v) for k, v in prog.mesh.shape.items()}
    if progress:
        print(f"compiling {prog.name} for {target.where} (mesh {mesh_shape}); large models on large slices take "
              "minutes...", file=sys.stderr, flush=True)
    try:
        compiled, seconds = aot.compile_program(prog)
    except Exception as e:  # XLA refuses programs that exceed HBM
        oom = aot.out_of_memory(str(e))
        if oom is None:
            raise
        return {"program": prog.name, "fits": False, "hbm_gib": target.hbm_gib, "topology": target.where,
                "out_of_memory": oom, "per_chip_gib": {oom["what"]: oom["needed_gib"]},
                "flops_per_step": prog.flops, "collectives": {}, "devices": len(target.devices),
                "mesh": mesh_shape, "error": str(e).splitlines()[0][:500]}
    if dump_hlo:
        from etils import epath

        d = epath.Path(dump_hlo)
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{prog.name}.optimized.hlo.txt").write_text(compiled.as_text())
    processes = len({d.process_index for d in target.devices})
    r = aot.report(prog, compiled, seconds=seconds, hbm_gib=target.hbm_gib,
                   devices_per_host=len(target.devices) // processes)
    if target.usable_gib is not None:
        r["usable_gib"] = target.usable_gib
        r["fits"] = bool(r["per_chip_gib"]["total"] <= target.usable_gib)
    r["topology"] = target.where
    r["memory_line"] = aot.memory_line(prog.name, r["per_chip_gib"], target.hbm_gib)
    return r


def verdict(r: dict) -> str:
    """The one-line answer."""
    head = f"{r['program']} on {r['topology']} (mesh {'x'.join(str(v) for v in r['mesh'].values())})"
    if "out_of_memory" in r:
        oom = r["out_of_memory"]
        return (f"{head}: does NOT fit: XLA needs {oom['needed_gib']:.2f} GiB for {oom['what']}, "
                f"{oom['usable_gib']:.2f} GiB of HBM are usable per chip")
    total, usable = r["per_chip_gib"]["total"], r.get("usable_gib")
    if r["fits"] is None or usable is None:
        return f"{head}: {total:.2f} GiB per chip (this device reports no memory size)"
    word = "fits" if r["fits"] else "does NOT fit"
    return f"{head}: {word}, {total:.2f} GiB per chip of {usable:g} GiB usable HBM"


def define_flags():
    config_flags.DEFINE_config_file("config", None, "configs/coordtok.py:SIZE[,stage=N] or configs/sit.py:SIZE",
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "TPU slice, e.g. v5e-256, v4-128, v5p-128, v6e-64 or v5e:16x16 "
                        "(default: this host's devices)")
    flags.DEFINE_enum("program", "train", list(PROGRAMS), "What to compile (tokenizer configs).")
    flags.DEFINE_integer("batch", None, "Global batch (train: overrides config.batch_size; encode/decode: "
                         "default one video per chip of the batch axes).")
    flags.DEFINE_string("tokenizer_config", None, "SiT only: the frozen tokenizer's config, e.g. "
                        "configs/coordtok.py:L (default: config.tokenizer's, else L).")
    flags.DEFINE_float("hbm_gib", None, "Compare with this many GiB per chip instead of the chip's usable HBM "
                       "(e.g. to keep headroom for the input pipeline).")
    flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
    flags.DEFINE_string("dump_hlo", None, "Write the optimized HLO to this directory.")


def main(argv):
    from coordtok_jax.train import aot

    r = compile_report(FLAGS.config, FLAGS.topology, program=FLAGS.program, batch=FLAGS.batch,
                       tokenizer_config=FLAGS.tokenizer_config, dump_hlo=FLAGS.dump_hlo, hbm_gib=FLAGS.hbm_gib)
    if "error" not in r:
        print(aot.format_report(r))
        print()
    if FLAGS.json:
        from etils import epath

        epath.Path(FLAGS.json).write_text(json.dumps(r, indent=2))
    print(verdict(r))
    if r["fits"] is False:
        sys.exit(1)


def run():
    cli.run(__name__, define_flags, main, required=("config",))


if __name__ == "__main__":
    run()
