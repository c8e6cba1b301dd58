"""grain pipelines: synthetic, folder (PyAV, with corrupt files), ArrayRecord prepare + read."""

import hashlib
import json
import logging
import os
import subprocess
import sys

import coordtok
import numpy as np
import pytest
from PIL import Image

import video_files
from coordtok_jax.data import records
from coordtok_jax.data.pipeline import make_dataset
from coordtok_jax.data.prepare_shards import prepare
from coordtok_jax.data.sources import DataError, FolderSource, make_source
from coordtok_jax.data.video_io import decode_frames, resize_center_crop, take_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (16, 32, 32)


def data_config(**overrides):
    d = coordtok.get_config("tiny").data
    with d.unlocked():
        for k, v in overrides.items():
            d[k] = v
    return d


def take(it, n):
    return [next(it) for _ in range(n)]


def digest(batch):
    return [hashlib.sha1(v.tobytes()).hexdigest() for v in batch["video"]]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def video_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    written = video_files.make_tree(root, lengths=(40, 24, 12, 30, 20))
    return root, written


@pytest.fixture(scope="module")
def corrupt_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    written = video_files.make_tree(root, lengths=(30, 20, 12))
    bad = video_files.add_corrupt_files(root)
    return root, written, bad


# ---------------------------------------------------------------- synthetic


def test_synthetic_batches_follow_the_contract():
    it = iter(make_dataset(data_config(num_clips=40), SHAPE, 4, process_index=0, process_count=1))
    batches = take(it, 5)
    for b in batches:
        assert b["video"].shape == (4,) + SHAPE + (3,) and b["video"].dtype == np.uint8
        assert b["n_frames"].dtype == np.int32 and b["n_frames"].shape == (4,)
        assert np.all((b["n_frames"] >= 9) & (b["n_frames"] <= 16))
        assert b["decode_failures"].sum() == 0
        for v, n in zip(b["video"], b["n_frames"]):
            assert np.all(v[n:] == 0)  # frames past n_frames are padding
    assert any(np.any(b["n_frames"] < 16) for b in batches)


def test_shuffle_is_deterministic_by_seed_and_reshuffles_epochs():
    mk = lambda seed: iter(make_dataset(data_config(num_clips=8, seed=seed), SHAPE, 4, process_index=0, process_count=1))
    a, b, c = take(mk(0), 4), take(mk(0), 4), take(mk(1), 4)
    assert_same_batches(a, b)
    assert [digest(x) for x in a] != [digest(x) for x in c]
    epoch1, epoch2 = digest(a[0]) + digest(a[1]), digest(a[2]) + digest(a[3])
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # same clips, new order


def test_hosts_get_disjoint_shards_covering_the_data():
    d = data_config(num_clips=10)
    seen = []
    for host in range(2):
        batches = list(make_dataset(d, SHAPE, 2, train=False, process_index=host, process_count=2))
        seen.append({h for b in batches for h in digest(b)})
    assert not seen[0] & seen[1]
    everything = list(make_dataset(d, SHAPE, 5, train=False, process_index=0, process_count=1))
    assert seen[0] | seen[1] == {h for b in everything for h in digest(b)}


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_the_same_next_batches(workers):
    d = data_config(num_clips=12, num_workers=workers)
    ds = make_dataset(d, SHAPE, 3, process_index=0, process_count=1)
    it = iter(ds)
    take(it, 3)
    state = it.get_state()
    json.dumps(state)  # the trainer stores it in its checkpoint
    expected = take(it, 4)
    restored = iter(make_dataset(d, SHAPE, 3, process_index=0, process_count=1))
    restored.set_state(json.loads(json.dumps(state)))
    assert_same_batches(take(restored, 4), expected)


# ---------------------------------------------------------------- folder


def test_resize_center_crop_follows_torchvision_rule():
    frames = np.zeros((1, 48, 64, 3), np.uint8)
    frames[0, :, 30:34] = 255  # a vertical bar at the horizontal centre
    out = resize_center_crop(frames, 32, 32)
    assert out.shape == (1, 32, 32, 3)
    # shorter side 48 -> 32, long side int(32 * 64 / 48) = 42, left = round((42 - 32) / 2) = 5
    want = np.asarray(Image.fromarray(frames[0]).resize((42, 32), Image.BICUBIC))[:, 5:37]
    np.testing.assert_array_equal(out[0], want)
    bar = out[0, 16, :, 0].astype(int)
    assert abs(int(np.argmax(bar)) - 15.5) <= 1.5  # still centred


