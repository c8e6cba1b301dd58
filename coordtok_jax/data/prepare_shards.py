r"""Pre-decode clips into ArrayRecord shards (the fast input path for TPU VMs).

    python -m coordtok_jax.prepare --source=folder --input=UCF-101/ --output=gs://bucket/ucf101_128 \
        --num_shards=64 [--height=128 --width=128] [--workers=8]

Each video of the UCF-101-style tree INPUT/class/*.avi|mp4|... is decoded with PyAV, every frame
resized (PIL bicubic, shorter side) and center-cropped as the official preprocessing does, and
stored whole as one record (data/records.py), so training still draws random T-frame windows.
Videos are dealt round-robin over the shards in sorted order. `--source=synthetic --num_clips=N`
writes procedural clips instead (for trying the pipeline).

Output: OUTPUT/clips-SSSSS-of-NNNNN.array_record and OUTPUT/metadata.json (classes, counts,
failures). Unreadable videos are skipped with a warning and listed in metadata.json. Shards are
written under temporary names and renamed when complete, and metadata.json is written last, so an
interrupted run never leaves output that looks complete. A gs:// output is written locally first
and then uploaded (array_record cannot write to gs://).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time

from absl import flags, logging
from etils import epath

from coordtok_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program, so importing this module defines no flags."""
    flags.DEFINE_enum("source", "folder", ["folder", "synthetic"], "What to read.")
    flags.DEFINE_string("input", None, "Root of the class/video tree (--source=folder).")
    flags.DEFINE_string("output", None, "Output directory, local or gs://.")
    flags.DEFINE_integer("num_shards", 8, "Number of ArrayRecord shards.", lower_bound=1)
    flags.DEFINE_integer("height", 128, "Frame height after resize + center crop.", lower_bound=1)
    flags.DEFINE_integer("width", 128, "Frame width after resize + center crop.", lower_bound=1)
    flags.DEFINE_integer("workers", max(1, (os.cpu_count() or 2) - 1), "Decoding processes.", lower_bound=1)
    flags.DEFINE_integer("num_clips", 64, "Clips for --source=synthetic.", lower_bound=1)
    flags.DEFINE_integer("frames", 128, "Frames per clip for --source=synthetic.", lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Replace an existing complete output.")


def _shard_name(i: int, n: int) -> str:
    return f"clips-{i:05d}-of-{n:05d}.array_record"


def _load_folder(job):
    root, rel, label, height, width = job
    from coordtok_jax.data.video_io import decode_frames, resize_center_crop

    try:
        frames = resize_center_crop(decode_frames(epath.Path(root) / rel), height, width)
    except Exception as e:  # noqa: BLE001 - reported and skipped
        return rel, label, None, f"{type(e).__name__}: {e}"
    return rel, label, frames, None


def _load_synthetic(job):
    index, frames, height, width = job
    from coordtok_jax.data.synthetic import synthetic_clip

    video, n = synthetic_clip(0, index, (frames, height, width), min_frames=max(1, frames // 4))
    return f"synthetic/{index:06d}", -1, video[:n], None


def prepare(source: str, input_dir, output: str, num_shards: int, height: int, width: int, workers: int,
            num_clips: int = 64, frames: int = 128, overwrite: bool = False) -> dict:
    from tqdm import tqdm

    from coordtok_jax.data import records
    from coordtok_jax.data.shards import ShardWriter, staging_dir
    from coordtok_jax.data.sources import list_videos

    out = epath.Path(output)
    if (out / "metadata.json").exists() and not overwrite:
        raise FileExistsError(f"{output} already holds a complete dataset (metadata.json); pass --overwrite")
    if source == "folder":
        if not input_dir:
            raise ValueError("--input is required for --source=folder")
        files, classes = list_videos(epath.Path(input_dir))
        jobs = [(str(input_dir), rel, classes.index(rel.split("/")[0]), height, width) for rel in files]
        load = _load_folder
    else:
        classes = []
        jobs = [(i, frames, height, width) for i in range(num_clips)]
        load = _load_synthetic
    num_shards = min(num_shards, len(jobs))

    staging, temporary = staging_dir(out, "coordtok_prepare_")
    writers = [ShardWriter(out, _shard_name(i, num_shards), staging) for i in range(num_shards)]
    failures = []
    total_frames = 0
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(workers) as pool:
            results = pool.imap(load, jobs, chunksize=1)
            for k, (name, label, video, error) in enumerate(tqdm(results, total=len(jobs), unit="video",
                                                                 desc="prepare", file=sys.stdout)):
                if error is not None:
                    logging.warning("skipping %s: %s", name, error)
                    failures.append({"file": name, "error": error})
                    continue
                writers[k % num_shards].write(records.encode_clip(video, label, name))
                total_frames += video.shape[0]
        counts = [w.count for w in writers]
        if sum(counts) == 0:
            raise RuntimeError(f"no video of {input_dir or source} could be decoded; first failures: {failures[:5]}")
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if temporary:
            shutil.rmtree(staging, ignore_errors=True)
    written = sum(counts)
    metadata = dict(
        source=source, input=str(input_dir) if input_dir else None, height=height, width=width,
        num_shards=num_shards, num_clips=written, clips_per_shard=counts, total_frames=total_frames,
        classes=classes, failures=failures, format="coordtok_jax.data.records npz (video, label, name)",
    )
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
    print(f"wrote {written} clips ({total_frames} frames) to {num_shards} shards in {output} "
          f"in {time.time() - start:.1f} s; {len(failures)} unreadable videos skipped")
    return metadata


def main(argv):
    prepare(FLAGS.source, FLAGS.input, FLAGS.output, FLAGS.num_shards, FLAGS.height, FLAGS.width,
            FLAGS.workers, FLAGS.num_clips, FLAGS.frames, FLAGS.overwrite)


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError, RuntimeError), required=("output",))
