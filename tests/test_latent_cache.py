"""The latent cache: records and the grain reader (host split, checkpointable position, clear
errors), encode_latents (planes equal a direct encoding of the same clips, crash resume, refusals,
two processes) and train_sit from the cache with the in-loop sampling eval."""

import json

import numpy as np
import pytest
import sit
from distributed import run_two_processes

from coordtok_jax.generation import latent_cache
from coordtok_jax.data.shards import ShardWriter
from coordtok_jax.data.sources import DataError

SHAPES = [(4, 4, 2), (6, 4, 2), (6, 4, 2)]


def _write_cache(root, num_clips=10, num_shards=2, shapes=SHAPES, metadata=True, staging=None):
    rng = np.random.default_rng(0)
    bounds = np.linspace(0, num_clips, num_shards + 1).round().astype(int)
    planes = {}
    for s in range(num_shards):
        w = ShardWriter(root, latent_cache.shard_name(s, num_shards), staging)
        for k in range(bounds[s], bounds[s + 1]):
            planes[k] = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
            w.write(latent_cache.encode_planes(planes[k], label=k % 3, clip=k))
        w.finish()
    spec = dict(plane_shapes=[list(x) for x in SHAPES], num_clips=num_clips, num_shards=num_shards,
                tokenizer="tok", tokenizer_step=1, data={"source": "synthetic"})
    (root / "spec.json").write_text(json.dumps(spec))
    if metadata:
        (root / "metadata.json").write_text(json.dumps(spec))
    return planes


def test_latent_dataset_split_over_hosts_checkpoints_and_reports_bad_caches(tmp_path):
    planes = _write_cache(tmp_path)
    seen = []
    for host in range(2):
        it = iter(latent_cache.make_latent_dataset(tmp_path, 5, seed=3, process_index=host, process_count=2))
        b = next(it)
        assert b["xy"].shape == (5, 4, 4, 2) and b["yt"].shape == (5, 6, 4, 2) and b["xy"].dtype == np.float32
        for i, k in enumerate(b["clip"]):
            for z, want in zip((b["xy"], b["yt"], b["xt"]), planes[int(k)]):
                np.testing.assert_array_equal(z[i], want)
            assert b["label"][i] == k % 3
        seen += b["clip"].tolist()
        it.close()  # stops its reader threads
    assert sorted(seen) == list(range(10))  # one epoch: each host its half, no overlap

    it = iter(latent_cache.make_latent_dataset(tmp_path, 3, seed=3, process_index=0, process_count=1))
    next(it), next(it)
    state = it.get_state()
    expected = [next(it)["clip"].tolist() for _ in range(4)]  # crosses the epoch boundary
    again = iter(latent_cache.make_latent_dataset(tmp_path, 3, seed=3, process_index=0, process_count=1))
    again.set_state(state)
    assert [next(again)["clip"].tolist() for _ in range(4)] == expected
    it.close(), again.close()  # no reader thread is left on the files damaged below

    sampled = list(latent_cache.make_sampled_latents(tmp_path, 7, 4, seed=1, process_index=0, process_count=1))
    assert [len(b["clip"]) for b in sampled] == [4, 3]

    (tmp_path / "metadata.json").unlink()
    with pytest.raises(DataError, match="did not finish: run the same command again"):
        latent_cache.make_latent_dataset(tmp_path, 2, process_index=0, process_count=1)
    with pytest.raises(DataError, match="not a latent cache"):
        latent_cache.LatentSource(tmp_path / "nothing")
    meta = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / "metadata.json").write_text(json.dumps(dict(meta, plane_shapes=[[4, 4, 2], [6, 4, 3], [6, 4, 2]])))
    bad = iter(latent_cache.make_latent_dataset(tmp_path, 2, process_index=0, process_count=1))
    with pytest.raises(DataError, match=r"plane yt is \(6, 4, 2\), metadata.json says \(6, 4, 3\)"):
        next(bad)
    bad.close()
    (tmp_path / latent_cache.shard_name(1, 2)).unlink()
    with pytest.raises(DataError, match="1 of 2 shards are missing"):
        latent_cache.LatentSource(tmp_path)


@pytest.mark.gcs
def test_latent_cache_on_gcs(tmp_path):
    pytest.importorskip("gcp_storage_emulator")
    import gcs_emulator
    from etils import epath

    from coordtok_jax.data.shards import is_remote, staging_dir

    with gcs_emulator.running_emulator() as emu:
        root = epath.Path(f"gs://{emu.make_bucket()}/latents")
        staging, temporary = staging_dir(root, "test_")
        assert is_remote(root) and temporary and not is_remote(staging)
        planes = _write_cache(root, num_clips=6, num_shards=2, staging=staging)
        assert sorted(p.name for p in root.iterdir()) == [latent_cache.shard_name(0, 2), latent_cache.shard_name(1, 2),
                                                           "metadata.json", "spec.json"]
        assert not list(staging.iterdir())  # staged shards were moved up
        # a finite reader read to its end: no prefetch thread outlives the emulator
        (b,) = list(latent_cache.make_sampled_latents(str(root), 6, 6, seed=0, process_index=0, process_count=1))
        for i, k in enumerate(b["clip"]):
            np.testing.assert_array_equal(b["xt"][i], planes[int(k)][2])


def _cache_config(tokenizer_dir, **overrides):
    config = sit.get_config("tiny")
    with config.unlocked():
        config.tokenizer = str(tokenizer_dir)
        config.batch_size = 8
        for k, v in overrides.items():
            config[k] = v
    return config