def test_take_window_pads_short_clips():
    frames = np.arange(5 * 2 * 2 * 3, dtype=np.uint8).reshape(5, 2, 2, 3) + 1
    video, n = take_window(frames, 8, None, np.random.default_rng(0))
    assert n == 5 and video.shape == (8, 2, 2, 3)
    np.testing.assert_array_equal(video[:5], frames)
    assert np.all(video[5:] == 0)
    video, n = take_window(frames, 3, 2, None)
    assert n == 3
    np.testing.assert_array_equal(video, frames[2:5])
    starts = {int(take_window(frames, 3, None, np.random.default_rng(s))[0][0, 0, 0, 0]) for s in range(40)}
    assert starts == {1, 13, 25}  # uniform over the 3 possible starts


def test_folder_source_decodes_resizes_and_labels(video_tree):
    root, written = video_tree
    d = data_config(source="folder", root=str(root))
    batches = take(iter(make_dataset(d, SHAPE, 5, process_index=0, process_count=1)), 2)
    lengths = {min(len(f), 16) for f in written.values()}
    for b in batches:
        assert b["video"].shape == (5,) + SHAPE + (3,)
        assert set(b["n_frames"].tolist()) <= lengths
        assert set(b["label"].tolist()) <= {0, 1}
        assert b["decode_failures"].sum() == 0
    assert 12 in {n for b in batches for n in b["n_frames"].tolist()}  # the short clip, padded


def test_folder_eval_list_gives_fixed_windows(video_tree, tmp_path):
    root, written = video_tree
    (tmp_path / "eval.txt").write_text("class_a/v00.mp4 10\nclass_b/v01.avi\n")
    d = data_config(source="folder", root=str(root), eval_list=str(tmp_path / "eval.txt"))
    (batch,) = list(make_dataset(d, SHAPE, 2, train=False, process_index=0, process_count=1))
    want = resize_center_crop(decode_frames(root / "class_a/v00.mp4"), 32, 32)[10:26]
    np.testing.assert_array_equal(batch["video"][0], want)
    np.testing.assert_array_equal(batch["label"], [0, 1])
    # decoded frames are close to what was written (mpeg4 at qscale 1)
    raw = decode_frames(root / "class_a/v00.mp4")
    assert np.abs(raw.astype(int) - written["class_a/v00.mp4"].astype(int)).mean() < 8
    (tmp_path / "bad.txt").write_text("class_a/nope.mp4 3\n")
    with pytest.raises(DataError, match="nope.mp4"):
        FolderSource(root, SHAPE, str(tmp_path / "bad.txt"))


def test_corrupt_files_are_skipped_counted_and_warned_once(corrupt_tree, caplog):
    root, written, bad = corrupt_tree
    d = data_config(source="folder", root=str(root), read_threads=1)
    caplog.set_level(logging.WARNING, logger="coordtok_jax.data.pipeline")
    batches = take(iter(make_dataset(d, SHAPE, 4, process_index=0, process_count=1)), 6)
    failures = sum(int(b["decode_failures"].sum()) for b in batches)
    assert failures > 0
    for b in batches:
        for v, n in zip(b["video"], b["n_frames"]):
            assert n >= 1 and v[:n].max() > 0
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable clip" in r.getMessage()]
    assert len(warned) == len(set(warned))  # once per file
    assert {m.split("skipping unreadable clip ")[1].split(" (")[0].split(str(root) + "/")[1] for m in warned} <= set(bad)
    # the distinct failed records the trainer counts: bad files only, each once
    source = make_source(d, SHAPE)
    distinct = {int(i) for b in batches for i in b["failed_records"].ravel() if i >= 0}
    assert distinct and {source.describe(i).split(str(root) + "/")[1] for i in distinct} <= set(bad)
    assert sum(int((b["failed_records"] >= 0).sum()) for b in batches) == failures  # no clip had > 4 failures here


class _FlakySource:
    """50 records; 7 and 8 fail to load. A clip's pixels hold its record index."""

    name = "flaky(50 clips)"

    def __len__(self):
        return 50

    def describe(self, i):
        return f"record {i}"

    def load(self, i, rng):
        if i in (7, 8):
            raise ValueError("truncated file")
        return {"video": np.full(SHAPE + (3,), i, np.uint8), "n_frames": SHAPE[0]}


