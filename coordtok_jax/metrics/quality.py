"""Reconstruction metrics on videos in [0, 1], per frame and per video (the paper's protocol:
each metric per frame, averaged over a video's valid frames, then over videos).

* PSNR: 10 log10(range^2 / MSE) per frame, float32.
* SSIM: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, averaged
  over the valid region and the RGB channels (dm-pix; equals scikit-image's
  `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  channel_axis=-1, data_range=1)`).
* LPIPS: the trainer's Flax LPIPS (VGG16 + the official linear heads), deterministic, per frame,
  on frames mapped to [-1, 1].

All functions are jit-compatible and batched over leading axes; run them under jit with inputs
sharded over the mesh's batch axis to spread them over devices.
"""

from __future__ import annotations

from typing import Optional

import dm_pix
import jax
import jax.numpy as jnp


def psnr_per_frame(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """PSNR of every frame: (..., T, H, W, C) -> (..., T), in dB, computed in float32."""
    err = jnp.mean((pred.astype(jnp.float32) - target.astype(jnp.float32)) ** 2, axis=(-3, -2, -1))
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(err, 1e-20))


def ssim_per_frame(pred: jax.Array, target: jax.Array, data_range: float = 1.0) -> jax.Array:
    """SSIM of every frame: (..., T, H, W, C) -> (..., T); frames need H, W >= 11."""
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"SSIM needs two (..., H, W, C) arrays of one shape, got {pred.shape}, {target.shape}")
    if min(pred.shape[-3:-1]) < 11:
        raise ValueError(f"SSIM uses an 11x11 window: frames must be at least 11x11, got {pred.shape[-3:-1]}")
    lead = pred.shape[:-3]
    flat = lambda v: v.reshape((-1,) + v.shape[-3:]).astype(jnp.float32)  # dm-pix takes (N, H, W, C)
    return dm_pix.ssim(flat(pred), flat(target), max_val=data_range).reshape(lead)


def lpips_per_frame(lpips, pred: jax.Array, target: jax.Array) -> jax.Array:
    """LPIPS of every frame: (B, T, H, W, 3) in [0, 1] -> (B, T) (deterministic, no dropout)."""
    b, t = pred.shape[:2]
    flat = lambda v: v.reshape((b * t,) + v.shape[2:]).astype(jnp.float32) * 2.0 - 1.0
    return lpips(flat(pred), flat(target), deterministic=True).reshape(b, t)


def valid_frames(num_frames: int, n_frames: jax.Array) -> jax.Array:
    """(B, T) mask of each video's first n_frames frames."""
    return jnp.arange(num_frames)[None, :] < jnp.asarray(n_frames).reshape(-1, 1)


def video_mean(per_frame: jax.Array, n_frames: jax.Array) -> jax.Array:
    """(B, T) per-frame values -> (B,) mean over each video's first n_frames frames."""
    valid = valid_frames(per_frame.shape[-1], n_frames)
    return jnp.sum(jnp.where(valid, per_frame, 0.0), axis=-1) / jnp.maximum(valid.sum(-1), 1)


def video_psnr(pred: jax.Array, target: jax.Array, n_frames: jax.Array, data_range: float = 1.0) -> jax.Array:
    """Per-video PSNR: per-frame PSNR averaged over each video's first n_frames frames. (B,)"""
    return video_mean(psnr_per_frame(pred, target, data_range), n_frames)


def video_metrics(pred: jax.Array, target: jax.Array, n_frames: jax.Array, lpips=None) -> dict[str, jax.Array]:
    """{'psnr', 'ssim'[, 'lpips']} per video (B,) for videos (B, T, H, W, 3) in [0, 1]."""
    out = {
        "psnr": video_psnr(pred, target, n_frames),
        "ssim": video_mean(ssim_per_frame(pred, target), n_frames),
    }
    if lpips is not None:
        out["lpips"] = video_mean(lpips_per_frame(lpips, pred, target), n_frames)
    return out


def frames_in_unit_range(decoded: jax.Array, dtype: Optional[jnp.dtype] = jnp.float32) -> jax.Array:
    """Decoder output ([-1, 1] space, unclamped) -> [0, 1], clamped, as the official callers do."""
    return jnp.clip((decoded.astype(dtype) + 1.0) / 2.0, 0.0, 1.0)
