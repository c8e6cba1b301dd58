"""LPIPS-VGG16 in Flax NNX: against an independent PyTorch reference, properties, loading, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordtok_jax.io.pth import load_pth
from coordtok_jax.metrics.lpips import LPIPS, Frozen, _normalize, load_lpips

# torchvision vgg16 `features` (independent of the module's constants): ints are 3x3 convs + ReLU,
# 'M' is a 2x2 max pool. Official LPIPS taps the outputs of features[0:4], [4:9], [9:16], [16:23], [23:30].
VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAP_AFTER = (3, 8, 15, 22, 29)
LIN_C = (64, 128, 256, 512, 512)


def random_state_dicts(seed=0):
    """A torchvision-layout vgg16 features state_dict and an LPIPS lin state_dict (NumPy)."""
    rng = np.random.default_rng(seed)
    vgg, index, cin = {}, 0, 3
    for v in VGG_CFG:
        if v == "M":
            index += 1
            continue
        vgg[f"features.{index}.weight"] = (rng.standard_normal((v, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
        vgg[f"features.{index}.bias"] = (0.01 * rng.standard_normal(v)).astype(np.float32)
        index, cin = index + 2, v  # conv, relu
    lin = {f"lin{k}.model.1.weight": rng.uniform(0, 8 / c, (1, c, 1, 1)).astype(np.float32)
           for k, c in enumerate(LIN_C)}
    return vgg, lin


@pytest.fixture(scope="module")
def weights():
    return random_state_dicts(0)


@pytest.fixture(scope="module")
def model(weights):
    return LPIPS.from_state_dicts(*weights)


# Compiled once per shape/dtype (XLA's CPU compile of VGG16 dominates the run time of these tests).
fwd = nnx.jit(lambda m, x, y: m(x, y))
grad_x = nnx.jit(lambda m, x, y: jax.grad(lambda x: m(x, y).sum())(x))


def images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def pair(seed, shape=(2, 32, 32, 3)):
    return jnp.asarray(images(shape, seed)), jnp.asarray(images(shape, seed + 1))


def torch_lpips(torch, vgg, lin, x, y):
    """Official LPIPS semantics with torch.nn.functional, NCHW, torchvision weight layout."""
    F = torch.nn.functional
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def taps(img):
        h = (torch.from_numpy(img).permute(0, 3, 1, 2) - shift) / scale
        out, index = [], 0
        for v in VGG_CFG:
            if v == "M":
                h = F.max_pool2d(h, kernel_size=2, stride=2)
                index += 1
            else:
                w, b = (torch.from_numpy(vgg[f"features.{index}.{n}"]) for n in ("weight", "bias"))
                h = F.relu(F.conv2d(h, w, b, stride=1, padding=1))
                if index + 1 in TAP_AFTER:
                    out.append(h)
                index += 2
        return out

    total = 0
    for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
        nx = fx / (torch.sqrt(torch.sum(fx**2, dim=1, keepdim=True)) + 1e-10)
        ny = fy / (torch.sqrt(torch.sum(fy**2, dim=1, keepdim=True)) + 1e-10)
        d = F.conv2d((nx - ny) ** 2, torch.from_numpy(lin[f"lin{k}.model.1.weight"]))
        total = total + d.mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1).numpy()


@pytest.mark.torch
@pytest.mark.parametrize("hw", [(32, 32), (48, 64)])
def test_matches_torch_reference(weights, model, hw):
    torch = pytest.importorskip("torch")
    x, y = images((2, *hw, 3), 1), images((2, *hw, 3), 2)
    want = torch_lpips(torch, *weights, x, y)
    got = fwd(model, jnp.asarray(x), jnp.asarray(y))
    assert got.shape == (2,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def test_properties(model):
    x, y = pair(3)
    dxx = fwd(model, x, x)
    assert dxx.shape == (2,) and dxx.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(dxx), 0.0)
    dxy, dyx = np.asarray(fwd(model, x, y)), np.asarray(fwd(model, y, x))
    np.testing.assert_allclose(dxy, dyx, atol=1e-6)
    assert (dxy > 0).all()
    nearby = np.asarray(fwd(model, x, x + 0.05 * (y - x)))
    assert (nearby > 0).all() and (nearby < dxy).all()


def test_bfloat16_compute(weights, model):
    x, y = pair(5)
    bf16 = LPIPS.from_state_dicts(*weights, dtype=jnp.bfloat16)
    assert bf16.kernels[0][...].dtype == jnp.float32  # stored float32, computed bfloat16
    got = fwd(bf16, x, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(fwd(model, x, y)), rtol=0.1)


@nnx.jit
def dropout_outputs(m, x, y, keys, rngs):
    """Deterministic, dropout per key (vmapped: VGG runs once) and dropout from an nnx.Rngs."""
    many = jax.vmap(lambda k: m(x, y, deterministic=False, rngs=k))(keys)
    return m(x, y), many, m(x, y, deterministic=False, rngs=rngs), m(x, y, deterministic=False, key=keys[1])


def test_dropout(model):
    x, y = pair(7, (2, 16, 16, 3))
    keys = jax.random.split(jax.random.key(2), 200)
    keys = keys.at[0].set(nnx.Rngs(dropout=3).dropout())  # what an nnx.Rngs(dropout=3) draws first
    det, many, via_rngs, via_key = (np.asarray(a) for a in dropout_outputs(model, x, y, keys, nnx.Rngs(dropout=3)))
    assert many.shape == (200, 2) and det.shape == (2,)
    np.testing.assert_array_equal(via_rngs, many[0])  # nnx.Rngs: its 'dropout' stream
    np.testing.assert_array_equal(via_key, many[1])  # key=k is the same as rngs=k
    _, again, _, _ = dropout_outputs(model, x, y, keys, nnx.Rngs(dropout=3))
    np.testing.assert_array_equal(np.asarray(again), many)  # deterministic per key
    assert not np.allclose(many[0], det) and not np.allclose(many[0], many[1])
    # inverted dropout (x 1/(1-p)) is unbiased: the mean over many keys approaches the deterministic value
    np.testing.assert_allclose(many.mean(0), det, rtol=0.02)
    with pytest.raises(ValueError, match="rngs"):
        model(x, y, deterministic=False)


def test_grad_and_frozen(model):
    x, y = pair(9)
    x = x.at[1].set(y[1])  # sample 1: x == y, the minimum: gradient exactly 0
    g = np.asarray(grad_x(model, x, y))
    assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g[0]).max() > 0
    np.testing.assert_array_equal(g[1], 0.0)
    # a position whose features are all zero (dead ReLUs): finite gradient (PyTorch gives NaN)
    f = jnp.zeros((1, 2, 2, 8)).at[0, 0, 0].set(1.0)
    gn = jax.grad(lambda f: (_normalize(f) * jnp.arange(8.0)).sum())(f)
    assert np.isfinite(np.asarray(gn)).all()
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 0
    frozen = jax.tree.leaves(nnx.state(model, Frozen))
    assert len(frozen) == 13 * 2 + 5
    assert sum(a.size for a in frozen) == 14_714_688 + sum(LIN_C)  # vgg16 features + lin
    rand = jax.tree.leaves(nnx.state(LPIPS.random(jax.random.key(0)), Frozen))
    assert [(a.shape, a.dtype) for a in rand] == [(a.shape, a.dtype) for a in frozen]


def test_from_state_dicts_errors(weights):
    vgg, lin = weights
    bad = dict(vgg)
    bad["features.5.weight"] = bad["features.5.weight"][:, :32]
    del bad["features.28.bias"]
    bad["features.30.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ValueError) as e:
        LPIPS.from_state_dicts(bad, lin)
    for name in ("features.5.weight", "features.28.bias", "features.30.weight"):
        assert name in str(e.value)
    bad_lin = dict(lin, **{"lin2.model.1.weight": np.zeros((1, 128, 1, 1), np.float32)})
    with pytest.raises(ValueError, match="lin2.model.1.weight"):
        LPIPS.from_state_dicts(vgg, bad_lin)
    # a full torchvision vgg16 state_dict: classifier.* is ignored
    LPIPS.from_state_dicts(dict(vgg, **{"classifier.0.weight": np.zeros((4, 4), np.float32)}), lin)


@pytest.mark.torch
def test_real_lin_file(reference_dir, weights):
    """The official LPIPS linear heads (a legacy-format torch file read without torch) give the
    distance the torch reference computes with the same file's heads."""
    torch = pytest.importorskip("torch")
    lin = load_pth(reference_dir / "lpips_vgg_lin.pth")
    model = LPIPS.from_state_dicts(weights[0], lin)
    np.testing.assert_array_equal(np.asarray(model.lins[3][...]), lin["lin3.model.1.weight"].reshape(-1))
    x, y = images((2, 32, 32, 3), 11), images((2, 32, 32, 3), 12)
    want = torch_lpips(torch, weights[0], {k: np.asarray(v) for k, v in lin.items()}, x, y)
    np.testing.assert_allclose(np.asarray(fwd(model, jnp.asarray(x), jnp.asarray(y))), want, rtol=1e-5)


