"""Logical axis names -> mesh shardings; models created directly sharded on 8 simulated devices."""

import coordtok
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from coordtok_jax import sharding
from coordtok_jax.models import CoordTok

ALLOWED = {None, "embed", "mlp", "qkv", "heads", "norm", "layers"}


def test_every_parameter_has_logical_names():
    abstract = nnx.eval_shape(lambda: CoordTok(coordtok.get_config("tiny").model, rngs=nnx.Rngs(0)))
    specs = nnx.get_partition_spec(nnx.state(abstract, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    named = 0
    for path, var in flat:
        names = var.get_metadata().get("out_sharding")
        key = jax.tree_util.keystr(path)
        assert names is not None and len(names) == len(var.get_value()), key
        assert set(names) <= ALLOWED, key
        if ".layers." in key or "['layers']" in key:
            assert names[0] == "layers", key
        named += any(n is not None for n in names)
    assert named >= 0.8 * len(flat)


def test_make_mesh_fill_and_errors(devices):
    assert dict(sharding.make_mesh((-1, 2), ("data", "fsdp")).shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh((1, -1), ("data", "fsdp")).shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(ValueError, match="needs 6 devices, 8 available"):
        sharding.make_mesh((3, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1), ("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible by 3"):
        sharding.make_mesh((-1, 3), ("data", "fsdp"))


def test_logical_to_mesh_rules(devices):
    mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
    rules = coordtok.LOGICAL_AXIS_RULES
    assert sharding.logical_to_mesh(("layers", "embed", "mlp"), (2, 64, 256), rules, mesh) == P(None, "fsdp", None)
    assert sharding.logical_to_mesh(("embed",), (6,), rules, mesh) == P(None)  # 4 does not divide 6
    assert sharding.logical_to_mesh(("embed", "embed"), (8, 8), rules, mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match="'vocab' has no rule"):
        sharding.logical_to_mesh(("vocab",), (8,), rules, mesh)


@pytest.mark.parametrize("shape", [(4, 2), (1, 8)])
def test_created_sharded_equals_unsharded(shape, devices):
    config = coordtok.get_config("tiny")
    mesh = sharding.make_mesh(shape, config.mesh.axes)
    build = lambda: CoordTok(config.model, rngs=nnx.Rngs(0))
    sharded = sharding.create_sharded(build, mesh, config.logical_axis_rules)
    plain = build()
    layout = sharding.describe(nnx.state(sharded, nnx.Param))
    kernel = layout["decoder.transformer.layers.blocks.mlp.fc1.kernel"]
    assert kernel == ((2, 64, 256), P(None, "fsdp", None))
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)), jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(a.sharding.device_set) == 8

    video = jax.random.uniform(jax.random.key(0), (8, 16, 32, 32, 3), minval=-1, maxval=1)
    coords = jax.random.uniform(jax.random.key(1), (8, 64, 3))
    batch = jax.sharding.NamedSharding(mesh, P("data"))
    fwd = nnx.jit(lambda m, v, c: m(v, None, c))
    with jax.set_mesh(mesh):
        out = fwd(sharded, jax.device_put(video, batch), jax.device_put(coords, batch))
    np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(plain, video, coords)), rtol=1e-5, atol=1e-5)
