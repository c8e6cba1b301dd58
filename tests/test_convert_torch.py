"""PyTorch interop (needs torch): the self-contained PyTorch model's official state_dict, bit-exact
round trips, JAX vs the PyTorch model (tiny and a non-square medium config, padded clips),
official file wrappers, strict errors, and the torch-export / torch-import CLI feeding the trainer."""

import os
import subprocess
import sys

import coordtok
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from test_convert import ROOT, _reference, medium_config  # noqa: E402

from coordtok_jax.convert.torch import coordtok as torch_model  # noqa: E402
from coordtok_jax.convert import commands  # noqa: E402
from coordtok_jax.io.runs import abstract_params  # noqa: E402
from coordtok_jax.convert.coordtok import ConversionError, from_official  # noqa: E402
from coordtok_jax.models.coordtok import CoordTok, count_params  # noqa: E402
from coordtok_jax.models.decode_video import decode_video  # noqa: E402
from coordtok_jax.convert.torch_io import (  # noqa: E402
    from_torch_state_dict,
    model_from_params,
    model_params,
    read_checkpoint,
    save_checkpoint,
    to_torch_state_dict,
)
from coordtok_jax.io.checkpoint import is_params_only, restore_params, save_params  # noqa: E402


def torch_kwargs(cfg):
    names = list(torch_model.RELEASED) + ["mlp_ratio", "padding_mask"]
    return {k: cfg[k] for k in names}


def jax_model(cfg, seed):
    """A JAX CoordTok with the official (PyTorch) initialisation, via the converter: fast, and
    free of the per-op compilations an eager Flax initialisation costs."""
    torch.manual_seed(seed)
    return from_torch_state_dict(torch_model.CoordTok(**torch_kwargs(cfg)).state_dict(), cfg)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("size", ["tiny", "L"])
def test_torch_model_state_dict_is_the_official_one(reference_dir, size):
    ref = _reference(reference_dir, size)
    with torch.device("meta"):  # L without allocating 3.4 GB
        model = torch_model.CoordTok(**torch_kwargs(coordtok.model_config(size)))
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == [(k, tuple(s)) for k, s, _ in ref["state_dict"]]
    assert sum(p.numel() for p in model.parameters()) == ref["total_numel"]
    if size == "L":
        assert sd.keys() == {k: 0 for k, *_ in ref["state_dict"]}.keys()
        assert ref["total_numel"] == 853_410_496


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trips_are_bit_exact(scan_layers):
    cfg = medium_config()
    cfg.scan_layers = scan_layers  # stacked layers or one tree per layer
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: CoordTok(cfg, rngs=nnx.Rngs(0))), nnx.Param))
    rng = np.random.default_rng(3)  # JAX-side parameters: every value distinct
    model = model_from_params(jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract), cfg)
    sd = to_torch_state_dict(model)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    back = model_params(from_torch_state_dict(sd, cfg))
    want = model_params(model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), back, want)
    assert count_params(from_torch_state_dict(sd, cfg)) == count_params(model)

    # torch -> JAX -> torch, starting from a PyTorch-initialised model
    tmodel = torch_model.CoordTok(**torch_kwargs(cfg))
    again = to_torch_state_dict(from_torch_state_dict(tmodel.state_dict(), cfg))
    assert list(again) == list(tmodel.state_dict())
    for k, v in tmodel.state_dict().items():
        assert torch.equal(again[k], v), k


def _clips(cfg, batch, n_frames, seed):
    T, H, W = cfg.video_shape
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1, 1, (batch, T, H, W, 3)).astype(np.float32)
    for b, n in enumerate(n_frames):
        video[b, n:] = -3.0  # the official padding value
    return video, np.asarray(n_frames, np.int64)


@pytest.mark.parametrize("which,mode", [("tiny", "official"), ("tiny_per_layer", "official"), ("medium", "official"),
                                        ("medium", "exclude")])
