"""CoordTok encoder: ViT3D over the video, then a cross/self-attention encoder whose learned
query tokens read the ViT3D memory and are projected and unpatchified into three latent planes.

Official semantics (spec section 3). By default the quirks the released weights depend on are
reproduced (spec 9, rows 1, 3, 4): padded memory tokens get +1.0 added to their cross-attention
logits (a float key_padding_mask), a temporal patch is "padded" when t_p >= floor(n_frames / pt),
and the ViT3D self-attention has no mask at all. `padding_mask='exclude'` instead removes padded
memory tokens from the cross-attention (logit -inf) and counts a temporal patch as valid when it
holds at least one valid frame (t_p < ceil(n_frames / pt), at least one patch).
"""

from __future__ import annotations

from typing import Optional

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from coordtok_jax import sharding
from coordtok_jax.models.config import Geometry
from coordtok_jax.models.layers import (
    Compute,
    CrossSelfBlock,
    Stack,
    ViTBlock,
    dense,
    layer_norm,
    named,
    normal,
    patch_conv,
)


def learned(rngs: nnx.Rngs, shape, axes, stddev: float = 1.0) -> nnx.Param:
    """A learned table initialised N(0, stddev^2) (the official torch.randn tables)."""
    return nnx.Param(named(normal(stddev), axes)(rngs.params(), shape, jnp.float32))


