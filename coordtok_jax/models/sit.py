"""Triplane SiT (Flax NNX): the official CoordTok latent diffusion transformer.

Semantics of the official `models/diffusion/sit_models.py` (port spec, section 7), which is
DiT/SiT with three planes instead of one image:

* inputs are the three normalised planes, channel-last: xy (B, Rxy, Rxy, C), yt and xt
  (B, Rt, Rxy, C); t (B,) float in [0, 1] (NOT scaled by 1000); y (B,) int class labels.
* `x_embedder_{xy,yt,xt}`: Conv(C -> D, kernel = stride = p) per plane, tokens row-major.
  xy tokens += `pos_embed_xy`, the fixed MAE 2D sin-cos table over the (Rxy/p, Rxy/p) grid
  (first half of the channels encodes the COLUMN index, because the official builds the grid with
  meshgrid(w, h)); yt and xt tokens += the SAME learned `pos_embed_t` (1, (Rt/p)(Rxy/p), D);
  plane k += `type_embed[:, k]`; tokens concatenated [xy, yt, xt].
* c = TimestepEmbedder(t) + LabelEmbedder(y): 256-dim frequency embedding [cos, sin] with
  freqs exp(-ln(10000) i / 128) -> Linear-SiLU-Linear; label table (num_classes +
  (class_dropout_prob > 0), D). Labels are replaced by the null class `num_classes` where
  `force_drop_ids == 1`, or at random with class_dropout_prob when training (the official
  `token_drop`, for classifier-free guidance).
* `depth` adaLN-Zero blocks (LayerNorm without affine, eps 1e-6; x * (1 + scale) + shift;
  timm Attention with qkv bias; Mlp with tanh-approximate GELU; gates), stacked with
  `layers.Stack` (stacked on a 'layers' axis + lax.scan, or one tree per layer: model.scan_layers;
  optional remat).
* `final_layer_{xy,yt,xt}`: adaLN shift/scale, LayerNorm, Linear(D, p*p*out_channels);
  unpatchify 'nhwpqc->nchpwq' (token (i, j) features laid out (p, q, c) fill pixel
  (i*p + a, j*p + b)); learn_sigma: out_channels = 2C and the second C channels are discarded.

Initialisation is the official `initialize_weights` (Xavier-uniform Linear with zero bias,
patch embeddings Xavier-uniform on the flattened (D, C*p*p) weight, label table and timestep
MLP weights N(0, 0.02), adaLN modulations and final linears zero, `pos_embed_t` zero,
`type_embed` N(0, 1)). With the zero final layers the output is exactly 0 at initialisation.

State: every trainable tensor is an `nnx.Param`; `pos_embed_xy` is a `Buffer` (a non-Param
nnx.Variable, the official requires_grad=False Parameter): optimise and average (EMA) only
`nnx.state(model, nnx.Param)`, and rebuild with `nnx.merge(graphdef, params, buffers)` or
`sit_model_from_params` (which recomputes a missing table). `count_params(model)` counts the
trainable parameters; `count_sit_params(model)` adds the buffer, as the official state_dict
numel does (SiT-L/2: 461,397,184 + 65,536 = 461,462,720).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordtok_jax import sharding
from coordtok_jax.models.config import (
    ATTENTION_IMPLS,
    DTYPES,
    REMAT_POLICIES,
    ConfigError,
    get_field,
    make_compute,
    positive_int,
    query_chunk,
    scan_layers,
    scan_unroll,
)
from coordtok_jax.models.encoder import learned
from coordtok_jax.models.layers import XAVIER_UNIFORM, Attention, Compute, Stack, named, normal

FREQUENCY_EMBEDDING_SIZE = 256  # official TimestepEmbedder default
PLANES = ("xy", "yt", "xt")

SIT_FIELDS = (
    "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio",
    "in_channels",  # C of the tokenizer planes
    "latent_resolution_xy", "latent_resolution_t",  # xy (Rxy, Rxy, C); yt, xt (Rt, Rxy, C)
    "num_classes", "class_dropout_prob", "learn_sigma",
    "dtype", "attention_impl", "remat_policy",
)


def _get(cfg: Any, name: str) -> Any:
    return get_field(cfg, name, SIT_FIELDS)


def _positive_int(cfg: Any, name: str) -> int:
    return positive_int(cfg, name, SIT_FIELDS)


@dataclasses.dataclass(frozen=True)
class SiTGeometry:
    hidden_size: int
    depth: int
    num_heads: int
    patch: int
    channels: int  # C of the input planes
    out_channels: int  # 2C with learn_sigma
    latent_xy: int
    latent_t: int
    num_classes: int
    table_rows: int  # num_classes + 1 when class_dropout_prob > 0 (the null / CFG class)

    @property
    def plane_shapes(self) -> tuple[tuple[int, int, int], ...]:
        c = self.channels
        return ((self.latent_xy, self.latent_xy, c), (self.latent_t, self.latent_xy, c),
                (self.latent_t, self.latent_xy, c))

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Token grid of each plane (rows, cols)."""
        return tuple((r1 // self.patch, r2 // self.patch) for r1, r2, _ in self.plane_shapes)

    @property
    def num_tokens(self) -> tuple[int, int, int]:
        return tuple(a * b for a, b in self.grids)


def validate_sit(cfg: Any) -> SiTGeometry:
    """Checks a SiT model config (ConfigDict, dict or dataclass); ConfigError names the field."""
    d = _positive_int(cfg, "hidden_size")
    depth = _positive_int(cfg, "depth")
    heads = _positive_int(cfg, "num_heads")
    p = _positive_int(cfg, "patch_size")
    c = _positive_int(cfg, "in_channels")
    rxy = _positive_int(cfg, "latent_resolution_xy")
    rt = _positive_int(cfg, "latent_resolution_t")
    n_cls = _positive_int(cfg, "num_classes")
    if d % heads:
        raise ConfigError(f"config.model.num_heads={heads} must divide config.model.hidden_size={d} "
                          "(attention heads split the width)")
    if d % 4:
        raise ConfigError(f"config.model.hidden_size={d} must be a multiple of 4 (the 2D sin-cos table "
                          "splits the width into row/column halves of sin and cos)")
    for name, r in (("latent_resolution_xy", rxy), ("latent_resolution_t", rt)):
        if r % p:
            raise ConfigError(f"config.model.patch_size={p} must divide config.model.{name}={r} "
                              "(patch embedding tiles the planes)")
    ratio = _get(cfg, "mlp_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or int(d * ratio) <= 0:
        raise ConfigError(f"config.model.mlp_ratio must be a positive number, got {ratio!r}")
    prob = _get(cfg, "class_dropout_prob")
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob < 1.0:
        raise ConfigError(f"config.model.class_dropout_prob must be in [0, 1), got {prob!r}")
    sigma = _get(cfg, "learn_sigma")
    if not isinstance(sigma, bool):
        raise ConfigError(f"config.model.learn_sigma must be True or False, got {sigma!r}")
    if _get(cfg, "dtype") not in DTYPES:
        raise ConfigError(f"config.model.dtype must be one of {DTYPES}, got {_get(cfg, 'dtype')!r}")
    if _get(cfg, "attention_impl") not in ATTENTION_IMPLS:
        raise ConfigError(f"config.model.attention_impl must be one of {ATTENTION_IMPLS}, "
                          f"got {_get(cfg, 'attention_impl')!r}")
    query_chunk(cfg)
    scan_unroll(cfg)
    scan_layers(cfg)
    policy = _get(cfg, "remat_policy")
    if policy not in REMAT_POLICIES or (policy != "none" and not hasattr(jax.checkpoint_policies, policy)):
        raise ConfigError(f"config.model.remat_policy must be one of {REMAT_POLICIES}, got {policy!r}")
    return SiTGeometry(d, depth, heads, p, c, 2 * c if sigma else c, rxy, rt, n_cls, n_cls + (prob > 0))


class Buffer(nnx.Variable):
    """Non-trainable state saved with the model (a PyTorch Parameter with requires_grad=False)."""


def sincos_2d(embed_dim: int, grid_size) -> np.ndarray:
    """(rows * cols, embed_dim) float32: the MAE / DiT `get_2d_sincos_pos_embed` table.

    grid_size = rows = cols, or (rows, cols). Token n = i * cols + j (row i, column j).
    Channels [0, D/2) encode the column j and [D/2, D) the row i (the official meshgrid(w, h) puts
    w first); each half is [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000 ** (-k / (D/4)),
    computed in float64.
    """
    n_rows, n_cols = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
    rows = np.repeat(np.arange(n_rows, dtype=np.float32), n_cols)
    cols = np.tile(np.arange(n_cols, dtype=np.float32), n_rows)

    def one(p):
        out = np.outer(p, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
    """(B,) -> (B, dim) float32: [cos(t f), sin(t f)], f_i = exp(-ln(max_period) * i / (dim/2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


def unpatchify(tokens: jax.Array, grid: tuple[int, int], patch: int, channels: int) -> jax.Array:
    """(B, h*w, p*p*c) -> (B, h*p, w*p, c): official 'nhwpqc->nchpwq', channel-last."""
    b = tokens.shape[0]
    (h, w), p = grid, patch
    x = tokens.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, channels)


def linear(din: int, dout: int, axes, compute: Compute, rngs: nnx.Rngs, kernel_init=XAVIER_UNIFORM) -> nnx.Linear:
    """nn.Linear after the official `_basic_init`: Xavier-uniform weight, zero bias."""
    return nnx.Linear(din, dout, dtype=compute.dtype, param_dtype=jnp.float32,
                      kernel_init=named(kernel_init, axes),
                      bias_init=named(nnx.initializers.zeros_init(), axes[1:]), rngs=rngs)


ZEROS = nnx.initializers.zeros_init()


def _no_affine_norm(dim: int, compute: Compute, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=1e-6, use_bias=False, use_scale=False, dtype=compute.dtype, rngs=rngs)


class PatchEmbed(nnx.Module):
    """Conv(C -> D, kernel = stride = p) (official `x_embedder_*.proj`), Xavier on (D, C*p*p)."""

    def __init__(self, cin: int, dim: int, patch: int, compute: Compute, rngs: nnx.Rngs):
        bound = math.sqrt(6.0 / (cin * patch * patch + dim))
        init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
        self.proj = nnx.Conv(cin, dim, (patch, patch), (patch, patch), padding="VALID", dtype=compute.dtype,
                             param_dtype=jnp.float32, kernel_init=named(init, (None, None, None, "embed")),
                             bias_init=named(ZEROS, ("embed",)), rngs=rngs)

    def __call__(self, plane: jax.Array) -> jax.Array:  # (B, R1, R2, C) -> (B, tokens, D) row-major
        x = self.proj(plane)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class SiTAttention(Attention):
    """timm Attention (packed qkv with bias, proj), Xavier-uniform / zero-bias init; the forward
    is `layers.Attention`'s (jax.nn.dot_product_attention with the config's implementation)."""

    def __init__(self, dim: int, num_heads: int, compute: Compute, rngs: nnx.Rngs):  # noqa: super init replaced
        self.dim, self.num_heads, self.compute = dim, num_heads, compute
        self.qkv = linear(dim, 3 * dim, ("embed", "qkv"), compute, rngs)
        self.proj = linear(dim, dim, ("heads", "embed"), compute, rngs)


class SiTMlp(nnx.Module):
    """timm Mlp with tanh-approximate GELU (DiT/SiT `approx_gelu`)."""

    def __init__(self, dim: int, hidden: int, compute: Compute, rngs: nnx.Rngs):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), compute, rngs)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), compute, rngs)
        self.compute = compute

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.compute.constrain(jax.nn.gelu(self.fc1(x), approximate=True), sharding.BLF)
        return self.compute.constrain(self.fc2(hidden), sharding.BLD)


class SiTBlock(nnx.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(LN(x))); x += gate_mlp * mlp(mod(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, compute: Compute, rngs: nnx.Rngs):
        self.norm1 = _no_affine_norm(dim, compute, rngs)
        self.attn = SiTAttention(dim, num_heads, compute, rngs)
        self.norm2 = _no_affine_norm(dim, compute, rngs)
        self.mlp = SiTMlp(dim, int(dim * mlp_ratio), compute, rngs)
        self.adaLN_modulation = linear(dim, 6 * dim, ("embed", None), compute, rngs, ZEROS)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mods = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nnx.Module):
    def __init__(self, dim: int, patch: int, out_channels: int, compute: Compute, rngs: nnx.Rngs):
        self.norm_final = _no_affine_norm(dim, compute, rngs)
        self.linear = linear(dim, patch * patch * out_channels, ("embed", None), compute, rngs, ZEROS)
        self.adaLN_modulation = linear(dim, 2 * dim, ("embed", None), compute, rngs, ZEROS)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TimestepEmbedder(nnx.Module):
    """Official `t_embedder`: frequency embedding (256) -> Linear -> SiLU -> Linear (mlp.0 / mlp.2)."""

    def __init__(self, dim: int, compute: Compute, rngs: nnx.Rngs):
        self.fc1 = linear(FREQUENCY_EMBEDDING_SIZE, dim, (None, "embed"), compute, rngs, normal(0.02))
        self.fc2 = linear(dim, dim, (None, "embed"), compute, rngs, normal(0.02))

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.silu(self.fc1(timestep_embedding(t))))


class LabelEmbedder(nnx.Module):
    """Official `y_embedder`: table (num_classes + use_cfg_embedding, D), N(0, 0.02)."""

    def __init__(self, g: SiTGeometry, dropout_prob: float, compute: Compute, rngs: nnx.Rngs):
        self.num_classes, self.dropout_prob, self.compute = g.num_classes, float(dropout_prob), compute
        self.embedding_table = learned(rngs, (g.table_rows, g.hidden_size), (None, "embed"), 0.02)

    def __call__(self, labels, *, train: bool, key=None, force_drop_ids=None) -> jax.Array:
        labels = jnp.asarray(labels).reshape(-1).astype(jnp.int32)
        drop = None
        if force_drop_ids is not None:
            drop = jnp.asarray(force_drop_ids).reshape(-1) == 1
        elif train and self.dropout_prob > 0:
            if key is None:
                raise ValueError("training with config.model.class_dropout_prob > 0 drops labels at random: "
                                 "pass dropout_key=jax.random.key(...)")
            drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
        if drop is not None:
            if self.embedding_table.shape[0] == self.num_classes:
                raise ValueError("force_drop_ids needs the null-class row, which exists only when "
                                 "config.model.class_dropout_prob > 0 (official use_cfg_embedding)")
            labels = jnp.where(drop, self.num_classes, labels)
        return jnp.take(self.embedding_table[...], labels, axis=0).astype(self.compute.dtype)


class TriplaneSiT(nnx.Module):
    """The official triplane SiT. `model(planes, t, y)` -> three planes (float32, same shapes).

    Args of __call__: planes = (xy (B, Rxy, Rxy, C), yt (B, Rt, Rxy, C), xt (B, Rt, Rxy, C));
    t (B,) in [0, 1]; y (B,) int labels (always 0 for the unconditional official model);
    train: enables random label dropout (needs dropout_key) when class_dropout_prob > 0;
    force_drop_ids (B,): 1 = use the null class (classifier-free guidance).
    `axis_rules`: as CoordTok's (activation sharding constraints under a mesh).
    """

    def __init__(self, config: Any, *, rngs: nnx.Rngs, axis_rules=None):
        g = self.geometry = validate_sit(config)
        compute = self.compute = make_compute(config, axis_rules)
        d, c, p = g.hidden_size, g.channels, g.patch
        self.learn_sigma = bool(config.learn_sigma)
        self.pos_embed_xy = Buffer(jnp.asarray(sincos_2d(d, g.grids[0][0])[None]),
                                   out_sharding=(None, None, "embed"), eager_sharding=False)
        # Official: pos_embed_t starts at zero (the yt / xt tokens carry no position until it is
        # learned); 'sincos' starts it at the 2D sin-cos table of the (Rt/p, Rxy/p) grid.
        init_t = config.get("pos_embed_t_init", "zeros")
        if init_t not in ("zeros", "sincos"):
            raise ValueError(f"config.model.pos_embed_t_init must be 'zeros' (official) or 'sincos', got {init_t!r}")
        table_t = sincos_2d(d, g.grids[1])[None]
        init = ZEROS if init_t == "zeros" else (lambda key, shape, dtype=jnp.float32: jnp.asarray(table_t, dtype))
        self.pos_embed_t = nnx.Param(named(init, (None, None, "embed"))(rngs.params(), (1, g.num_tokens[1], d)))
        self.type_embed = learned(rngs, (1, 3, d), (None, None, "embed"))
        self.x_embedder_xy = PatchEmbed(c, d, p, compute, rngs)
        self.x_embedder_yt = PatchEmbed(c, d, p, compute, rngs)
        self.x_embedder_xt = PatchEmbed(c, d, p, compute, rngs)
        self.t_embedder = TimestepEmbedder(d, compute, rngs)
        self.y_embedder = LabelEmbedder(g, config.class_dropout_prob, compute, rngs)
        self.blocks = Stack(lambda r: SiTBlock(d, g.num_heads, config.mlp_ratio, compute, r),
                            g.depth, compute, rngs)
        self.final_layer_xy = FinalLayer(d, p, g.out_channels, compute, rngs)
        self.final_layer_yt = FinalLayer(d, p, g.out_channels, compute, rngs)
        self.final_layer_xt = FinalLayer(d, p, g.out_channels, compute, rngs)

    def _check(self, planes, t, y):
        planes = tuple(planes)
        if len(planes) != 3:
            raise ValueError(f"planes must be (xy, yt, xt), got {len(planes)} arrays")
        batch = planes[0].shape[0]
        for name, z, shape in zip(PLANES, planes, self.geometry.plane_shapes):
            if z.ndim != 4 or tuple(z.shape[1:]) != shape or z.shape[0] != batch:
                raise ValueError(f"plane {name} must be ({batch},) + {shape} (channel-last, this config), "
                                 f"got shape {tuple(z.shape)}")
        for name, v in (("t", t), ("y", y)):
            if jnp.size(v) != batch:
                raise ValueError(f"{name} must hold one value per sample ({batch}), got shape {jnp.shape(v)}")
        return planes

    def __call__(self, planes, t, y, *, train: bool = False, dropout_key=None, force_drop_ids=None):
        planes = self._check(planes, t, y)
        g, dtype = self.geometry, self.compute.dtype
        embedders = (self.x_embedder_xy, self.x_embedder_yt, self.x_embedder_xt)
        positions = (self.pos_embed_xy, self.pos_embed_t, self.pos_embed_t)
        tokens = [
            embed(z.astype(dtype)) + pos[...].astype(dtype) + self.type_embed[:, k][:, None].astype(dtype)
            for k, (embed, pos, z) in enumerate(zip(embedders, positions, planes))
        ]
        pin = self.compute.constrain
        x = pin(jnp.concatenate(tokens, axis=1), sharding.BLD)
        c = self.t_embedder(jnp.reshape(t, (-1,))) + self.y_embedder(
            y, train=train, key=dropout_key, force_drop_ids=force_drop_ids)
        c = pin(c, (sharding.BATCH, "activation_embed"))
        x = self.blocks(x, c)

        finals = (self.final_layer_xy, self.final_layer_yt, self.final_layer_xt)
        out, start = [], 0
        for final, grid, n in zip(finals, g.grids, g.num_tokens):
            z = unpatchify(final(x[:, start:start + n], c).astype(jnp.float32), grid, g.patch, g.out_channels)
            out.append(pin(z[..., :g.channels], (sharding.BATCH, None, None, None)))  # learn_sigma: first C
            start += n
        return tuple(out)

    def forward_with_cfg(self, planes, t, y, cfg_scale: float):
        """Classifier-free guidance: uncond + cfg_scale * (cond - uncond), every channel.

        The conditional and null-class passes run as one batch of 2B (as the official does with
        a doubled batch). The triplane official code is unconditional and defines no CFG; note
        that image DiT/SiT guide only the first 3 channels, an image-specific choice not copied.
        """
        b = planes[0].shape[0]
        both = tuple(jnp.concatenate([z, z]) for z in planes)
        drop = jnp.concatenate([jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32)])
        out = self(both, jnp.concatenate([jnp.reshape(t, (-1,))] * 2), jnp.concatenate([jnp.reshape(y, (-1,))] * 2),
                   force_drop_ids=drop)
        return tuple(o[b:] + cfg_scale * (o[:b] - o[b:]) for o in out)


def count_sit_params(model: nnx.Module, include_buffers: bool = True) -> int:
    """Numbers in the official state_dict (Params + the pos_embed_xy buffer), or Params only."""
    kinds = (nnx.Param, Buffer) if include_buffers else nnx.Param
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, kinds)))


def sit_model_from_params(params: Mapping, config: Any) -> TriplaneSiT:
    """A TriplaneSiT holding `params` (nested dict, e.g. `sit_from_official` or a trainer's Param
    tree) without initialising random weights; a missing `pos_embed_xy` is recomputed."""
    abstract = sharding.eval_shape(lambda: TriplaneSiT(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    tree = dict(params)
    if "pos_embed_xy" not in tree:
        g = abstract.geometry
        tree["pos_embed_xy"] = sincos_2d(g.hidden_size, g.grids[0][0])[None]
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, tree))
    return nnx.merge(graphdef, state)


def split_sit(config, axis_rules=None):
    """(graphdef, abstract Param tree (pure dict), constant buffers state) of config.model, without
    initialising the weights (the buffers, the fixed sin-cos table, are computed alone)."""
    build = lambda: TriplaneSiT(config.model, rngs=nnx.Rngs(config.seed), axis_rules=axis_rules)
    graphdef, params, _ = nnx.split(sharding.eval_shape(build), nnx.Param, ...)
    buffers = jax.jit(lambda: nnx.state(build(), nnx.Not(nnx.Param)))()  # XLA drops the weight init
    return graphdef, nnx.to_pure_dict(params), buffers
