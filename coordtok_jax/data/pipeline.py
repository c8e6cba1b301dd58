"""grain input pipeline: per-host batches {'video': uint8 (B, T, H, W, 3), 'n_frames': int32 (B,),
'label': int32 (B,), 'decode_failures': int32 (B,)}.

* Deterministic: the shuffle is seeded by config.data.seed and re-drawn every epoch; the random
  window of element k of the stream comes from a generator seeded by (seed, host, k).
* Per host: the records are strided over `jax.process_index() / jax.process_count()`.
* Workers and prefetch from config.data (num_workers=0 keeps everything in-process).
* The iterator has `get_state()` / `set_state()`; the trainer stores the state in its checkpoint
  and restoring it yields exactly the same next batches.
* Bad input never stops training: a record that fails to load (unreadable, truncated, empty or
  zero-frame file) is logged once, by name, and replaced by a random other record (drawn from a
  generator seeded by (seed, host, k, attempt), so the stream stays deterministic and no
  neighbour of a bad file is over-drawn). Each clip carries in 'decode_failures' how many
  records were skipped to produce it and in 'failed_records' (MAX_REPORTED,) their indices
  (-1 = none), from which the trainer counts distinct bad files. If `max_consecutive_failures`
  records in a row fail, DataError names the source and the first failures.
"""

from __future__ import annotations

import logging
from typing import Optional

import grain
import numpy as np

from coordtok_jax.data.sources import DataError, make_source

log = logging.getLogger(__name__)
_WARNED: set = set()
MAX_REPORTED = 4  # failed record indices carried per clip (the count in 'decode_failures' is exact)


class ClipLoader:
    """map_with_index transform: stream position k, record index i -> clip dict."""

    def __init__(self, source, seed: int, host: int, max_consecutive_failures: int = 64):
        self.source = source
        self.seed = int(seed)
        self.host = int(host)
        self.max_failures = max(1, min(int(max_consecutive_failures), len(source)))

    def __call__(self, position: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, self.host, int(position)])
        failures, failed = [], []
        n = len(self.source)
        i = int(index)
        for k in range(self.max_failures):
            if k:  # a random other record replaces a bad one (deterministic per seed, host, position)
                draw = np.random.default_rng([self.seed, self.host, int(position), k])
                i = int(draw.integers(0, n - 1)) if n > 1 else 0
                i = i + (i >= int(index)) if n > 1 else i
            try:
                clip = self.source.load(i, rng)
            except DataError:
                raise
            except Exception as e:  # noqa: BLE001 - any bad file is skipped and counted
                what = self.source.describe(i)
                failures.append(f"{what}: {type(e).__name__}: {e}")
                failed.append(i)
                if what not in _WARNED:
                    _WARNED.add(what)
                    log.warning("skipping unreadable clip %s (%s: %s)", what, type(e).__name__, e)
                continue
            return {
                "video": np.asarray(clip["video"], np.uint8),
                "n_frames": np.int32(clip["n_frames"]),
                "label": np.int32(clip.get("label", -1)),
                "decode_failures": np.int32(k),
                "failed_records": np.array((failed + [-1] * MAX_REPORTED)[:MAX_REPORTED], np.int32),
            }
        raise DataError(
            f"{self.source.name}: {len(failures)} records in a row failed to load; first failures:\n  "
            + "\n  ".join(failures[:5])
        )


def distinct_count(bad_files: set) -> int:
    """Distinct unreadable records seen by this host, summed over hosts (each host reads its own
    stride of the records; a replacement drawn from another host's stride may count twice)."""
    import jax

    if jax.process_count() == 1:
        return len(bad_files)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(len(bad_files)))))


def make_dataset(
    data,
    video_shape,
    batch_size: int,
    *,
    train: bool = True,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.IterDataset:
    """The per-host batched dataset for config.data and clips of video_shape = (T, H, W)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = make_source(data, tuple(video_shape), train=train)
    ds = grain.MapDataset.range(len(source))[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"{source.name}: host {process_index} of {process_count} gets no records")
    if train:
        ds = ds.shuffle(seed=int(data.seed)).repeat()
    ds = ds.map_with_index(ClipLoader(source, data.seed, process_index, data.get("max_consecutive_failures", 64)))
    return batched(ds, data, batch_size, drop_remainder=train)


def batched(ds: grain.MapDataset, data, batch_size: int, *, drop_remainder: bool) -> grain.IterDataset:
    """A MapDataset read with config.data's threads / prefetch, batched, optionally through
    `num_workers` worker processes (the last step of every pipeline here)."""
    data = data or {}
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data.get("read_threads", 4)),
                                              prefetch_buffer_size=int(data.get("prefetch", 8))))
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if int(data.get("num_workers", 0)) > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=int(data.num_workers), per_worker_buffer_size=int(data.get("worker_buffer_size", 2))))
    return it


def make_sampled_dataset(
    data,
    video_shape,
    num_clips: int,
    batch_size: int,
    *,
    seed: int = 0,
    train: bool = False,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> grain.IterDataset:
    """`num_clips` clips drawn uniformly with replacement from the (eval) split, as the paper's
    evaluation protocol (random videos, random windows), in batches of `batch_size` (the last
    may be shorter). Each host draws ceil(num_clips / process_count) clips, so every host yields
    the same number of batches; the draw is fixed by (seed, host)."""
    if num_clips <= 0 or batch_size <= 0:
        raise ValueError(f"num_clips and batch_size must be positive, got {num_clips}, {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = make_source(data, tuple(video_shape), train=train)
    if len(source) == 0:
        raise DataError(f"{source.name}: no records to evaluate on")
    local = -(-int(num_clips) // int(process_count))
    records = np.random.default_rng([int(seed), int(process_index)]).integers(0, len(source), local)
    ds = grain.MapDataset.source(records.tolist())
    ds = ds.map_with_index(ClipLoader(source, seed, process_index, data.get("max_consecutive_failures", 64)))
    return batched(ds, data, batch_size, drop_remainder=False)
