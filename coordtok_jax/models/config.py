"""CoordTok model configuration: field names, derived geometry and validation.

The field names follow the official `train_coordtok.py` arguments so that a configuration
can be read off the official command line (or the reference JSON files) one to one.
`validate` is called by `CoordTok.__init__` and by the trainers before anything is traced,
so impossible geometry fails with a message that names the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from coordtok_jax.errors import UserError
from coordtok_jax.models.layers import Compute
from coordtok_jax.sharding import freeze_rules

PADDING_MASK_MODES = ("official", "exclude")
ATTENTION_IMPLS = (None, "xla", "cudnn", "chunked", "splash", "splash_interpret")
DTYPES = ("float32", "bfloat16", "float16")
# Ready-made jax.checkpoint_policies (the others are factories that need arguments).
REMAT_POLICIES = (
    "none",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)

# Every field CoordTok reads, with the official meaning.
MODEL_FIELDS = (
    "video_shape",  # (T, H, W) of the training clips.
    "enc_embed_dim",  # encoder width D (ViT3D and cross/self encoder).
    "enc_num_heads",
    "enc_patch_num_layers",  # ViT3D depth.
    "enc_num_layers",  # cross/self encoder depth.
    "enc_patch_size_t",  # ViT3D Conv3d patch (t, xy, xy).
    "enc_patch_size_xy",
    "latent_resolution_xy",  # z_xy is (Rxy, Rxy, C); z_yt, z_xt are (Rt, Rxy, C).
    "latent_resolution_t",
    "latent_n_features",  # C.
    "latent_patch_size_xy",  # query-token patch on the planes.
    "latent_patch_size_t",
    "dec_embed_dim",
    "dec_num_heads",
    "dec_num_layers",
    "dec_patch_size_t",  # decoded patch (pt, px, py); px = py = dec_patch_size_xy.
    "dec_patch_size_xy",
    "mlp_ratio",
    "padding_mask",  # 'official' (+1 logit on padded memory, spec 9.1/9.3) or 'exclude'.
    "dtype",  # compute dtype; parameters are always float32.
    "attention_impl",  # None / 'xla' (plain), 'cudnn' (GPU), 'splash' (TPU) or 'chunked' (query chunks).
    "remat_policy",  # 'none' or a name in jax.checkpoint_policies.
)


class ConfigError(UserError, ValueError):
    """A model configuration that cannot work; the message names the field."""


def get_field(cfg: Any, name: str, fields=MODEL_FIELDS) -> Any:
    """cfg.name (ConfigDict, dict or dataclass); ConfigError listing `fields` when missing."""
    present = name in cfg if isinstance(cfg, Mapping) else hasattr(cfg, name)
    if not present:
        raise ConfigError(f"config.model.{name} is missing (expected fields: {', '.join(fields)})")
    return cfg[name] if isinstance(cfg, Mapping) else getattr(cfg, name)


_get = get_field


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every size the model derives from its configuration, validated."""

    video_shape: tuple[int, int, int]
    enc_patch: tuple[int, int, int]
    enc_grid: tuple[int, int, int]  # ViT3D token grid (T', H', W').
    latent_xy: int
    latent_t: int
    channels: int
    query_patch_xy: tuple[int, int]
    query_patch_t: tuple[int, int]  # for yt and xt: (t, xy).
    query_grid_xy: tuple[int, int]
    query_grid_t: tuple[int, int]
    dec_patch: tuple[int, int, int]
    dec_grid: tuple[int, int, int]  # decoder positional table (T/pt, H/px, W/py).

    @property
    def num_memory_tokens(self) -> int:
        t, h, w = self.enc_grid
        return t * h * w

    @property
    def num_query_tokens(self) -> tuple[int, int, int]:
        nxy = self.query_grid_xy[0] * self.query_grid_xy[1]
        nt = self.query_grid_t[0] * self.query_grid_t[1]
        return nxy, nt, nt

    @property
    def num_latent_tokens(self) -> int:
        """Tokens of the triplane representation (the paper's token count)."""
        return self.latent_xy * self.latent_xy + 2 * self.latent_t * self.latent_xy

    @property
    def patch_values(self) -> int:
        pt, px, py = self.dec_patch
        return pt * px * py * 3

    @property
    def plane_shapes(self) -> tuple[tuple[int, int, int], ...]:
        c = self.channels
        return (
            (self.latent_xy, self.latent_xy, c),
            (self.latent_t, self.latent_xy, c),
            (self.latent_t, self.latent_xy, c),
        )


