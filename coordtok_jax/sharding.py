"""Meshes and parameter shardings from logical axis names.

Parameters carry logical axis names (see models/layers.py); `config.logical_axis_rules` maps each
name to a mesh axis (or None = replicated). A dimension whose size the mesh axis does not divide,
or a mesh axis already used by another dimension of the same array, is replicated instead.
`create_sharded` builds a model directly into its shardings (MaxText style: `nnx.eval_shape`,
then `jax.jit(init, out_shardings=...)`), so no host ever holds the full unsharded model.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh of `shape` over all (or the given) devices; one entry may be -1 (= fill)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh.shape {tuple(shape)} and config.mesh.axes {tuple(axes)} differ in length")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape {tuple(shape)}: positive sizes and at most one -1 expected")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise ValueError(f"config.mesh.shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    return jax.make_mesh(tuple(shape), tuple(axes), axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def logical_to_mesh(
    names: Sequence[Optional[str]], shape: Sequence[int], rules: Sequence[tuple[str, Optional[str]]], mesh: Mesh
) -> PartitionSpec:
    """Logical names of one array -> PartitionSpec on `mesh` (unknown names are an error)."""
    table: Mapping[str, Optional[str]] = dict(rules)
    used: set = set()
    out = []
    for name, size in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in config.logical_axis_rules {tuple(table)}")
        axis = table[name]
        if axis is None or axis in used or axis not in mesh.shape or size % mesh.shape[axis]:
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for every variable of an (abstract) state, from its logical names."""

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_mesh(names, var.shape, rules, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules) -> nnx.Module:
    """Builds `build()` with every parameter created directly in its sharding."""
    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    plain = lambda tree: jax.tree.map(
        lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
        is_leaf=lambda x: isinstance(x, nnx.Variable))

    @jax.jit
    def init():
        return plain(nnx.state(build()))

    with jax.set_mesh(mesh):
        values = jax.jit(init, out_shardings=plain(shardings))()
    state = jax.tree.map(
        lambda var, value: var.replace(value), abstract_state, values,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdef, state)


def describe(state: nnx.State) -> dict[str, tuple]:
    """{path: (shape, sharding spec)} of a concrete state, for logs and tests."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = (str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        key = ".".join(k for k in parts if k and k != "value")
        out[key] = (tuple(np.shape(value)), getattr(getattr(value, "sharding", None), "spec", None))
    return out
