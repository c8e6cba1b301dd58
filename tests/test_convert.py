"""Checkpoint conversion without torch: the official key order and shapes, strict errors on
NumPy state_dicts. The PyTorch side is in test_convert_torch.py."""

import json
import math
import os

import coordtok
import jax
import numpy as np
import pytest
from flax import nnx

from coordtok_jax.convert.coordtok import ConversionError, from_official, official_shapes, strip_wrappers, to_official
from coordtok_jax.convert.torch_io import model_params
from coordtok_jax.models.coordtok import CoordTok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_FILES = {"tiny": "coordtok_small_state_dict.json", "L": "coordtok_L_state_dict.json"}


def medium_config(padding_mask="official"):
    """Non-square video, non-square planes, temporal decoder patches: catches axis swaps."""
    cfg = coordtok.model_config("tiny")
    cfg.update(dict(
        video_shape=(24, 48, 64), enc_embed_dim=96, enc_num_heads=3, enc_patch_num_layers=2, enc_num_layers=3,
        enc_patch_size_t=4, enc_patch_size_xy=16, latent_resolution_xy=8, latent_resolution_t=12,
        latent_n_features=4, latent_patch_size_xy=4, latent_patch_size_t=6, dec_embed_dim=64, dec_num_heads=4,
        dec_num_layers=3, dec_patch_size_t=2, dec_patch_size_xy=8, padding_mask=padding_mask,
    ))
    return cfg


def _reference(reference_dir, size):
    return json.loads((reference_dir / REFERENCE_FILES[size]).read_text())


@pytest.mark.parametrize("size", ["tiny", "L"])
def test_official_keys_order_shapes_and_counts(reference_dir, size):
    ref = _reference(reference_dir, size)
    shapes = official_shapes(coordtok.model_config(size))
    assert list(shapes.items()) == [(k, tuple(s)) for k, s, _ in ref["state_dict"]]
    assert sum(math.prod(s) for s in shapes.values()) == ref["total_numel"]




def test_numpy_round_trip_wrappers_and_errors():
    cfg = medium_config()
    params = model_params(CoordTok(cfg, rngs=nnx.Rngs(0)))
    official = to_official(params)
    assert official["encoder.encoder.patch_embed.proj.weight"].shape == (96, 3, 4, 16, 16)
    np.testing.assert_array_equal(  # Conv3d (out, in, t, h, w) from the Flax (t, h, w, in, out) kernel
        official["encoder.encoder.patch_embed.proj.weight"][5, 2, 1, 3, 7],
        params["encoder"]["encoder"]["patch_embed"]["kernel"][1, 3, 7, 2, 5])
    np.testing.assert_array_equal(  # row 2 of the stacked in_proj kernels, transposed
        official["encoder.transformer.layers.2.cross_attn.in_proj_weight"],
        params["encoder"]["transformer"]["layers"]["blocks"]["cross_attn"]["qkv"]["kernel"][2].T)
    back = from_official(official, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), back, params)

    wrapped = {"model": {f"module.{k}": v for k, v in official.items()}, "epoch": 1}
    wrapped["model"]["module.decoder.lpips_loss.net.slice1.0.weight"] = np.zeros((64, 3, 3, 3), np.float32)
    stripped, skipped = strip_wrappers(wrapped)
    assert list(stripped) == list(official) and skipped == ["module.decoder.lpips_loss.net.slice1.0.weight"]
    half = {k: v.astype(np.float16) for k, v in official.items()}
    np.testing.assert_array_equal(from_official(half, cfg)["weight_tokens_xy"],
                                  official["weight_tokens_xy"].astype(np.float16).astype(np.float32))

    broken = dict(official)
    broken.pop("decoder.projector.weight")
    broken["decoder.projector.bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError, match=r"(?s)1 missing keys.*decoder.projector.weight.*"
                                              r"decoder.projector.bias: \(7,\), expected"):
        from_official(broken, cfg)
    with pytest.raises(ConversionError, match="expected a state_dict"):
        strip_wrappers([1, 2])