@pytest.fixture(scope="module")
def cache(tokenizer_dir, tmp_path_factory):
    """12 tiny clips encoded into 3 shards (batch 8 over the 8 devices: one full and one padded batch)."""
    from coordtok_jax.generation.encode_latents import encode_latents

    out = tmp_path_factory.mktemp("cache")
    meta = encode_latents(_cache_config(tokenizer_dir), str(out), num_clips=12, num_shards=3, progress=False)
    return out, meta


def test_encode_latents_equals_direct_encoding_resumes_and_refuses(cache, tokenizer_dir):
    from coordtok_jax.generation.encode_latents import encode_latents
    from coordtok_jax.data.pipeline import ClipLoader
    from coordtok_jax.data.sources import make_source
    from coordtok_jax.generation.frozen_tokenizer import frozen_tokenizer

    out, meta = cache
    config = _cache_config(tokenizer_dir)
    assert meta["num_clips"] == 12 and meta["clips_per_shard"] == [4, 4, 4] and meta["encoded_this_run"] == 12
    assert meta["tokenizer"] == str(tokenizer_dir) and meta["tokenizer_step"] == 5
    assert meta["plane_shapes"] == [[8, 8, 8], [8, 8, 8], [8, 8, 8]]
    source = latent_cache.LatentSource(out)
    records = [source[i] for i in range(len(source))]
    assert [int(r["clip"]) for r in records] == list(range(12))  # shards hold contiguous clip ranges, in order

    # the cached planes are the tokenizer's encoding of training clip k (record k % n, window by (seed, k))
    tok = frozen_tokenizer(config, None)
    data = make_source(config.data, tok.geometry.video_shape, train=True)
    loader = ClipLoader(data, config.data.seed, 0)
    for k in (0, 5, 11):
        clip = loader(k, k % len(data))
        direct = tok.encode(tok.params, clip["video"][None], np.asarray([clip["n_frames"]], np.int32))
        for name, z in zip(latent_cache.PLANES, direct):
            np.testing.assert_allclose(records[k][name], np.asarray(z)[0], rtol=1e-5, atol=1e-6)
        assert records[k]["label"] == clip["label"]

    with pytest.raises(FileExistsError, match="already holds a complete latent cache"):
        encode_latents(config, str(out), num_clips=12, num_shards=3, progress=False)

    # a crash after the first shards: only the missing shard is encoded again, to the same records
    before = (out / latent_cache.shard_name(1, 3)).read_bytes()
    (out / latent_cache.shard_name(1, 3)).unlink()
    (out / "metadata.json").unlink()
    with pytest.raises(FileExistsError, match=r"num_clips: cache has 12, this run 16"):
        encode_latents(config, str(out), num_clips=16, num_shards=3, progress=False)
    again = encode_latents(config, str(out), num_clips=12, num_shards=3, progress=False)
    assert again["encoded_this_run"] == 4
    assert (out / latent_cache.shard_name(1, 3)).read_bytes() == before
    assert not list(out.glob("*.tmp"))


def test_encode_latents_two_processes_write_their_shards(cache, tokenizer_dir, tmp_path):
    """jax.distributed over 2 processes x 2 devices: each process writes its own shards; the
    cache equals the single-process one."""
    single, _ = cache
    outputs = run_two_processes(["-m", "coordtok_jax.encode_latents", "--config=configs/sit.py:tiny",
                                 f"--config.tokenizer={tokenizer_dir}", f"--output={tmp_path}", "--num_clips=12",
                                 "--num_shards=4", "--batch=4"])
    assert "wrote 12 clips' latents" in outputs[0][0]
    meta = latent_cache.read_metadata(tmp_path)
    assert meta["num_shards"] == 4 and meta["clips_per_shard"] == [3, 3, 3, 3]
    a, b = latent_cache.LatentSource(single), latent_cache.LatentSource(tmp_path)
    for i in range(12):
        ra, rb = a[i], b[i]
        assert int(ra["clip"]) == int(rb["clip"]) == i
        for name in latent_cache.PLANES:
            np.testing.assert_allclose(rb[name], ra[name], rtol=1e-5, atol=1e-6)


def test_train_sit_from_the_cache_with_sampling_eval(cache, tmp_path):
    from coordtok_jax.generation.train_sit import train_sit

    out, meta = cache
    config = sit.get_config("tiny")
    with config.unlocked():
        config.latents = str(out)
        config.mesh.shape = (-1, 1)
        config.batch_size = 8
        config.stats_num_clips = 12
        config.total_steps, config.log_every, config.save_every = 3, 1, 3
        config.eval_every, config.eval_num_videos, config.eval_sampler_steps = 3, 2, 2
        config.data.source = "folder"  # replaced by the cache's data config
    summary = train_sit(config, str(tmp_path))
    assert summary["last_step"] == 3 and np.isfinite(summary["loss"])
    assert np.isfinite(summary["eval_sample_latent_std"]) and summary["eval_sample_latent_std"] > 0
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tokenizer"] == meta["tokenizer"] and saved["data"]["source"] == "synthetic"
    assert {k: v for k, v in saved["data"].items() if k not in latent_cache.DATA_IO_KEYS} == meta["data"]
    stats = json.loads((tmp_path / "latent_stats.json").read_text())
    assert stats["count"][0] == 12 * 8 * 8  # 12 cached clips x the 8x8 xy plane
    from PIL import Image

    gif = Image.open(tmp_path / "samples" / "step_00000003.gif")
    assert gif.n_frames == 16 and gif.size == (64, 32)  # 2 videos side by side

    from coordtok_jax.models import ConfigError

    with config.unlocked():
        config.model.in_channels = 4
    with pytest.raises(ConfigError, match=r"latent cache .* has planes xy \(8, 8, 8\).*expects xy \(8, 8, 4\)"):
        train_sit(config, str(tmp_path / "other"))