def memory_padding(n_frames: jax.Array, geometry: Geometry, mode: str):
    """Cross-attention (bias, mask) for the memory tokens, each (B, 1, 1, L) or None.

    Memory token index is t * H' * W' + h * W' + w, so the per-frame-patch flag repeats H'W' times.
    """
    tp, hp, wp = geometry.enc_grid
    pt = geometry.enc_patch[0]
    n = jnp.asarray(n_frames).reshape(-1).astype(jnp.int32)
    t_idx = jnp.arange(tp, dtype=jnp.int32)[None, :]
    if mode == "official":
        padded = t_idx >= (n // pt)[:, None]
        bias = jnp.repeat(padded.astype(jnp.float32), hp * wp, axis=1)
        return bias[:, None, None, :], None
    n_valid = jnp.clip((n + pt - 1) // pt, 1, tp)
    valid = jnp.repeat(t_idx < n_valid[:, None], hp * wp, axis=1)
    return None, valid[:, None, None, :]


class ViT3D(nnx.Module):
    """Conv3d patch embed, learned pos-emb, cls token, pre-LN timm blocks (no qkv bias)."""

    def __init__(self, cfg, geometry: Geometry, compute: Compute, rngs: nnx.Rngs):
        d = cfg.enc_embed_dim
        self.compute = compute
        self.patch_embed = patch_conv(3, d, geometry.enc_patch, compute, rngs)
        self.cls_token = learned(rngs, (1, 1, d), (None, None, "embed"))
        self.pos_emb = learned(rngs, (1, geometry.num_memory_tokens, d), (None, None, "embed"))
        self.layers = Stack(
            lambda r: ViTBlock(d, cfg.enc_num_heads, cfg.mlp_ratio, False, compute, r),
            cfg.enc_patch_num_layers,
            compute,
            rngs,
        )
        self.norm = layer_norm(d, 1e-5, compute, rngs)

    def __call__(self, video: jax.Array) -> jax.Array:
        dtype, pin = self.compute.dtype, self.compute.constrain
        video = pin(video.astype(dtype), (sharding.BATCH, None, None, None, None))
        x = self.patch_embed(video)  # (B, T', H', W', D), t-major token order.
        b, d = x.shape[0], x.shape[-1]
        x = pin(x.reshape(b, -1, d) + self.pos_emb[...].astype(dtype), sharding.BLD)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (b, 1, d))
        x = self.layers(jnp.concatenate([cls, x], axis=1))
        return pin(self.norm(x[:, 1:]), sharding.BLD)


class CrossSelfTransformer(nnx.Module):
    def __init__(self, cfg, compute: Compute, rngs: nnx.Rngs):
        d = cfg.enc_embed_dim
        self.layers = Stack(
            lambda r: CrossSelfBlock(d, cfg.enc_num_heads, cfg.mlp_ratio, compute, r),
            cfg.enc_num_layers,
            compute,
            rngs,
        )
        self.norm = layer_norm(d, 1e-6, compute, rngs)

    def __call__(self, queries, memory, memory_bias: Optional[jax.Array], memory_mask: Optional[jax.Array]):
        return self.norm(self.layers(queries, memory, memory_bias, memory_mask))


class Encoder(nnx.Module):
    """The official CoordTokEncoder: video + n_frames + weight tokens -> (z_xy, z_yt, z_xt)."""

    def __init__(self, cfg, geometry: Geometry, compute: Compute, rngs: nnx.Rngs):
        d, c = cfg.enc_embed_dim, geometry.channels
        self.geometry = geometry
        self.compute = compute
        self.padding_mask = cfg.padding_mask
        self.encoder = ViT3D(cfg, geometry, compute, rngs)
        self.cross_pos_emb = learned(rngs, (1, geometry.num_memory_tokens, d), (None, None, "embed"))
        self.patch_embeds_xy = patch_conv(c, d, geometry.query_patch_xy, compute, rngs)
        self.patch_embeds_yt = patch_conv(c, d, geometry.query_patch_t, compute, rngs)
        self.patch_embeds_xt = patch_conv(c, d, geometry.query_patch_t, compute, rngs)
        self.transformer = CrossSelfTransformer(cfg, compute, rngs)
        pxy, pt = geometry.query_patch_xy, geometry.query_patch_t
        self.projectors_xy = dense(d, pxy[0] * pxy[1] * c, ("embed", None), compute, rngs)
        self.projectors_yt = dense(d, pt[0] * pt[1] * c, ("embed", None), compute, rngs)
        self.projectors_xt = dense(d, pt[0] * pt[1] * c, ("embed", None), compute, rngs)

    def queries(self, weight_tokens) -> jax.Array:
        """(1, Nxy + Nyt + Nxt, D): patch-embedded weight tokens, row-major per plane."""
        embeds = (self.patch_embeds_xy, self.patch_embeds_yt, self.patch_embeds_xt)
        out = []
        for embed, tokens in zip(embeds, weight_tokens):
            q = embed(tokens[...].astype(self.compute.dtype))
            out.append(q.reshape(1, -1, q.shape[-1]))
        return jnp.concatenate(out, axis=1)

    def __call__(self, video: jax.Array, n_frames: jax.Array, weight_tokens) -> tuple[jax.Array, ...]:
        g = self.geometry
        dtype, pin = self.compute.dtype, self.compute.constrain
        memory = pin(self.encoder(video) + self.cross_pos_emb[...].astype(dtype), sharding.BLD)
        bias, mask = memory_padding(n_frames, g, self.padding_mask)
        q = self.queries(weight_tokens)
        q = pin(jnp.broadcast_to(q, (memory.shape[0],) + q.shape[1:]), sharding.BLD)
        x = pin(self.transformer(q, memory, bias, mask), sharding.BLD)

        nxy, nyt, _ = g.num_query_tokens
        heads = (
            (self.projectors_xy, x[:, :nxy], g.query_grid_xy, g.query_patch_xy),
            (self.projectors_yt, x[:, nxy : nxy + nyt], g.query_grid_t, g.query_patch_t),
            (self.projectors_xt, x[:, nxy + nyt :], g.query_grid_t, g.query_patch_t),
        )
        planes = []
        for proj, tokens, (gh, gw), (p1, p2) in heads:
            values = pin(proj(pin(tokens, sharding.BLD)), (sharding.BATCH, "activation_length", None))
            plane = einops.rearrange(values.astype(jnp.float32), "b (h w) (p1 p2 c) -> b (h p1) (w p2) c",
                                     h=gh, w=gw, p1=p1, p2=p2)
            planes.append(pin(plane, (sharding.BATCH, None, None, None)))
        return tuple(planes)
