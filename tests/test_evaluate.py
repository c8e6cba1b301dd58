"""The evaluate and reconstruct CLIs end to end on a tiny checkpoint trained for a few steps:
outputs, shapes, frame counts, and metrics equal to an independent recomputation."""

import json
import os
import re
import subprocess
import sys

import av
import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from coordtok_jax.data.pipeline import make_sampled_dataset
from coordtok_jax.data.video import to_model_input
from coordtok_jax.data.video_io import crop_box, decode_frames, resize, resize_center_crop
from coordtok_jax.io.runs import load_tokenizer
from coordtok_jax.models.decode_video import decode_video
from coordtok_jax.train import trainer
from video_files import moving_frames, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_run")
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.total_steps, config.eval_videos, config.log_every, config.save_every = 3, 0, 1, 3
    trainer.train(config, str(workdir))
    return workdir


@nnx.jit
def _reconstruct(model, video, n):
    """Encode + decode every frame, jitted (eager dispatch would compile every op on its own)."""
    return decode_video(model, model.encode(to_model_input(video, n), n))


def _recompute(workdir, num_videos, seed, lpips=None):
    """Per-video PSNR / SSIM with scikit-image on the same clip draw, decoded independently."""
    model, config, _ = load_tokenizer(str(workdir))
    T, H, W = model.geometry.video_shape
    clips = list(make_sampled_dataset(config.data, (T, H, W), num_videos, num_videos, seed=seed))[0]
    video, n = jnp.asarray(clips["video"]), jnp.asarray(clips["n_frames"])
    recon = np.clip((np.asarray(_reconstruct(model, video, n)) + 1) / 2, 0, 1).astype(np.float64)
    target = np.asarray(clips["video"], np.float64) / 255
    psnr, ssim = [], []
    for b in range(num_videos):
        k = int(clips["n_frames"][b])
        psnr.append(np.mean([peak_signal_noise_ratio(target[b, t], recon[b, t], data_range=1.0) for t in range(k)]))
        ssim.append(np.mean([structural_similarity(target[b, t], recon[b, t], data_range=1.0, channel_axis=-1,
                                                   gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                             for t in range(k)]))
    return float(np.mean(psnr)), float(np.mean(ssim)), clips


def _random_i3d(path):
    from coordtok_jax.metrics.i3d import expected_shapes

    rng = np.random.default_rng(0)
    sd = {}
    for k, shape in expected_shapes().items():
        if k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif k.endswith("conv3d.weight"):
            sd[k] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        else:
            sd[k] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    np.savez(path, **sd)
    return sd


def test_evaluate_writes_results_that_match_a_recomputation(trained, tmp_path):
    """PSNR/SSIM (scikit-image), LPIPS and rFVD (I3D logits, Frechet distance) recomputed."""
    from coordtok_jax.metrics.fvd import FeatureStats, fvd
    from coordtok_jax.metrics.i3d import i3d_features, load_i3d
    from coordtok_jax.evaluate.run import evaluate
    from coordtok_jax.metrics.lpips import conv_shapes, lin_shapes

    rng = np.random.default_rng(1)
    np.savez(tmp_path / "vgg.npz", **{k: (rng.standard_normal(s) * 0.05).astype(np.float32)
                                      for k, s in conv_shapes().items()})
    np.savez(tmp_path / "lin.npz", **{k: np.abs(rng.standard_normal(s)).astype(np.float32) * 0.1
                                      for k, s in lin_shapes().items()})
    _random_i3d(tmp_path / "i3d.npz")
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.lpips.vgg_path, config.lpips.lin_path = str(tmp_path / "vgg.npz"), str(tmp_path / "lin.npz")
    # one device: the I3D passes at 224x224 are the cost here, no padded batch slots; two videos
    # are the fewest a covariance (rFVD) takes
    results = evaluate(str(trained), config=config, num_videos=2, batch=2, seed=3,
                       i3d_path=str(tmp_path / "i3d.npz"), progress=False, devices=jax.devices()[:1])

    saved = json.loads((trained / "eval_3.json").read_text())
    assert saved["num_videos"] == 2 and saved["step"] == 3 and saved["tokens_per_video"] == 192
    assert saved["psnr"] == results["psnr"] and not saved["notes"]
    table = (trained / "eval_3.md").read_text()
    assert "| rFVD | PSNR | SSIM | LPIPS | tokens per video |" in table
    assert f"| {saved['rfvd']:.1f} | {saved['psnr']:.2f} | {saved['ssim']:.4f} | {saved['lpips']:.4f} | 192 |" in table

    psnr, ssim, clips = _recompute(trained, 2, 3)
    assert results["psnr"] == pytest.approx(psnr, rel=1e-4)
    assert results["ssim"] == pytest.approx(ssim, abs=1e-4)
    assert 0 < results["lpips"] and np.isfinite(results["lpips"])

    # rFVD: I3D logits of the originals and of the reconstructions (padding from the original)
    model, _, _ = load_tokenizer(str(trained))
    video, n = jnp.asarray(clips["video"]), jnp.asarray(clips["n_frames"])
    recon = np.clip((np.asarray(_reconstruct(model, video, n)) + 1) / 2, 0, 1)
    keep = np.arange(16)[None, :, None, None, None] < clips["n_frames"][:, None, None, None, None]
    fake = np.where(keep, recon * 255.0, clips["video"].astype(np.float32))
    i3d = load_i3d(str(tmp_path / "i3d.npz"))
    want = fvd(FeatureStats.from_features(i3d_features(i3d, clips["video"])),
               FeatureStats.from_features(i3d_features(i3d, fake)))
    assert results["rfvd"] == pytest.approx(want, rel=1e-3) and results["rfvd"] > 0


def test_reconstruct_cli_and_tokens_round_trip(trained, tmp_path):
    from coordtok_jax.evaluate.reconstruct import reconstruct

    frames = moving_frames(37, 60, 90, seed=1)  # any size and length: 37 frames = 16 + 16 + 5
    src = write_video(tmp_path / "user.avi", frames)
    out = tmp_path / "out" / "recon.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "coordtok_jax.reconstruct", f"--workdir={trained}", f"--input={src}",
         f"--output={out}", "--side-by-side", f"--save-tokens={tmp_path / 'tokens.npz'}", "--batch=2",
         "--mode=chunks", "--points_per_call=100"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"37 frames in 3 windows: 576 tokens \(192 per window\), PSNR ([\d.]+) dB", proc.stdout)
    assert m, proc.stdout
    with av.open(str(out)) as container:
        written = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # at the input's resolution: the 60x60 center region of the 60x90 input | the reconstruction upsampled
    assert len(written) == 37 and written[0].shape == (60, 120, 3)
    assert crop_box(60, 90, 32, 32) == (0, 15, 60, 60)
    region = decode_frames(src)[:, :, 15:75]
    assert np.abs(written[3][:, :60].astype(float) - region[3]).mean() < 6  # the input half (codec loss only)
    assert np.abs(resize(region, 32, 32).astype(float) - resize_center_crop(decode_frames(src), 32, 32)).mean() < 3
    plot = np.asarray(Image.open(tmp_path / "out" / "recon_psnr.png").convert("RGB"))
    assert plot.shape[1] > 100 and ((plot == [200, 30, 30]).all(-1)).sum() > 100  # the curve and its markers
    tokens = np.load(tmp_path / "tokens.npz")
    assert tokens["z_xy"].shape == (3, 8, 8, 8) and tokens["z_yt"].shape == (3, 8, 8, 8)
    np.testing.assert_array_equal(tokens["n_frames"], [16, 16, 5])

    # PSNR recomputed from the saved tokens (same chunked decoding), against the resized input
    model, _, _ = load_tokenizer(str(trained))
    original = resize_center_crop(decode_frames(src), 32, 32)
    planes = tuple(jnp.asarray(tokens[k]) for k in ("z_xy", "z_yt", "z_xt"))
    decoded = np.clip((np.asarray(decode_video(model, planes, 16, 100)) + 1) / 2, 0, 1)
    recon = np.concatenate([decoded[w, :n] for w, n in enumerate(tokens["n_frames"])])
    want = np.mean([peak_signal_noise_ratio(original[t] / 255.0, recon[t].astype(np.float64), data_range=1.0)
                    for t in range(37)])
    assert float(m.group(1)) == pytest.approx(want, abs=0.01)

    s = reconstruct(str(trained), str(tmp_path / "again.mp4"), from_tokens=str(tmp_path / "tokens.npz"),
                    input_path=str(src), mode="chunks", points_per_call=100)
    assert s["frames"] == 37 and s["psnr"] == pytest.approx(want, abs=1e-3)
    full = reconstruct(str(trained), str(tmp_path / "full.mp4"), from_tokens=str(tmp_path / "tokens.npz"),
                       input_path=str(src))  # mode all: every patch of a window jointly
    assert full["psnr"] != s["psnr"]
    one = reconstruct(str(trained), str(tmp_path / "one.mp4"), input_path=str(src), max_frames=1)
    assert one["frames"] == 1 and one["windows"] == 1 and one["output_size"] == [60, 60]
    plot = np.asarray(Image.open(tmp_path / "one_psnr.png").convert("RGB"))
    assert ((plot == [200, 30, 30]).all(-1)).sum() > 10  # a single frame still shows as a point
    with pytest.raises(ValueError, match="or --from_tokens"):
        reconstruct(str(trained), str(tmp_path / "x.mp4"))
    bad = tmp_path / "bad.npz"
    np.savez(bad, z_xy=np.zeros((1, 4, 4, 8)), z_yt=np.zeros((1, 8, 8, 8)), z_xt=np.zeros((1, 8, 8, 8)),
             n_frames=np.array([16]))
    with pytest.raises(ValueError, match="z_xy must be"):
        reconstruct(str(trained), str(tmp_path / "x.mp4"), from_tokens=str(bad))


def test_reconstruct_refuses_an_empty_or_garbage_file_naming_it(trained, tmp_path):
    from coordtok_jax.evaluate.reconstruct import reconstruct

    for name, content in (("empty.mp4", b""), ("garbage.mp4", os.urandom(4096))):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / name))}: (not a readable video|no decodable)"):
            reconstruct(str(trained), str(tmp_path / "out.mp4"), input_path=str(tmp_path / name))
    assert not (tmp_path / "out.mp4").exists()
