"""decode_video: every patch of the clip, in one pass or in the official contiguous chunks."""

import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordtok_jax.models import CoordTok
from coordtok_jax.models.decode_video import decode_video
from coordtok_jax.models.patches import grid_indices, indices_to_coords, patches_to_video


@pytest.fixture(scope="module")
def setup():
    model = CoordTok(coordtok.get_config("tiny").model, rngs=nnx.Rngs(0))
    video = jax.random.uniform(jax.random.key(0), (2, 16, 32, 32, 3), minval=-1, maxval=1)
    return model, nnx.jit(lambda m, v: m.encode(v))(model, video)


def test_all_mode_is_one_joint_pass(setup):
    model, planes = setup
    out = nnx.jit(lambda m, p: decode_video(m, p))(model, planes)
    assert out.shape == (2, 16, 32, 32, 3)
    g = model.geometry
    coords = jnp.broadcast_to(indices_to_coords(grid_indices(16, g.dec_grid), g.dec_grid), (2, 1024, 3))
    want = patches_to_video(model.decode(planes, coords), 16, g.dec_grid, g.dec_patch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_chunks_follow_official_slicing_and_decode_the_remainder(setup):
    model, planes = setup
    g = model.geometry
    # 15 frames = 960 patches in chunks of 448: two chunks + a remainder of 64 (the official drops it)
    out = nnx.jit(lambda m, p: decode_video(m, p, num_frames=15, points_per_call=448))(model, planes)
    assert out.shape == (2, 15, 32, 32, 3)
    coords = jnp.broadcast_to(indices_to_coords(grid_indices(15, g.dec_grid), g.dec_grid), (2, 960, 3))
    pieces = [model.decode(planes, coords[:, a:b]) for a, b in ((0, 448), (448, 896), (896, 960))]
    want = patches_to_video(jnp.concatenate(pieces, axis=1), 15, g.dec_grid, g.dec_patch)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out[:, 14])).mean() > 0  # remainder frames are decoded, not left at 0
    full = nnx.jit(lambda m, p: decode_video(m, p, num_frames=15))(model, planes)
    assert not np.allclose(np.asarray(out), np.asarray(full), atol=1e-4)  # slicing changes outputs (official)
    with pytest.raises(ValueError, match=r"num_frames must be in \[1, 16\]"):
        decode_video(model, planes, num_frames=17)


def test_modes_and_chunked_attention_agree():
    """mode='chunks' is the points_per_call slicing; attention_impl='chunked' (memory-efficient,
    queries in chunks against all keys) equals plain attention in mode 'all'."""
    import coordtok
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from coordtok_jax.models import CoordTok

    cfg = coordtok.model_config("tiny")
    model = CoordTok(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    planes = tuple(jnp.asarray(rng.standard_normal((2,) + s).astype(np.float32)) for s in model.geometry.plane_shapes)
    run = nnx.jit(decode_video, static_argnums=(2, 3), static_argnames=("mode",))
    by_mode = run(model, planes, 13, 300, mode="chunks")
    np.testing.assert_array_equal(by_mode, run(model, planes, 13, 300))
    full = run(model, planes, 13, None, mode="all")
    assert full.shape == (2, 13, 32, 32, 3)
    assert float(jnp.abs(full - by_mode).max()) > 1e-4  # slicing changes what attends to what

    cfg.attention_impl, cfg.attention_query_chunk = "chunked", 200  # 832 queries -> 5 chunks, padded
    chunked = CoordTok(cfg, rngs=nnx.Rngs(0))
    out = run(chunked, planes, 13, None, mode="all")
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="points_per_call"):
        decode_video(model, planes, mode="chunks")
    with pytest.raises(ValueError, match="mode"):
        decode_video(model, planes, mode="every")