def test_jax_matches_pytorch_model(which, mode):
    if which.startswith("tiny"):
        cfg = coordtok.model_config("tiny")
        cfg.padding_mask = mode
        cfg.scan_layers = which == "tiny"  # tiny_per_layer: one parameter tree per layer
        n_frames = [16, 7, 3]
    else:
        cfg = medium_config(mode)
        n_frames = [24, 10, 5]
    torch.manual_seed(0)  # the official initialisation (PyTorch defaults, N(0, 1) tables)
    tmodel = torch_model.CoordTok(**torch_kwargs(cfg)).eval()
    model = from_torch_state_dict(tmodel.state_dict(), cfg)
    video, n = _clips(cfg, len(n_frames), n_frames, seed=1)

    encode = nnx.jit(lambda m, v, k: m.encode(v, k))
    planes = encode(model, jnp.asarray(video), jnp.asarray(n))
    with torch.no_grad():
        tplanes = tmodel.encode(torch.from_numpy(video), torch.from_numpy(n))
    for a, b in zip(planes, tplanes):
        assert a.shape == tuple(b.shape)
        assert rel(a, b.numpy()) <= 1e-5
    # padding matters (else the n_frames checks above would be vacuous)
    full = encode(model, jnp.asarray(video), jnp.asarray(np.full_like(n, cfg.video_shape[0])))
    assert rel(full[0][1], planes[0][1]) > 1e-3

    # decode the same planes in both (random coordinates, then whole videos in both modes)
    tin = tuple(torch.from_numpy(np.array(p)) for p in planes)
    coords = np.random.default_rng(2).uniform(0, 1, (len(n_frames), 37, 3)).astype(np.float32)
    out = nnx.jit(lambda m, p, c: m.decode(p, c))(model, planes, jnp.asarray(coords))
    with torch.no_grad():
        tout = tmodel.decode(tin, torch.from_numpy(coords))
    assert rel(out, tout.numpy()) <= 1e-5
    num_frames = cfg.video_shape[0] - 3  # not a multiple of the temporal patch for medium
    for per_call in (None, 100):  # 100 leaves a remainder chunk
        frames = nnx.jit(decode_video, static_argnums=(2, 3))(model, planes, num_frames, per_call)
        with torch.no_grad():
            tframes = tmodel.decode_video(tin, num_frames, per_call)
        assert frames.shape == tuple(tframes.shape) == (len(n_frames), num_frames) + tuple(cfg.video_shape[1:]) + (3,)
        assert rel(frames, tframes.numpy()) <= 1e-5
    for per_call in (100, 300):  # the official slicing: equal chunks, remainder and partial patch left 0
        frames = nnx.jit(lambda m, p: decode_video(m, p, num_frames, per_call, mode="official"))(model, planes)
        with torch.no_grad():
            want = official_decode_video(tmodel, tin, num_frames, per_call)
        assert frames.shape == want.shape
        assert rel(frames, want.numpy()) <= 1e-5


def official_decode_video(tmodel, planes, num_frames, point_per_vid):
    """The official tools/utils_coordtok.decode_video written out on the PyTorch model: patch starts
    over whole temporal patches, Nslice = n // point_per_vid contiguous chunks of int(n / Nslice)
    patches, each one decoder call; patches past Nslice * split and a partial temporal patch stay 0."""
    batch = planes[0].shape[0]
    pt, px, py = tmodel.dec_patch
    _, gx, gy = tmodel.dec_grid
    num_t = num_frames // pt
    coords = tmodel.patch_coords(num_t * pt, planes[0].device)
    n = coords.shape[0]
    nslice = n // point_per_vid
    split = int(n / nslice)
    values = torch.zeros(batch, n, pt * px * py * 3)
    for i in range(nslice):
        chunk = coords[i * split:(i + 1) * split].expand(batch, -1, -1)
        values[:, i * split:(i + 1) * split] = tmodel.decode(planes, chunk)
    v = values.reshape(batch, num_t, gx, gy, pt, px, py, 3).permute(0, 1, 4, 2, 5, 3, 6, 7)
    video = torch.zeros((batch, num_frames, gx * px, gy * py, 3))
    video[:, :num_t * pt] = v.reshape(batch, num_t * pt, gx * px, gy * py, 3)
    return video


