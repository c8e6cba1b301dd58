"""A trained tokenizer from a workdir: its config (from the checkpoint) and parameters.

    model, config, step = load_tokenizer("gs://BUCKET/coordtok_L_s2")           # latest step
    model, config, step = load_tokenizer(workdir, step=50_000, attention_impl="chunked")

Works for trainer checkpoints and for parameters-only checkpoints written by
`python -m coordtok_jax.convert torch-import`. Parameters are restored directly into the given
sharding (replicated over a mesh for data-parallel evaluation; one device by default).
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import nnx

from coordtok_jax.models import validate
from coordtok_jax.models.coordtok import CoordTok
from coordtok_jax.train.checkpoint import read_config, resolve_step, restore_params


def abstract_params(model_config, sharding: Optional[jax.sharding.Sharding] = None):
    """ShapeDtypeStructs of the model's parameters in `sharding` (default: this process's first device)."""
    abstract = nnx.eval_shape(lambda: CoordTok(model_config, rngs=nnx.Rngs(0)))
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def load_tokenizer(workdir: str, step: Optional[int] = None, sharding: Optional[jax.sharding.Sharding] = None,
                   **model_overrides):
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
    with config.unlocked():
        for k, v in model_overrides.items():
            config.model[k] = v
    validate(config.model)
    params, step = restore_params(workdir, abstract_params(config.model, sharding), step)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CoordTok(config.model, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params), config, step
