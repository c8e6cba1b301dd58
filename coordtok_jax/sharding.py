"""Meshes, and shardings of parameters and activations from logical axis names (MaxText style).

Every array the model holds or computes is described by logical axis names: parameters carry
theirs as metadata (models/layers.py), activations name theirs where they are constrained
(`constrain`, at block boundaries, inside the layer scan and at the attention/MLP internals). One
rules table, `config.logical_axis_rules`, maps each name to mesh axes:

  parameters   embed -> fsdp (ZeRO-3: each chip holds 1/fsdp of every matrix, gathered per layer),
               mlp, heads -> tensor (Megatron column/row split), qkv, norm, layers -> replicated
  activations  activation_batch -> (data, fsdp): the batch is split over every chip of both axes,
               activation_heads, activation_mlp -> tensor; length, embed, kv -> replicated

A name may map to one mesh axis, a tuple of them, or None. Mesh axes the mesh does not have are
dropped (a ('data',) evaluation mesh uses the same table), as are trailing axes of a tuple whose
product does not divide the dimension; a mesh axis is used at most once per array.

Pinning activations to the batch axes is what makes FSDP FSDP: without it GSPMD propagates the
weights' 'embed' sharding into the activations, splits the matmuls along the model width and
all-reduces partial activations instead of gathering weights (benchmarks/RESULTS.md, 'Sharding').

`constrain` reads the mesh from the context (`jax.set_mesh`); with no mesh set, or no rules, it
does nothing, so the models run unchanged outside a mesh.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from coordtok_jax.errors import UserError

MeshAxes = Union[None, str, Sequence[str]]
Rules = Sequence[tuple[str, MeshAxes]]

# The project's table (configs copy it into config.logical_axis_rules, where it can be overridden).
LOGICAL_AXIS_RULES: tuple = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    # the packed q/k/v kernel's columns are [q | k | v]: a contiguous split over 'tensor' would cut
    # across the three projections, so it is sharded by 'embed' only and sliced per head in use.
    ("qkv", None),
    ("norm", None),
    ("layers", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
)

# Standard activation layouts.
BLD = ("activation_batch", "activation_length", "activation_embed")  # residual stream
BLHK = ("activation_batch", "activation_length", "activation_heads", "activation_kv")  # q, k, v
BLF = ("activation_batch", "activation_length", "activation_mlp")  # MLP hidden
BATCH = "activation_batch"


class MeshError(UserError, ValueError):
    """A mesh that cannot be built from the configuration (the message names the field)."""


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh of `shape` over all (or the given) devices; one entry may be -1 (= fill).

    Axes are Auto (GSPMD propagates shardings between the constraints we set).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = [int(s) for s in shape]
    axes = tuple(str(a) for a in axes)
    if len(shape) != len(axes):
        raise MeshError(f"config.mesh.shape {tuple(shape)} and config.mesh.axes {axes} differ in length")
    if len(set(axes)) != len(axes):
        raise MeshError(f"config.mesh.axes {axes} names an axis twice")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"config.mesh.shape {tuple(shape)}: positive sizes and at most one -1 expected")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if len(devices) % known:
            raise MeshError(f"config.mesh.shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise MeshError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, {len(devices)} available")
    try:
        return jax.make_mesh(tuple(shape), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        kind = getattr(devices[0], "device_kind", "?")
        raise MeshError(f"config.mesh.shape {tuple(shape)} (axes {axes}) does not fit the {len(devices)} "
                        f"{kind} devices' physical layout: {str(e).splitlines()[0]}") from None


def rules_of(config: Any) -> tuple:
    """The rules a program should use: the project's table updated by config.logical_axis_rules
    (config entries win; names only the config has are added). `config` may be None."""
    table = dict(LOGICAL_AXIS_RULES)
    given = None if config is None else (config.get("logical_axis_rules") if hasattr(config, "get")
                                         else getattr(config, "logical_axis_rules", None))
    table.update(freeze_rules(given))
    return tuple(table.items())


def freeze_rules(rules: Optional[Rules]) -> tuple:
    """Rules as a hashable tuple of (name, axes) (config values may be lists after JSON)."""
    return tuple((str(name), _normalise(axes)) for name, axes in (rules or ()))


def _normalise(axes: Any) -> MeshAxes:
    if axes is None or isinstance(axes, str):
        return axes
    axes = tuple(str(a) for a in axes)
    return axes[0] if len(axes) == 1 else (axes or None)


def logical_to_mesh(names: Sequence[Optional[str]], shape: Sequence[int], rules: Rules, mesh) -> PartitionSpec:
    """Logical names of one array -> PartitionSpec on `mesh` (a Mesh or AbstractMesh).

    Unknown names are an error. For each dimension the rule's mesh axes are kept in order while
    they exist in the mesh, are not used by an earlier dimension and their product divides the
    dimension; the rest is replicated.
    """
    table: Mapping[str, MeshAxes] = dict(rules)
    sizes = dict(mesh.shape)
    used: set = set()
    out = []
    for name, size in zip(names, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise UserError(f"logical axis {name!r} has no rule in config.logical_axis_rules "
                            f"(names: {', '.join(table)})")
        axes = _normalise(table[name])
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        kept, product = [], 1
        for axis in axes:
            if axis not in sizes or axis in used or size % (product * sizes[axis]):
                continue
            kept.append(axis)
            product *= sizes[axis]
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def named_sharding(mesh: Mesh, rules: Rules, names: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(names, shape, rules, mesh))


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
    """Sharding of a host batch array (B, ...): B on 'activation_batch', the rest replicated."""
    return named_sharding(mesh, rules, (BATCH,) + (None,) * (len(shape) - 1), shape)


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """Into how many pieces 'activation_batch' splits a batch on this mesh (when it divides)."""
    axes = _normalise(dict(rules).get(BATCH))
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    return math.prod(dict(mesh.shape).get(a, 1) for a in axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, names: Sequence[Optional[str]], rules: Optional[Rules]) -> jax.Array:
    """with_sharding_constraint of `x` to its logical names under the context mesh.

    A no-op without rules or outside `jax.set_mesh`, and for arrays whose layout would be fully
    replicated on a one-device mesh.
    """
    if not rules:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"logical names {tuple(names)} do not match an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names, x.shape, rules, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for every variable of an (abstract) state, from its logical names."""

    def one(var):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        return NamedSharding(mesh, logical_to_mesh(names, var.shape, rules, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) carrying `shardings` (a tree of
    the same structure, or one sharding for every leaf)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def describe(state: Any) -> dict[str, tuple]:
    """{path: (shape, sharding spec)} of a concrete state, for logs and tests."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(state)[0]:
        parts = (str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
        key = ".".join(k for k in parts if k and k != "value")
        out[key] = (tuple(np.shape(value)), getattr(getattr(value, "sharding", None), "spec", None))
    return out


NO_MESH = jax.sharding.AbstractMesh((), ())


def eval_shape(build: Callable[[], nnx.Module]) -> nnx.Module:
    """nnx.eval_shape(build) as if no mesh were set: flax would otherwise read the logical names
    as mesh axes of the context mesh; shardings come from the rules instead."""
    with jax.sharding.use_abstract_mesh(NO_MESH):
        return nnx.eval_shape(build)
