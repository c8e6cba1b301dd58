"""PSNR / SSIM per frame against scikit-image, per-video means over valid frames, LPIPS per frame."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from coordtok_jax.metrics.quality import (
    frames_in_unit_range,
    lpips_per_frame,
    psnr_per_frame,
    ssim_per_frame,
    video_mean,
    video_metrics,
)


def _videos(seed=0, shape=(2, 5, 24, 40, 3)):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 1, shape)
    pred = np.clip(target + rng.normal(0, 0.05, shape) * rng.uniform(0.2, 2, shape[:2] + (1, 1, 1)), 0, 1)
    return pred.astype(np.float32), target.astype(np.float32)


def test_psnr_and_ssim_per_frame_match_scikit_image():
    pred, target = _videos()
    psnr = np.asarray(jax.jit(psnr_per_frame)(pred, target))
    ssim = np.asarray(jax.jit(ssim_per_frame)(pred, target))
    assert psnr.shape == ssim.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            p64, t64 = pred[b, t].astype(np.float64), target[b, t].astype(np.float64)
            assert psnr[b, t] == pytest.approx(peak_signal_noise_ratio(t64, p64, data_range=1.0), rel=1e-5)
            want = structural_similarity(t64, p64, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
            assert ssim[b, t] == pytest.approx(want, abs=2e-5)
    assert len(np.unique(np.round(ssim, 4))) > 5  # frames differ: not a constant
    assert float(ssim_per_frame(target[0], target[0]).min()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="11x11"):
        ssim_per_frame(pred[..., :8, :8, :], target[..., :8, :8, :])


def test_video_means_use_only_valid_frames():
    per_frame = jnp.array([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    np.testing.assert_allclose(video_mean(per_frame, jnp.array([3, 1])), [2.0, 4.0])
    pred, target = _videos(1)
    out = video_metrics(pred, target, jnp.array([5, 2]))
    want = [np.mean([peak_signal_noise_ratio(target[b, t], pred[b, t], data_range=1.0) for t in range(n)])
            for b, n in enumerate((5, 2))]
    np.testing.assert_allclose(out["psnr"], want, rtol=1e-5)
    np.testing.assert_array_equal(frames_in_unit_range(jnp.array([-3.0, -1.0, 0.0, 1.0, 2.0])),
                                  [0.0, 0.0, 0.5, 1.0, 1.0])


def test_lpips_per_frame_is_frame_wise():
    from coordtok_jax.metrics.lpips import LPIPS

    lpips = LPIPS.random(jax.random.key(0))
    pred, target = _videos(2, (2, 3, 32, 32, 3))
    per = np.asarray(lpips_per_frame(lpips, pred, target))
    assert per.shape == (2, 3) and (per > 0).all()
    one = float(lpips(jnp.asarray(pred[1, 2:3]) * 2 - 1, jnp.asarray(target[1, 2:3]) * 2 - 1)[0])
    assert per[1, 2] == pytest.approx(one, rel=1e-5)
    np.testing.assert_array_equal(lpips_per_frame(lpips, target, target), 0.0)
