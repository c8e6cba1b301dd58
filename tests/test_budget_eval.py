"""Token budgets end to end on a tiny nested-token run: the scorer tool, evaluate --token_budget
(allocations within the budget, PSNR equal to an independent recomputation at the chosen levels),
per-block PSNR against scikit-image, and the errors of a fixed-token checkpoint."""

import json

import coordtok
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage.metrics import peak_signal_noise_ratio

from coordtok_jax.data.pipeline import make_sampled_dataset
from coordtok_jax.data.video import to_model_input
from coordtok_jax.evaluate import budgets
from coordtok_jax.evaluate.run import evaluate
from coordtok_jax.evaluate.token_scorer import train_scorer
from coordtok_jax.io.runs import load_tokenizer
from coordtok_jax.models.decode_video import decode_video
from coordtok_jax.models.nested import block_of_frames


@pytest.fixture(scope="module")
def nested_run(tmp_path_factory):
    """A tiny nested-token checkpoint with random parameters, fills included (the trainer's nested
    step is tested in test_nested_tokens.py), and its scorer."""
    from conftest import save_random_tokenizer

    workdir = tmp_path_factory.mktemp("nested_run")
    save_random_tokenizer(workdir, coordtok.get_config("tiny,tokens=nested,data=mixed"), step=3)
    train_scorer(str(workdir), num_clips=8, eval_clips=4, steps=30, batch=4, progress=False)
    return workdir


def test_block_psnr_matches_scikit_image():
    config = coordtok.get_config("tiny,tokens=nested")
    from coordtok_jax.models.nested import nested_tokens
    from coordtok_jax.models import validate

    nt = nested_tokens(config.model, validate(config.model))
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 1, (2, 16, 8, 8, 3))
    pred = np.clip(target + rng.normal(0, 0.05, target.shape), 0, 1)
    n_frames = np.array([16, 6])
    got, valid = budgets.block_psnr(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                    jnp.asarray(n_frames), nt)
    blocks = block_of_frames(16, nt)
    for b in range(2):
        for k in range(nt.blocks):
            frames = [t for t in range(n_frames[b]) if blocks[t] == k]
            assert bool(valid[b, k]) == bool(frames)
            if frames:
                want = np.mean([peak_signal_noise_ratio(target[b, t], pred[b, t], data_range=1.0) for t in frames])
                assert float(got[b, k]) == pytest.approx(want, abs=1e-3)
    np.testing.assert_array_equal(budgets.valid_blocks(n_frames, 16, nt), np.asarray(valid))


def test_scorer_tool_and_budget_evaluation(nested_run, tmp_path, monkeypatch):
    saved = json.loads((nested_run / "scorer" / "scorer.json").read_text())
    assert saved["levels"] == [4, 8, 12, 16] and saved["held_out"]["blocks"] > 0
    assert saved["train"]["rmse_db"] >= 0 and len(saved["measured_mean_psnr_by_level"]) == 4
    assert 25 <= saved["best_step"] <= 30 and saved["val_rmse_db"] >= 0  # early stopping on held-back clips
    # a refit reuses the measurements (same checkpoint, levels, clips, seed): nothing is decoded again
    from coordtok_jax.evaluate import token_scorer

    monkeypatch.setattr(token_scorer, "measure_clips", lambda *a, **k: pytest.fail("measured again"))
    again = train_scorer(str(nested_run), num_clips=8, eval_clips=4, steps=30, batch=4, progress=False)
    assert again["held_out"] == saved["held_out"]

    model, config, _ = load_tokenizer(str(nested_run))
    nt = model.nested
    # uniform: half of every block's cells (no decoding needed to check that)
    np.testing.assert_array_equal(budgets.allocate(np.zeros((8, nt.blocks, 4)), np.ones((8, nt.blocks), bool), nt,
                                                   0.5, "uniform"), 1)
    for method in ("ilp",):  # greedy vs ilp: test_token_budget.py
        r = evaluate(str(nested_run), num_videos=8, batch=8, token_budget=0.5, allocation=method,
                     output_dir=str(tmp_path), progress=False)
        levels = np.asarray(r["allocations"])
        assert levels.shape == (8, nt.blocks)
        assert nt.tokens(levels).sum() <= 0.5 * 8 * nt.full_tokens  # the budget, exactly respected
        assert r["temporal_tokens_per_video"] == pytest.approx(nt.tokens(levels).mean())
        assert (tmp_path / f"eval_{r['step']}_budget0.5_{method}.json").exists()
        # the reported PSNR is the model's at exactly these levels (recomputed with scikit-image)
        T, H, W = model.geometry.video_shape
        clips = list(make_sampled_dataset(config.data, (T, H, W), 8, 8, seed=0))[0]
        video, n = jnp.asarray(clips["video"]), jnp.asarray(clips["n_frames"])

        @nnx.jit
        def recon(model, video, n, levels):
            return decode_video(model, model.apply_levels(model.encode(to_model_input(video, n), n), levels))

        out = np.clip((np.asarray(recon(model, video, n, jnp.asarray(levels))) + 1) / 2, 0, 1).astype(np.float64)
        target = np.asarray(clips["video"], np.float64) / 255
        want = np.mean([np.mean([peak_signal_noise_ratio(target[b, t], out[b, t], data_range=1.0)
                                 for t in range(int(n[b]))]) for b in range(8)])
        assert r["psnr"] == pytest.approx(want, abs=2e-3)


