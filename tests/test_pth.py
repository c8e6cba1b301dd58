"""Torch-free .pth reader: the real LPIPS file, torch.save round trips (both formats), refusals."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from coordtok_jax.io.pth import MAGIC_NUMBER, PROTOCOL_VERSION, load_pth


def test_real_lpips_lin_file(reference_dir):
    sd = load_pth(reference_dir / "lpips_vgg_lin.pth")  # legacy format, saved with CUDA locations
    assert list(sd) == [f"lin{k}.model.1.weight" for k in range(5)]
    for k, c in enumerate((64, 128, 256, 512, 512)):
        w = sd[f"lin{k}.model.1.weight"]
        assert isinstance(w, np.ndarray) and w.shape == (1, c, 1, 1) and w.dtype == np.float32
        assert np.isfinite(w).all()
    assert load_pth(str(reference_dir / "lpips_vgg_lin.pth")).keys() == sd.keys()  # str path too


def _torch_state_dict(torch):
    g = torch.Generator().manual_seed(0)
    big = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(7) - 3,
        "bool": torch.rand(4, generator=g) > 0.5,
        "transposed": torch.randn(3, 5, generator=g).t(),
        "big": big,
        "slice": big[2:5, 3:9],  # shares big's storage, offset 23, strides (10, 1)
        "column": big[:, 4],  # stride 10
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
    }


def _as_numpy(torch, t):
    t = t.detach()
    if t.dtype == torch.bfloat16:  # torch cannot export bfloat16 to NumPy: go through the bits
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.torch
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path, zip_format):
    torch = pytest.importorskip("torch")
    sd = _torch_state_dict(torch)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd, "epoch": 3, "name": "run"}, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    out = load_pth(path)
    assert type(out) is dict and type(out["model"]) is dict
    assert out["epoch"] == 3 and out["name"] == "run"
    assert list(out["model"]) == list(sd)
    for k, t in sd.items():
        want, got = _as_numpy(torch, t), out["model"][k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        np.testing.assert_array_equal(got.view(np.int16) if k == "bf16" else got,
                                      want.view(np.int16) if k == "bf16" else want, err_msg=k)
        assert got.flags.c_contiguous
    # the top folder of the zip is named after the file; another name must work as well
    other = tmp_path / "other_name.pt"
    torch.save(sd, other, _use_new_zipfile_serialization=zip_format)
    np.testing.assert_array_equal(load_pth(str(other))["slice"], sd["slice"].numpy())


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forbidden_global_refused_legacy(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pth.*(posix|os|nt)\.system"):
        load_pth(path)
    assert not marker.exists()
    plain = tmp_path / "plain.pkl"  # a bare pickle (no magic number) is refused the same way
    plain.write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(ValueError, match="system"):
        load_pth(plain)
    assert not marker.exists()


@pytest.mark.torch
def test_forbidden_global_refused_zip(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Evil(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pt.*system"):
        load_pth(path)
    assert not marker.exists()


def test_truncated_and_missing(tmp_path, reference_dir):
    data = (reference_dir / "lpips_vgg_lin.pth").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=f"cut{cut}.pth"):
            load_pth(path)
    with pytest.raises(ValueError, match=r"truncated file: expected \d+ bytes of data for storage"):
        load_pth(tmp_path / f"cut{len(data) - 5}.pth")  # the last storage is short
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pth(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pth(junk)


@pytest.mark.torch
def test_truncated_zip(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "z.pth"
    torch.save({"w": torch.ones(100)}, path)
    data = path.read_bytes()
    bad = tmp_path / "zcut.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="zcut.pth.*zip"):
        load_pth(bad)
