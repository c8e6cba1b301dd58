"""Configs: every variant builds; validate() names the field for geometry that cannot work."""

import os
import subprocess
import sys

import coordtok
import pytest

from coordtok_jax.models import ConfigError, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arg", ["L", "B", "S", "tiny", "cpu"])
def test_every_variant_validates(arg):
    config = coordtok.get_config(arg)
    geometry = coordtok.validate(config)
    assert geometry.video_shape == tuple(config.model.video_shape)
    assert config.mesh.axes == ("data", "fsdp")


def test_released_geometry():
    g = validate(coordtok.get_config("L").model)
    assert g.num_latent_tokens == 1280
    assert g.enc_grid == (16, 8, 8) and g.num_memory_tokens == 1024
    assert g.num_query_tokens == (4, 4, 4)
    assert g.dec_grid == (128, 16, 16) and g.patch_values == 192


def test_paper_small_and_base_sizes():
    """Table 5: S 512 wide / 8 heads / 8-8-8 layers, B 768 / 12 / 8-12-12 (and their parameter counts)."""
    from flax import nnx

    from coordtok_jax.models import CoordTok, count_params

    for size, (width, heads, layers), params in (("S", (512, 8, (8, 8, 8)), 107_748_032),
                                                 ("B", (768, 12, (8, 12, 12)), 290_664_128)):
        m = coordtok.get_config(size).model
        assert (m.enc_embed_dim, m.enc_num_heads) == (m.dec_embed_dim, m.dec_num_heads) == (width, heads)
        assert (m.enc_patch_num_layers, m.enc_num_layers, m.dec_num_layers) == layers
        assert count_params(nnx.eval_shape(lambda: CoordTok(m, rngs=nnx.Rngs(0)))) == params


def test_the_cpu_sit_matches_the_cpu_tokenizer():
    """configs/sit.py:cpu reads the planes of configs/coordtok.py:cpu and trains on the same data."""
    import sit

    tok, gen = coordtok.get_config("cpu"), sit.get_config("cpu")
    g = validate(tok.model)
    assert (gen.model.latent_resolution_xy, gen.model.latent_resolution_t, gen.model.in_channels) == \
        (g.latent_xy, g.latent_t, tok.model.latent_n_features)
    assert {k: gen.data[k] for k in ("synthetic_texture", "synthetic_motion")} == \
        {k: tok.data[k] for k in ("synthetic_texture", "synthetic_motion")}


def test_unknown_size():
    with pytest.raises(ValueError, match=r"config argument 'XL': unknown size 'XL'; choose one of \['L', 'B', 'S'"):
        coordtok.get_config("XL")


def test_runlocal_keeps_the_model_and_swaps_the_schedule():
    """SIZE,runlocal = SIZE's model with the CPU-scale schedule of tiny; stage and runlocal combine."""
    import sit

    full, local, tiny = coordtok.get_config("S,stage=2"), coordtok.get_config("S,stage=2,runlocal"), \
        coordtok.get_config("tiny,stage=2")
    assert local.model.to_dict() == full.model.to_dict() and local.stage == full.stage == 2
    for field in ("batch_size", "total_steps", "num_points", "eval_every", "keep_every"):
        assert local[field] == tiny[field] != full[field], field
    assert tuple(local.mesh.shape) == (-1, 1) and tuple(full.mesh.shape) == (1, -1)
    sit_local, sit_full = sit.get_config("L/2,runlocal"), sit.get_config("L/2")
    assert sit_local.model.to_dict() == sit_full.model.to_dict()
    assert (sit_local.batch_size, sit_local.total_steps) == (8, 100) != (sit_full.batch_size, sit_full.total_steps)


@pytest.mark.parametrize("arg, message", [
    ("L,stage=3", r"config argument 'L,stage=3': stage must be one of \['1', '2'\], got '3'"),
    ("L,steps=3", r"config argument 'L,steps=3': unknown option 'steps' \(known: \['data', 'stage', 'tokens'\], runlocal\)"),
    ("L,fast", r"config argument 'L,fast': expected SIZE\[,key=value...\]\[,runlocal\], got 'fast'"),
])
def test_config_argument_errors_name_the_argument(arg, message):
    with pytest.raises(ValueError, match=message):
        coordtok.get_config(arg)


