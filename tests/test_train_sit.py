"""SiT training: the loss of a tiny SiT on fixed latents falls well below its start, the EMA
update, and the train_sit trainer end to end on a tiny tokenizer (stats saved and carried in
the checkpoint, resume)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sit

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.train.state import make_optimizer
from coordtok_jax.diffusion.transport import make_transport
from coordtok_jax.generation.train_sit import make_sit_update, sit_state, train_sit


def _one_device_mesh():
    return sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])


def _tiny_sit_config(**overrides):
    config = sit.get_config("tiny")
    with config.unlocked():
        config.mesh.shape = (1, 1)
        for k, v in overrides.items():
            config[k] = v
    return config


def test_tiny_sit_loss_falls_on_fixed_latents_and_ema_updates():
    config = _tiny_sit_config()
    with config.unlocked():
        config.optimizer.learning_rate = 1e-3
        config.ema_decay = 0.9
    mesh = _one_device_mesh()
    tx = make_optimizer(config)
    stats = (np.zeros((3, 8)), np.ones((3, 8)))
    plan = sit_state(config, mesh, tx, stats)
    graphdef, buffers, state = plan.graphdef, plan.buffers, plan.create()
    update = jax.jit(make_sit_update(graphdef, buffers, make_transport(config), tx, config.ema_decay))
    rng = np.random.default_rng(0)
    # two fixed latents (each repeated 4 times): the exact velocity field is learnable
    x1 = tuple(jnp.asarray(np.repeat(rng.standard_normal((2,) + s), 4, axis=0).astype(np.float32))
               for s in ((8, 8, 8), (8, 8, 8), (8, 8, 8)))
    y = jnp.zeros((8,), jnp.int32)

    params0 = state.params
    state1, m = update(state, x1, y)
    # EMA: decay * previous EMA (= the initial parameters) + (1 - decay) * the new parameters
    jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, 0.9 * p0 + 0.1 * p1, rtol=1e-6, atol=1e-7),
                 state1.ema, params0, state1.params)
    first = float(m["loss"])
    assert first == pytest.approx(2.0, rel=0.15)  # zero-initialised output: E|x1 - x0|^2 = 2
    losses = []
    state = state1
    for _ in range(200):
        state, m = update(state, x1, y)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-20:]) < 0.5 * first, (first, losses[-20:])
    assert int(state.step) == 201 and int(state.first_nonfinite) == -1


@pytest.fixture(scope="module")
def sit_run(tokenizer_dir, tmp_path_factory):
    """train_sit for 4 steps, then resumed to 6: (workdir, config, first summary, resumed summary)."""
    tmp_path = tmp_path_factory.mktemp("sit_run")
    config = _tiny_sit_config(tokenizer=str(tokenizer_dir), total_steps=4, log_every=2, save_every=2)
    with config.unlocked():
        config.mesh.shape = (-1, 1)  # data parallel over the 8 simulated devices
        config.batch_size = 8
        config.stats_num_clips = 12  # -> 2 whole batches of 8
    out = train_sit(config, str(tmp_path))
    with config.unlocked():
        config.total_steps = 6
    resumed = train_sit(config, str(tmp_path))
    return tmp_path, config, out, resumed


def test_class_conditional_training_drops_labels_to_the_null_class():
    """class_dropout_prob > 0: the step trains the null-class row (for classifier-free guidance);
    the labels' own rows move too, unused rows do not."""
    config = _tiny_sit_config()
    with config.unlocked():
        config.model.num_classes, config.model.class_dropout_prob = 4, 0.5
    tx = make_optimizer(config)
    plan = sit_state(config, _one_device_mesh(), tx, (np.zeros((3, 8)), np.ones((3, 8))))
    graphdef, buffers, state = plan.graphdef, plan.buffers, plan.create()
    update = jax.jit(make_sit_update(graphdef, buffers, make_transport(config), tx, config.ema_decay))
    x1 = tuple(jnp.asarray(np.random.default_rng(0).standard_normal((8, 8, 8, 8)).astype(np.float32))
               for _ in range(3))
    table0 = np.asarray(state.params["y_embedder"]["embedding_table"])
    y = jnp.asarray([0, 1] * 4, jnp.int32)
    new = state
    for _ in range(3):  # adaLN-Zero (zero final linear and modulations): labels get gradients from step 3 on
        new, m = update(new, x1, y)
    moved = np.abs(np.asarray(new.params["y_embedder"]["embedding_table"]) - table0).max(axis=1)
    assert table0.shape[0] == 5 and np.isfinite(float(m["loss"]))
    assert moved[0] > 0 and moved[1] > 0 and moved[4] > 0  # labels 0, 1 and the null class 4
    assert moved[2] == 0 and moved[3] == 0

    from coordtok_jax.generation.sample import make_generator

    unconditional = _tiny_sit_config()
    with unconditional.unlocked():
        unconditional.sampler.cfg_scale = 4.0
    with pytest.raises(ValueError, match="cfg_scale=4.0 needs a class-conditional SiT"):
        make_generator(unconditional, graphdef, buffers, None, None, 2)