def test_torch_attention_equals_nn_multihead_attention_with_the_official_float_mask():
    """The official cross-attention passes a float 0/1 key_padding_mask to nn.MultiheadAttention,
    which adds it to the logits: our module's +1 bias must be the same on this torch version."""
    torch.manual_seed(0)
    d, heads = 32, 4
    ours = torch_model.MultiheadAttention(d, heads)
    official = torch.nn.MultiheadAttention(d, heads, bias=False, batch_first=True)
    official.load_state_dict(ours.state_dict(), strict=True)
    q, mem = torch.randn(2, 5, d), torch.randn(2, 12, d)
    padded = torch.zeros(2, 12)
    padded[1, 6:] = 1.0
    with torch.no_grad():
        want, _ = official(q, mem, mem, key_padding_mask=padded, need_weights=False)
        got = ours(q, mem, mem, bias=padded[:, None, None, :])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        want, _ = official(q, mem, mem, key_padding_mask=padded.bool(), need_weights=False)
        got = ours(q, mem, mem, mask=~padded.bool()[:, None, None, :])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _lpips_extra(reference_dir):
    ref = _reference(reference_dir, "tiny")
    return {k: torch.zeros(s) for k, s, _ in ref["stage2_checkpoint_extra_keys_lpips"]}


def test_import_accepts_official_wrappers_and_skips_lpips(reference_dir, tmp_path):
    cfg = coordtok.model_config("tiny")
    model = jax_model(cfg, 1)
    sd = to_torch_state_dict(model)
    want = model_params(model)
    lpips = _lpips_extra(reference_dir)
    assert all(k.startswith("module.decoder.lpips_loss.") for k in lpips)
    wrapped = {"epoch": 3, "best_psnr": 30.1, "model": {**{f"module.{k}": v for k, v in sd.items()}, **lpips}}
    path = tmp_path / "stage2.pth"
    torch.save(wrapped, path)
    for variant in (sd, {"model": sd}, wrapped, read_checkpoint(path)):
        got = model_params(from_torch_state_dict(variant, cfg))
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_import_errors_list_every_problem(tmp_path):
    cfg = coordtok.model_config("tiny")
    sd = to_torch_state_dict(jax_model(cfg, 0))
    bad = dict(sd)
    del bad["decoder.projector.bias"], bad["encoder.encoder.norm.weight"]
    bad["encoder.extra.weight"] = torch.zeros(3)
    bad["encoder.cross_pos_emb"] = torch.zeros(1, 63, 64)
    bad["decoder.transformer.pos_embed"] = torch.zeros(1, 16, 8, 8, 64, dtype=torch.int64)
    with pytest.raises(ConversionError) as e:
        from_torch_state_dict(bad, cfg)
    msg = str(e.value)
    for text in ("2 missing keys", "decoder.projector.bias", "encoder.encoder.norm.weight", "1 unexpected keys",
                 "encoder.extra.weight", "encoder.cross_pos_emb: (1, 63, 64), expected (1, 64, 64)",
                 "not floating point", "decoder.transformer.pos_embed: int64"):
        assert text in msg, (text, msg)
    with pytest.raises(ConversionError, match="twice"):
        from_torch_state_dict({**sd, "module.weight_tokens_xy": sd["weight_tokens_xy"]}, cfg)
    with pytest.raises(ConversionError, match="looks like 105 tensors"):
        from_torch_state_dict(sd, medium_config())

    path = tmp_path / "model.pth"
    torch.save({"model": sd}, path)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(ConversionError, match="truncated.pth"):
        read_checkpoint(truncated)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")
    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "fn": os.system}, evil)
    with pytest.raises(ConversionError, match="evil.pth"):
        read_checkpoint(evil)  # weights_only refuses pickled callables


def test_export_import_cli_functions_and_torch_free_reader(tmp_path):
    from coordtok_jax.io.pth import load_pth
    from coordtok_jax.convert.torch_io import official_numpy

    config = coordtok.get_config("tiny")
    model = jax_model(config.model, 5)
    want = model_params(model)
    save_params(str(tmp_path / "run"), want, config, step=7)
    assert is_params_only(str(tmp_path / "run"))

    out = tmp_path / "export.pth"
    s = commands.torch_export(str(tmp_path / "run"), str(out))
    assert s["step"] == 7 and s["tensors"] == 105 and s["parameters"] == 511_408
    with pytest.raises(FileExistsError, match="--overwrite"):
        commands.torch_export(str(tmp_path / "run"), str(out))
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["step"] == 7 and ckpt["config"]["enc_embed_dim"] == 64
    assert all(k.startswith("module.") for k in ckpt["model"])
    ref = to_torch_state_dict(model)
    assert [k[len("module."):] for k in ckpt["model"]] == list(ref)
    assert all(torch.equal(ckpt["model"]["module." + k], v) for k, v in ref.items())
    # the self-contained PyTorch model loads the exported file as the official loaders do
    tmodel = torch_model.CoordTok(**torch_kwargs(config.model))
    torch_model.load_official_checkpoint(tmodel, str(out))
    assert all(torch.equal(tmodel.state_dict()[k], v) for k, v in ref.items())
    # torch-free reader: same tensors
    arrays, _ = official_numpy(load_pth(out))
    jax.tree.map(np.testing.assert_array_equal, from_official(arrays, config.model), want)

    s = commands.torch_import(str(out), config, str(tmp_path / "imported"))
    assert s["tensors"] == 105 and s["parameters"] == 511_408
    params, step = restore_params(str(tmp_path / "imported"), abstract_params(config.model))
    assert step == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, want)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        commands.torch_import(str(out), config, str(tmp_path / "imported"))


