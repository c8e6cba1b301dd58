"""Fréchet Video Distance: feature statistics and the Fréchet distance, torch- and scipy-free.

FVD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)) between Gaussians fitted (mean, unbiased
covariance) to I3D Kinetics-400 logits of two sets of clips (`coordtok_jax.metrics.i3d`). Everything
here is float64 NumPy; the matrix square root is computed through symmetric eigendecompositions
instead of scipy.linalg.sqrtm (same value for PSD covariances, no complex round-off).

Protocols:
* gFVD (generation), as StyleGAN-V's `fvd2048_128f` metric: `GFVD_NUM_CLIPS` = 2048 generated clips
  vs 2048 real clips of `GFVD_NUM_FRAMES` = 128 consecutive frames each, real clips drawn at random
  from the dataset (videos shorter than the clip are discarded; a random start frame in each), the
  features being the I3D logits ("raw features before the softmax"). `sample_clips` draws such
  (video, start) pairs reproducibly. Note that StyleGAN-V's own numbers come from its TorchScript
  port of the TF-Hub I3D; the network here is piergiaj's `i3d_pretrained_400.pt`, as loaded by the
  DIGAN/TATS-style FVD code the official CoordTok evaluation uses.
* rFVD (reconstruction): the same statistics for the test clips and for their reconstructions.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

GFVD_NUM_CLIPS = 2048
GFVD_NUM_FRAMES = 128
GFVD_PROTOCOL = {
    "num_real_clips": GFVD_NUM_CLIPS, "num_fake_clips": GFVD_NUM_CLIPS,
    "num_frames": GFVD_NUM_FRAMES, "real_clips": "random clip of each randomly drawn video",
    "features": "I3D Kinetics-400 logits (400-d, before softmax)", "resolution": 224,
}


class FeatureStats:
    """Running mean/covariance of feature vectors: sums and sums of outer products in float64.

    `update(features)` adds a (n, D) batch; `a.merge(b)` / `a + b` pool two accumulators (e.g. from
    several hosts or devices) into a new one; `.count`, `.mean` (D,), `.cov` (D, D; unbiased, N - 1,
    like np.cov's default). `as_dict()` / `from_dict()` turn it into plain arrays (np.savez-able).
    """

    def __init__(self, dim: Optional[int] = None):
        self.dim = None if dim is None else int(dim)
        self._count = 0
        self._sum = None if dim is None else np.zeros(self.dim, np.float64)
        self._outer = None if dim is None else np.zeros((self.dim, self.dim), np.float64)

    @classmethod
    def from_features(cls, features) -> "FeatureStats":
        """Statistics of a (N, D) array of features."""
        return cls().update(features)

    def update(self, features) -> "FeatureStats":
        """Adds features (n, D) (any float dtype, NaN/inf rejected); returns self."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"FeatureStats.update expects (n, D) features, got shape {f.shape}")
        if self.dim is None:
            self.__init__(f.shape[1])
        if f.shape[1] != self.dim:
            raise ValueError(f"feature dimension {f.shape[1]} does not match the accumulated {self.dim}")
        if not np.all(np.isfinite(f)):
            raise ValueError("features contain NaN or inf")
        self._count += f.shape[0]
        self._sum += f.sum(axis=0)
        self._outer += f.T @ f
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """A new FeatureStats holding the samples of both (either may be empty)."""
        if not isinstance(other, FeatureStats):
            raise TypeError(f"can only merge FeatureStats, got {type(other).__name__}")
        if self.dim is not None and other.dim is not None and self.dim != other.dim:
            raise ValueError(f"cannot merge FeatureStats of dimensions {self.dim} and {other.dim}")
        out = FeatureStats(self.dim if self.dim is not None else other.dim)
        for s in (self, other):
            if s._count:
                out._count += s._count
                out._sum += s._sum
                out._outer += s._outer
        return out

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return self.merge(other) if isinstance(other, FeatureStats) else NotImplemented

    @property
    def count(self) -> int:
        return self._count

    @property
    def mean(self) -> np.ndarray:
        if self._count < 1:
            raise ValueError("FeatureStats.mean needs at least one sample")
        return self._sum / self._count

    @property
    def cov(self) -> np.ndarray:
        if self._count < 2:
            raise ValueError(f"FeatureStats.cov needs at least two samples, got {self._count}")
        mu = self.mean
        c = (self._outer - self._count * np.outer(mu, mu)) / (self._count - 1)
        return (c + c.T) / 2

    def as_dict(self) -> dict[str, np.ndarray]:
        """{'count', 'sum', 'outer'} arrays (float64), e.g. for np.savez or a multi-host all-gather."""
        if self.dim is None:
            raise ValueError("FeatureStats is empty")
        return {"count": np.asarray(self._count, np.int64), "sum": self._sum.copy(),
                "outer": self._outer.copy()}

    @classmethod
    def from_dict(cls, d) -> "FeatureStats":
        s = cls(np.shape(d["sum"])[0])
        s._count = int(d["count"])
        s._sum = np.asarray(d["sum"], np.float64).copy()
        s._outer = np.asarray(d["outer"], np.float64).copy()
        return s

    def __repr__(self) -> str:
        return f"FeatureStats(count={self._count}, dim={self.dim})"


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)), in float64.

    tr(sqrtm(S1 S2)) = sum of sqrt of the eigenvalues (clipped at 0) of sqrt(S1) S2 sqrt(S1), a
    symmetric PSD matrix similar to S1 S2; sqrt(S1) comes from np.linalg.eigh. This equals what
    StyleGAN-V/TATS get from scipy.linalg.sqrtm(S1 @ S2) for PSD inputs, without its instability.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance expects mu (D,) and sigma (D, D), got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sum(np.sqrt(np.clip(eig, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def _as_stats(x: Union[FeatureStats, Any]) -> FeatureStats:
    return x if isinstance(x, FeatureStats) else FeatureStats.from_features(x)


def fvd(a: Union[FeatureStats, Any], b: Union[FeatureStats, Any]) -> float:
    """FVD between two FeatureStats (or (N, D) feature arrays)."""
    a, b = _as_stats(a), _as_stats(b)
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def sample_clips(video_lengths: Sequence[int], num_clips: int = GFVD_NUM_CLIPS,
                 num_frames: int = GFVD_NUM_FRAMES, seed: int = 0) -> list[tuple[int, int]]:
    """Random real clips for gFVD: [(video index, start frame)] * num_clips, reproducible by seed.

    Videos with fewer than num_frames frames are discarded (as StyleGAN-V's discard_short_videos);
    videos are drawn without replacement while there are enough, else with replacement; the start
    frame is uniform in [0, length - num_frames].
    """
    lengths = np.asarray(video_lengths, np.int64)
    ok = np.flatnonzero(lengths >= num_frames)
    if ok.size == 0:
        raise ValueError(f"no video has >= {num_frames} frames (longest: {lengths.max(initial=0)})")
    rng = np.random.default_rng(seed)
    idx = rng.choice(ok, size=num_clips, replace=num_clips > ok.size)
    starts = rng.integers(0, lengths[idx] - num_frames + 1)
    return [(int(i), int(s)) for i, s in zip(idx, starts)]


def compute_stats(video_batches: Iterable, model, *, num_clips: Optional[int] = None,
                  batch_size: Optional[int] = None, value_range: tuple[float, float] = (0.0, 255.0),
                  progress: bool = True, desc: str = "I3D features",
                  stats: Optional[FeatureStats] = None) -> FeatureStats:
    """FeatureStats of the I3D logits of raw clips, as the official FVD feature pass.

    video_batches: an iterable of (b, T, H, W, 3) uint8 batches (values in value_range), each run
    through `i3d.preprocess` and `model` (an InceptionI3d) by `i3d.i3d_features`, padded to
    `batch_size` (default: the first batch's size) so that one compilation serves all batches.
    Stops after num_clips clips (None: all). progress: a tqdm bar. stats: accumulate into this one.
    """
    from tqdm.auto import tqdm

    from coordtok_jax.metrics.i3d import i3d_features

    stats = FeatureStats() if stats is None else stats
    done = 0
    with tqdm(total=num_clips, desc=desc, unit="clip", disable=not progress) as bar:
        for batch in video_batches:
            if num_clips is not None and done >= num_clips:
                break
            if num_clips is not None and batch.shape[0] > num_clips - done:
                batch = batch[:num_clips - done]
            batch_size = batch_size or int(batch.shape[0])
            feats = i3d_features(model, batch, batch_size=batch_size, value_range=value_range)
            stats.update(feats)
            done += feats.shape[0]
            bar.update(feats.shape[0])
    if num_clips is not None and done < num_clips:
        raise ValueError(f"compute_stats: the batches held {done} clips, fewer than num_clips={num_clips}")
    return stats

