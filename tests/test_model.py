"""CoordTok forward: parity with the float64 NumPy reference, padding semantics, shapes, counts."""

import json

import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_reference as ref
from coordtok_jax.models import CoordTok, count_params
from coordtok_jax.models.patches import grid_indices, indices_to_coords

# Official totals (tests/data/reference/*_state_dict.json hold the full layouts).
OFFICIAL_NUMEL = {"tiny": 511_408, "L": 853_410_496}


def tiny(**overrides):
    cfg = coordtok.get_config("tiny").model
    cfg.unlock() if hasattr(cfg, "unlock") else None
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def model():
    return CoordTok(tiny(), rngs=nnx.Rngs(0))


def _video(key, shape, batch=2):
    return jax.random.uniform(key, (batch,) + tuple(shape) + (3,), minval=-1.0, maxval=1.0)


def _params(m):
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("mode", ["official", "exclude"])
def test_encode_decode_match_float64_reference(mode):
    cfg = tiny(padding_mask=mode)
    m = CoordTok(cfg, rngs=nnx.Rngs(1))
    video = _video(jax.random.key(0), cfg.video_shape)
    video = video.at[1, 6:].set(-3.0)  # padded like the official pipeline
    n_frames = jnp.array([[16], [6]])  # official (B, 1) shape
    planes = m.encode(video, n_frames)
    want = ref.encode(_params(m), cfg, video, n_frames, mode)
    for got, w, name in zip(planes, want, ("xy", "yt", "xt")):
        assert got.shape == w.shape, name
        assert _rel(got, w) < 1e-5, name
    idx = np.stack([np.random.default_rng(0).integers(0, s, size=(2, 50)) for s in m.geometry.dec_grid], -1)
    coords = indices_to_coords(idx, m.geometry.dec_grid)
    got = m.decode(planes, coords)
    assert got.shape == (2, 50, 48)
    assert _rel(got, ref.decode(_params(m), cfg, planes, coords)) < 1e-5


def test_nonsquare_geometry_matches_reference():
    """Unequal H and W, t-grid != xy-grid for the query tokens: the true token grid is used."""
    cfg = tiny(video_shape=(8, 16, 24), enc_patch_size_t=4, latent_resolution_xy=8, latent_resolution_t=12,
               latent_patch_size_xy=4, latent_patch_size_t=4, dec_patch_size_t=2)
    m = CoordTok(cfg, rngs=nnx.Rngs(2))
    video = _video(jax.random.key(1), cfg.video_shape, batch=1)
    planes = m.encode(video, jnp.array([5]))
    assert [p.shape for p in planes] == [(1, 8, 8, 8), (1, 12, 8, 8), (1, 12, 8, 8)]
    for got, w in zip(planes, ref.encode(_params(m), cfg, video, np.array([5]))):
        assert _rel(got, w) < 1e-5
    coords = jax.random.uniform(jax.random.key(2), (1, 30, 3))
    got = m.decode(planes, coords)
    assert got.shape == (1, 30, 2 * 4 * 4 * 3)
    assert _rel(got, ref.decode(_params(m), cfg, planes, coords)) < 1e-5


def test_padding_mask_floor_semantics(model):
    """Official: floor(n_frames / pt) valid temporal patches -> n=6 == n=4 (pt=4), n=8 differs."""
    video = _video(jax.random.key(3), (16, 32, 32), batch=1)
    enc = lambda n: model.encode(video, jnp.array([n]))
    for a, b in zip(enc(6), enc(4)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(enc(8)[0]), np.asarray(enc(4)[0]))
    assert not np.allclose(np.asarray(enc(16)[0]), np.asarray(enc(12)[0]))


