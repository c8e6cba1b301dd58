"""Full-video decoding: query every patch coordinate of the first num_frames frames.

Three modes:
* `all` (default): every patch of a video in one joint decoder pass (the paper's protocol:
  32,768 points for 128x128x128). Attention over that many points needs a memory-efficient
  kernel: cuDNN flash attention on GPUs (`config.model.attention_impl='cudnn'`, bf16) or
  `attention_impl='chunked'` anywhere (queries in chunks; see models/layers.py).
* `chunks`: the patches (t-major, then x, then y) cut into contiguous chunks of
  `points_per_call`, each decoded as one sequence, like the official decode_video's slicing (a
  patch's output depends on the patches decoded with it); a last, shorter chunk decodes the
  remainder, which the official leaves at zero.

* `official`: exactly what the official decode_video computes: Nslice = n // points_per_call
  chunks of int(n / Nslice) contiguous patches each; the remainder patches are never decoded
  (left at zero, e.g. 1024 patches at 300 per call are 3 chunks of 341 and one zero patch), and
  a trailing partial temporal patch (num_frames not a multiple of the decoder's temporal patch)
  is not decoded either. For parity checks against the official code and its numbers; `evaluate`
  uses `all` (the paper's protocol) unless told otherwise.

Pure and jit-compatible (chunks run in lax.map); batched over videos, so under jit with planes
sharded over the mesh's batch axis the videos are decoded on their devices. No Python loop
over patches.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from coordtok_jax.models.patches import grid_indices, indices_to_coords, patches_to_video


MODES = ("all", "chunks", "official")


def decode_video(model, planes, num_frames: Optional[int] = None, points_per_call: Optional[int] = None,
                 *, mode: Optional[str] = None) -> jax.Array:
    """planes of B videos -> (B, num_frames, H, W, 3) float32 in model output space ([-1, 1]).

    mode 'all' decodes every patch jointly; 'chunks' needs points_per_call. mode None means
    'chunks' when points_per_call is given, else 'all'. Any num_frames <= the trained T.
    """
    if mode is None:
        mode = "all" if points_per_call is None else "chunks"
    if mode not in MODES:
        raise ValueError(f"decode_video mode must be one of {MODES}, got {mode!r}")
    if mode in ("chunks", "official") and points_per_call is None:
        raise ValueError(f"decode_video(mode={mode!r}) needs points_per_call (the official default: 1024)")
    if mode == "all":
        points_per_call = None
    g = model.geometry
    T = g.video_shape[0]
    num_frames = T if num_frames is None else int(num_frames)
    if not 1 <= num_frames <= T:
        raise ValueError(f"num_frames must be in [1, {T}] (config.model.video_shape[0]), got {num_frames}")
    pt = g.dec_patch[0]
    if mode == "official":
        return _decode_official(model, planes, num_frames, int(points_per_call))
    num_t = -(-num_frames // pt)
    coords = indices_to_coords(grid_indices(num_t, g.dec_grid), g.dec_grid)
    batch = planes[0].shape[0]
    n = coords.shape[0]
    coords = jnp.broadcast_to(coords, (batch, n, 3))
    if points_per_call is None or points_per_call >= n:
        values = model.decode(planes, coords)
    else:
        c = int(points_per_call)
        if c <= 0:
            raise ValueError(f"points_per_call must be positive, got {c}")
        q = n // c
        values = _decode_chunks(model, planes, coords, q, c)
        if q * c < n:
            values = jnp.concatenate([values, model.decode(planes, coords[:, q * c :])], axis=1)
    return patches_to_video(values, num_t, g.dec_grid, g.dec_patch)[:, :num_frames]


def _decode_chunks(model, planes, coords, count: int, size: int) -> jax.Array:
    """The first count * size of coords (B, n, 3) decoded as `count` contiguous sequences of `size`
    points each (one lax.map over the chunks); returns (B, count * size, P)."""
    batch = coords.shape[0]
    chunks = coords[:, : count * size].reshape(batch, count, size, 3).transpose(1, 0, 2, 3)
    values = jax.lax.map(lambda cc: model.decode(planes, cc), chunks)  # (count, B, size, P)
    return values.transpose(1, 0, 2, 3).reshape(batch, count * size, -1)


def _decode_official(model, planes, num_frames: int, points_per_call: int) -> jax.Array:
    """The official slicing (see the module docstring); frames and patches it skips are zero."""
    g = model.geometry
    pt = g.dec_patch[0]
    if points_per_call <= 0:
        raise ValueError(f"points_per_call must be positive, got {points_per_call}")
    num_t = num_frames // pt  # whole temporal patches only
    batch = planes[0].shape[0]
    T, H, W = g.video_shape
    if num_t == 0:
        return jnp.zeros((batch, num_frames, H, W, 3), jnp.float32)
    coords = indices_to_coords(grid_indices(num_t, g.dec_grid), g.dec_grid)
    n = coords.shape[0]
    nslice = max(n // points_per_call, 1)  # the official divides by zero when n < points_per_call
    split = n // nslice
    values = _decode_chunks(model, planes, jnp.broadcast_to(coords, (batch, n, 3)), nslice, split)
    values = jnp.concatenate([values, jnp.zeros((batch, n - nslice * split, values.shape[-1]), values.dtype)], axis=1)
    video = patches_to_video(values, num_t, g.dec_grid, g.dec_patch)
    pad = num_frames - video.shape[1]
    if pad > 0:
        video = jnp.concatenate([video, jnp.zeros((batch, pad) + video.shape[2:], video.dtype)], axis=1)
    return video[:, :num_frames]
