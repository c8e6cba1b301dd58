"""A trained tokenizer from a workdir: its config (from the checkpoint) and parameters.

    model, config, step = load_tokenizer("gs://BUCKET/coordtok_L_s2")           # latest step
    model, config, step = load_tokenizer(workdir, step=50_000, attention_impl="chunked")
    model, config, step = load_tokenizer(workdir, mesh=mesh, rules=sharding.rules_of(config))

Works for trainer checkpoints and for parameters-only checkpoints written by
`python -m coordtok_jax.convert torch-import`. Parameters are restored directly into their
shardings: with `mesh`, each parameter takes the sharding of its logical names under `rules`
(FSDP over a training mesh, replicated over a ('data',) evaluation mesh) and the model constrains
its activations with the same rules; else `sharding` (one for every parameter; default: this
process's first device).
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.models import validate
from coordtok_jax.models.coordtok import CoordTok
from coordtok_jax.io.checkpoint import read_config, require_kind, resolve_step, restore_params


def abstract_params(model_config, sharding: Optional[jax.sharding.Sharding] = None, *, mesh=None, rules=None):
    """ShapeDtypeStructs of the model's parameters: in their logical-name shardings on `mesh`
    (with `rules`), else all in `sharding` (default: this process's first device)."""
    abstract = sharding_lib.eval_shape(lambda: CoordTok(model_config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if mesh is not None:
        shardings = sharding_lib.state_shardings(nnx.state(abstract, nnx.Param), mesh,
                                                 sharding_lib.rules_of(None) if rules is None else rules)
        return sharding_lib.abstract(params, nnx.to_pure_dict(shardings))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return sharding_lib.abstract(params, sharding)


def load_tokenizer(workdir: str, step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None,
                   *, mesh=None, rules=None, **model_overrides):
    """(CoordTok, full config, step) of `workdir`'s latest (or `step`) checkpoint.

    `model_overrides` replace config.model fields that do not change the parameters (dtype,
    attention_impl, attention_query_chunk, remat_policy, padding_mask).
    """
    allowed = {"dtype", "attention_impl", "attention_query_chunk", "remat_policy", "padding_mask"}
    bad = set(model_overrides) - allowed
    if bad:
        raise ValueError(f"load_tokenizer can only override {sorted(allowed)}, got {sorted(bad)}")
    _, step = resolve_step(workdir, step)
    config = read_config(workdir, step)
    require_kind(config, "tokenizer", workdir, "loading a tokenizer")
    with config.unlocked():
        for k, v in model_overrides.items():
            config.model[k] = v
    validate(config.model)
    if mesh is not None and rules is None:
        rules = sharding_lib.rules_of(config)
    params, step = restore_params(workdir, abstract_params(config.model, sharding, mesh=mesh, rules=rules), step)
    axis_rules = rules if mesh is not None else None
    graphdef = nnx.graphdef(sharding_lib.eval_shape(
        lambda: CoordTok(config.model, rngs=nnx.Rngs(0), axis_rules=axis_rules)))
    return nnx.merge(graphdef, params), config, step
