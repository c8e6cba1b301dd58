"""The CoordTok tokenizer: `encode(video, n_frames) -> planes`, `decode(planes, coords) -> patches`."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordtok_jax.models.config import Geometry, make_compute, validate
from coordtok_jax.models.decoder import Decoder
from coordtok_jax.models.encoder import Encoder, learned
from coordtok_jax.models import nested as nested_lib


class CoordTok(nnx.Module):
    """CoordTok with the official parameter tree (weight tokens, encoder, decoder).

    Args:
      config: `config.model` of configs/coordtok.py (a ConfigDict; see models/config.py).
      rngs: `nnx.Rngs(seed)`; initialisation follows the official (PyTorch defaults, N(0, 1)
        learned tables, N(0, 1/D) decoder positional table).
      axis_rules: logical axis rules (`sharding.rules_of(config)`): under a mesh set with
        `jax.set_mesh`, activations are constrained to them (batch split over the data and
        fsdp axes, heads/MLP over tensor). None: no constraints (GSPMD decides).

    `encode(video, n_frames)`: video (B, T, H, W, 3) in [-1, 1] (frames at or past n_frames are
    padding, -3 in the official data pipeline), n_frames (B,) or (B, 1) ints (None = all T) ->
    (z_xy (B, Rxy, Rxy, C), z_yt (B, Rt, Rxy, C), z_xt (B, Rt, Rxy, C)), float32, channel-last.
    `decode(planes, coords)`: coords (B, N, 3) = (t, x, y) patch-start coordinates in [0, 1]
    (index / (grid - 1)) -> (B, N, pt * px * py * 3) float32 in (pt, px, py, 3) order. All N
    points of a video attend to each other. Both are pure functions of their arguments.
    With config.model.nested_tokens (models/nested.py, off by default), `apply_levels(planes,
    levels)` puts each temporal block at a token budget before `decode`.
    """

    def __init__(self, config: Any, *, rngs: nnx.Rngs, axis_rules=None):
        self.geometry: Geometry = validate(config)
        g = self.geometry
        nested = nested_lib.nested_tokens(config, g)  # checked before anything is built
        compute = make_compute(config, axis_rules)
        self.compute = compute
        c = g.channels
        self.weight_tokens_xy = learned(rngs, (1, g.latent_xy, g.latent_xy, c), (None,) * 4)
        self.weight_tokens_yt = learned(rngs, (1, g.latent_t, g.latent_xy, c), (None,) * 4)
        self.weight_tokens_xt = learned(rngs, (1, g.latent_t, g.latent_xy, c), (None,) * 4)
        self.encoder = Encoder(config, g, compute, rngs)
        self.decoder = Decoder(config, g, compute, rngs)
        self.nested = nested
        if self.nested is not None:  # only then: the official parameter tree is unchanged
            self.nested_fill_yt = nnx.Param(jnp.zeros((c,), jnp.float32))
            self.nested_fill_xt = nnx.Param(jnp.zeros((c,), jnp.float32))

    def _check_video(self, video: jax.Array) -> None:
        want = self.geometry.video_shape
        if video.ndim != 5 or tuple(video.shape[1:]) != want + (3,):
            raise ValueError(
                f"video must be (B, {want[0]}, {want[1]}, {want[2]}, 3) for this config "
                f"(config.model.video_shape={want}), got shape {tuple(video.shape)}"
            )
        if not jnp.issubdtype(video.dtype, jnp.floating):
            raise ValueError(
                f"video must be floating point in [-1, 1], got dtype {video.dtype}; convert uint8 frames "
                "with coordtok_jax.data.video.to_model_input(frames, n_frames)"
            )

    def _check_n_frames(self, n_frames: jax.Array, batch: int) -> jax.Array:
        n_frames = jnp.asarray(n_frames)
        if n_frames.size != batch or not jnp.issubdtype(n_frames.dtype, jnp.integer):
            raise ValueError(
                f"n_frames must hold one integer length per video ({batch}), got {n_frames.dtype} shape {n_frames.shape}"
            )
        if not isinstance(n_frames, jax.core.Tracer):  # concrete: check the range here
            T = self.geometry.video_shape[0]
            values = np.asarray(n_frames)  # NumPy: also concrete inside a trace (a closed-over array)
            lo, hi = int(values.min()), int(values.max())
            if lo < 1 or hi > T:
                raise ValueError(f"n_frames must be in [1, {T}] (config.model.video_shape[0]), got {lo}..{hi}")
        return n_frames

    def encode(self, video: jax.Array, n_frames: Optional[jax.Array] = None) -> tuple[jax.Array, ...]:
        self._check_video(video)
        batch = video.shape[0]
        if n_frames is None:
            n_frames = jnp.full((batch,), self.geometry.video_shape[0], jnp.int32)
        n_frames = self._check_n_frames(n_frames, batch)
        tokens = (self.weight_tokens_xy, self.weight_tokens_yt, self.weight_tokens_xt)
        return self.encoder(video, n_frames, tokens)

    def decode(self, planes, coords: jax.Array) -> jax.Array:
        planes = tuple(planes)
        want = self.geometry.plane_shapes
        if len(planes) != 3:
            raise ValueError(f"planes must be (z_xy, z_yt, z_xt), got {len(planes)} arrays")
        for name, z, shape in zip(("z_xy", "z_yt", "z_xt"), planes, want):
            if tuple(z.shape[1:]) != shape:
                raise ValueError(f"{name} must be (B,) + {shape} for this config, got shape {tuple(z.shape)}")
        if coords.ndim != 3 or coords.shape[-1] != 3 or coords.shape[0] != planes[0].shape[0]:
            raise ValueError(
                f"coords must be (B={planes[0].shape[0]}, N, 3) = (t, x, y), got shape {tuple(coords.shape)}"
            )
        return self.decoder(planes, coords)

    def apply_levels(self, planes, levels: Optional[jax.Array]):
        """planes with each temporal block of video b at level levels[b, block] (an index into
        config.model.token_levels); levels None = the planes unchanged (the full budget)."""
        if levels is None:
            return tuple(planes)
        if self.nested is None:
            raise ValueError("token levels need a model with config.model.nested_tokens=True")
        z_xy, z_yt, z_xt = planes
        if not isinstance(levels, jax.core.Tracer):
            nested_lib.check_levels(levels, z_xy.shape[0], self.nested)
        return (z_xy, nested_lib.apply_levels(z_yt, levels, self.nested_fill_yt[...], self.nested),
                nested_lib.apply_levels(z_xt, levels, self.nested_fill_xt[...], self.nested))

    def __call__(self, video: jax.Array, n_frames: Optional[jax.Array], coords: jax.Array,
                 levels: Optional[jax.Array] = None) -> jax.Array:
        return self.decode(self.apply_levels(self.encode(video, n_frames), levels), coords)


def count_params(model: nnx.Module) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
