"""Procedurally generated videos, deterministic per (seed, index), any (T, H, W).

Moving and rotating textured shapes over a panning textured background, with varied speeds;
a fraction of clips are shorter than T (the frames past `n_frames` are zeros, as a decoder of a
short real clip would leave them) so that padding and n_frames are exercised. This is the
embedded default data of the README's main job and of the tests.
"""

from __future__ import annotations

import numpy as np

# The class of a labelled clip (config.data.synthetic_labels): the kind of its largest shape.
SHAPE_KINDS = ("disc", "square", "ring")


def clip_motion(seed: int, index: int, motion: float, fast_fraction: float = 0.0, fast_motion: float = 1.0) -> float:
    """The motion scale of clip `index`: `fast_motion` for a `fast_fraction` of the clips (drawn
    per (seed, index), independently of the clip's content), `motion` for the others."""
    if not 0.0 <= fast_fraction <= 1.0:
        raise ValueError(f"synthetic: config.data.synthetic_fast_fraction must be in [0, 1], got {fast_fraction}")
    if fast_fraction == 0.0:
        return float(motion)
    fast = np.random.default_rng([int(seed), int(index), 7]).uniform() < fast_fraction
    return float(fast_motion if fast else motion)


def synthetic_clip(
    seed: int,
    index: int,
    shape: tuple[int, int, int],
    *,
    min_frames: int | None = None,
    short_fraction: float = 0.25,
    texture: float = 1.0,
    motion: float = 1.0,
    max_shapes: int = 3,
    centered: bool = False,
    with_label: bool = False,
) -> tuple:
    """Returns (frames uint8 (T, H, W, 3), n_frames), and with `with_label` also the clip's class:
    the index in SHAPE_KINDS of its largest shape (the first drawn among equal sizes).

    `texture` scales the background's gratings and checker and the shapes' stripes (1: the default
    data; 0: flat backgrounds and flat shapes; the clip's layout and motion do not change).
    `motion` scales the background's pan and the shapes' velocities and spin (1: the default data;
    0: a still picture; the layout, colours and textures do not change).
    `max_shapes`: each clip has 1 .. max_shapes shapes (3: the default data).
    `centered`: every shape starts at the frame's centre (the rest of the clip is drawn as before).
    """
    T, H, W = (int(s) for s in shape)
    if min(T, H, W) <= 0:
        raise ValueError(f"shape must be three positive ints (T, H, W), got {shape}")
    if max_shapes < 1:
        raise ValueError(f"max_shapes must be >= 1, got {max_shapes}")
    rng = np.random.default_rng([int(seed), int(index)])
    t = np.arange(T, dtype=np.float32)[:, None, None]
    xs = np.arange(H, dtype=np.float32)[None, :, None] / H  # row coordinate in [0, 1)
    ys = np.arange(W, dtype=np.float32)[None, None, :] / W

    # Background: two oriented gratings and a checker texture, panning at a random velocity.
    pan = (motion * rng.uniform(-0.02, 0.02, size=2)).astype(np.float32)
    bx, by = xs + pan[0] * t, ys + pan[1] * t
    base = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    video = np.broadcast_to(base, (T, H, W, 3)).copy()
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 8), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * freq * (np.cos(theta) * bx + np.sin(theta) * by) + phase)
        video += texture * 0.15 * wave[..., None] * rng.uniform(-1, 1, size=3).astype(np.float32)
    checks = rng.integers(2, 6)
    checker = ((np.floor(bx * checks * 2) + np.floor(by * checks * 2)) % 2)[..., None]
    video += texture * 0.08 * (checker - 0.5)

    # Shapes: discs, rotating squares and rings, moving and bouncing at varied speeds.
    label, largest = -1, 0.0
    for _ in range(rng.integers(1, max_shapes + 1)):
        kind = rng.integers(0, 3)
        size = rng.uniform(0.08, 0.25)
        if size > largest:
            label, largest = int(kind), size
        pos = rng.uniform(size, 1 - size, size=2)
        if centered:
            pos = np.full(2, 0.5)
        vel = motion * rng.uniform(-0.03, 0.03, size=2)
        spin = motion * rng.uniform(-0.2, 0.2)
        color = rng.uniform(0, 1, size=3).astype(np.float32)
        stripes = rng.uniform(10, 30)
        # Bounce off the borders: reflect the unbounded trajectory into [size, 1 - size].
        span = 1 - 2 * size
        path = (pos[None, :] - size) + vel[None, :] * np.arange(T)[:, None]
        path = np.abs(((path / span) + 1) % 2 - 1) * span + size
        cx = path[:, 0, None, None].astype(np.float32)
        cy = path[:, 1, None, None].astype(np.float32)
        dx, dy = xs - cx, ys - cy
        angle = (spin * t).astype(np.float32)
        rx = np.cos(angle) * dx - np.sin(angle) * dy
        ry = np.sin(angle) * dx + np.cos(angle) * dy
        if kind == 0:
            inside = dx**2 + dy**2 <= size**2
        elif kind == 1:
            inside = (np.abs(rx) <= size * 0.8) & (np.abs(ry) <= size * 0.8)
        else:
            r2 = dx**2 + dy**2
            inside = (r2 <= size**2) & (r2 >= (0.5 * size) ** 2)
        shade = texture * (0.85 + 0.15 * np.sin(stripes * rx)[..., None]) + (1.0 - texture)
        video = np.where(inside[..., None], color * shade, video)

    frames = (np.clip(video, 0, 1) * 255 + 0.5).astype(np.uint8)
    n_frames = T
    if min_frames is not None and min_frames < T and rng.uniform() < short_fraction:
        n_frames = int(rng.integers(max(1, min_frames), T))
        frames[n_frames:] = 0
    return (frames, n_frames, label) if with_label else (frames, n_frames)
