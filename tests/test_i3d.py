"""InceptionI3d: state_dict layout and loading, blocks vs float64 NumPy, forward, preprocess, torch parity."""

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordtok_jax.metrics import i3d


def _random_state_dict(shapes, seed=0):
    """Random weights of the given torch shapes: He-normal convs, positive BN running_var."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = np.array(7, np.int64)
        elif k.endswith("conv3d.weight"):
            sd[k] = (rng.standard_normal(s, np.float32) * np.sqrt(2.0 / np.prod(s[1:]))).astype(np.float32)
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, s).astype(np.float32)
        elif k.endswith("bn.weight"):
            sd[k] = rng.uniform(0.8, 1.2, s).astype(np.float32)
        else:  # BN bias / running_mean, logits bias
            sd[k] = (0.1 * rng.standard_normal(s)).astype(np.float32)
    return sd


@pytest.fixture(scope="module")
def reference_shapes(reference_dir):
    entries = json.loads((reference_dir / "i3d_state_dict.json").read_text())
    assert len(entries) == 344
    return {k: tuple(s) for k, s, _ in entries}


@pytest.fixture(scope="module")
def state_dict(reference_shapes):
    return _random_state_dict(reference_shapes)


@pytest.fixture(scope="module")
def model(state_dict):
    return i3d.i3d_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def video_and_logits(model):
    """One uint8 224x224 clip of the minimum length (9 frames) and its i3d_features (one jit)."""
    video = np.random.default_rng(1).integers(0, 256, (1, 9, 224, 224, 3), dtype=np.uint8)
    return video, i3d.i3d_features(model, video)


# ------------------------------------------------------------------ float64 NumPy reference

def _np_same_pad(x, kernel, stride):
    """piergiaj compute_pad on (B, T, H, W, C), zero fill."""
    pads = []
    for n, k, s in zip(x.shape[1:4], kernel, stride):
        p = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((p // 2, p - p // 2))
    return np.pad(x, [(0, 0), *pads, (0, 0)])


def _np_windows(x, kernel, stride):
    """Yields (offset, strided view) for every kernel offset of a VALID window op."""
    out = [(n - k) // s + 1 for n, k, s in zip(x.shape[1:4], kernel, stride)]
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            for c in range(kernel[2]):
                yield (a, b, c), x[:, a:a + stride[0] * (out[0] - 1) + 1:stride[0],
                                   b:b + stride[1] * (out[1] - 1) + 1:stride[1],
                                   c:c + stride[2] * (out[2] - 1) + 1:stride[2]]


def _np_unit(sd, prefix, x, stride=(1, 1, 1)):
    """Unit3D in float64 from torch-layout weights: SAME pad, conv, BN (eps 1e-3), ReLU."""
    w = sd[f"{prefix}.conv3d.weight"].astype(np.float64)
    x = _np_same_pad(x, w.shape[2:], stride)
    y = sum(np.einsum("bthwi,oi->bthwo", v, w[:, :, a, b, c])
            for (a, b, c), v in _np_windows(x, w.shape[2:], stride))
    g, beta, mean, var = (sd[f"{prefix}.bn.{p}"].astype(np.float64)
                          for p in ("weight", "bias", "running_mean", "running_var"))
    return np.maximum((y - mean) / np.sqrt(var + 1e-3) * g + beta, 0.0)


def _np_max_pool(x, kernel, stride):
    x = _np_same_pad(x, kernel, stride)
    out = None
    for _, v in _np_windows(x, kernel, stride):
        out = v if out is None else np.maximum(out, v)
    return out


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------------ layout and loading

def test_expected_shapes_match_reference(reference_shapes):
    want = {k: s for k, s in reference_shapes.items() if not k.endswith("num_batches_tracked")}
    assert i3d.expected_shapes() == want
    assert sum(k.endswith("num_batches_tracked") for k in reference_shapes) == 57


def test_all_keys_load(model, state_dict):
    back = i3d.i3d_state_dict(model)
    loaded = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    assert back.keys() == loaded.keys()
    for k, v in loaded.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert model.Conv3d_1a_7x7.kernel[...].shape == (7, 7, 7, 3, 64)  # DHWIO
    assert model.Mixed_3b.b3b.kernel[...].shape == (1, 1, 1, 192, 32)
    # a "module." (DataParallel) prefix and a {"state_dict": ...} wrapper are accepted
    wrapped = {"state_dict": {"module." + k: v for k, v in state_dict.items()}}
    np.testing.assert_array_equal(i3d.i3d_from_state_dict(wrapped).logits.bias[...],
                                  state_dict["logits.conv3d.bias"])


def test_strict_loading_lists_all_problems(state_dict):
    bad = dict(state_dict)
    del bad["Mixed_4c.b1b.bn.running_var"], bad["logits.conv3d.bias"]
    bad["Mixed_6a.b0.conv3d.weight"] = np.zeros((1,), np.float32)
    bad["Conv3d_2b_1x1.conv3d.weight"] = np.zeros((64, 64, 3, 3, 3), np.float32)
    with pytest.raises(ValueError) as e:
        i3d.i3d_from_state_dict(bad)
    msg = str(e.value)
    for k in ("Mixed_4c.b1b.bn.running_var", "logits.conv3d.bias", "Mixed_6a.b0.conv3d.weight",
              "Conv3d_2b_1x1.conv3d.weight: (64, 64, 3, 3, 3) (expected (64, 64, 1, 1, 1))"):
        assert k in msg


def test_load_i3d_npz_and_missing_file(tmp_path, state_dict):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        i3d.load_i3d(tmp_path / "nowhere.pt")
    np.savez(tmp_path / "i3d.npz", **{k: state_dict[k] for k in ("logits.conv3d.bias",)})
    with pytest.raises(ValueError, match=r"i3d\.npz.*missing keys"):
        i3d.load_i3d(tmp_path / "i3d.npz")


# ------------------------------------------------------------------ blocks vs float64 NumPy

def test_conv3d_1a_vs_numpy(model, state_dict):
    # odd and even sizes: stride-2 SAME padding is (3, 3) for odd and (2, 3) for even sizes
    x = np.random.default_rng(2).uniform(-1, 1, (1, 6, 11, 12, 3))
    got = model.Conv3d_1a_7x7(jnp.asarray(x, jnp.float32))
    want = _np_unit(state_dict, "Conv3d_1a_7x7", x, stride=(2, 2, 2))
    assert got.shape == want.shape == (1, 3, 6, 6, 64)
    assert _rel_err(got, want) <= 1e-5


def test_mixed_3b_vs_numpy(model, state_dict):
    x = np.random.default_rng(3).uniform(0, 2, (1, 4, 7, 6, 192))
    got = model.Mixed_3b(jnp.asarray(x, jnp.float32))
    p = "Mixed_3b."
    want = np.concatenate([
        _np_unit(state_dict, p + "b0", x),
        _np_unit(state_dict, p + "b1b", _np_unit(state_dict, p + "b1a", x)),
        _np_unit(state_dict, p + "b2b", _np_unit(state_dict, p + "b2a", x)),
        _np_unit(state_dict, p + "b3b", _np_max_pool(x, (3, 3, 3), (1, 1, 1)))], axis=-1)
    assert got.shape == want.shape == (1, 4, 7, 6, 256)
    assert _rel_err(got, want) <= 1e-5


def test_max_pool_pads_with_zeros():
    x = np.random.default_rng(4).uniform(-2, -1, (1, 6, 7, 8, 4))  # all negative: padding shows
    for kernel, stride in i3d.POOLS.values():
        got = np.asarray(i3d.max_pool_same(jnp.asarray(x, jnp.float32), kernel, stride))
        want = _np_max_pool(x, kernel, stride)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.any(got == 0.0)


# ------------------------------------------------------------------ forward, preprocess

def test_forward_logits(video_and_logits):
    _, logits = video_and_logits
    assert logits.shape == (1, 400) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits)) and np.std(logits) > 1e-3


def test_forward_rejects_too_small_inputs(model):
    with pytest.raises(ValueError, match="9 frames"):
        model(jnp.zeros((1, 8, 224, 224, 3)))
    with pytest.raises(ValueError, match="193..224"):
        model(jnp.zeros((1, 16, 128, 128, 3)))
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        model(jnp.zeros((1, 16, 224, 224)))


def test_preprocess_shapes_range_constant():
    rng = np.random.default_rng(5)
    video = rng.integers(0, 256, (2, 3, 128, 160, 3), dtype=np.uint8)
    out = jax.jit(i3d.preprocess)(video)
    assert out.shape == (2, 3, 224, 224, 3) and out.dtype == jnp.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    assert i3d.target_size(128, 160) == (224, 280) and i3d.target_size(180, 120) == (336, 224)
    const = np.full((1, 2, 100, 75, 3), 77, np.uint8)
    np.testing.assert_allclose(np.asarray(i3d.preprocess(const)), 77 / 255 * 2 - 1, rtol=0, atol=1e-6)
    square = rng.integers(0, 256, (1, 2, 224, 224, 3), dtype=np.uint8)
    np.testing.assert_allclose(np.asarray(i3d.preprocess(square)), square / 255 * 2 - 1, atol=1e-6)
    floats = np.asarray(i3d.preprocess(square.astype(np.float32) / 127.5 - 1, value_range=(-1, 1)))
    np.testing.assert_allclose(floats, square / 255 * 2 - 1, atol=1e-6)


# ------------------------------------------------------------------ torch parity (piergiaj semantics)

def _torch_pad(x, kernel, stride):
    """piergiaj: F.pad of (B, C, T, H, W) with the compute_pad amounts (zeros)."""
    import torch.nn.functional as tF
    pads = []
    for n, k, s in zip(x.shape[2:], kernel, stride):
        p = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((p // 2, p - p // 2))
    (tf_, tb), (hf, hb), (wf, wb) = pads
    return tF.pad(x, (wf, wb, hf, hb, tf_, tb))


def _torch_unit(sd, prefix, x, stride=1, bn=True, relu=True):
    import torch.nn.functional as tF
    w = sd[f"{prefix}.conv3d.weight"]
    x = tF.conv3d(_torch_pad(x, w.shape[2:], (stride,) * 3), w, sd.get(f"{prefix}.conv3d.bias"), stride)
    if bn:
        x = tF.batch_norm(x, sd[f"{prefix}.bn.running_mean"], sd[f"{prefix}.bn.running_var"],
                          sd[f"{prefix}.bn.weight"], sd[f"{prefix}.bn.bias"], False, 0.01, 1e-3)
    return tF.relu(x) if relu else x


def _torch_pool(x, kernel, stride):
    import torch.nn.functional as tF
    return tF.max_pool3d(_torch_pad(x, kernel, stride), kernel, stride)


def _torch_i3d(sd, x):
    """piergiaj InceptionI3d forward (eval) + DIGAN's mean over time, on (B, 3, T, H, W)."""
    import torch
    import torch.nn.functional as tF
    x = _torch_unit(sd, "Conv3d_1a_7x7", x, stride=2)
    x = _torch_pool(x, *i3d.POOLS["MaxPool3d_2a_3x3"])
    x = _torch_unit(sd, "Conv3d_2c_3x3", _torch_unit(sd, "Conv3d_2b_1x1", x))
    x = _torch_pool(x, *i3d.POOLS["MaxPool3d_3a_3x3"])
    for name, _, _ in i3d.MIXED:
        if name == "Mixed_4b":
            x = _torch_pool(x, *i3d.POOLS["MaxPool3d_4a_3x3"])
        if name == "Mixed_5b":
            x = _torch_pool(x, *i3d.POOLS["MaxPool3d_5a_2x2"])
        p = name + "."
        x = torch.cat([_torch_unit(sd, p + "b0", x),
                       _torch_unit(sd, p + "b1b", _torch_unit(sd, p + "b1a", x)),
                       _torch_unit(sd, p + "b2b", _torch_unit(sd, p + "b2a", x)),
                       _torch_unit(sd, p + "b3b", _torch_pool(x, (3, 3, 3), (1, 1, 1)))], dim=1)
    x = _torch_unit(sd, "logits", tF.avg_pool3d(x, (2, 7, 7), (1, 1, 1)), bn=False, relu=False)
    return x.squeeze(3).squeeze(3).mean(dim=2)


