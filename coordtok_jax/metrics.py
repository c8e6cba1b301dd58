"""Reconstruction metrics on videos in [0, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def psnr_per_frame(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR of every frame: (..., T, H, W, C) -> (..., T), in dB, computed in float32."""
    err = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(err, 1e-20))


def video_psnr(pred: jax.Array, target: jax.Array, n_frames: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-video PSNR: per-frame PSNR averaged over each video's first n_frames frames. (B,)"""
    per_frame = psnr_per_frame(pred, target, data_range)
    valid = jnp.arange(per_frame.shape[-1])[None, :] < jnp.asarray(n_frames).reshape(-1, 1)
    return jnp.sum(jnp.where(valid, per_frame, 0.0), axis=-1) / jnp.maximum(valid.sum(-1), 1)