def test_padding_mask_official_is_plus_one_not_masking():
    """The official float mask adds +1 to padded logits: padded memory still contributes."""
    video = _video(jax.random.key(4), (16, 32, 32), batch=1)
    off = CoordTok(tiny(padding_mask="official"), rngs=nnx.Rngs(0))
    exc = CoordTok(tiny(padding_mask="exclude"), rngs=nnx.Rngs(0))
    n = jnp.array([16])
    for a, b in zip(off.encode(video, n), exc.encode(video, n)):  # nothing padded: identical
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    n = jnp.array([4])
    assert not np.allclose(np.asarray(off.encode(video, n)[0]), np.asarray(exc.encode(video, n)[0]), atol=1e-4)
    # 'exclude' counts partially valid temporal patches (ceil): 5 frames -> 2 patches, like 8.
    for a, b in zip(exc.encode(video, jnp.array([5])), exc.encode(video, jnp.array([8]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_is_pure_and_deterministic(model):
    video = _video(jax.random.key(5), (16, 32, 32))
    planes = model.encode(video)
    coords = jax.random.uniform(jax.random.key(6), (2, 20, 3))
    before = np.asarray(coords).copy()
    first = model.decode(planes, coords)
    np.testing.assert_array_equal(np.asarray(coords), before)
    np.testing.assert_array_equal(np.asarray(model.decode(planes, coords)), np.asarray(first))


def test_joint_attention_couples_points(model):
    """A point's output depends on which other points are decoded with it (official behaviour)."""
    planes = model.encode(_video(jax.random.key(7), (16, 32, 32), batch=1))
    coords = jax.random.uniform(jax.random.key(8), (1, 10, 3))
    full = model.decode(planes, coords)
    half = model.decode(planes, coords[:, :5])
    assert not np.allclose(np.asarray(full[:, :5]), np.asarray(half), atol=1e-5)
    perm = jnp.array([3, 1, 4, 0, 2, 9, 8, 7, 6, 5])  # but permutation-equivariant
    np.testing.assert_allclose(np.asarray(model.decode(planes, coords[:, perm])), np.asarray(full[:, perm]), atol=1e-5)


def test_positional_index_is_rounded_on_fp32_grid():
    """i / 127 * 127 truncates to i - 1 for some i in fp32 reciprocal math; round() never does."""
    from coordtok_jax.models.decoder import position_index

    grid = (128, 16, 16)
    idx = grid_indices(128, grid)[::256]  # every t, x = y = 0
    coords = indices_to_coords(idx, grid) * np.float32(1.0)
    scrambled = jnp.asarray(idx, jnp.float32) * (np.float32(1) / np.float32(127))  # reciprocal-multiply
    flat = np.asarray(idx[:, 0]) * 256
    np.testing.assert_array_equal(np.asarray(position_index(coords, grid)), flat)
    scrambled_coords = jnp.stack([scrambled[:, 0], coords[:, 1], coords[:, 2]], -1)
    np.testing.assert_array_equal(np.asarray(position_index(scrambled_coords, grid)), flat)


def test_jit_and_grad_are_finite(model):
    video = _video(jax.random.key(9), (16, 32, 32))
    coords = jax.random.uniform(jax.random.key(10), (2, 64, 3))
    target = jax.random.uniform(jax.random.key(11), (2, 64, 48), minval=-1, maxval=1)

    @nnx.jit
    def step(m):
        def loss(m):
            return jnp.mean((m(video, jnp.array([16, 9]), coords) - target) ** 2)
        return nnx.value_and_grad(loss)(m)

    value, grads = step(model)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.abs(g).sum()) > 0 for g in leaves) == len(leaves)  # every parameter is used


def test_bf16_compute_and_remat_policy():
    video = _video(jax.random.key(12), (16, 32, 32))
    coords = jax.random.uniform(jax.random.key(13), (2, 32, 3))
    f32 = CoordTok(tiny(), rngs=nnx.Rngs(3))
    bf16 = CoordTok(tiny(dtype="bfloat16"), rngs=nnx.Rngs(3))
    remat = CoordTok(tiny(remat_policy="nothing_saveable"), rngs=nnx.Rngs(3))
    fwd = nnx.jit(lambda m: m(video, None, coords))
    out = fwd(f32)
    low = fwd(bf16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    assert low.dtype == jnp.float32 and _rel(low, out) < 5e-2
    loss = lambda m: jnp.sum(m(video, None, coords) ** 2)
    g1 = nnx.jit(nnx.grad(loss))(f32)
    g2 = nnx.jit(nnx.grad(loss))(remat)
    np.testing.assert_allclose(np.asarray(fwd(remat)), np.asarray(out), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert _rel(b, a) < 1e-5


@pytest.mark.parametrize("size", ["L", "B", "S", "tiny"])
def test_shapes_without_allocation(size):
    cfg = coordtok.get_config(size).model
    T, H, W = cfg.video_shape

    def run():
        m = CoordTok(cfg, rngs=nnx.Rngs(0))
        planes = m.encode(jnp.zeros((2, T, H, W, 3)), jnp.array([T, T // 2]))
        return planes, m.decode(planes, jnp.zeros((2, 1024, 3)))

    planes, out = jax.eval_shape(run)
    rxy, rt, c = cfg.latent_resolution_xy, cfg.latent_resolution_t, cfg.latent_n_features
    assert [p.shape for p in planes] == [(2, rxy, rxy, c), (2, rt, rxy, c), (2, rt, rxy, c)]
    assert out.shape == (2, 1024, cfg.dec_patch_size_t * cfg.dec_patch_size_xy**2 * 3)
    if size != "tiny":
        assert rxy * rxy + 2 * rt * rxy == 1280  # the released latent geometry


def _official(reference_dir, name):
    return json.loads((reference_dir / name).read_text())


@pytest.mark.parametrize("size,json_name", [("tiny", "coordtok_small_state_dict.json"), ("L", "coordtok_L_state_dict.json")])
def test_parameter_counts_equal_official(size, json_name, request):
    cfg = coordtok.get_config(size).model
    abstract = nnx.eval_shape(lambda: CoordTok(cfg, rngs=nnx.Rngs(0)))
    want = OFFICIAL_NUMEL[size]
    try:
        reference = _official(request.getfixturevalue("reference_dir"), json_name)
    except pytest.skip.Exception:
        reference = None
    if reference is not None:
        want = reference["total_numel"]
        assert {k: v for k, v in reference["config"].items() if k in cfg} == {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in reference["config"]}
        params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
        for module, numel in reference["numel_by_top_module"].items():
            got = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params[module]))
            assert got == numel, module
    assert count_params(abstract) == want


def test_initialisation_follows_pytorch_defaults():
    cfg = tiny(enc_embed_dim=128, dec_embed_dim=96)
    m = CoordTok(cfg, rngs=nnx.Rngs(4))
    p = _params(m)
    assert abs(float(np.std(p["encoder"]["encoder"]["pos_emb"])) - 1.0) < 0.05
    assert abs(float(np.std(p["weight_tokens_yt"])) - 1.0) < 0.1
    assert abs(float(np.std(p["decoder"]["transformer"]["pos_embed"])) - 96**-0.5) < 0.005
    fc1 = p["decoder"]["transformer"]["layers"]["blocks"]["mlp"]["fc1"]
    bound = 96**-0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for arr in (fc1["kernel"], fc1["bias"]):
        assert np.abs(arr).max() <= bound and np.abs(arr).max() > 0.95 * bound
    conv = p["encoder"]["encoder"]["patch_embed"]["kernel"]  # fan_in = 3 * 4 * 8 * 8
    assert np.abs(conv).max() <= 768**-0.5 and np.abs(conv).max() > 0.95 * 768**-0.5
    in_proj = p["encoder"]["transformer"]["layers"]["blocks"]["cross_attn"]["qkv"]["kernel"]
    xavier = np.sqrt(6.0 / (128 + 3 * 128))  # Xavier over the packed (3D, D) in_proj_weight
    assert np.abs(in_proj).max() <= xavier and np.abs(in_proj).max() > 0.95 * xavier
    ln = p["encoder"]["transformer"]["norm"]
    np.testing.assert_array_equal(ln["scale"], 1.0)
    np.testing.assert_array_equal(ln["bias"], 0.0)
    # stacked layers are independent draws
    stacked = p["encoder"]["encoder"]["layers"]["blocks"]["attn"]["qkv"]["kernel"]
    assert not np.allclose(stacked[0], stacked[1])


def test_bad_inputs_name_what_was_expected(model):
    with pytest.raises(ValueError, match=r"video must be \(B, 16, 32, 32, 3\)"):
        model.encode(jnp.zeros((1, 8, 32, 32, 3)))
    with pytest.raises(ValueError, match="n_frames must hold one integer length per video"):
        model.encode(jnp.zeros((2, 16, 32, 32, 3)), jnp.array([16, 16, 16]))
    with pytest.raises(ValueError, match=r"n_frames must be in \[1, 16\]"):
        model.encode(jnp.zeros((2, 16, 32, 32, 3)), jnp.array([16, 17]))
    with pytest.raises(ValueError, match="to_model_input"):
        model.encode(jnp.zeros((1, 16, 32, 32, 3), jnp.uint8))
    planes = model.encode(jnp.zeros((1, 16, 32, 32, 3)))
    with pytest.raises(ValueError, match="coords must be"):
        model.decode(planes, jnp.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="z_yt"):
        model.decode((planes[0], planes[1][:, :4], planes[2]), jnp.zeros((1, 4, 3)))


def test_scan_unroll_changes_nothing_but_the_loop():
    """model.scan_unroll (here: every stack unrolled): same parameter tree, same outputs and gradients
    as one layer per iteration."""
    base, unrolled = CoordTok(tiny(), rngs=nnx.Rngs(3)), CoordTok(tiny(scan_unroll=64), rngs=nnx.Rngs(3))
    assert jax.tree.map(jnp.shape, _params(base)) == jax.tree.map(jnp.shape, _params(unrolled))
    video = _video(jax.random.key(4), tiny().video_shape)
    coords = jax.random.uniform(jax.random.key(5), (2, 40, 3))
    n = jnp.array([16, 7])

    def loss(m):
        return jnp.sum(m(video, n, coords) ** 2)

    grad = nnx.jit(nnx.value_and_grad(loss))
    (l_base, g_base), (l_unrolled, g_unrolled) = grad(base), grad(unrolled)
    np.testing.assert_allclose(np.asarray(l_unrolled), np.asarray(l_base), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    with pytest.raises(Exception, match="scan_unroll must be a positive integer, got 0"):
        CoordTok(tiny(scan_unroll=0), rngs=nnx.Rngs(0))


def test_per_layer_stacks_compute_what_the_scanned_ones_do():
    """model.scan_layers=False: one parameter tree per layer (no 'layers' axis), run in a Python
    loop; given the scanned model's weights (moved through the official layout) it gives the same
    outputs and gradients (here through per-block remat; without remat: the PyTorch parity and
    checkpoint tests)."""
    from coordtok_jax.convert.coordtok import from_official, to_official
    from coordtok_jax.convert.torch_io import model_from_params
    from coordtok_jax.models.config import scan_layers

    remat = "nothing_saveable"

    scanned = CoordTok(tiny(remat_policy=remat), rngs=nnx.Rngs(3))
    cfg = tiny(scan_layers=False, remat_policy=remat)
    per_layer = model_from_params(from_official(to_official(_params(scanned)), cfg), cfg)
    blocks = _params(per_layer)["decoder"]["transformer"]["layers"]["blocks"]
    assert sorted(blocks) == list(range(cfg.dec_num_layers))
    assert blocks[1]["mlp"]["fc1"]["kernel"].shape == (cfg.dec_embed_dim, int(cfg.dec_embed_dim * cfg.mlp_ratio))
    spec = nnx.get_partition_spec(nnx.state(per_layer, nnx.Param))
    assert tuple(spec["decoder"]["transformer"]["layers"]["blocks"][0]["mlp"]["fc1"]["kernel"].get_value()) == ("embed", "mlp")
    assert count_params(per_layer) == count_params(scanned)

    video = _video(jax.random.key(4), tiny().video_shape)
    coords = jax.random.uniform(jax.random.key(5), (2, 40, 3))
    n = jnp.array([16, 7])
    grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(video, n, coords) ** 2)))
    (l_scan, g_scan), (l_loop, g_loop) = grad(scanned), grad(per_layer)
    np.testing.assert_allclose(np.asarray(l_loop), np.asarray(l_scan), rtol=1e-5)
    g_scan, g_loop = to_official(nnx.to_pure_dict(g_scan)), to_official(nnx.to_pure_dict(g_loop))
    assert list(g_scan) == list(g_loop)
    for k in g_scan:
        np.testing.assert_allclose(np.asarray(g_loop[k]), np.asarray(g_scan[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    with pytest.raises(Exception, match="config.model.scan_layers must be True or False, got 'no'"):
        scan_layers({"scan_layers": "no"})