def test_overrides_refuse_a_field_that_does_not_exist():
    from coordtok_jax import config_lib

    config = coordtok.get_config("tiny")
    config_lib.override(config, {"optimizer.learning_rate": 0.5})
    assert config.optimizer.learning_rate == 0.5
    with pytest.raises(KeyError, match="override 'optimizer.learnig_rate'"):
        config_lib.override(config, {"optimizer.learnig_rate": 0.5})


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("latent_resolution_t", 8, r"latent_resolution_t=8 is smaller than config.model.latent_patch_size_t=16"),
        ("latent_resolution_t", 40, r"latent_patch_size_t=16 must divide config.model.latent_resolution_t=40"),
        ("enc_patch_size_t", 12, r"enc_patch_size_t=12 must divide config.model.video_shape\[0\]=128"),
        ("enc_num_heads", 12, r"enc_num_heads=12 must divide config.model.enc_embed_dim=1024"),
        ("dec_num_heads", 24, r"dec_num_heads=24 must divide config.model.dec_embed_dim=1024"),
        ("dec_patch_size_xy", 6, r"dec_patch_size_xy=6 must divide config.model.video_shape\[1\]=128"),
        ("latent_patch_size_xy", 5, r"latent_patch_size_xy=5 must divide config.model.latent_resolution_xy=16"),
        ("video_shape", (128, 128), r"video_shape must be three positive ints"),
        ("enc_num_layers", 0, r"enc_num_layers must be a positive integer"),
        ("padding_mask", "ignore", r"padding_mask must be one of"),
        ("dtype", "float8", r"dtype must be one of"),
        ("attention_impl", "flash", r"attention_impl must be one of"),
        ("remat_policy", "save_all", r"remat_policy must be one of"),
        ("remat_policy", "save_only_these_names", r"remat_policy must be one of"),
    ],
)
def test_validation_names_the_field(field, value, message):
    config = coordtok.get_config("L")
    with config.unlocked():
        config.model[field] = value
    with pytest.raises(ConfigError, match=message):
        coordtok.validate(config)


def test_missing_field():
    model = dict(coordtok.get_config("tiny").model)
    del model["dec_num_layers"]
    with pytest.raises(ConfigError, match="config.model.dec_num_layers is missing"):
        validate(model)


def _demo(*args):
    return subprocess.run(
        [sys.executable, "-m", "coordtok_jax.demo", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""},
    )


def test_command_line_override_is_validated_before_compiling():
    """The README's typo geometry fails at once with the field named (no traceback)."""
    proc = _demo("--config=configs/coordtok.py:L", "--config.model.latent_resolution_t=8", "--output=/dev/null/x")
    assert proc.returncode != 0
    assert "latent_resolution_t=8" in proc.stderr
    assert "init (jit)" not in proc.stdout and "Traceback" not in proc.stderr


@pytest.mark.parametrize("tool,args,message", [
    ("coordtok_jax.train", ["--config=configs/coordtok.py:tiny", "--config.stage=3", "--workdir={tmp}/w"],
     "config.stage must be 1 or 2, got 3"),
    ("coordtok_jax.train_sit", ["--config=configs/sit.py:tiny", "--config.tokenizer={tmp}/none", "--workdir={tmp}/w"],
     "no checkpoint in {tmp}/none"),
    ("coordtok_jax.sample", ["--workdir={tmp}/none", "--output={tmp}/out"], "no checkpoint in {tmp}/none"),
])
def test_cli_user_errors_exit_2_with_the_message(tool, args, message, tmp_path):
    """entry.run: a UserError (or missing file) is one line on stderr and exit status 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", tool, *(a.format(tmp=tmp_path) for a in args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {message.format(tmp=tmp_path)}" in proc.stderr and "Traceback" not in proc.stderr


def test_command_line_override_reaches_the_model(tmp_path):
    import json

    from flax import nnx

    from coordtok_jax.models import CoordTok, count_params

    proc = _demo("--config=configs/coordtok.py:tiny", "--config.model.dec_num_layers=1",
                 "--config.model.padding_mask=exclude", "--num_videos=1", f"--output={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.model.dec_num_layers = 1
    want = count_params(nnx.eval_shape(lambda: CoordTok(config.model, rngs=nnx.Rngs(0))))
    assert summary["parameters"] == want < 511_408
