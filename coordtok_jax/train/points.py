"""On-device coordinate sampling and target gathering for the two training stages.

Stage 1 (official VideoTimeWrapperPatchMultiGPU): N patches per video, t, x and y patch indices
drawn independently and uniformly, with replacement; t only over valid temporal patches
(t * pt <= n_frames - pt).
Stage 2 (official VideoTimeWrapperFrameMultiGPU): K distinct valid temporal patches (frames when
pt = 1) in random order, each with all its patches in row-major (x outer, y inner) order, so the
points of one frame are contiguous (LPIPS unpatchifies them). When a video has fewer than K valid
frames (the official would crash), its valid frames are repeated in the same random order.
Targets are gathered from the uint8 video inside the step and scaled to [-1, 1] (v / 255 * 2 - 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from coordtok_jax.models.config import Geometry


def valid_time_patches(n_frames: jax.Array, geometry: Geometry) -> jax.Array:
    """Number of temporal patches t with t * pt + pt <= n_frames (at least 1). (B,)"""
    pt = geometry.dec_patch[0]
    n = jnp.asarray(n_frames).reshape(-1).astype(jnp.int32)
    return jnp.clip(n // pt, 1, geometry.dec_grid[0])


def sample_stage1(key: jax.Array, n_frames: jax.Array, geometry: Geometry, num_points: int) -> jax.Array:
    """(B, num_points, 3) int32 (t, x, y) patch indices, uniform with replacement."""
    valid = valid_time_patches(n_frames, geometry)
    batch = valid.shape[0]
    kt, kx, ky = jax.random.split(key, 3)
    _, gx, gy = geometry.dec_grid
    t = jax.random.randint(kt, (batch, num_points), 0, valid[:, None])
    x = jax.random.randint(kx, (batch, num_points), 0, gx)
    y = jax.random.randint(ky, (batch, num_points), 0, gy)
    return jnp.stack([t, x, y], axis=-1).astype(jnp.int32)


def sample_stage2(key: jax.Array, n_frames: jax.Array, geometry: Geometry, num_frames: int) -> jax.Array:
    """(B, num_frames * gx * gy, 3) int32 indices: K distinct valid frames, all their patches."""
    valid = valid_time_patches(n_frames, geometry)
    batch = valid.shape[0]
    tp, gx, gy = geometry.dec_grid
    # A random permutation of the valid temporal patches: sort random keys, invalid ones last.
    scores = jax.random.uniform(key, (batch, tp))
    scores = jnp.where(jnp.arange(tp)[None, :] < valid[:, None], scores, 2.0)
    order = jnp.argsort(scores, axis=1)
    picks = jnp.arange(num_frames)[None, :] % valid[:, None]  # repeat when fewer valid than K
    frames = jnp.take_along_axis(order, picks, axis=1)  # (B, K)
    xs, ys = jnp.meshgrid(jnp.arange(gx), jnp.arange(gy), indexing="ij")
    t = jnp.repeat(frames, gx * gy, axis=1)
    x = jnp.tile(xs.reshape(-1), (batch, num_frames))
    y = jnp.tile(ys.reshape(-1), (batch, num_frames))
    return jnp.stack([t, x, y], axis=-1).astype(jnp.int32)


def gather_targets(video: jax.Array, indices: jax.Array, geometry: Geometry) -> jax.Array:
    """uint8 video (B, T, H, W, 3), indices (B, N, 3) -> float32 (B, N, pt*px*py*3) in [-1, 1]."""
    tp, gx, gy = geometry.dec_grid
    pt, px, py = geometry.dec_patch
    b = video.shape[0]
    grid = video.reshape(b, tp, pt, gx, px, gy, py, 3).transpose(0, 1, 3, 5, 2, 4, 6, 7)
    grid = grid.reshape(b, tp * gx * gy, pt * px * py * 3)
    flat = (indices[..., 0] * gx + indices[..., 1]) * gy + indices[..., 2]
    patches = jnp.take_along_axis(grid, flat[..., None], axis=1)
    return patches.astype(jnp.float32) / 255.0 * 2.0 - 1.0