def test_train_sit_end_to_end_with_stats_resume_and_sampling(sit_run):
    tmp_path, config, out, resumed = sit_run
    assert out["last_step"] == 4 and np.isfinite(out["loss"])
    saved = json.loads((tmp_path / "latent_stats.json").read_text())
    np.testing.assert_allclose(np.asarray(out["state"].latent_mean), saved["mean"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["state"].latent_std), saved["std"], rtol=1e-6)
    assert saved["count"][0] == 16 * 8 * 8  # 16 clips x the 8x8 xy plane
    assert np.all(np.asarray(saved["std"]) > 0)

    assert resumed["first_step"] == 4 and resumed["last_step"] == 6
    np.testing.assert_array_equal(np.asarray(resumed["state"].latent_mean), np.asarray(out["state"].latent_mean))

    # sample CLI (function) on this run: EMA weights + stored stats -> decoded videos
    import av
    from PIL import Image

    from coordtok_jax.generation.sample import sample

    s = sample(str(tmp_path), str(tmp_path / "samples"), num_videos=3, batch=2, steps=3, progress=False)
    assert s["step"] == 6 and s["videos"] == 3 and s["shape"] == [16, 32, 32, 3] and len(s["outputs"]) == 3
    with av.open(s["outputs"][2]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 16 and frames[0].shape == (32, 32, 3)
    grid = Image.open(tmp_path / "samples" / "grid.gif")
    assert grid.n_frames == 16 and grid.size == (64, 64)  # 3 videos in a 2x2 grid
    with pytest.raises(ValueError, match="--i3d"):
        sample(str(tmp_path), str(tmp_path / "x"), fvd=True)

    bad = _tiny_sit_config(tokenizer=None)
    with pytest.raises(Exception, match="config.tokenizer"):
        train_sit(bad, str(tmp_path / "x"))


@pytest.mark.torch
def test_sit_export_import_round_trip_samples_identically(sit_run, tmp_path):
    pytest.importorskip("torch")
    import torch

    from coordtok_jax.convert.commands import sit_export, sit_import
    from coordtok_jax.generation.sample import sample

    workdir, config, _, _ = sit_run
    s = sit_export(str(workdir), str(tmp_path / "sit.pth"))
    ckpt = torch.load(tmp_path / "sit.pth", map_location="cpu", weights_only=True)
    assert s["step"] == 6 and set(ckpt) == {"model", "ema", "args"}
    assert list(ckpt["ema"])[:3] == ["pos_embed_xy", "pos_embed_t", "type_embed"]
    assert not torch.equal(ckpt["ema"]["blocks.0.attn.qkv.weight"], ckpt["model"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="--latent_stats"):
        sit_import(str(tmp_path / "sit.pth"), config, str(tmp_path / "imported"), None)
    exported = json.loads((tmp_path / "sit.pth.latent_stats.json").read_text())  # written beside the .pth
    assert s["latent_stats"] == str(tmp_path / "sit.pth.latent_stats.json")
    saved = json.loads((workdir / "latent_stats.json").read_text())
    for k in ("mean", "std"):
        assert np.allclose(exported[k], saved[k], rtol=1e-6), k
    sit_import(str(tmp_path / "sit.pth"), config, str(tmp_path / "imported"), s["latent_stats"])
    a = sample(str(workdir), str(tmp_path / "a"), num_videos=2, batch=2, steps=2, progress=False)
    b = sample(str(tmp_path / "imported"), str(tmp_path / "b"), num_videos=2, batch=2, steps=2, progress=False)
    assert (tmp_path / "a" / "sample_0001.mp4").read_bytes() == (tmp_path / "b" / "sample_0001.mp4").read_bytes()
    assert a["videos"] == b["videos"] == 2


def test_commands_on_the_wrong_kind_of_run_name_it_and_the_right_command(sit_run, tmp_path):
    from coordtok_jax.convert.commands import sit_export, torch_export
    from coordtok_jax.generation.sample import sample

    workdir, config, _, _ = sit_run
    with pytest.raises(ValueError, match=r"holds a SiT run \(coordtok_jax.train_sit\), not a CoordTok tokenizer run.*"
                                         r"torch-export cannot read it \(sample / convert sit-export read it"):
        torch_export(str(workdir), str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match=r"holds a CoordTok tokenizer run .*sample cannot read it"):
        sample(str(config.tokenizer), str(tmp_path / "s"), num_videos=1, batch=1, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"holds a CoordTok tokenizer run .*sit-export cannot read it"):
        sit_export(str(config.tokenizer), str(tmp_path / "y.pth"))


def test_class_conditional_sit_refuses_unlabelled_clips(tmp_path):
    """num_classes > 1 on unlabelled synthetic clips is refused before anything is loaded or
    written (the labels would all be -1); labelled clips pass; an out-of-range label is named."""
    from coordtok_jax.generation.train_sit import check_labels
    from coordtok_jax.models import ConfigError

    config = _tiny_sit_config(tokenizer=str(tmp_path / "no_tokenizer"))
    with config.unlocked():
        config.model.num_classes, config.model.class_dropout_prob = 3, 0.1
        config.mesh.shape, config.batch_size = (-1, 1), 8  # the 8 simulated devices
    with pytest.raises(ConfigError, match=r"num_classes=3 needs every clip's label in \[0, 3\), but config\.data "
                                          r"\(source 'synthetic'\) gave label -1: set config\.data\.synthetic_labels"):
        train_sit(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    with config.unlocked():
        config.data.synthetic_labels = True
    check_labels(config, np.array([0, 2, 1]))
    with config.unlocked():
        config.model.num_classes = 2
    with pytest.raises(ConfigError, match=r"num_classes=2 needs .* gave label 2$"):
        check_labels(config, np.array([0, 2]))
    with config.unlocked():
        config.model.num_classes = 1  # the official unconditional model ignores labels
    check_labels(config, np.array([-1, 5]))
    with config.unlocked():  # a latent cache encoded without labels: the fix is to encode it again
        config.model.num_classes, config.latents, config.data.synthetic_labels = 3, "/caches/unlabelled", False
    with pytest.raises(ConfigError, match=r"the latent cache /caches/unlabelled gave label -1: encode it again"):
        check_labels(config, np.array([-1]))