def _torch_preprocess(video, resolution=224):
    """DIGAN/TATS preprocess_single on a (T, H, W, C) uint8 video -> (C, T, h, w) in [-1, 1]."""
    import torch
    import torch.nn.functional as tF
    v = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0
    _, _, h, w = v.shape
    scale = resolution / min(h, w)
    size = (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)
    v = tF.interpolate(v, size=size, mode="bilinear", align_corners=False)
    _, _, h, w = v.shape
    hs, ws = (h - resolution) // 2, (w - resolution) // 2
    v = v[:, :, hs:hs + resolution, ws:ws + resolution].permute(1, 0, 2, 3).contiguous()
    return (v - 0.5) * 2


@pytest.fixture(scope="module")
def torch_sd(state_dict):
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(v) for k, v in state_dict.items()}


@pytest.mark.torch
def test_torch_unit_and_pool_parity(model, torch_sd):
    import torch
    x = np.random.default_rng(6).uniform(-1, 1, (1, 7, 13, 10, 3)).astype(np.float32)
    with torch.no_grad():
        want = _torch_pool(_torch_unit(torch_sd, "Conv3d_1a_7x7", torch.from_numpy(x).permute(0, 4, 1, 2, 3),
                                       stride=2), (1, 3, 3), (1, 2, 2)).permute(0, 2, 3, 4, 1).numpy()
    got = i3d.max_pool_same(model.Conv3d_1a_7x7(jnp.asarray(x)), (1, 3, 3), (1, 2, 2))
    assert got.shape == want.shape == (1, 4, 4, 3, 64)
    assert _rel_err(got, want) <= 1e-5


