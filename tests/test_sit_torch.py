"""Triplane SiT and PyTorch: the self-contained PyTorch SiT has the official state_dict (L/2 on
the meta device), JAX matches it after conversion (tiny, a non-square medium config, no
learn_sigma, class-conditional with forced null labels) with random non-zero weights, round
trips are bit-exact, and official checkpoint files ({'model','ema','opt','args'}) load."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sit
from flax import nnx

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from test_sit_model import inputs, medium, random_tree, rel  # noqa: E402

from coordtok_jax.convert.torch import sit as torch_sit  # noqa: E402
from coordtok_jax.convert.coordtok import ConversionError  # noqa: E402
from coordtok_jax.convert.sit import (  # noqa: E402
    read_sit_checkpoint,
    sit_from_torch_state_dict,
    sit_to_torch_state_dict,
)
from coordtok_jax.models.coordtok import count_params  # noqa: E402
from coordtok_jax.models.sit import count_sit_params, sincos_2d, sit_model_from_params  # noqa: E402


def torch_kwargs(cfg):
    return {k: cfg[k] for k in torch_sit.SIT_L2}


def torch_model(cfg, seed):
    """The official initialisation, then adaLN, final layers and pos_embed_t randomised: with
    their zero init the output would be 0 and parity vacuous."""
    torch.manual_seed(seed)
    model = torch_sit.TriplaneSiT(**torch_kwargs(cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name or name == "pos_embed_t":
                p.normal_(0.0, 0.1 if p.ndim > 1 else 0.5)
    return model


def test_torch_state_dict_is_the_official_one(reference_dir):
    ref = json.loads((reference_dir / "sit_L2_state_dict.json").read_text())
    with torch.device("meta"):  # SiT-L/2 without allocating 1.8 GB
        model = torch_sit.TriplaneSiT(**torch_kwargs(sit.model_config("L/2")))
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, tuple(s)) for k, s, _ in ref["state_dict"]]
    assert sum(v.numel() for v in sd.values()) == ref["total_numel"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["trainable_numel"]
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ref["non_trainable_entries"]


def test_pos_embed_table_and_initialisation_agree_with_jax():
    cfg = sit.model_config("tiny")
    torch.manual_seed(0)
    tmodel = torch_sit.TriplaneSiT(**torch_kwargs(cfg))
    np.testing.assert_array_equal(tmodel.pos_embed_xy.detach().numpy()[0], sincos_2d(64, 4))
    np.testing.assert_array_equal(torch_sit.sincos_2d(1024, 8).numpy(), sincos_2d(1024, 8))
    model = sit_from_torch_state_dict(tmodel.state_dict(), cfg)
    assert count_sit_params(model) == sum(v.numel() for v in tmodel.state_dict().values())
    assert count_params(model) == sum(p.numel() for p in tmodel.parameters() if p.requires_grad)
    planes, t, y = inputs(cfg)
    with torch.no_grad():
        out = tmodel(tuple(map(torch.from_numpy, planes)), torch.from_numpy(t), torch.from_numpy(y).long())
    assert all(o.shape == p.shape and not o.any() for o, p in zip(out, planes))  # adaLN-Zero: exactly 0


CASES = {
    "tiny": lambda: sit.model_config("tiny"),
    "medium": lambda: medium(),  # xy 8x8, yt/xt 12x8, depth 3, 3 heads, C 4
    "medium_no_sigma": lambda: medium(learn_sigma=False),
    "conditional": lambda: medium(num_classes=3, class_dropout_prob=0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_jax_matches_pytorch(case):
    cfg = CASES[case]()
    tmodel = torch_model(cfg, seed=1)
    model = sit_from_torch_state_dict(tmodel.state_dict(), cfg)
    conditional = cfg.num_classes > 1
    planes, t, y = inputs(cfg, batch=4, labels=[0, 2, 1, 2] if conditional else None)
    drop = np.array([0, 1, 0, 1]) if conditional else None
    tin = (tuple(map(torch.from_numpy, planes)), torch.from_numpy(t), torch.from_numpy(y).long())
    with torch.no_grad():
        want = tmodel(*tin, force_drop_ids=None if drop is None else torch.from_numpy(drop))
    run = nnx.jit(lambda m, p, t, y, d: m(p, t, y, force_drop_ids=d))
    got = run(model, tuple(map(jnp.asarray, planes)), jnp.asarray(t), jnp.asarray(y),
              None if drop is None else jnp.asarray(drop))
    for a, b in zip(got, want):
        assert a.shape == tuple(b.shape) == b.shape
        assert rel(a, b.numpy()) <= 1e-5
    if conditional:  # the forced rows really took the null class
        with torch.no_grad():
            plain = tmodel(*tin)
        assert rel(plain[0][1::2], want[0][1::2].numpy()) > 1e-3
        np.testing.assert_allclose(plain[0][0::2].numpy(), want[0][0::2].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trips_are_bit_exact(scan_layers):
    cfg = medium(scan_layers=scan_layers)
    tree = random_tree(cfg, seed=3)  # JAX side: every value distinct
    sd = sit_to_torch_state_dict(sit_model_from_params(tree, cfg))
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    back = nnx.to_pure_dict(nnx.state(sit_from_torch_state_dict(sd, cfg)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b, strict=True), back, tree)

    tmodel = torch_model(cfg, seed=2)  # torch -> JAX -> torch
    again = sit_to_torch_state_dict(sit_from_torch_state_dict(tmodel.state_dict(), cfg))
    assert list(again) == list(tmodel.state_dict())
    for k, v in tmodel.state_dict().items():
        assert torch.equal(again[k], v), k


def test_official_checkpoint_files(tmp_path):
    cfg = sit.model_config("tiny")
    raw, ema = torch_model(cfg, seed=4).state_dict(), torch_model(cfg, seed=5).state_dict()
    path = tmp_path / "0600000.pt"
    args = argparse.Namespace(model="SiT-L/2", global_batch_size=64, ckpt_every=50_000)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args}, path)
    ckpt = read_sit_checkpoint(path)
    assert ckpt["args"].global_batch_size == 64
    for which, want in (("ema", ema), ("model", raw)):
        sd = sit_to_torch_state_dict(sit_from_torch_state_dict(ckpt, cfg, which=which))
        assert all(torch.equal(sd[k], v) for k, v in want.items())
    tmodel = torch_sit.TriplaneSiT(**torch_kwargs(cfg))
    torch_sit.load_official_checkpoint(tmodel, str(path))  # find_model: the EMA weights
    assert all(torch.equal(tmodel.state_dict()[k], v) for k, v in ema.items())

    with pytest.raises(ConversionError, match="depth 2"):
        sit_from_torch_state_dict(ckpt, medium())
    evil = tmp_path / "evil.pt"
    torch.save({"ema": ema, "fn": print}, evil)
    with pytest.raises(ConversionError, match="evil.pt"):
        read_sit_checkpoint(evil)
