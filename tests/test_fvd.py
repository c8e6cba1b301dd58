"""FVD: FeatureStats, the Fréchet distance (vs closed forms and scipy), compute_stats plumbing."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordtok_jax.metrics import fvd as F


def _features(n, d, seed, scale=3.0, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return shift + scale * rng.standard_normal((n, d)) @ mix + rng.standard_normal(d)


def _spd(d, rng, floor=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + floor * np.eye(d)


@pytest.mark.parametrize("n", [300, 40])  # full rank, and rank-deficient (n < d)
def test_self_distance_is_zero(n):
    f = _features(n, 64, 0)
    s = F.FeatureStats.from_features(f)
    scale = np.trace(s.cov)
    assert abs(F.fvd(s, s)) < 1e-6 * scale
    assert abs(F.frechet_distance(s.mean, s.cov, s.mean, s.cov)) < 1e-6 * scale


def test_symmetry_and_positive():
    a, b = _features(500, 48, 1), _features(400, 48, 2, scale=2.0, shift=0.5)
    d_ab, d_ba = F.fvd(a, b), F.fvd(b, a)
    assert d_ab > 0
    assert abs(d_ab - d_ba) <= 1e-8 * abs(d_ab)


def test_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    v1, v2 = rng.uniform(0.1, 5, 20), rng.uniform(0.1, 5, 20)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("singular,rel", [(False, 1e-10), (True, 1e-7)])
def test_commuting_covariances_closed_form(singular, rel):
    rng = np.random.default_rng(4)
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    a, b = rng.uniform(0.01, 4, 16), rng.uniform(0.01, 4, 16)
    if singular:  # rounding noise ~1e-16 on zero eigenvalues costs ~sqrt(1e-16) after the sqrt
        a[:3] = 0.0
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    # tr(S1 + S2 - 2 sqrt(S1 S2)) = sum_i a_i + b_i - 2 sqrt(a_i b_i) for a common eigenbasis
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("seed", [5, 6])
def test_agrees_with_scipy_sqrtm(seed):
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(seed)
    d = 40
    s1, s2 = _spd(d, rng), _spd(d, rng, floor=0.5)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_feature_stats_incremental_and_merged():
    f = _features(257, 32, 7, scale=10.0, shift=5.0).astype(np.float32)
    inc = F.FeatureStats()
    for chunk in np.array_split(f, [1, 10, 100, 101, 200]):
        inc.update(chunk)
    parts = [F.FeatureStats.from_features(c) for c in np.array_split(f, 3)]
    merged = parts[0] + parts[1] + F.FeatureStats() + parts[2]
    full_mean = np.mean(f.astype(np.float64), axis=0)
    full_cov = np.cov(f.astype(np.float64), rowvar=False)
    for s in (inc, merged, parts[0].merge(parts[1]).merge(parts[2])):
        assert s.count == 257 and s.dim == 32
        np.testing.assert_allclose(s.mean, full_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(s.cov, full_cov, rtol=1e-9, atol=1e-9 * np.abs(full_cov).max())
        assert s.cov.dtype == np.float64 and np.array_equal(s.cov, s.cov.T)
    back = F.FeatureStats.from_dict(merged.as_dict())
    assert back.count == 257 and np.array_equal(back.cov, merged.cov)
    assert F.fvd(f, merged) == pytest.approx(0.0, abs=1e-6 * np.trace(full_cov))


def test_feature_stats_errors():
    s = F.FeatureStats()
    with pytest.raises(ValueError, match="at least one"):
        s.mean
    s.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least two"):
        s.cov
    with pytest.raises(ValueError, match="dimension"):
        s.update(np.ones((2, 5)))
    with pytest.raises(ValueError, match="dimensions"):
        s + F.FeatureStats(3)
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(n, D\)"):
        s.update(np.ones(4))
    with pytest.raises(ValueError, match="sigma"):
        F.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_sample_clips():
    lengths = [200, 100, 128, 5000, 127]
    clips = F.sample_clips(lengths, num_clips=10, num_frames=128, seed=1)
    assert clips == F.sample_clips(lengths, num_clips=10, num_frames=128, seed=1)
    assert len(clips) == 10
    for v, s in clips:
        assert v in (0, 2, 3) and 0 <= s <= lengths[v] - 128
    assert sorted(v for v, _ in F.sample_clips(lengths, num_clips=3, num_frames=128)) == [0, 2, 3]
    with pytest.raises(ValueError, match="128 frames"):
        F.sample_clips([10, 20], num_frames=128)
    assert (F.GFVD_NUM_CLIPS, F.GFVD_NUM_FRAMES) == (2048, 128)


class _TinyFeatures(nnx.Module):
    """Stand-in for InceptionI3d: spatio-temporal mean of the (preprocessed) video -> 3 features."""
    num_classes = 3

    def __call__(self, video):
        return jnp.mean(video, axis=(1, 2, 3)) * jnp.asarray([1.0, 2.0, -1.0])


def test_compute_stats_batches_and_truncates():
    rng = np.random.default_rng(8)
    videos = rng.integers(0, 256, (7, 2, 16, 20, 3), dtype=np.uint8)
    batches = [videos[:3], videos[3:6], videos[6:]]
    stats = F.compute_stats(iter(batches), _TinyFeatures(), num_clips=5, progress=False)
    # reference: preprocess is resize + crop + affine; the mean of 16x20 -> 224x280 -> crop differs
    # slightly from the plain mean, so compare with i3d_features on the same clips directly
    from coordtok_jax.metrics.i3d import i3d_features
    feats = i3d_features(_TinyFeatures(), videos[:5], batch_size=2)
    assert stats.count == 5
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-6, atol=1e-7)
    want_cov = np.cov(feats.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(stats.cov, want_cov, rtol=1e-5, atol=1e-9)
    assert np.all(np.abs(feats) <= 2.0 + 1e-6)
    with pytest.raises(ValueError, match="fewer than num_clips"):
        F.compute_stats(iter(batches), _TinyFeatures(), num_clips=8, progress=False)