def test_a_bad_record_is_replaced_by_a_random_other_record_deterministically():
    from coordtok_jax.data.pipeline import ClipLoader

    load = ClipLoader(_FlakySource(), seed=0, host=0)
    picks = [int(load(p, 7)["video"][0, 0, 0, 0]) for p in range(40)]
    assert not {7, 8} & set(picks)
    assert len(set(picks)) >= 15  # spread over the records, not always the next one in order
    assert picks == [int(load(p, 7)["video"][0, 0, 0, 0]) for p in range(40)]  # deterministic per (seed, position)
    assert picks != [int(ClipLoader(_FlakySource(), seed=1, host=0)(p, 7)["video"][0, 0, 0, 0]) for p in range(40)]
    clip = load(3, 7)
    assert clip["decode_failures"] >= 1 and clip["failed_records"][0] == 7
    assert int(load(3, 12)["decode_failures"]) == 0 and (load(3, 12)["failed_records"] == -1).all()


def test_a_broken_eval_clip_is_named_and_replaced(corrupt_tree, tmp_path, caplog):
    """The trainer's held-out clips go through the same loader: a broken first eval clip is logged by
    name and replaced, not a crash at start-up."""
    from coordtok_jax.data import pipeline
    from coordtok_jax.train.trainer import _eval_clips

    pipeline._WARNED.clear()  # warned once per process: another test may have met this file already
    root, written, bad = corrupt_tree
    listing = tmp_path / "eval.txt"
    listing.write_text("".join(f"{rel}\n" for rel in [sorted(bad)[0]] + sorted(written)[:2]))
    config = coordtok.get_config("tiny")
    with config.unlocked():
        config.data.source, config.data.root, config.data.eval_list = "folder", str(root), str(listing)
        config.eval_videos = 3
    caplog.set_level(logging.WARNING, logger="coordtok_jax.data.pipeline")
    frames, n = _eval_clips(config, SHAPE)
    assert frames.shape == (3,) + SHAPE + (3,) and (n >= 1).all()
    assert any(sorted(bad)[0] in r.getMessage() for r in caplog.records if "skipping unreadable clip" in r.getMessage())


def test_everything_failing_names_the_source_and_failures(tmp_path):
    for i in range(3):
        (tmp_path / "cls" / f"bad{i}.mp4").parent.mkdir(exist_ok=True)
        (tmp_path / "cls" / f"bad{i}.mp4").write_bytes(b"garbage")
    d = data_config(source="folder", root=str(tmp_path))
    with pytest.raises(DataError, match=r"(?s)folder\(.*3 videos\): 3 records in a row failed.*bad\d\.mp4"):
        next(iter(make_dataset(d, SHAPE, 2, process_index=0, process_count=1)))
    with pytest.raises(DataError, match="no video files"):
        make_dataset(data_config(source="folder", root=str(tmp_path / "cls")), SHAPE, 2)


# ---------------------------------------------------------------- array_record


def test_prepare_then_read_array_record(corrupt_tree, tmp_path):
    root, written, bad = corrupt_tree
    out = tmp_path / "ar"
    meta = prepare("folder", str(root), str(out), num_shards=2, height=32, width=32, workers=1)
    assert meta["num_clips"] == len(written) and len(meta["failures"]) == len(bad)
    assert meta["classes"] == ["class_a", "class_b"]
    shards = sorted(p.name for p in out.glob("*.array_record"))
    assert shards == ["clips-00000-of-00002.array_record", "clips-00001-of-00002.array_record"]
    assert not list(out.glob("*.tmp"))

    from array_record.python.array_record_data_source import ArrayRecordDataSource

    src = ArrayRecordDataSource([str(out / s) for s in shards])
    stored = {c["name"]: c for c in (records.decode_clip(src[i]) for i in range(len(src)))}
    assert set(stored) == set(written)
    for rel, clip in stored.items():
        np.testing.assert_array_equal(clip["video"], resize_center_crop(decode_frames(root / rel), 32, 32))
        assert clip["label"] == (0 if rel.startswith("class_a") else 1)

    d = data_config(source="array_record", path=str(out), num_workers=0)
    ds = make_dataset(d, SHAPE, 3, process_index=0, process_count=1)
    it = iter(ds)
    batches = take(it, 3)
    for b in batches:
        assert b["video"].shape == (3,) + SHAPE + (3,) and b["decode_failures"].sum() == 0
    state = it.get_state()
    expected = take(it, 2)
    again = iter(make_dataset(d, SHAPE, 3, process_index=0, process_count=1))
    again.set_state(state)
    assert_same_batches(take(again, 2), expected)

    # shards prepared for another resolution: an error naming both, unless resizing is asked for
    with pytest.raises(DataError, match=r"metadata.json: the prepared clips are 32x32 but the model takes 16x16.*"
                                        r"allow_resize=True"):
        make_dataset(d, (16, 16, 16), 3, process_index=0, process_count=1)
    resized = data_config(source="array_record", path=str(out), num_workers=0, allow_resize=True)
    assert next(iter(make_dataset(resized, (16, 16, 16), 3, process_index=0, process_count=1)))["video"].shape == \
        (3, 16, 16, 16, 3)

    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare("folder", str(root), str(out), num_shards=2, height=32, width=32, workers=1)
    with pytest.raises(DataError, match="no \\*.array_record shards"):
        make_dataset(data_config(source="array_record", path=str(tmp_path / "none")), SHAPE, 2)


