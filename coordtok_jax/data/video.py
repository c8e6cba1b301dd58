"""uint8 clips -> model input."""

from __future__ import annotations

import jax
import jax.numpy as jnp

OFFICIAL_PAD_VALUE = -3.0  # official padding: -1 in [0, 1] space, then v * 2 - 1 (spec 9.2).


def to_model_input(frames: jax.Array, n_frames: jax.Array, pad_value: float = OFFICIAL_PAD_VALUE) -> jax.Array:
    """frames uint8 (B, T, H, W, 3), n_frames (B,) -> float32 in [-1, 1]; frames >= n_frames = pad_value."""
    video = frames.astype(jnp.float32) / 255.0 * 2.0 - 1.0  # ToTensor, then v * 2 - 1
    n = jnp.asarray(n_frames).reshape(-1, 1, 1, 1, 1)
    t = jnp.arange(video.shape[1]).reshape(1, -1, 1, 1, 1)
    return jnp.where(t < n, video, jnp.float32(pad_value))