@pytest.mark.torch
def test_torch_full_network_parity(video_and_logits, torch_sd):
    import torch
    video, logits = video_and_logits
    with torch.no_grad():
        x = torch.stack([_torch_preprocess(v) for v in video])
        want = _torch_i3d(torch_sd, x).numpy()
    assert want.shape == logits.shape == (1, 400)
    assert _rel_err(logits, want) <= 1e-4


@pytest.mark.torch
@pytest.mark.parametrize("hw", [(128, 160), (300, 256)])  # upsampling; downsampling (no antialias)
def test_torch_preprocess_parity(hw):
    pytest.importorskip("torch")
    video = np.random.default_rng(7).integers(0, 256, (2, 2, *hw, 3), dtype=np.uint8)
    want = np.stack([_torch_preprocess(v).permute(1, 2, 3, 0).numpy() for v in video])
    got = np.asarray(i3d.preprocess(video))
    assert got.shape == want.shape == (2, 2, 224, 224, 3)
    np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.torch
def test_load_i3d_pt_with_and_without_torch(tmp_path, torch_sd, monkeypatch):
    import torch
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save({"module." + k: v for k, v in torch_sd.items()}, path)
    names = ("logits.conv3d.bias", "Mixed_5c.b2b.bn.running_var")
    with_torch = i3d.i3d_state_dict(i3d.load_i3d(path))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails: load_pth path
    without = i3d.i3d_state_dict(i3d.load_i3d(str(path)))
    for k in names:
        np.testing.assert_array_equal(with_torch[k], torch_sd[k].numpy())
        np.testing.assert_array_equal(without[k], torch_sd[k].numpy())
