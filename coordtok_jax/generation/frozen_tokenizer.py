"""The SiT's frozen tokenizer: a trained CoordTok's encoder as a pure function of its parameters,
loaded from a run (sharded by the SiT's rules) or abstract (for `compile`), and the check that its
planes are the ones the SiT's config expects."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from flax import nnx

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.data.video import to_model_input
from coordtok_jax.io.runs import abstract_params, load_tokenizer
from coordtok_jax.models import ConfigError, CoordTok


def check_plane_shapes(config, plane_shapes, where: str) -> None:
    """The SiT's planes (config.model) must be the tokenizer's."""
    m = config.model
    want = [(m.latent_resolution_xy, m.latent_resolution_xy, m.in_channels),
            (m.latent_resolution_t, m.latent_resolution_xy, m.in_channels)]
    got = [tuple(s) for s in plane_shapes]
    if got[0] != want[0] or got[1] != want[1] or got[2] != want[1]:
        raise ConfigError(f"{where} has planes xy {got[0]}, yt {got[1]}, xt {got[2]}; config.model expects xy "
                          f"{want[0]} and yt/xt {want[1]} (latent_resolution_xy/t, in_channels)")


class FrozenTokenizer(NamedTuple):
    encode: Callable  # (params, uint8 video (B, T, H, W, 3), n_frames (B,)) -> planes (xy, yt, xt)
    params: Any  # concrete (loaded) or abstract (for `compile`), in the parameters' rule shardings
    graphdef: Any
    geometry: Any
    step: int
    config: Any  # the tokenizer's full config


def _frozen(graphdef, params, geometry, step, tok_config) -> FrozenTokenizer:
    pad_value = float(tok_config.data.get("pad_value", -3.0))

    def encode(tok_params, video, n_frames):
        model = nnx.merge(graphdef, tok_params)
        return model.encode(to_model_input(video, n_frames, pad_value), n_frames)

    return FrozenTokenizer(encode, params, graphdef, geometry, step, tok_config)


def frozen_tokenizer(config, mesh) -> FrozenTokenizer:
    """The tokenizer named by config.tokenizer, its parameters sharded by the rules on `mesh`
    (FSDP on a training mesh: the frozen L tokenizer costs 1/fsdp of its 3.4 GB per chip)."""
    if not config.tokenizer:
        raise ConfigError("config.tokenizer must name the tokenizer's workdir (a trainer run or a torch-import)")
    rules = sharding_lib.rules_of(config)
    tokenizer, tok_config, tok_step = load_tokenizer(config.tokenizer, mesh=mesh, rules=rules)
    check_plane_shapes(config, tokenizer.geometry.plane_shapes, f"the tokenizer in {config.tokenizer}")
    graphdef, params = nnx.split(tokenizer)
    return _frozen(graphdef, params, tokenizer.geometry, tok_step, tok_config)


def abstract_tokenizer(config, tok_config, mesh) -> FrozenTokenizer:
    """A tokenizer of `tok_config` (its full config) with abstract parameters, for `compile`."""
    rules = sharding_lib.rules_of(config)
    model = sharding_lib.eval_shape(lambda: CoordTok(tok_config.model, rngs=nnx.Rngs(0), axis_rules=rules))
    check_plane_shapes(config, model.geometry.plane_shapes, "the tokenizer config")
    params = abstract_params(tok_config.model, mesh=mesh, rules=rules)
    return _frozen(nnx.graphdef(model), params, model.geometry, 0, tok_config)