def test_prepare_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "coordtok_jax.prepare", "--source=synthetic", "--num_clips=3", "--frames=8",
         "--height=16", "--width=16", f"--output={tmp_path}", "--num-shards=2", "--workers=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote 3 clips" in proc.stdout and "100%" in proc.stdout  # progress bar
    assert json.loads((tmp_path / "metadata.json").read_text())["num_clips"] == 3
    missing = subprocess.run([sys.executable, "-m", "coordtok_jax.prepare", "--source=folder",
                              f"--input={tmp_path}/nope", f"--output={tmp_path}/o"], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


@pytest.mark.gcs
def test_prepare_to_gcs_and_read_array_record_from_gcs(tmp_path):
    pytest.importorskip("gcp_storage_emulator")
    from etils import epath

    import gcs_emulator

    with gcs_emulator.running_emulator() as emu:
        bucket = emu.make_bucket()
        out = f"gs://{bucket}/clips"
        meta = prepare("synthetic", None, out, num_shards=2, height=16, width=16, workers=1, num_clips=5, frames=12)
        assert meta["num_clips"] == 5
        names = sorted(p.name for p in epath.Path(out).iterdir())
        assert names == ["clips-00000-of-00002.array_record", "clips-00001-of-00002.array_record", "metadata.json"]
        d = data_config(source="array_record", path=out)
        batches = take(iter(make_dataset(d, (8, 16, 16), 2, process_index=0, process_count=1)), 3)
        for b in batches:
            assert b["video"].shape == (2, 8, 16, 16, 3) and b["decode_failures"].sum() == 0
        # the same clips as a local prepare
        local = tmp_path / "local"
        prepare("synthetic", None, str(local), num_shards=2, height=16, width=16, workers=1, num_clips=5, frames=12)
        local_batches = take(iter(make_dataset(data_config(source="array_record", path=str(local)), (8, 16, 16), 2,
                                               process_index=0, process_count=1)), 3)
        assert_same_batches(batches, local_batches)


def test_load_npz_equals_np_load_without_parsing_python():
    """Records are decoded in grain's reader threads; np.load's ast-based header parse races there
    on CPython 3.11 (SystemError 'AST constructor recursion depth mismatch'). load_npz must give
    what np.load gives, for every kind of array np.savez writes, without calling ast.parse."""
    import ast
    import io

    def load_without_ast(data):
        real, calls = ast.parse, []
        ast.parse = lambda *a, **k: calls.append(a) or real(*a, **k)
        try:
            return records.load_npz(data), calls
        finally:
            ast.parse = real

    rng = np.random.default_rng(0)
    arrays = {
        "video": rng.integers(0, 255, (3, 5, 4, 3), dtype=np.uint8),
        "planes": rng.standard_normal((4, 6, 2)).astype(np.float32),
        "big_endian": np.arange(6, dtype=">i4").reshape(2, 3),
        "fortran": np.asfortranarray(rng.standard_normal((3, 7))),
        "scalar": np.int64(-7),
        "vector": np.arange(5, dtype=np.int16),
        "empty": np.zeros((0, 4), np.float16),
        "name": np.asarray("clip \u00fcn\u00efcode.mp4"),
        "flags": np.array([True, False]),
        "complex": np.array([1 + 2j], np.complex64),
    }
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, **arrays)
        with np.load(io.BytesIO(buf.getvalue())) as f:
            want = {k: f[k] for k in f.files}
        got, calls = load_without_ast(buf.getvalue())
        assert not calls and sorted(got) == sorted(arrays)
        for k in arrays:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            np.testing.assert_array_equal(got[k], want[k])
            assert got[k].flags.writeable

    structured = np.array([(1, 2.5)], dtype=[("a", "<i4"), ("b", "<f8")])  # numpy's parser, under a lock
    buf = io.BytesIO()
    np.savez(buf, structured=structured)
    got, calls = load_without_ast(buf.getvalue())
    assert calls and got["structured"].dtype == structured.dtype
    np.testing.assert_array_equal(got["structured"], structured)

    buf = io.BytesIO()
    np.savez(buf, video=arrays["video"])
    corrupt = buf.getvalue().replace(b"(3, 5, 4, 3)", b"(3, 5, 9, 3)")
    with pytest.raises(ValueError, match=r"not a readable .npz record .*Bad CRC-32 for file 'video.npy'"):
        records.load_npz(corrupt)
    with pytest.raises(ValueError, match=r"not a readable .npz record \(5 bytes\)"):
        records.load_npz(b"hello")


