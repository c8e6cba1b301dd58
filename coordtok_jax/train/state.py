"""Train states, the optimizer, and the one builder that creates a state already sharded.

A state is a flax struct of plain arrays: `params` (the model's nnx.Param tree as a nested dict),
`opt_state` (optax), `step`, `rng` (the run's base key; step k uses fold_in(rng, k)),
`first_nonfinite` (the first step whose loss was NaN/Inf, -1 if none), plus what a trainer adds
(the SiT's EMA and latent statistics). The model's graphdef (and its non-trainable buffers) are
kept outside.

`plan_state` works from abstract shapes only (MaxText style): it evaluates the model and the
optimizer with `eval_shape`, gives every parameter the sharding of its logical axis names, every
subtree shaped like the parameters (Adam's moments, an EMA) the same shardings, and everything else
(scalars, keys, statistics) replicated. The plan's `abstract` state (ShapeDtypeStructs carrying
their shardings) is what Orbax restores into and what ahead-of-time compilation (train/aot.py)
lowers against, so a TPU slice's program can be compiled on a CPU host without allocating the
model; `plan.create()` builds the state with one jitted init whose outputs land in their
shardings, so no host ever holds an unsharded copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from coordtok_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    first_nonfinite: jax.Array


def lr_schedule(config):
    """config.optimizer's learning rate as an optax schedule: linear warm-up over warmup_steps, then
    constant (official) or, with schedule='cosine', a cosine decay to 0 at config.total_steps."""
    o = config.optimizer
    lr, warmup = float(o.learning_rate), int(o.warmup_steps)
    kind = o.get("schedule", "constant")
    if kind not in ("constant", "cosine"):
        from coordtok_jax.errors import UserError

        raise UserError(f"config.optimizer.schedule must be 'constant' or 'cosine', got {kind!r}")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(int(config.total_steps), warmup + 1))
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    return lr


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW as the official (lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8, weight decay 1e-3
    on every parameter), with optional warm-up, cosine decay and global-norm clipping."""
    o = config.optimizer
    chain = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*chain)


def learning_rate(config, step):
    """The learning rate at `step` (for logging)."""
    schedule = lr_schedule(config)
    return schedule(step) if callable(schedule) else jnp.asarray(schedule, jnp.float32)


def like_params_shardings(tree, params, param_shardings, replicated):
    """Shardings for `tree`: every subtree with the parameters' structure (the parameters, Adam's
    mu and nu, an EMA) takes the parameters' shardings; every other leaf is replicated."""
    params_def = jax.tree.structure(params)
    is_params = lambda x: jax.tree.structure(x) == params_def
    return jax.tree.map(lambda sub: param_shardings if is_params(sub) else replicated, tree, is_leaf=is_params)


@dataclasses.dataclass(frozen=True)
class StatePlan:
    """A train state described before it exists: its structure, shardings and how to build it."""

    mesh: Mesh
    graphdef: Any  # the model's nnx graphdef: nnx.merge(graphdef, params[, buffers])
    buffers: Any  # the model's non-Param variables (concrete, replicated; None when it has none)
    abstract: Any  # the state as ShapeDtypeStructs carrying their shardings
    shardings: Any  # the state's NamedShardings
    param_shardings: Any
    init: Callable[[], Any]  # builds the state (jitted by `create`)

    def create(self):
        """The fresh state, each array created directly in its sharding."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self.init, out_shardings=self.shardings)()

    def model(self, params):
        """The nnx model holding `params` (and the buffers)."""
        return nnx.merge(self.graphdef, params, *(() if self.buffers is None else (self.buffers,)))


def plan_state(build: Callable[[], nnx.Module], mesh: Mesh, rules, tx: optax.GradientTransformation,
               make_state: Callable[[Any, Any], Any]) -> StatePlan:
    """The one state builder of both trainers.

    build: () -> the model (with its rngs and axis rules); make_state(params, opt_state) -> the
    trainer's state struct (may add fields; fields shaped like params are sharded like them).
    """
    model_abstract = sharding_lib.eval_shape(build)
    graphdef, abstract_params, abstract_buffers = nnx.split(model_abstract, nnx.Param, ...)
    abstract_params = nnx.to_pure_dict(abstract_params)
    param_sh = nnx.to_pure_dict(sharding_lib.state_shardings(nnx.state(model_abstract, nnx.Param), mesh, rules))
    replicated = sharding_lib.replicated(mesh)

    def init():
        params = nnx.to_pure_dict(nnx.state(build(), nnx.Param))
        return make_state(params, tx.init(params))

    abstract_state = jax.eval_shape(init)
    state_sh = like_params_shardings(abstract_state, abstract_params, param_sh, replicated)
    buffers = None
    if jax.tree.leaves(abstract_buffers):  # e.g. the SiT's fixed sin-cos table: a constant computed
        # alone on this host (XLA drops the unused parameter initialisers), replicated when the mesh
        # is this host's (a topology being compiled for has no devices to put it on)
        with jax.sharding.use_abstract_mesh(sharding_lib.NO_MESH):
            buffers = jax.jit(lambda: nnx.state(build(), nnx.Not(nnx.Param)))()
        if all(d.process_index == jax.process_index() and d.platform == jax.default_backend()
               for d in mesh.devices.flat):
            buffers = jax.device_put(buffers, replicated)
    return StatePlan(mesh=mesh, graphdef=graphdef, buffers=buffers,
                     abstract=sharding_lib.abstract(abstract_state, state_sh), shardings=state_sh,
                     param_shardings=param_sh, init=init)


def tokenizer_state(config, mesh: Mesh, tx: optax.GradientTransformation) -> StatePlan:
    """The CoordTok trainer's state plan (config.model, config.seed, config.logical_axis_rules)."""
    from coordtok_jax.models import CoordTok

    rules = sharding_lib.rules_of(config)
    build = lambda: CoordTok(config.model, rngs=nnx.Rngs(config.seed), axis_rules=rules)
    make = lambda params, opt_state: TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=jax.random.PRNGKey(config.seed),
        first_nonfinite=jnp.full((), -1, jnp.int32))
    return plan_state(build, mesh, rules, tx, make)
