"""The token-budget scorer (issue 17): predicts, per temporal block, the PSNR at every token level.

Input: the encoder's planes of a batch (full budget) and the model's fill values; output (B,
blocks, L) predicted PSNR in dB at each level of config.model.token_levels, non-decreasing in
the level by construction (a base value plus softplus increments), so the allocators see more
tokens as never worse.

Features per block (`block_features`), all functions of the planes alone:
* for each level, log of the mean squared change the budget makes to the block's cells of z_yt
  and z_xt (what the decoder loses when the block is cut to that level; 2 L values);
* the block's mean absolute step between neighbouring latent rows (its motion) and its mean
  absolute value, per channel of z_yt and z_xt (4 C values);
* the video's z_xy mean absolute value and spatial roughness per channel (2 C values).
A two-layer MLP maps them to the L predictions. Trained after the tokenizer on measured per-block
PSNRs (evaluate/token_scorer.py); it never changes the tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from coordtok_jax.models.nested import NestedTokens, apply_levels


def block_features(planes, fills, nt: NestedTokens) -> jax.Array:
    """planes (z_xy, z_yt, z_xt) of B videos, fills (fill_yt, fill_xt) -> (B, blocks, F) float32."""
    z_xy, z_yt, z_xt = (jnp.asarray(p, jnp.float32) for p in planes)
    batch = z_xy.shape[0]
    feats = []
    for plane, fill in ((z_yt, fills[0]), (z_xt, fills[1])):
        blocks = plane.reshape(batch, nt.blocks, nt.rows, nt.cols, -1)
        errors = []
        for level in range(len(nt.levels)):
            cut = apply_levels(plane, jnp.full((batch, nt.blocks), level, jnp.int32), fill, nt)
            diff = (cut - plane).reshape(batch, nt.blocks, -1)
            errors.append(jnp.log(jnp.mean(diff**2, axis=-1) + 1e-6))
        feats.append(jnp.stack(errors, axis=-1))
        step = jnp.abs(jnp.diff(plane, axis=1))  # (B, Rt - 1, Rxy, C): change between latent rows
        step = jnp.concatenate([step, step[:, -1:]], axis=1).reshape(batch, nt.blocks, nt.rows, nt.cols, -1)
        feats.append(jnp.mean(step, axis=(2, 3)))
        feats.append(jnp.mean(jnp.abs(blocks), axis=(2, 3)))
    rough = jnp.mean(jnp.abs(jnp.diff(z_xy, axis=1)), axis=(1, 2)) + jnp.mean(jnp.abs(jnp.diff(z_xy, axis=2)), axis=(1, 2))
    content = jnp.concatenate([jnp.mean(jnp.abs(z_xy), axis=(1, 2)), rough], axis=-1)
    feats.append(jnp.broadcast_to(content[:, None], (batch, nt.blocks, content.shape[-1])))
    return jnp.concatenate(feats, axis=-1)


def num_features(nt: NestedTokens, channels: int) -> int:
    return 2 * len(nt.levels) + 6 * channels


class BlockScorer(nnx.Module):
    """features (..., F) -> predicted PSNR (..., L), non-decreasing along L."""

    def __init__(self, num_in: int, num_levels: int, hidden: int = 64, *, rngs: nnx.Rngs):
        self.mean = nnx.Variable(jnp.zeros((num_in,), jnp.float32))  # feature standardisation,
        self.scale = nnx.Variable(jnp.ones((num_in,), jnp.float32))  # set from the training set
        self.hidden1 = nnx.Linear(num_in, hidden, rngs=rngs)
        self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_levels, rngs=rngs)
        self.offset = nnx.Variable(jnp.asarray(25.0, jnp.float32))  # dB around which it predicts

    def __call__(self, features: jax.Array) -> jax.Array:
        x = (features - self.mean[...]) / self.scale[...]
        x = nnx.gelu(self.hidden1(x))
        x = nnx.gelu(self.hidden2(x))
        raw = self.out(x)
        steps = jnp.concatenate([raw[..., :1], jax.nn.softplus(raw[..., 1:])], axis=-1)
        return self.offset[...] + 5.0 * jnp.cumsum(steps, axis=-1)