def test_load_lpips_missing_paths(tmp_path, reference_dir):
    lin_path = reference_dir / "lpips_vgg_lin.pth"
    with pytest.raises(FileNotFoundError, match=r"config\.lpips\.vgg_path.*vgg16-397923af\.pth"):
        load_lpips(None, lin_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*config\.lpips\.vgg_path"):
        load_lpips(tmp_path / "missing.pth", lin_path)
    with pytest.raises(FileNotFoundError, match=r"config\.lpips\.lin_path.*vgg\.pth"):
        load_lpips(lin_path, None)  # (any readable file stands in for the VGG weights here)


@pytest.mark.torch
def test_load_lpips_from_torch_files(tmp_path, weights, model, reference_dir):
    torch = pytest.importorskip("torch")
    vgg, _ = weights
    full = {k: torch.from_numpy(v) for k, v in vgg.items()}
    full["classifier.0.weight"] = torch.zeros(8, 8)  # stands in for the (large) classifier
    torch.save(full, tmp_path / "vgg16.pth")
    torch.save({k: torch.from_numpy(v) for k, v in weights[1].items()}, tmp_path / "lin.pth",
               _use_new_zipfile_serialization=False)
    loaded = load_lpips(tmp_path / "vgg16.pth", str(tmp_path / "lin.pth"))
    x, y = pair(13)
    np.testing.assert_array_equal(np.asarray(fwd(loaded, x, y)), np.asarray(fwd(model, x, y)))
    # the bare `features` Sequential's state_dict ('0.weight', ...) is accepted as well
    torch.save({k[len("features."):]: torch.from_numpy(v) for k, v in vgg.items()}, tmp_path / "f.pth")
    load_lpips(tmp_path / "f.pth", reference_dir / "lpips_vgg_lin.pth")
