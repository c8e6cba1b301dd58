"""Nested triplane tokens (issue 17): the temporal planes encode at any per-block token budget.

A token is one latent cell (the paper's count: 1280 = 16x16 + 2 x 32x16 for the released model).
With `config.model.nested_tokens = True` the temporal planes z_yt and z_xt (Rt, Rxy, C) are cut
into `token_blocks` temporal blocks of Rt / token_blocks rows; the cells of a block are ranked
(`config.model.token_order`: 'time_first', the default, whole latent rows in coarse-to-fine
temporal order, see `time_first_order`; or 'coarse_to_fine', a 2D lattice refinement, see
`refinement_order`), and a budget of k tokens keeps the first k cells of the block in each of the
two temporal planes. A dropped cell takes the value of its nearest kept
cell (so a prefix is a coarser sampling of the block, not a hole) plus a learned per-channel
fill offset (`nested_fill_yt` / `nested_fill_xt`, zero at start). The content plane z_xy keeps
its full size.

The allowed budgets are `token_levels`, fractions of a block's cells (ascending, the last 1.0);
training draws one level per (video, block) uniformly on device, so one model decodes at every
level. Prefix property: the planes at level l depend only on the first levels[l] cells of each
block (the fill sources never point at a dropped cell), tested by perturbing the others.

With the option off nothing here is built: the parameter tree and the outputs are the official
model's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from coordtok_jax.models.config import ConfigError, Geometry

DEFAULT_LEVELS = (0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class NestedTokens:
    """The nested-token layout of one model: blocks, levels and the fill tables."""

    blocks: int  # temporal blocks over Rt
    rows: int  # latent rows of one block (Rt / blocks)
    cols: int  # Rxy
    levels: tuple[int, ...]  # allowed cells kept per block and plane, ascending; the last = rows * cols
    # Tuples, so that the layout is hashable static metadata of the model (arrays: the properties).
    order_: tuple[int, ...]  # cell index (row-major in the block) by rank
    sources_: tuple[tuple[int, ...], ...]  # at level l, cell i takes the value of cell sources[l][i]

    @property
    def order(self) -> np.ndarray:
        return np.asarray(self.order_, np.int64)

    @property
    def sources(self) -> np.ndarray:
        """(L, cells) int32."""
        return np.asarray(self.sources_, np.int32)

    @property
    def kept(self) -> np.ndarray:
        """(L, cells) bool: cell i is one of the first levels[l] cells."""
        kept = np.zeros((len(self.levels), self.cells), bool)
        for level, k in enumerate(self.levels):
            kept[level, self.order[:k]] = True
        return kept

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    def tokens(self, level_idx) -> np.ndarray:
        """Temporal-plane tokens (both planes) of per-block level indices (..., blocks) -> (...)."""
        return 2 * np.asarray(self.levels, np.int64)[np.asarray(level_idx)].sum(axis=-1)

    @property
    def full_tokens(self) -> int:
        """Temporal-plane tokens of one video at the full budget (2 Rt Rxy)."""
        return 2 * self.blocks * self.cells


def _coarse_to_fine_1d(n: int) -> list[int]:
    """0..n-1 with the coarsest lattice first: 0, n/2, n/4, 3n/4, ... (each stride's new points in order)."""
    stride = 1
    while stride * 2 < n:
        stride *= 2
    out, seen = [], set()
    while stride >= 1:
        for i in range(0, n, stride):
            if i not in seen:
                out.append(i)
                seen.add(i)
        stride //= 2
    return out


def time_first_order(rows: int, cols: int) -> np.ndarray:
    """Cell indices (row-major) of a rows x cols block, whole latent rows (time steps) first.

    Rows come in coarse-to-fine temporal order (0, rows/2, rows/4, 3 rows/4, ...), and within a
    row the columns coarse-to-fine: a budget of k whole rows keeps full spatial resolution at
    1/k of the temporal resolution, which costs a still clip nothing and a moving one its motion.
    """
    if rows <= 0 or cols <= 0:
        raise ValueError(f"a block needs positive rows and cols, got {rows} x {cols}")
    col_order = _coarse_to_fine_1d(cols)
    return np.asarray([r * cols + c for r in _coarse_to_fine_1d(rows) for c in col_order], np.int64)


ORDERS = ("time_first", "coarse_to_fine")


def refinement_order(rows: int, cols: int) -> np.ndarray:
    """Cell indices (row-major) of a rows x cols grid in coarse-to-fine order.

    Cells on the stride-s lattice (i % s == 0 and j % s == 0) come before the rest, for s from
    the largest power of two below max(rows, cols) down to 1; within the cells new at stride s,
    those that halve the spacing in time (odd i / s) come first, then in space (odd j / s), then
    both, each group row-major. Any prefix is therefore a near-uniform sampling of the block.
    """
    if rows <= 0 or cols <= 0:
        raise ValueError(f"a block needs positive rows and cols, got {rows} x {cols}")
    stride = 1
    while stride * 2 < max(rows, cols):
        stride *= 2
    seen = np.zeros((rows, cols), bool)
    order = []
    while stride >= 1:
        groups: dict[tuple[int, int], list[int]] = {(0, 0): [], (1, 0): [], (0, 1): [], (1, 1): []}
        for i in range(0, rows, stride):
            for j in range(0, cols, stride):
                if not seen[i, j]:
                    groups[((i // stride) % 2, (j // stride) % 2)].append(i * cols + j)
                    seen[i, j] = True
        for key in ((0, 0), (1, 0), (0, 1), (1, 1)):
            order.extend(groups[key])
        stride //= 2
    return np.asarray(order, np.int64)


def fill_sources(order: np.ndarray, rows: int, cols: int, keep: int) -> np.ndarray:
    """(cells,) int32: every cell's nearest kept cell (itself when kept) when the first `keep`
    cells of `order` are kept; distance in cells, ties to the earlier-ranked cell."""
    kept = np.asarray(order[:keep])
    i, j = np.divmod(np.arange(rows * cols), cols)
    ki, kj = np.divmod(kept, cols)
    dist = (i[:, None] - ki[None, :]) ** 2 + (j[:, None] - kj[None, :]) ** 2
    return kept[np.argmin(dist, axis=1)].astype(np.int32)  # argmin takes the first (earliest-ranked) tie


def _field(cfg: Any, name: str, default):
    if hasattr(cfg, "get"):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def nested_tokens(cfg: Any, geometry: Geometry) -> Optional[NestedTokens]:
    """The NestedTokens of a model config, or None when config.model.nested_tokens is off.

    Fields (all optional, so configs without them are the official model):
      nested_tokens (bool, default False), token_blocks (int, default 4: must divide
      latent_resolution_t), token_levels (fractions of a block's cells, ascending in (0, 1], the
      last 1.0; default 0.25, 0.5, 0.75, 1.0), token_order ('time_first' or 'coarse_to_fine').
    """
    on = _field(cfg, "nested_tokens", False)
    if not isinstance(on, bool):
        raise ConfigError(f"config.model.nested_tokens must be True or False, got {on!r}")
    if not on:
        return None
    blocks = _field(cfg, "token_blocks", 4)
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks <= 0 or geometry.latent_t % blocks:
        raise ConfigError(f"config.model.token_blocks must be a positive integer dividing "
                          f"config.model.latent_resolution_t={geometry.latent_t}, got {blocks!r}")
    rows, cols = geometry.latent_t // blocks, geometry.latent_xy
    fractions = _field(cfg, "token_levels", DEFAULT_LEVELS)
    try:
        fractions = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(f"config.model.token_levels must be a sequence of fractions, got {fractions!r}") from None
    cells = rows * cols
    levels = tuple(int(round(f * cells)) for f in fractions)
    if (not fractions or fractions[-1] != 1.0 or min(fractions) <= 0
            or any(b <= a for a, b in zip(levels, levels[1:])) or levels[0] < 1):
        raise ConfigError(
            f"config.model.token_levels must be fractions of a block's {cells} cells, strictly increasing "
            f"in whole cells, the first >= 1 cell and the last 1.0; got {fractions!r} (= {levels} cells)")
    kind = _field(cfg, "token_order", "time_first")
    if kind not in ORDERS:
        raise ConfigError(f"config.model.token_order must be one of {ORDERS}, got {kind!r}")
    order = time_first_order(rows, cols) if kind == "time_first" else refinement_order(rows, cols)
    sources = tuple(tuple(int(v) for v in fill_sources(order, rows, cols, k)) for k in levels)
    return NestedTokens(blocks, rows, cols, levels, tuple(int(v) for v in order), sources)


def apply_levels(plane: jax.Array, level_idx: jax.Array, fill: jax.Array, nt: NestedTokens) -> jax.Array:
    """One temporal plane (B, Rt, Rxy, C) at per-block levels (B, blocks) ints -> (B, Rt, Rxy, C).

    Kept cells are unchanged; a dropped cell = its nearest kept cell + fill (C,).
    """
    batch, rt, rxy, c = plane.shape
    blocks = plane.reshape(batch, nt.blocks, nt.cells, c)
    level_idx = jnp.asarray(level_idx, jnp.int32)
    src = jnp.asarray(nt.sources)[level_idx]  # (B, blocks, cells)
    kept = jnp.asarray(nt.kept)[level_idx][..., None]
    taken = jnp.take_along_axis(blocks, src[..., None], axis=2)
    out = jnp.where(kept, blocks, taken + fill.reshape(1, 1, 1, c).astype(plane.dtype))
    return out.reshape(batch, rt, rxy, c)


def sample_levels(key: jax.Array, batch: int, nt: NestedTokens) -> jax.Array:
    """Training: one level per (video, block), uniform over the allowed levels, on device."""
    return jax.random.randint(key, (batch, nt.blocks), 0, len(nt.levels), jnp.int32)


def check_levels(level_idx, batch: int, nt: NestedTokens) -> None:
    """Concrete per-block level indices: shape (batch, blocks), values in range (one-line error)."""
    values = np.asarray(level_idx)
    if values.shape != (batch, nt.blocks) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"token levels must be ({batch}, {nt.blocks}) integers (video, temporal block), "
                         f"got {values.dtype} {values.shape}")
    if values.size and (values.min() < 0 or values.max() >= len(nt.levels)):
        raise ValueError(f"token levels must index config.model.token_levels (0..{len(nt.levels) - 1}), "
                         f"got {values.min()}..{values.max()}")


def block_of_frames(num_frames: int, nt: NestedTokens) -> np.ndarray:
    """(T,) the temporal block each frame falls in (frames split evenly over the blocks)."""
    return (np.arange(num_frames) * nt.blocks) // num_frames


def uniform_levels(batch: int, nt: NestedTokens, level: Optional[int] = None) -> np.ndarray:
    """Every block of every video at one level (default: the full budget)."""
    level = len(nt.levels) - 1 if level is None else int(level)
    return np.full((batch, nt.blocks), level, np.int32)
