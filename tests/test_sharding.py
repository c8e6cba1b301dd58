"""Logical axis names -> mesh shardings of parameters and activations; states created sharded."""

import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from coordtok_jax import sharding
from coordtok_jax.models import CoordTok
from coordtok_jax.train.state import make_optimizer, tokenizer_state

ALLOWED = {None, "embed", "mlp", "qkv", "heads", "norm", "layers"}


def test_every_parameter_has_logical_names():
    abstract = sharding.eval_shape(lambda: CoordTok(coordtok.get_config("tiny").model, rngs=nnx.Rngs(0)))
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
    assert dict(sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor")).shape) == {"data": 2, "fsdp": 2,
                                                                                     "tensor": 2}
    with pytest.raises(sharding.MeshError, match="needs 6 devices, 8 available"):
        sharding.make_mesh((3, 2), ("data", "fsdp"))
    with pytest.raises(sharding.MeshError, match="at most one -1"):
        sharding.make_mesh((-1, -1), ("data", "fsdp"))
    with pytest.raises(sharding.MeshError, match="not divisible by 3"):
        sharding.make_mesh((-1, 3), ("data", "fsdp"))
    with pytest.raises(sharding.MeshError, match="names an axis twice"):
        sharding.make_mesh((2, 4), ("data", "data"))


def test_logical_to_mesh_rules(devices):
    mesh = sharding.make_mesh((2, 4), ("data", "fsdp"))
    rules = sharding.rules_of(coordtok.get_config("tiny"))
    assert sharding.logical_to_mesh(("layers", "embed", "mlp"), (2, 64, 256), rules, mesh) == P(None, "fsdp", None)
    assert sharding.logical_to_mesh(("embed",), (6,), rules, mesh) == P(None)  # 4 does not divide 6
    assert sharding.logical_to_mesh(("embed", "embed"), (8, 8), rules, mesh) == P("fsdp", None)
    # the batch goes over both axes; trailing axes are dropped when they do not divide it
    assert sharding.logical_to_mesh(sharding.BLD, (8, 5, 64), rules, mesh) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_mesh(sharding.BLD, (2, 5, 64), rules, mesh) == P("data", None, None)
    assert sharding.logical_to_mesh(sharding.BLD, (4, 5, 64), rules, mesh) == P("data", None, None)
    with pytest.raises(sharding.UserError, match="'vocab' has no rule"):
        sharding.logical_to_mesh(("vocab",), (8,), rules, mesh)
    # a tensor axis: heads and MLP split over it, parameters over fsdp and tensor
    mesh3 = sharding.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    assert sharding.logical_to_mesh(("embed", "mlp"), (64, 256), rules, mesh3) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh(sharding.BLHK, (8, 5, 4, 16), rules, mesh3) == P(("data", "fsdp"), None,
                                                                                     "tensor", None)
    # a mesh without an axis the rules name ('data' only): that axis is simply not used
    mesh1 = sharding.make_mesh((8,), ("data",))
    assert sharding.logical_to_mesh(("embed", "mlp"), (64, 256), rules, mesh1) == P(None, None)
    assert sharding.batch_shards(mesh1, rules) == 8 and sharding.batch_shards(mesh3, rules) == 4


def test_rules_of_config_overrides_and_survives_json():
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.logical_axis_rules = [["embed", None], ["activation_batch", ["data"]]]  # as read from config.json
    table = dict(sharding.rules_of(config))
    assert table["embed"] is None and table["activation_batch"] == "data" and table["mlp"] == "tensor"
    hash(sharding.rules_of(config))  # usable as static model configuration


def test_constrain_is_a_no_op_without_a_mesh_or_rules(devices):
    x = jnp.ones((8, 3))
    assert sharding.constrain(x, ("activation_batch", None), sharding.LOGICAL_AXIS_RULES) is x
    mesh = sharding.make_mesh((4, 2), ("data", "fsdp"))
    f = jax.jit(lambda x: sharding.constrain(x * 2, ("activation_batch", None), sharding.LOGICAL_AXIS_RULES))
    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 3)))


@pytest.mark.parametrize("shape,axes", [((4, 2), ("data", "fsdp")), ((1, 8), ("data", "fsdp")),
                                        ((2, 2, 2), ("data", "fsdp", "tensor"))])
def test_planned_state_is_created_sharded_and_equals_the_plain_model(shape, axes, devices):
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.mesh.shape, config.mesh.axes = shape, axes
    mesh = sharding.make_mesh(shape, axes)
    plan = tokenizer_state(config, mesh, make_optimizer(config))
    state = plan.create()
    kernel = state.params["decoder"]["transformer"]["layers"]["blocks"]["mlp"]["fc1"]["kernel"]
    want = P(None, "fsdp", "tensor") if "tensor" in axes else P(None, "fsdp", None)
    assert kernel.shape == (2, 64, 256) and kernel.sharding.spec == want
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == kernel.shape]
    assert len(moments) >= 2 and all(m.sharding == kernel.sharding for m in moments)  # Adam's mu, nu
    assert state.step.sharding.spec == P()
    # the abstract state (what Orbax restores into and `compile` lowers against) has the same layout
    assert jax.tree.map(lambda a, s: a.sharding == s.sharding, plan.abstract, state) == jax.tree.map(
        lambda _: True, state)
    plain = nnx.to_pure_dict(nnx.state(CoordTok(config.model, rngs=nnx.Rngs(config.seed)), nnx.Param))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert len(a.sharding.device_set) == 8
