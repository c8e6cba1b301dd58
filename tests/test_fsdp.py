"""FSDP as FSDP, on 8 simulated CPU devices: the trainer's own compiled step (train/trainer.py
build_step + train/aot.py) on data-parallel, hybrid, full-FSDP and tensor-parallel meshes.

* The optimized HLO of an FSDP step gathers parameters only (no all-gather of an activation
  batch, no all-to-all reshuffle), and its temporaries stay within 1.5x of the data-parallel
  program's, while its arguments (parameters + Adam moments) shrink with the fsdp axis.
* Every mesh trains the same: losses and parameters after 3 steps equal a one-device run.
"""

import math
import re

import jax
import numpy as np
import pytest
from test_train_step import micro_config

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.train import aot
from coordtok_jax.train.trainer import build_step

MESHES = {(8, 1): ("data", "fsdp"), (4, 2): ("data", "fsdp"), (1, 8): ("data", "fsdp"),
          (2, 2, 2): ("data", "fsdp", "tensor"), (1, 1): ("data", "fsdp")}
STEPS = 3


def _batches():
    rng = np.random.default_rng(0)
    return [{"video": rng.integers(0, 256, size=(8, 8, 16, 16, 3), dtype=np.uint8),
             "n_frames": rng.integers(4, 9, size=(8,)).astype(np.int32),
             "decode_failures": np.zeros((8,), np.int32)} for _ in range(STEPS)]


@pytest.fixture(scope="module")
def runs(devices):
    """{mesh shape: (plan, compiled step, losses, final params, initial params)}; 3 steps of the
    micro config."""
    out = {}
    batches = _batches()
    for shape, axes in MESHES.items():
        config = micro_config()
        with config.unlocked():
            config.mesh.shape, config.mesh.axes = shape, axes
        devs = devices if math.prod(shape) == 8 else devices[:1]
        mesh = sharding_lib.make_mesh(shape, axes, devices=devs)
        plan, _, program = build_step(config, mesh)
        compiled, _ = aot.compile_program(program)
        batch_sh = {k: v.sharding for k, v in program.args[1].items()}
        losses = []
        with jax.set_mesh(mesh):
            state = plan.create()
            initial = jax.tree.map(np.asarray, state.params)
            for b in batches:
                state, metrics = compiled(state, {k: jax.device_put(v, batch_sh[k]) for k, v in b.items()}, None)
                losses.append(float(metrics["loss"]))
        out[shape] = (plan, compiled, losses, jax.tree.map(np.asarray, state.params), initial)
    return out


def _parameter_sizes(plan, config) -> set:
    """Element counts a parameter gather may have: each parameter, one layer of a stack, the
    q / k,v slices of a packed q/k/v kernel, and the encoder's query tokens (Q, D), computed from
    the weight tokens alone (no batch dimension)."""
    from coordtok_jax.models import validate

    sizes = {sum(validate(config.model).num_query_tokens) * config.model.enc_embed_dim}
    for path, leaf in jax.tree_util.tree_flatten_with_path(plan.abstract.params)[0]:
        keys = jax.tree_util.keystr(path)
        n = math.prod(leaf.shape)
        layer = n // leaf.shape[0] if "['layers']" in keys else n
        sizes |= {n, layer}
        if "['qkv']" in keys:
            sizes |= {layer // 3, 2 * layer // 3}
    return sizes


def _gathers(hlo: str):
    """(element count, text) of every all-gather result in an optimized HLO."""
    out = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (.*?) all-gather(?:-start)?\(", line)
        if m:
            for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", m.group(1)):
                out.append((math.prod(int(d) for d in dims.split(",") if d), m.group(1)))
    return out


@pytest.mark.parametrize("shape", [(4, 2), (1, 8)])
def test_fsdp_step_gathers_parameters_not_activations(runs, shape):
    plan, compiled = runs[shape][:2]
    hlo = compiled.as_text()
    counts = aot.collectives(hlo)
    assert "all-to-all" not in counts, counts  # no reshuffling of heads or batch
    assert counts["all-gather"]["ops"] > 0  # the weights are gathered (FSDP), ...
    allowed = _parameter_sizes(plan, micro_config())
    activations = [text for n, text in _gathers(hlo) if n not in allowed]
    assert not activations, f"all-gathers of non-parameter arrays: {activations[:5]}"  # ... and only the weights


@pytest.mark.parametrize("shape", [(4, 2), (1, 8), (2, 2, 2)])
def test_sharded_step_memory_stays_within_data_parallel(runs, shape):
    dp = aot.memory(runs[(8, 1)][1])
    mem = aot.memory(runs[shape][1])
    assert mem["temporaries"] <= 1.5 * dp["temporaries"], (mem, dp)
    fsdp = dict(zip(MESHES[shape], shape))["fsdp"]
    # parameters + Adam moments are split fsdp ways (the few small replicated scalars aside)
    assert mem["arguments"] <= dp["arguments"] / fsdp * 1.15 + 1e-4, (mem, dp)


def test_every_mesh_trains_the_same(runs):
    _, _, ref_losses, ref_params, initial = runs[(1, 1)]
    for shape, (_, _, losses, params, _) in runs.items():
        np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(shape))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=str(shape))
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(initial))]
    assert min(moved) > 1e-5  # every parameter was updated (lr 1e-4, 3 steps)


@pytest.mark.parametrize("extra_carry", [0, 6])
def test_collectives_count_a_scanned_body_once_per_iteration(devices, extra_carry):
    """aot.collectives multiplies ops inside a while body by the loop's trip count (also when the
    loop's computations list more than 5 parameters, which XLA annotates /*index=5*/)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = sharding_lib.make_mesh((8,), ("data",))
    w_sh = NamedSharding(mesh, P(None, "data"))

    def f(ws, x):
        def body(carry, w):  # w (16, 16) split on its columns: each layer all-gathers it
            h, rest = carry
            w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
            return (h @ w, tuple(r * 1.5 + h[0, 0] for r in rest)), None
        rest = tuple(x[i] for i in range(extra_carry))
        return jax.lax.scan(body, (x, rest), ws)[0]

    ws = jax.ShapeDtypeStruct((5, 16, 16), np.float32, sharding=NamedSharding(mesh, P(None, None, "data")))
    x = jax.ShapeDtypeStruct((4, 16), np.float32, sharding=NamedSharding(mesh, P()))
    del w_sh
    compiled = jax.jit(f).lower(ws, x).compile()
    counts = aot.collectives(compiled.as_text())
    assert counts["all-gather"]["ops"] >= 1
    assert counts["all-gather"]["count"] == 5 * counts["all-gather"]["ops"], counts
    assert counts["all-gather"]["bytes"] == pytest.approx(5 * counts["all-gather"]["ops"] * 16 * 16 * 4)
