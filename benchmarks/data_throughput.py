r"""Input pipeline throughput: clips/s per core for each source at T x H x W (default 128^3).

    python benchmarks/data_throughput.py [--frames=128 --size=128] [--videos=8] [--clips=32]
        [--sources=synthetic,folder,array_record,tfds] [--workdir=/tmp/coordtok_bench_data]

Makes its own data in --workdir: --videos UCF-101-like files (320x240, 25 fps, ~7 s, mpeg4/h264),
the ArrayRecord shards `prepare` writes from them (resized to --size), and (when TensorFlow is
installed) a TFDS dataset of the same clips. Then draws --clips clips through the grain
pipeline with no worker processes and one read thread (one core) and prints clips/s. A trainer
consuming C clips/s needs ceil(C / rate) cores of input workers.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "configs"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

_FRAMES = flags.DEFINE_integer("frames", 128, "T of the clips.")
_SIZE = flags.DEFINE_integer("size", 128, "H = W of the clips.")
_VIDEOS = flags.DEFINE_integer("videos", 8, "Source videos to generate.")
_CLIPS = flags.DEFINE_integer("clips", 32, "Clips to draw per source (after 2 warm-up batches).")
_SOURCES = flags.DEFINE_list("sources", ["synthetic", "folder", "array_record", "tfds"], "Sources to time.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/coordtok_bench_data", "Where the generated data goes.")


def _make_videos(root, n):
    import video_files

    for i in range(n):
        cls = f"class_{i % 2}"
        ext, codec = (".avi", "mpeg4") if i % 2 else (".mp4", "libx264")
        path = os.path.join(root, cls, f"v{i:03d}{ext}")
        if not os.path.exists(path):
            length = 150 + 10 * (i % 5)
            video_files.write_video(path, video_files.moving_frames(length, 240, 320, seed=i), codec)


def _tfds_dir(workdir, folder_root, size):
    import numpy as np
    import tensorflow_datasets as tfds

    from coordtok_jax.data.sources import list_videos
    from coordtok_jax.data.video_io import decode_frames, resize_center_crop

    files, classes = list_videos(folder_root)

    class CoordtokBenchVideos(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "video": tfds.features.Video(shape=(None, size, size, 3)),
                "label": tfds.features.ClassLabel(num_classes=len(classes))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for k, rel in enumerate(files):
                frames = resize_center_crop(decode_frames(os.path.join(folder_root, rel)), size, size)
                yield k, {"video": frames.astype(np.uint8), "label": classes.index(rel.split("/")[0])}

    data_dir = os.path.join(workdir, "tfds")
    CoordtokBenchVideos(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def main(argv):
    del argv
    import coordtok
    from coordtok_jax.data.pipeline import make_dataset
    from coordtok_jax.data.prepare_shards import prepare

    shape = (_FRAMES.value, _SIZE.value, _SIZE.value)
    work = _WORKDIR.value
    folder = os.path.join(work, "videos")
    _make_videos(folder, _VIDEOS.value)
    ar = os.path.join(work, f"array_record_{_SIZE.value}")
    if "array_record" in _SOURCES.value and not os.path.exists(os.path.join(ar, "metadata.json")):
        prepare("folder", folder, ar, num_shards=2, height=_SIZE.value, width=_SIZE.value, workers=1)

    print(f"clips {shape[0]}x{shape[1]}x{shape[2]}, one core (no worker processes, 1 read thread), "
          f"{_CLIPS.value} clips per source")
    print("| source | clips/s per core | ms per clip | MB/s of uint8 clips |")
    print("|---|---:|---:|---:|")
    for source in _SOURCES.value:
        data = coordtok.get_config("tiny").data
        with data.unlocked():
            data.source, data.read_threads, data.prefetch, data.num_workers = source, 1, 2, 0
            data.min_frames = 29
            if source == "folder":
                data.root = folder
            elif source == "array_record":
                data.path = ar
            elif source == "tfds":
                try:
                    data.data_dir = _tfds_dir(work, folder, _SIZE.value)
                except ImportError:
                    print("| tfds | (TensorFlow not installed) | | |")
                    continue
                data.name = "coordtok_bench_videos"
        it = iter(make_dataset(data, shape, 1, process_index=0, process_count=1))
        next(it), next(it)
        start = time.perf_counter()
        for _ in range(_CLIPS.value):
            next(it)
        rate = _CLIPS.value / (time.perf_counter() - start)
        mb = rate * shape[0] * shape[1] * shape[2] * 3 / 2**20
        print(f"| {source} | {rate:.2f} | {1e3 / rate:.1f} | {mb:.0f} |", flush=True)
    if "folder" in _SOURCES.value:
        window_seek_table(folder, shape[0])
    if "array_record" in _SOURCES.value:
        record_table(ar, shape[0])


def compare(title, items, ways, repeats):
    """Times each (name, fn(item, rng)) over every item `repeats` times and prints one table,
    the first way as the baseline (x = its time / this one's)."""
    import numpy as np

    rows = {}
    for name, fn in ways:
        rng, start = np.random.default_rng(0), time.perf_counter()
        for _ in range(repeats):
            for item in items:
                fn(item, rng)
        rows[name] = (time.perf_counter() - start) / (repeats * len(items))
    print(f"\n{title}:")
    print("| how | ms per clip | clips/s per core | x |")
    print("|---|---:|---:|---:|")
    base = rows[ways[0][0]]
    for name, t in rows.items():
        print(f"| {name} | {t * 1e3:.2f} | {1 / t:.0f} | {base / t:.2f} |")


def window_seek_table(folder, frames):
    """One T-frame window per video: the whole file decoded then sliced vs decode_window's seek."""
    from coordtok_jax.data.sources import list_videos
    from coordtok_jax.data.video_io import decode_frames, decode_window, take_window

    files = [os.path.join(folder, rel) for rel in list_videos(folder)[0]]
    compare(f"folder source, one {frames}-frame window of each {len(files)} source videos (decode only, one core)",
            files, [("decode the file, slice", lambda f, r: take_window(decode_frames(f), frames, None, r)),
                    ("seek to the window", lambda f, r: decode_window(f, frames, None, r))], repeats=2)


def record_table(path, frames):
    """One T-frame window per ArrayRecord record: the whole clip decoded (a copy of every frame,
    the member CRC checked) vs `clip_view` (the frames a view into the record, only the window copied)."""
    import numpy as np

    from coordtok_jax.data import records
    from coordtok_jax.data.shards import LazyRecords
    from coordtok_jax.data.sources import shard_paths
    from coordtok_jax.data.video_io import take_window

    src = LazyRecords(shard_paths(path))
    blobs = [src[i] for i in range(len(src))]
    window = lambda decode: lambda b, r: np.array(take_window(decode(b)["video"], frames, None, r)[0])
    compare(f"array_record source, one {frames}-frame window of each of {len(blobs)} records (read from memory, "
            "one core)", blobs, [("decode the whole record", window(records.decode_clip)),
                                 ("view, copy the window", window(records.clip_view))], repeats=5)


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
