"""Latent normalisation statistics for the triplane SiT: per plane and channel mean and std.

The official train_sit.py encodes ~2048 clips, takes each rank's per-channel mean and biased
variance over (clips, H, W), averages them over ranks (the mean of per-rank variances, not the
pooled variance) and never stores them (sample_sit parses them from log.txt). Here the
statistics are pooled exactly: every process accumulates counts, sums and sums of squares in
float64, the accumulators are summed over processes, and mean / biased variance are computed
once from the totals, so the result does not depend on how clips were split over devices and
hosts. They are saved with the SiT checkpoint and as JSON in the workdir.

Planes are channel-last (B, R1, R2, C), in the order (xy, yt, xt).
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import numpy as np

PLANES = ("xy", "yt", "xt")


class LatentStats:
    """Running per-plane, per-channel count / sum / sum of squares (float64)."""

    def __init__(self, channels: int):
        self.channels = int(channels)
        self.count = np.zeros(3, np.float64)  # values per channel seen for each plane
        self.sum = np.zeros((3, self.channels), np.float64)
        self.sumsq = np.zeros((3, self.channels), np.float64)

    def update(self, planes: Sequence) -> "LatentStats":
        """Adds a batch of planes ((B, R1, R2, C) each); returns self."""
        if len(planes) != 3:
            raise ValueError(f"expected three planes (xy, yt, xt), got {len(planes)}")
        for k, z in enumerate(planes):
            z = np.asarray(z, np.float64)
            if z.ndim != 4 or z.shape[-1] != self.channels:
                raise ValueError(f"plane {PLANES[k]} must be (B, R1, R2, {self.channels}), got {z.shape}")
            if not np.all(np.isfinite(z)):
                raise ValueError(f"plane {PLANES[k]} holds NaN or inf")
            flat = z.reshape(-1, self.channels)
            self.count[k] += flat.shape[0]
            self.sum[k] += flat.sum(0)
            self.sumsq[k] += np.square(flat).sum(0)
        return self

    def merge(self, other: "LatentStats") -> "LatentStats":
        out = LatentStats(self.channels)
        out.count, out.sum, out.sumsq = self.count + other.count, self.sum + other.sum, self.sumsq + other.sumsq
        return out

    __add__ = merge

    def as_array(self) -> np.ndarray:
        """(3, 2C + 1) float64: [count, sum..., sumsq...] per plane (for all-gathers)."""
        return np.concatenate([self.count[:, None], self.sum, self.sumsq], axis=1)

    @classmethod
    def from_array(cls, a: np.ndarray) -> "LatentStats":
        a = np.asarray(a, np.float64)
        c = (a.shape[1] - 1) // 2
        out = cls(c)
        out.count, out.sum, out.sumsq = a[:, 0].copy(), a[:, 1:1 + c].copy(), a[:, 1 + c:].copy()
        return out

    def all_processes(self) -> "LatentStats":
        """The sum over all JAX processes (each holding its own clips)."""
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return self
        gathered = multihost_utils.process_allgather(self.as_array().astype(np.float64))
        return LatentStats.from_array(np.asarray(gathered).reshape(-1, 3, self.as_array().shape[1]).sum(0))

    @property
    def mean(self) -> np.ndarray:
        """(3, C) per plane and channel."""
        if np.any(self.count == 0):
            raise ValueError("LatentStats: no values accumulated yet")
        return self.sum / self.count[:, None]

    @property
    def std(self) -> np.ndarray:
        """(3, C): sqrt of the biased (population) variance, as the official."""
        var = self.sumsq / self.count[:, None] - np.square(self.mean)
        return np.sqrt(np.maximum(var, 0.0))

    def to_json(self) -> dict:
        return {"planes": list(PLANES), "count": self.count.tolist(), "mean": self.mean.tolist(),
                "std": self.std.tolist()}


def normalize(planes, mean, std, eps: float = 1e-6):
    """(z - mean) / std per plane and channel; mean/std (3, C). Works on NumPy or jax arrays."""
    return tuple((z - mean[k]) / (std[k] + eps) for k, z in enumerate(planes))


def denormalize(planes, mean, std, eps: float = 1e-6):
    """Inverse of `normalize` (after sampling, before decoding)."""
    return tuple(z * (std[k] + eps) + mean[k] for k, z in enumerate(planes))


def compute_latent_stats(encode_fn, batches: Iterable, num_clips: int, channels: int, *,
                         progress: bool = True) -> LatentStats:
    """Pooled stats of encode_fn(batch) -> planes over `num_clips` clips (this process's
    batches; the result is summed over processes). Stops after num_clips local clips."""
    from tqdm import tqdm

    stats = LatentStats(channels)
    done = 0
    with tqdm(total=num_clips, unit="clip", desc="latent stats", disable=not progress) as bar:
        for batch in batches:
            if done >= num_clips:
                break
            planes = [np.asarray(z) for z in encode_fn(batch)]
            take = min(planes[0].shape[0], num_clips - done)
            stats.update([z[:take] for z in planes])
            done += take
            bar.update(take)
    if done < num_clips:
        raise ValueError(f"latent stats: the data gave {done} clips, fewer than num_clips={num_clips}")
    return stats.all_processes()


def save_stats(stats: LatentStats, path) -> None:
    from etils import epath

    epath.Path(path).write_text(json.dumps(stats.to_json(), indent=2))


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mean (3, C), std (3, C)) from a JSON written by save_stats."""
    from etils import epath

    d = json.loads(epath.Path(path).read_text())
    try:
        return np.asarray(d["mean"], np.float64), np.asarray(d["std"], np.float64)
    except KeyError as e:
        raise ValueError(f"{path}: latent stats JSON lacks {e}") from None