def positive_int(cfg: Any, name: str, fields=MODEL_FIELDS) -> int:
    v = get_field(cfg, name, fields)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config.model.{name} must be a positive integer, got {v!r}")
    return v


def _divides(part: int, part_name: str, whole: int, whole_name: str, why: str) -> None:
    if whole % part:
        raise ConfigError(
            f"config.model.{part_name}={part} must divide config.model.{whole_name}={whole} ({why})"
        )


def validate(cfg: Any) -> Geometry:
    """Checks a model config (ConfigDict, dict or dataclass) and returns its Geometry.

    Raises ConfigError naming the offending field, before anything is built or compiled.
    """
    vs = _get(cfg, "video_shape")
    try:
        vs = tuple(int(v) for v in vs)
    except (TypeError, ValueError):
        raise ConfigError(f"config.model.video_shape must be (frames, height, width), got {vs!r}") from None
    if len(vs) != 3 or min(vs) <= 0:
        raise ConfigError(f"config.model.video_shape must be three positive ints (T, H, W), got {vs!r}")
    T, H, W = vs

    d_enc = positive_int(cfg, "enc_embed_dim")
    h_enc = positive_int(cfg, "enc_num_heads")
    positive_int(cfg, "enc_patch_num_layers")
    positive_int(cfg, "enc_num_layers")
    ept = positive_int(cfg, "enc_patch_size_t")
    epxy = positive_int(cfg, "enc_patch_size_xy")
    rxy = positive_int(cfg, "latent_resolution_xy")
    rt = positive_int(cfg, "latent_resolution_t")
    c = positive_int(cfg, "latent_n_features")
    lpxy = positive_int(cfg, "latent_patch_size_xy")
    lpt = positive_int(cfg, "latent_patch_size_t")
    d_dec = positive_int(cfg, "dec_embed_dim")
    h_dec = positive_int(cfg, "dec_num_heads")
    positive_int(cfg, "dec_num_layers")
    dpt = positive_int(cfg, "dec_patch_size_t")
    dpxy = positive_int(cfg, "dec_patch_size_xy")

    _divides(h_enc, "enc_num_heads", d_enc, "enc_embed_dim", "attention heads split the width")
    _divides(h_dec, "dec_num_heads", d_dec, "dec_embed_dim", "attention heads split the width")
    _divides(ept, "enc_patch_size_t", T, "video_shape[0]", "the ViT3D Conv3d patch tiles the frames")
    _divides(epxy, "enc_patch_size_xy", H, "video_shape[1]", "the ViT3D Conv3d patch tiles the height")
    _divides(epxy, "enc_patch_size_xy", W, "video_shape[2]", "the ViT3D Conv3d patch tiles the width")
    _divides(lpxy, "latent_patch_size_xy", rxy, "latent_resolution_xy", "query tokens tile the planes")
    if lpt > rt:
        raise ConfigError(
            f"config.model.latent_resolution_t={rt} is smaller than config.model.latent_patch_size_t={lpt}: "
            "the yt/xt planes would have no query tokens (the official README's latent_resolution_t=8 is a "
            "typo; the released model uses 32)"
        )
    _divides(lpt, "latent_patch_size_t", rt, "latent_resolution_t", "query tokens tile the yt/xt planes")
    _divides(dpt, "dec_patch_size_t", T, "video_shape[0]", "decoded patches tile the frames")
    _divides(dpxy, "dec_patch_size_xy", H, "video_shape[1]", "decoded patches tile the height")
    _divides(dpxy, "dec_patch_size_xy", W, "video_shape[2]", "decoded patches tile the width")

    mlp_ratio = _get(cfg, "mlp_ratio")
    if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0 or int(d_enc * mlp_ratio) <= 0:
        raise ConfigError(f"config.model.mlp_ratio must be a positive number, got {mlp_ratio!r}")
    mode = _get(cfg, "padding_mask")
    if mode not in PADDING_MASK_MODES:
        raise ConfigError(f"config.model.padding_mask must be one of {PADDING_MASK_MODES}, got {mode!r}")
    dtype = _get(cfg, "dtype")
    if dtype not in DTYPES:
        raise ConfigError(f"config.model.dtype must be one of {DTYPES}, got {dtype!r}")
    impl = _get(cfg, "attention_impl")
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"config.model.attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    query_chunk(cfg)
    scan_unroll(cfg)
    scan_layers(cfg)
    policy = _get(cfg, "remat_policy")
    if policy not in REMAT_POLICIES or (policy != "none" and not hasattr(jax.checkpoint_policies, policy)):
        raise ConfigError(f"config.model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")

    return Geometry(
        video_shape=(T, H, W),
        enc_patch=(ept, epxy, epxy),
        enc_grid=(T // ept, H // epxy, W // epxy),
        latent_xy=rxy,
        latent_t=rt,
        channels=c,
        query_patch_xy=(lpxy, lpxy),
        query_patch_t=(lpt, lpxy),
        query_grid_xy=(rxy // lpxy, rxy // lpxy),
        query_grid_t=(rt // lpt, rxy // lpxy),
        dec_patch=(dpt, dpxy, dpxy),
        dec_grid=(T // dpt, H // dpxy, W // dpxy),
    )


def query_chunk(cfg: Any) -> int:
    """config.model.attention_query_chunk (optional, default 1024): queries per chunk for
    attention_impl='chunked'."""
    v = cfg.get("attention_query_chunk", 1024) if hasattr(cfg, "get") else getattr(cfg, "attention_query_chunk", 1024)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config.model.attention_query_chunk must be a positive integer, got {v!r}")
    return v


def scan_unroll(cfg: Any) -> int:
    """config.model.scan_unroll (optional, default 1): layers per iteration of the layer scan
    (a number >= the depth unrolls the stack completely; measured on CPU in benchmarks/RESULTS.md).
    Parameters stay stacked either way; ignored with scan_layers=False."""
    v = cfg.get("scan_unroll", 1) if hasattr(cfg, "get") else getattr(cfg, "scan_unroll", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"config.model.scan_unroll must be a positive integer, got {v!r}")
    return v


def scan_layers(cfg: Any) -> bool:
    """config.model.scan_layers (optional, default True): the layer stacks' parameter layout.
    True: stacked on a leading 'layers' axis and run with lax.scan; False: one tree per layer
    (`blocks.0`, ...) run in a Python loop (faster on CPU, longer compiles). A checkpoint holds the
    layout it was trained with."""
    v = cfg.get("scan_layers", True) if hasattr(cfg, "get") else getattr(cfg, "scan_layers", True)
    if not isinstance(v, bool):
        raise ConfigError(f"config.model.scan_layers must be True or False, got {v!r}")
    return v


def compute_dtype(cfg: Any) -> jnp.dtype:
    return jnp.dtype(_get(cfg, "dtype"))


def make_compute(cfg: Any, axis_rules=None):
    """The layers' Compute of a (validated) model config; `axis_rules` (e.g.
    `sharding.rules_of(config)`) turns on the activation sharding constraints."""
    return Compute(compute_dtype(cfg), _get(cfg, "attention_impl"), _get(cfg, "remat_policy"), query_chunk(cfg),
                   freeze_rules(axis_rules), scan_unroll(cfg), scan_layers(cfg))