def test_fixed_token_checkpoints_and_missing_scorers_are_named(nested_run, tokenizer_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train the scorer first"):
        budgets.load_scorer(tmp_path, load_tokenizer(str(nested_run))[0].nested, 8)
    with pytest.raises(ValueError, match="nested_tokens=True"):
        evaluate(str(tokenizer_dir), num_videos=8, batch=8, token_budget=0.5, allocation="uniform", progress=False)
    with pytest.raises(ValueError, match="below the .* of every block at the lowest level"):
        budgets.allocate(np.zeros((2, 4, 4)), np.ones((2, 4), bool), load_tokenizer(str(nested_run))[0].nested,
                         0.1, "ilp")


def test_reconstruct_at_a_budget_saves_the_levels_and_decodes_them_back(nested_run, tmp_path):
    from coordtok_jax.evaluate.reconstruct import reconstruct
    from video_files import moving_frames, write_video

    src = write_video(tmp_path / "user.avi", moving_frames(37, 40, 48, seed=2))  # 3 windows: 16 + 16 + 5
    nt = load_tokenizer(str(nested_run))[0].nested
    first = reconstruct(str(nested_run), str(tmp_path / "a.mp4"), input_path=str(src), batch=2,
                        save_tokens=str(tmp_path / "tok.npz"), token_budget=0.5, allocation="ilp")
    levels = first["levels"]
    assert levels.shape == (3, nt.blocks) and nt.tokens(levels).sum() <= 0.5 * 3 * nt.full_tokens
    assert first["tokens"] == 3 * 64 + nt.tokens(levels).sum()
    assert np.all(levels[2, 2:] == 0)  # the 5-frame window's blocks past its frames: the lowest level
    saved = np.load(tmp_path / "tok.npz")
    np.testing.assert_array_equal(saved["levels"], levels)
    keep = nt.kept[levels].reshape(3, nt.blocks * nt.rows, nt.cols)
    assert np.all(saved["z_yt"][~keep] == 0) and np.all(saved["z_xt"][~keep] == 0)  # dropped cells: nothing stored
    second = reconstruct(str(nested_run), str(tmp_path / "b.mp4"), input_path=str(src), batch=2,
                         from_tokens=str(tmp_path / "tok.npz"))
    assert second["psnr"] == pytest.approx(first["psnr"], abs=1e-4) and second["tokens"] == first["tokens"]
    with pytest.raises(ValueError, match="saved at a token budget"):
        reconstruct(str(nested_run), str(tmp_path / "c.mp4"), from_tokens=str(tmp_path / "tok.npz"), token_budget=0.5)


def test_latent_cache_at_a_budget_stores_levels_and_cut_planes(nested_run, tokenizer_dir, tmp_path):
    import sit

    from coordtok_jax.data.pipeline import ClipLoader
    from coordtok_jax.data.sources import make_source
    from coordtok_jax.generation import latent_cache
    from coordtok_jax.generation.encode_latents import encode_latents
    from coordtok_jax.models import ConfigError

    config = sit.get_config("tiny")
    with config.unlocked():
        config.tokenizer, config.batch_size = str(nested_run), 8
        config.data = load_tokenizer(str(nested_run))[1].data
    meta = encode_latents(config, str(tmp_path / "cache"), num_clips=8, num_shards=1, progress=False,
                          token_budget=0.5, allocation="ilp")
    assert meta["token_budget"] == 0.5 and meta["allocation"] == "ilp" and meta["token_levels"] == [4, 8, 12, 16]
    records = [latent_cache.LatentSource(tmp_path / "cache")[i] for i in range(8)]
    model = load_tokenizer(str(nested_run))[0]
    nt = model.nested
    levels = np.stack([r["levels"] for r in records])
    assert levels.shape == (8, nt.blocks) and nt.tokens(levels).sum() <= 0.5 * 8 * nt.full_tokens
    data = make_source(config.data, model.geometry.video_shape, train=True)
    loader = ClipLoader(data, config.data.seed, 0)
    cut = nnx.jit(lambda m, v, n, lv: m.apply_levels(m.encode(to_model_input(v, n), n), lv))
    for k in (0, 6):  # the stored planes are the encoding cut at the stored levels
        clip = loader(k, k % len(data))
        n = jnp.asarray([clip["n_frames"]], jnp.int32)
        want = cut(model, jnp.asarray(clip["video"][None]), n, jnp.asarray(levels[k][None]))
        for name, z in zip(latent_cache.PLANES, want):
            np.testing.assert_allclose(records[k][name], np.asarray(z)[0], rtol=1e-5, atol=1e-5)
    with config.unlocked():
        config.tokenizer = str(tokenizer_dir)
    with pytest.raises(ConfigError, match="nested_tokens=True"):
        encode_latents(config, str(tmp_path / "c2"), num_clips=8, num_shards=1, progress=False, token_budget=0.5)