def test_clip_view_reads_a_record_without_copying_its_frames():
    """The ArrayRecord source's reader: the frames of a stored record are a view into its bytes,
    equal to a full decode; deflated records fall back to it; a wrong header is named."""
    import io

    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (9, 6, 5, 3), dtype=np.uint8)
    data = records.encode_clip(video, 4, "class/v.avi")
    view = records.clip_view(data)
    assert view["label"] == 4 and view["name"] == "class/v.avi"
    np.testing.assert_array_equal(view["video"], video)
    assert not view["video"].flags.owndata and not view["video"].flags.writeable  # no copy of the frames
    full = records.decode_clip(data)
    np.testing.assert_array_equal(full["video"], view["video"])
    buf = io.BytesIO()
    np.savez_compressed(buf, video=video, label=np.int32(2), name=np.asarray("z"))
    deflated = records.clip_view(buf.getvalue())
    np.testing.assert_array_equal(deflated["video"], video)
    assert deflated["label"] == 2 and deflated["video"].flags.owndata
    lying = data.replace(b"(9, 6, 5, 3)", b"(9, 6, 9, 3)")
    with pytest.raises(ValueError, match="video.npy does not match its header"):
        records.clip_view(lying)
    with pytest.raises(ValueError, match=r"not a readable clip record \(5 bytes\)"):
        records.clip_view(b"hello")


@pytest.mark.parametrize("name, codec, seeks", [("a.mp4", "libx264", True), ("b.avi", "mpeg4", True),
                                                ("c.mkv", "mpeg4", False)])
def test_window_seek_returns_the_frames_of_a_full_decode(tmp_path, monkeypatch, name, codec, seeks):
    """decode_window seeks to the key frame before the window; every window (and every random draw,
    and a clip shorter than the window) equals take_window over a full decode, frame for frame."""
    from video_files import moving_frames, write_video

    from coordtok_jax.data.video_io import decode_frames, decode_window, take_window

    path = write_video(tmp_path / name, moving_frames(45, 32, 48), codec=codec, fps=8, gop=6)
    full = decode_frames(path)
    assert len(full) == 45
    if seeks:  # the container states its frame count: no full decode behind the window's back
        from coordtok_jax.data import video_io

        monkeypatch.setattr(video_io, "decode_frames", lambda *a, **k: pytest.fail("fell back to a full decode"))
    for start in (0, 5, 6, 17, 30, 37):
        got, n = decode_window(path, 8, start, None)
        want, wn = take_window(full, 8, start, None)
        assert n == wn == 8
        np.testing.assert_array_equal(got, want)
    for seed in range(3):
        got, _ = decode_window(path, 8, None, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, take_window(full, 8, None, np.random.default_rng(seed))[0])
    monkeypatch.undo()  # a clip shorter than the window is decoded whole
    got, n = decode_window(path, 64, None, np.random.default_rng(0))
    want, wn = take_window(full, 64, None, np.random.default_rng(0))
    assert n == wn == 45
    np.testing.assert_array_equal(got, want)
