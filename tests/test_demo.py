"""The README's main job end to end on the tiny config: files, shapes and a recomputed PSNR."""

import json

import coordtok
import sit
import numpy as np
import pytest
from PIL import Image

from coordtok_jax import demo
from coordtok_jax.data.synthetic import synthetic_clip


def test_demo_reconstructs_synthetic_videos(tmp_path):
    config = coordtok.get_config("tiny")
    summary = demo.reconstruct(config, num_videos=3, output=str(tmp_path))
    data = np.load(tmp_path / "demo.npz")
    assert data["frames"].shape == data["reconstruction"].shape == (3, 16, 32, 32, 3)
    assert data["z_xy"].shape == (3, 8, 8, 8) and data["z_yt"].shape == (3, 8, 8, 8)
    for i in range(3):
        frames, n = synthetic_clip(config.seed, i, (16, 32, 32), min_frames=config.data.min_frames)
        np.testing.assert_array_equal(data["frames"][i], frames)
        assert data["n_frames"][i] == n
    # PSNR recomputed from the saved uint8 reconstruction (within its quantisation).
    for i, psnr in enumerate(summary["psnr"]):
        n = int(data["n_frames"][i])
        err = ((data["reconstruction"][i, :n] / 255.0 - data["frames"][i, :n] / 255.0) ** 2).mean(axis=(1, 2, 3))
        assert abs(np.mean(10 * np.log10(1 / err)) - psnr) < 0.05
    assert json.loads((tmp_path / "summary.json").read_text())["latent_tokens"] == 192
    assert Image.open(tmp_path / "demo.png").size[1] == 64


def test_synthetic_clips_are_deterministic_and_varied():
    a, na = synthetic_clip(0, 5, (24, 16, 20), min_frames=4)
    b, nb = synthetic_clip(0, 5, (24, 16, 20), min_frames=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (24, 16, 20, 3) and a.dtype == np.uint8 and na == nb
    assert not np.array_equal(a, synthetic_clip(0, 6, (24, 16, 20))[0])
    assert not np.array_equal(a, synthetic_clip(1, 5, (24, 16, 20))[0])
    assert np.abs(np.diff(a[:2].astype(int), axis=0)).mean() > 0  # things move
    lengths = [synthetic_clip(0, i, (24, 8, 8), min_frames=4)[1] for i in range(40)]
    assert min(lengths) >= 4 and any(n < 24 for n in lengths) and any(n == 24 for n in lengths)
    short = next(i for i, n in enumerate(lengths) if n < 24)
    clip, n = synthetic_clip(0, short, (24, 8, 8), min_frames=4)
    assert np.all(clip[n:] == 0)


def test_max_shapes_bounds_the_shapes_and_keeps_the_default_clips():
    """Flat, still clips: one colour for the background plus one per shape; max_shapes=3 is the
    default data bit for bit."""
    def colours(i, **kw):
        frame = synthetic_clip(0, i, (2, 32, 32), texture=0.0, motion=0.0, **kw)[0][0]
        return len(np.unique(frame.reshape(-1, 3), axis=0))

    one = [colours(i, max_shapes=1) for i in range(30)]
    default = [colours(i) for i in range(30)]
    assert max(one) == 2 and max(default) > 2  # (a shape may be hidden under another: <= not ==)
    np.testing.assert_array_equal(synthetic_clip(0, 3, (8, 16, 16), max_shapes=3)[0], synthetic_clip(0, 3, (8, 16, 16))[0])
    with pytest.raises(ValueError, match="max_shapes must be >= 1, got 0"):
        synthetic_clip(0, 0, (2, 8, 8), max_shapes=0)


def test_centered_shapes_start_in_the_middle():
    """centered=True: the one shape of a still, flat clip sits at the frame's centre (its pixels'
    centroid), the clip otherwise as drawn without it (same background colour)."""
    for i in range(5):
        clip = synthetic_clip(0, i, (2, 32, 32), texture=0.0, motion=0.0, max_shapes=1, centered=True)[0][0]
        plain = synthetic_clip(0, i, (2, 32, 32), texture=0.0, motion=0.0, max_shapes=1)[0][0]
        background = np.median(plain.reshape(-1, 3), axis=0)
        np.testing.assert_array_equal(np.median(clip.reshape(-1, 3), axis=0), background)
        ys, xs = np.nonzero(np.any(clip != background, axis=-1))
        assert abs(ys.mean() - 15.5) < 1.0 and abs(xs.mean() - 15.5) < 1.0, (i, ys.mean(), xs.mean())


def test_synthetic_labels_name_the_largest_shape():
    """with_label: the class is the kind of the clip's largest shape. One flat, still shape per clip,
    classified from its pixels at frame 0 (squares start unrotated): a ring's centre is background,
    a square fills its bounding box, a disc fills ~pi/4 of it. The frames do not change; the source
    reports the label only with config.data.synthetic_labels, -1 otherwise."""
    from coordtok_jax.data.sources import make_source
    from coordtok_jax.data.synthetic import SHAPE_KINDS

    seen = set()
    for i in range(40):
        frames, n, label = synthetic_clip(0, i, (1, 64, 64), texture=0.0, motion=0.0, max_shapes=1, with_label=True)
        frame = frames[0]
        background = frame[0, 0]
        ys, xs = np.nonzero(np.any(frame != background, axis=-1))
        box = frame[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        inside = np.any(box != background, axis=-1)
        centre = inside[inside.shape[0] // 2, inside.shape[1] // 2]
        kind = "ring" if not centre else ("square" if inside.mean() > 0.95 else "disc")
        assert SHAPE_KINDS[label] == kind, (i, label, kind, inside.mean())
        seen.add(kind)
        plain = synthetic_clip(0, i, (1, 64, 64), texture=0.0, motion=0.0, max_shapes=1)
        np.testing.assert_array_equal(plain[0], frames)
        assert plain[1] == n
    assert seen == set(SHAPE_KINDS)

    config = sit.get_config("cpu,classes=shapes")
    assert (config.model.num_classes, config.model.class_dropout_prob > 0) == (3, True)
    labelled = make_source(config.data, (4, 16, 16))
    with config.unlocked():
        config.data.synthetic_labels = False
    unlabelled = make_source(config.data, (4, 16, 16))
    for i in range(6):
        a, b = labelled.load(i, None), unlabelled.load(i, None)
        np.testing.assert_array_equal(a["video"], b["video"])
        assert b["label"] == -1
        assert a["label"] == synthetic_clip(labelled.seed, i, (4, 16, 16), min_frames=labelled.min_frames,
                                            texture=labelled.texture, motion=labelled.motion,
                                            max_shapes=labelled.max_shapes, with_label=True)[2]
