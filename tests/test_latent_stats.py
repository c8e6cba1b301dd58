"""Latent normalisation stats: exact pooling over batches (any split) equals one computation."""

import numpy as np
import pytest

from coordtok_jax.diffusion.latent_stats import (
    LatentStats,
    compute_latent_stats,
    denormalize,
    load_stats,
    normalize,
    save_stats,
)


def _planes(rng, b):
    return [rng.normal(1.5, 2.0, (b, 8, 8, 4)), rng.normal(-1, 0.5, (b, 12, 8, 4)), rng.normal(0, 3, (b, 12, 8, 4))]


def test_pooled_stats_equal_a_single_computation(tmp_path):
    rng = np.random.default_rng(0)
    planes = _planes(rng, 10)
    want_mean = np.stack([p.reshape(-1, 4).mean(0) for p in planes])
    want_std = np.stack([p.reshape(-1, 4).std(0) for p in planes])  # biased, as the official
    # three "devices/hosts" holding uneven shares, merged
    parts = [LatentStats(4).update([p[a:b] for p in planes]) for a, b in ((0, 3), (3, 4), (4, 10))]
    pooled = parts[0] + parts[1] + parts[2]
    np.testing.assert_allclose(pooled.mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(pooled.std, want_std, rtol=1e-10)
    again = LatentStats.from_array(pooled.as_array())
    np.testing.assert_array_equal(again.mean, pooled.mean)
    # the official mean-of-per-rank-variances differs from the pooled variance for uneven shares
    official_var = np.mean([p.std ** 2 for p in parts], axis=0)
    assert np.abs(official_var - want_std**2).max() > 1e-3

    batches = [[p[i:i + 4] for p in planes] for i in range(0, 10, 4)]
    stats = compute_latent_stats(lambda b: b, batches, num_clips=10, channels=4, progress=False)
    np.testing.assert_allclose(stats.mean, want_mean, rtol=1e-12)
    with pytest.raises(ValueError, match="fewer than num_clips"):
        compute_latent_stats(lambda b: b, batches, num_clips=11, channels=4, progress=False)

    save_stats(stats, tmp_path / "stats.json")
    mean, std = load_stats(tmp_path / "stats.json")
    z = normalize(planes, mean, std)
    for k in range(3):
        flat = z[k].reshape(-1, 4)
        np.testing.assert_allclose(flat.mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(flat.std(0), 1, atol=1e-5)
        np.testing.assert_allclose(denormalize(z, mean, std)[k], planes[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        LatentStats(4).update([np.full((1, 8, 8, 4), np.nan)] + planes[1:])
