"""Train state, optimizer and their shardings.

The state is a pytree of plain arrays: `params` (the model's nnx.Param tree as a nested dict),
`opt_state` (optax), `step`, `rng` (the run's base key; step k uses fold_in(rng, k)) and
`first_nonfinite` (the first step whose loss was NaN/Inf, -1 if none). The model's graphdef is
kept outside. Parameters and optimizer moments get the shardings of the logical axis names.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.models import CoordTok


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    first_nonfinite: jax.Array


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW as the official (lr 1e-4 constant, betas (0.9, 0.999), eps 1e-8, weight decay 1e-3
    on every parameter), with optional linear warm-up and global-norm clipping."""
    o = config.optimizer
    lr = o.learning_rate
    schedule = optax.linear_schedule(0.0, lr, o.warmup_steps) if o.warmup_steps > 0 else lr
    if o.warmup_steps > 0:
        schedule = optax.join_schedules([schedule, optax.constant_schedule(lr)], [o.warmup_steps])
    chain = []
    if o.grad_clip_norm and o.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*chain)


def learning_rate(config, step):
    o = config.optimizer
    if o.warmup_steps > 0:
        return o.learning_rate * jnp.minimum(1.0, step / o.warmup_steps)
    return jnp.asarray(o.learning_rate, jnp.float32)


def param_shardings(abstract_params, model_abstract, mesh, rules):
    """NamedSharding per parameter from the logical names carried by the abstract model."""
    named = sharding_lib.state_shardings(nnx.state(model_abstract, nnx.Param), mesh, rules)
    return nnx.to_pure_dict(named)


def opt_state_shardings(opt_state, params, param_shardings, replicated):
    """Subtrees of the optimizer state shaped like the parameters (Adam's mu and nu) take the
    parameters' shardings; scalars such as the step count are replicated."""
    params_def = jax.tree.structure(params)
    is_params = lambda x: jax.tree.structure(x) == params_def
    return jax.tree.map(lambda sub: param_shardings if is_params(sub) else replicated, opt_state, is_leaf=is_params)


def create_train_state(config, mesh, tx):
    """(graphdef, state, state_shardings): the state built directly in its shardings."""
    build = lambda: CoordTok(config.model, rngs=nnx.Rngs(config.seed))
    model_abstract = nnx.eval_shape(build)
    graphdef, abstract_params = nnx.split(model_abstract)
    abstract_params = nnx.to_pure_dict(abstract_params)
    param_sh = param_shardings(abstract_params, model_abstract, mesh, config.logical_axis_rules)

    def init():
        params = nnx.to_pure_dict(nnx.state(build(), nnx.Param))
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(config.seed),
            first_nonfinite=jnp.full((), -1, jnp.int32),
        )

    abstract_state = jax.eval_shape(init)
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = TrainState(
        step=replicated,
        params=param_sh,
        opt_state=opt_state_shardings(abstract_state.opt_state, abstract_params, param_sh, replicated),
        rng=replicated,
        first_nonfinite=replicated,
    )
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=state_sh)()
    return graphdef, state, state_sh


def abstract_with_shardings(state, shardings):
    """ShapeDtypeStructs carrying the target shardings (for Orbax restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
