"""Bilinear sampling of the three latent planes at (t, x, y) coordinates (decoder.get_embedding).

Official semantics (spec section 4), for a plane of size (R1, R2) sampled at (a, b) in [0, 1]:
  s = a * (R1 - 1); i0 = floor(s); i1 = min(i0 + 1, R1 - 1); f = s - i0      (same for b)
  c0 = g[i0a, i0b] (1 - fb) + g[i0a, i1b] fb
  c1 = g[i1a, i0b] (1 - fb) + g[i1a, i1b] fb
  c  = c0 (1 - fa) + c1 fa
i.e. corner-aligned (align_corners=True) interpolation. The xy plane is sampled at (x, y), yt at
(t, y) and xt at (t, x); features are concatenated [xy, yt, xt].

Coordinates outside [0, 1] are clamped to the plane's edge (the official code would index out of
range there). Gradients with respect to the planes are exact (autodiff of a gather is a
scatter-add of the same bilinear weights).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def _bilinear(plane: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """plane (B, R1, R2, C); a, b (B, N) in [0, 1] -> (B, N, C)."""
    batch, r1, r2, c = plane.shape
    flat = plane.reshape(batch, r1 * r2, c)

    def split(coord, size):
        s = jnp.clip(coord.astype(jnp.float32), 0.0, 1.0) * (size - 1)
        i0 = jnp.floor(s).astype(jnp.int32)
        i1 = jnp.minimum(i0 + 1, size - 1)
        return i0, i1, (s - i0.astype(jnp.float32))[..., None]

    i0a, i1a, fa = split(a, r1)
    i0b, i1b, fb = split(b, r2)

    def at(ia, ib):
        return jnp.take_along_axis(flat, (ia * r2 + ib)[..., None], axis=1, mode="clip")

    fa = fa.astype(plane.dtype)
    fb = fb.astype(plane.dtype)
    c0 = at(i0a, i0b) * (1 - fb) + at(i0a, i1b) * fb
    c1 = at(i1a, i0b) * (1 - fb) + at(i1a, i1b) * fb
    return c0 * (1 - fa) + c1 * fa


@jax.jit
def triplane_gather(planes: Sequence[jax.Array], coords: jax.Array) -> jax.Array:
    """Samples (z_xy, z_yt, z_xt) at coords (B, N, 3) = (t, x, y) in [0, 1] -> (B, N, 3C).

    z_xy is (B, Rxy, Rxy, C) indexed [x, y]; z_yt is (B, Rt, Rxy, C) indexed [t, y];
    z_xt is (B, Rt, Rxy, C) indexed [t, x]. Channel-last, any float dtype.
    """
    z_xy, z_yt, z_xt = planes
    if coords.ndim != 3 or coords.shape[-1] != 3:
        raise ValueError(f"coords must be (B, N, 3) = (t, x, y), got shape {coords.shape}")
    for name, z in (("z_xy", z_xy), ("z_yt", z_yt), ("z_xt", z_xt)):
        if z.ndim != 4 or z.shape[0] != coords.shape[0]:
            raise ValueError(f"{name} must be (B, R1, R2, C) with B={coords.shape[0]}, got shape {z.shape}")
    t, x, y = coords[..., 0], coords[..., 1], coords[..., 2]
    return jnp.concatenate(
        [_bilinear(z_xy, x, y), _bilinear(z_yt, t, y), _bilinear(z_xt, t, x)], axis=-1
    )
