"""The train step's pieces: coordinate sampling, target gathering, FLOPs, gradient accumulation
(sharding equivalence over meshes: test_fsdp.py)."""

import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.models import validate
from coordtok_jax.train import flops, points
from coordtok_jax.train.state import make_optimizer, tokenizer_state
from coordtok_jax.train.step import frames_from_points, make_train_step

TINY = validate(coordtok.get_config("tiny").model)  # grid (16, 8, 8), patch (1, 4, 4)


def micro_config():
    """An even smaller model for the multi-step sharding tests (8x16x16 clips, width 32, 1 layer):
    on 8 simulated CPU devices a step with FSDP-sharded parameters takes seconds."""
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.model.update(dict(
            video_shape=(8, 16, 16), enc_patch_size_t=4, enc_patch_size_xy=8, latent_resolution_xy=4,
            latent_resolution_t=4, latent_patch_size_xy=2, latent_patch_size_t=2, dec_patch_size_xy=4,
            enc_embed_dim=32, dec_embed_dim=32, enc_patch_num_layers=1, enc_num_layers=1, dec_num_layers=1))
        config.num_points = 32
        config.data.min_frames = 4
    return config


def test_stage1_indices_uniform_over_valid_frames_with_replacement():
    n_frames = jnp.array([16, 5, 1])
    idx = np.asarray(points.sample_stage1(jax.random.key(0), n_frames, TINY, 4000))
    assert idx.shape == (3, 4000, 3) and idx.dtype == np.int32
    for b, n in enumerate([16, 5, 1]):
        assert idx[b, :, 0].min() == 0 and idx[b, :, 0].max() == n - 1
        counts = np.bincount(idx[b, :, 0], minlength=n)[:n]
        assert counts.min() > 0.7 * 4000 / n  # roughly uniform
    assert idx[..., 1].max() == 7 and idx[..., 2].max() == 7 and idx[..., 1:].min() == 0
    assert len({tuple(r) for r in idx[0]}) < 4000  # duplicates occur (with replacement)


def test_stage2_distinct_frames_all_patches_row_major():
    n_frames = jnp.array([16, 10, 3])
    idx = np.asarray(points.sample_stage2(jax.random.key(1), n_frames, TINY, 4))
    assert idx.shape == (3, 4 * 64, 3)
    for b, n in enumerate([16, 10, 3]):
        frames = idx[b, ::64, 0]
        assert np.all(frames < n)
        per_frame = idx[b].reshape(4, 64, 3)
        assert np.all(per_frame[:, :, 0] == frames[:, None])  # each frame's patches contiguous
        np.testing.assert_array_equal(per_frame[0, :, 1:], np.stack(np.meshgrid(range(8), range(8), indexing="ij"), -1).reshape(64, 2))
        if n >= 4:
            assert len(set(frames.tolist())) == 4  # distinct
        else:
            assert set(frames.tolist()) == set(range(n))  # all valid frames, repeated
    orders = {tuple(np.asarray(points.sample_stage2(jax.random.key(s), n_frames, TINY, 4))[0, ::64, 0]) for s in range(20)}
    assert len(orders) > 10 and any(list(o) != sorted(o) for o in orders)  # random, not sorted


def test_gather_targets_matches_slicing():
    video = np.random.default_rng(0).integers(0, 256, size=(2, 16, 32, 32, 3), dtype=np.uint8)
    idx = np.asarray(points.sample_stage1(jax.random.key(2), jnp.array([16, 9]), TINY, 50))
    got = np.asarray(points.gather_targets(jnp.asarray(video), jnp.asarray(idx), TINY))
    for b in range(2):
        for k in range(50):
            t, x, y = idx[b, k]
            want = video[b, t : t + 1, x * 4 : x * 4 + 4, y * 4 : y * 4 + 4].reshape(-1) / 255.0 * 2 - 1
            np.testing.assert_allclose(got[b, k], want, atol=1e-6)


def test_stage2_frames_round_trip():
    video = np.random.default_rng(1).integers(0, 256, size=(1, 16, 32, 32, 3), dtype=np.uint8)
    idx = points.sample_stage2(jax.random.key(3), jnp.array([16]), TINY, 4)
    frames = np.asarray(frames_from_points(points.gather_targets(jnp.asarray(video), idx, TINY), TINY, 4))
    t = np.asarray(idx)[0, ::64, 0]
    np.testing.assert_allclose(frames, video[0, t] / 255.0 * 2 - 1, atol=1e-6)


