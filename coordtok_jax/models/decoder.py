"""CoordTok decoder: triplane features at the queried coordinates + a learned positional table,
joint self-attention over all N queried points of a video, projection to patch values.

Official semantics (spec section 5). The positional table (1, T/pt, H/px, W/py, D) is indexed by
round(coord * (size - 1)): identical to the official truncation on every grid coordinate, and
immune to the fp32 off-by-one the official truncation has when the division is rewritten.
Output per point is laid out (pt, px, py, 3), channel fastest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coordtok_jax import sharding
from coordtok_jax.models.config import Geometry
from coordtok_jax.models.encoder import learned
from coordtok_jax.models.layers import Compute, Stack, ViTBlock, dense, layer_norm
from coordtok_jax.models.triplane import triplane_gather


def position_index(coords: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Flat index into the (T/pt, H/px, W/py) positional table for coords (..., 3) in [0, 1]."""
    sizes = jnp.asarray(grid, jnp.int32)
    idx = jnp.round(coords.astype(jnp.float32) * (sizes - 1).astype(jnp.float32)).astype(jnp.int32)
    idx = jnp.clip(idx, 0, sizes - 1)
    return (idx[..., 0] * grid[1] + idx[..., 1]) * grid[2] + idx[..., 2]


class DecoderTransformer(nnx.Module):
    def __init__(self, cfg, geometry: Geometry, compute: Compute, rngs: nnx.Rngs):
        d = cfg.dec_embed_dim
        self.geometry = geometry
        self.compute = compute
        self.pos_embed = learned(rngs, (1,) + geometry.dec_grid + (d,), (None, None, None, None, "embed"), d**-0.5)
        self.patch_embed = dense(3 * geometry.channels, d, (None, "embed"), compute, rngs)
        self.layers = Stack(
            lambda r: ViTBlock(d, cfg.dec_num_heads, cfg.mlp_ratio, True, compute, r),
            cfg.dec_num_layers,
            compute,
            rngs,
        )
        self.norm = layer_norm(d, 1e-5, compute, rngs)

    def __call__(self, features: jax.Array, coords: jax.Array) -> jax.Array:
        pin = self.compute.constrain
        table = self.pos_embed[...]
        # the whole table on every chip (gathered like any FSDP weight), then a batch-split lookup
        table = pin(table.reshape(-1, table.shape[-1]), (None, "activation_embed"))
        pos = pin(jnp.take(table, position_index(coords, self.geometry.dec_grid), axis=0), sharding.BLD)
        x = pin(self.patch_embed(features) + pos.astype(self.compute.dtype), sharding.BLD)
        return pin(self.norm(self.layers(x)), sharding.BLD)


class Decoder(nnx.Module):
    def __init__(self, cfg, geometry: Geometry, compute: Compute, rngs: nnx.Rngs):
        self.transformer = DecoderTransformer(cfg, geometry, compute, rngs)
        self.projector = dense(cfg.dec_embed_dim, geometry.patch_values, ("embed", None), compute, rngs)
        self.compute = compute

    def __call__(self, planes, coords: jax.Array) -> jax.Array:
        points = ("activation_batch", "activation_length", None)
        features = self.compute.constrain(triplane_gather(tuple(planes), coords), points)
        out = self.projector(self.transformer(features, coords)).astype(jnp.float32)
        return self.compute.constrain(out, points)
