"""Patch indices, coordinates and video <-> patch layouts."""

import jax
import numpy as np

from coordtok_jax.data.video import to_model_input
from coordtok_jax.models.patches import grid_indices, indices_to_coords, patches_to_video, video_to_patches


def test_grid_order_is_t_major_then_x_then_y():
    idx = grid_indices(2, (4, 3, 5))
    assert idx.shape == (2 * 3 * 5, 3)
    np.testing.assert_array_equal(idx[:6], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4], [0, 1, 0]])
    np.testing.assert_array_equal(idx[-1], [1, 2, 4])


def test_coords_are_true_division():
    grid = (128, 16, 16)
    idx = grid_indices(128, grid)
    coords = np.asarray(indices_to_coords(idx, grid))
    assert coords.dtype == np.float32
    want = (idx.astype(np.float32) / np.array([127, 15, 15], np.float32))
    np.testing.assert_array_equal(coords, want)
    # the official decoder truncates coord * (n - 1): exact for every grid coordinate
    np.testing.assert_array_equal((coords * np.array([127, 15, 15], np.float32)).astype(np.int64), idx)


def test_patch_layout_round_trip_and_values():
    video = np.asarray(jax.random.uniform(jax.random.key(0), (2, 4, 8, 12, 3)))
    patches = np.asarray(video_to_patches(video, (2, 4, 4)))
    assert patches.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    # patch (t=1, x=0, y=2) holds video[2:4, 0:4, 8:12] in (pt, px, py, c) order
    k = 1 * 6 + 0 * 3 + 2
    np.testing.assert_array_equal(patches[1, k], video[1, 2:4, 0:4, 8:12].reshape(-1))
    np.testing.assert_array_equal(np.asarray(patches_to_video(patches, 2, (2, 2, 3), (2, 4, 4))), video)


def test_model_input_scaling_and_official_padding():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 2, 2, 3), dtype=np.uint8)
    out = np.asarray(to_model_input(frames, np.array([5, 3])))
    np.testing.assert_allclose(out[0], frames[0] / 255.0 * 2 - 1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1, :3], frames[1, :3] / 255.0 * 2 - 1, atol=1e-6)
    assert np.all(out[1, 3:] == -3.0)