def test_flops_reproduce_the_official_table():
    l1 = coordtok.get_config("L,stage=1")
    fwd = flops.forward_flops(l1.model, 1024)
    assert fwd["vit3d"] / 1e9 == pytest.approx(253.7, abs=0.05)
    assert fwd["cross_self"] / 1e9 == pytest.approx(112.8, abs=0.05)
    assert fwd["decoder"] / 1e9 == pytest.approx(722.0, abs=0.05)
    assert flops.train_flops_per_step(l1) / 1e12 == pytest.approx(836.0, abs=0.05)
    assert flops.vgg16_forward_flops(128, 128) / 1e9 == pytest.approx(10.02, abs=0.005)
    l2 = coordtok.get_config("L,stage=2")
    assert flops.forward_flops(l2.model, 4096)["decoder"] / 1e9 == pytest.approx(4125.0, abs=0.05)
    assert flops.train_flops_per_step(l2) / 1e12 == pytest.approx(3572.6, abs=0.05)


def test_grad_accumulation_averages_micro_batch_gradients(devices):
    import optax

    from coordtok_jax.train.step import make_loss_fn

    config = micro_config()
    with config.unlocked():
        config.grad_accum_steps = 2
    rng = np.random.default_rng(1)
    video = jnp.asarray(rng.integers(0, 256, size=(8, 8, 16, 16, 3), dtype=np.uint8))
    n_frames = jnp.asarray(rng.integers(4, 9, size=(8,)).astype(np.int32))
    mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=devices[:1])
    tx = make_optimizer(config)
    plan = tokenizer_state(config, mesh, tx)
    graphdef, state = plan.graphdef, plan.create()
    params0 = jax.tree.map(jnp.array, state.params)
    geometry = validate(config.model)
    new_state, metrics = jax.jit(make_train_step(graphdef, geometry, config, tx))(
        state, {"video": video, "n_frames": n_frames})

    loss_fn = make_loss_fn(graphdef, geometry, config)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
    grad = jax.jit(jax.grad(lambda p, v, n, k: loss_fn(p, v, n, k)[0]))
    grads = [grad(params0, video[i * 4:(i + 1) * 4], n_frames[i * 4:(i + 1) * 4], jax.random.fold_in(key, i))
             for i in range(2)]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    # one AdamW update from a fresh state, jitted (eager optax would compile every op per leaf)
    want = jax.jit(lambda g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]))(mean, params0)
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-6)  # lr = 1e-4
    # Adam is scale-invariant, so the norm is what tells a mean from a sum of micro-batch grads
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(mean)), rel=1e-4)


@pytest.mark.torch
def test_stage2_loss_is_the_mean_of_l2_plus_weighted_lpips_sums():
    """Stage 2's loss value: per video, the MSE over its K decoded frames plus lpips_weight x the SUM
    of the K frames' LPIPS (the torch reference of test_lpips on the frames put together with NumPy),
    averaged over videos."""
    torch = pytest.importorskip("torch")
    from flax import nnx
    from test_lpips import random_state_dicts, torch_lpips

    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.metrics.lpips import LPIPS
    from coordtok_jax.models import CoordTok
    from coordtok_jax.models.patches import indices_to_coords
    from coordtok_jax.train.step import make_loss_fn

    config = coordtok.get_config("tiny,stage=2")
    with config.unlocked():
        config.lpips_weight, config.lpips.dropout, config.num_frames = 0.7, False, 3
    model = CoordTok(config.model, rngs=nnx.Rngs(0))
    vgg, lin = random_state_dicts(1)
    graphdef, params = nnx.split(model)
    lpips_graphdef, lpips_state = nnx.split(LPIPS.from_state_dicts(vgg, lin))
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.integers(0, 256, (2, 16, 32, 32, 3), dtype=np.uint8))
    n_frames, key = jnp.array([16, 9]), jax.random.key(7)
    loss, metrics = jax.jit(make_loss_fn(graphdef, TINY, config, lpips_graphdef))(params, video, n_frames, key,
                                                                                 lpips_state)

    idx = points.sample_stage2(jax.random.split(key)[0], n_frames, TINY, 3)  # the step's own draw
    forward = jax.jit(lambda p, v, n, c: nnx.merge(graphdef, p)(v, n, c))
    pred = np.asarray(forward(params, to_model_input(video, n_frames, -3.0), n_frames,
                              indices_to_coords(idx, TINY.dec_grid)), np.float64)
    (_, gx, gy), (pt, p, _) = TINY.dec_grid, TINY.dec_patch
    frames = pred.reshape(2, 3, gx, gy, pt, p, p, 3).transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(2, 3, 32, 32, 3)
    t = np.asarray(idx)[:, :: gx * gy, 0]  # each frame's t (pt = 1)
    target = np.asarray(video, np.float64)[np.arange(2)[:, None], t] / 255 * 2 - 1
    l2 = ((frames - target) ** 2).mean(axis=(1, 2, 3, 4))
    lp = torch_lpips(torch, vgg, lin, frames.reshape(6, 32, 32, 3).astype(np.float32),
                     target.reshape(6, 32, 32, 3).astype(np.float32)).reshape(2, 3).sum(axis=1)
    np.testing.assert_allclose(float(metrics["l2"]), l2.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["lpips"]), lp.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(loss), (l2 + 0.7 * lp).mean(), rtol=1e-4)