def test_trainer_starts_from_a_torch_import_and_refuses_to_resume_it(tmp_path):
    from coordtok_jax.models import ConfigError
    from coordtok_jax.train import trainer

    config = coordtok.get_config("tiny")
    model = jax_model(config.model, 9)
    pth = tmp_path / "official.pth"
    save_checkpoint(to_torch_state_dict(model), pth)
    commands.torch_import(str(pth), config, str(tmp_path / "imported"))

    with config.unlocked():
        config.total_steps, config.eval_videos, config.log_every, config.save_every = 2, 0, 1, 2
    with pytest.raises(ConfigError, match="init_from"):
        trainer.train(config, str(tmp_path / "imported"))  # a params-only checkpoint is not a run
    with config.unlocked():
        config.init_from = str(tmp_path / "imported")
    out = trainer.train(config, str(tmp_path / "run"))
    assert out["first_step"] == 0 and out["last_step"] == 2
    start = jax.tree.leaves(model_params(model))
    trained = jax.tree.leaves(jax.tree.map(np.asarray, out["params"]))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(start, trained))
    assert 0 < moved < 1e-3  # two AdamW steps from the imported weights, not from a fresh init


def test_cli_bad_config_exit_code(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    sd = to_torch_state_dict(jax_model(coordtok.model_config("tiny"), 0))
    save_checkpoint(sd, tmp_path / "tiny.pth")
    r = subprocess.run([sys.executable, "-m", "coordtok_jax.convert", "torch-import",
                        f"--checkpoint={tmp_path / 'tiny.pth'}", "--config=configs/coordtok.py:S",
                        f"--workdir={tmp_path / 'w'}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "missing keys" in r.stderr and "hint:" in r.stderr
    assert not (tmp_path / "w").exists()  # nothing written on failure


def test_nested_token_runs_export_only_when_told_and_import_with_zero_fills(tmp_path):
    config = coordtok.get_config("tiny,tokens=nested")
    params = dict(model_params(jax_model(coordtok.get_config("tiny").model, 6)),
                  nested_fill_yt=np.linspace(-1, 1, 8).astype(np.float32), nested_fill_xt=np.ones(8, np.float32))
    assert set(abstract_params(config.model)) == set(params)
    save_params(str(tmp_path / "run"), params, config, step=4)
    out = tmp_path / "nested.pth"
    with pytest.raises(ValueError, match="nested triplane tokens .* pass --drop_nested"):
        commands.torch_export(str(tmp_path / "run"), str(out))
    assert not out.exists()
    s = commands.torch_export(str(tmp_path / "run"), str(out), drop_nested=True)
    assert s["dropped"] == list(commands.NESTED_PARAMS) and s["tensors"] == 105  # the official keys, nothing else
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    plain = {k: v for k, v in params.items() if k not in commands.NESTED_PARAMS}
    ref = to_torch_state_dict(plain)
    assert all(torch.equal(ckpt["model"]["module." + k], v) for k, v in ref.items())
    # the released weights can start a nested-token run: the fills start at zero
    s = commands.torch_import(str(out), config, str(tmp_path / "imported"))
    assert s["started"] == list(commands.NESTED_PARAMS)
    got, _ = restore_params(str(tmp_path / "imported"), abstract_params(config.model))
    np.testing.assert_array_equal(np.asarray(got["nested_fill_yt"]), np.zeros(8, np.float32))
    np.testing.assert_array_equal(np.asarray(got["encoder"]["cross_pos_emb"]), plain["encoder"]["cross_pos_emb"])
