"""Patch coordinates and the video <-> patch layouts the decoder reads and writes.

A decoded patch covers video[t:t+pt, x*px:(x+1)*px, y*py:(y+1)*py] of a (T, H, W) video, where
(t, x, y) are integer patch indices on the grid (T/pt, H/px, W/py). Its decoder coordinate is
(t / (T/pt - 1), x / (H/px - 1), y / (W/py - 1)) in [0, 1] (spec section 2), and its values are
laid out (pt, px, py, 3), channel fastest.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np


def grid_indices(num_t: int, grid: tuple[int, int, int]) -> np.ndarray:
    """All (t, x, y) patch indices of the first `num_t` temporal patches, t-major, then x, then y."""
    _, gx, gy = grid
    t, x, y = np.meshgrid(np.arange(num_t), np.arange(gx), np.arange(gy), indexing="ij")
    return np.stack([t.ravel(), x.ravel(), y.ravel()], axis=-1).astype(np.int32)


def indices_to_coords(indices: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """Integer patch indices (..., 3) -> float32 coordinates in [0, 1], exactly i / (n - 1).

    The quotients are IEEE divisions done once in NumPy and looked up, because XLA may turn a
    division into a reciprocal multiply, which is 1 ulp off for some i (spec 5.1).
    """
    indices = jnp.asarray(indices)
    tables = [np.arange(n, dtype=np.float32) / np.float32(max(n - 1, 1)) for n in grid]
    return jnp.stack([jnp.asarray(tab)[indices[..., k]] for k, tab in enumerate(tables)], axis=-1)


def patches_to_video(values: jax.Array, num_t: int, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> jax.Array:
    """(B, num_t*gx*gy, pt*px*py*3) patch values in `grid_indices` order -> (B, num_t*pt, H, W, 3)."""
    _, gx, gy = grid
    pt, px, py = patch
    return einops.rearrange(
        values,
        "b (t x y) (pt px py c) -> b (t pt) (x px) (y py) c",
        t=num_t, x=gx, y=gy, pt=pt, px=px, py=py, c=3,
    )


def video_to_patches(video: jax.Array, patch: tuple[int, int, int]) -> jax.Array:
    """(B, T, H, W, 3) -> (B, T/pt * H/px * W/py, pt*px*py*3) in `grid_indices` order."""
    pt, px, py = patch
    return einops.rearrange(video, "b (t pt) (x px) (y py) c -> b (t x y) (pt px py c)", pt=pt, px=px, py=py)
