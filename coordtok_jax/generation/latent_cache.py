"""The latent cache: a frozen tokenizer's triplanes of many clips in ArrayRecord shards.

Written by `python -m coordtok_jax.encode_latents`, read by `train_sit` with
`--config.latents=DIR` (the SiT then trains without running the tokenizer).

Layout of DIR:
* `latents-SSSSS-of-NNNNN.array_record`: one record per clip, an uncompressed .npz with the
  planes `xy` (Rxy, Rxy, C), `yt` and `xt` (Rt, Rxy, C) in float32 (channel-last, as
  `CoordTok.encode` returns them, not normalised), `label` int32 (-1 when unknown) and `clip`
  int64 (the clip's index in the encoding order: record `clip % len(source)`, window drawn by
  (data seed, clip)).
* A cache encoded with `--token_budget` (a nested-token tokenizer, issue 17) also stores `levels`
  (blocks,) int32 per clip: the temporal blocks' token levels (indices into the tokenizer's
  config.model.token_levels; a block's kept cells are models/nested.py's `kept[level]`), and its
  planes are as decoded at those levels (dropped cells filled). spec.json records the budget.
* `spec.json`: what is being encoded (tokenizer, its step, plane shapes, data config, clip count,
  shards), written first; a resumed run must match it.
* `metadata.json`: the spec plus the counts, written last: its presence marks a complete cache.
"""

from __future__ import annotations

import io
import json
from typing import Optional

import numpy as np
from etils import epath

from coordtok_jax.data.pipeline import batched
from coordtok_jax.data.records import load_npz
from coordtok_jax.data.shards import LazyRecords
from coordtok_jax.data.sources import DataError

PLANES = ("xy", "yt", "xt")
# config.data fields that say how to read, not what: not part of a cache's identity (spec.json),
# and a run training from a cache keeps its own.
DATA_IO_KEYS = ("read_threads", "prefetch", "num_workers", "worker_buffer_size")
FORMAT = "coordtok_jax latent cache v1: npz (xy, yt, xt float32 channel-last; label int32; clip int64)"


def shard_name(i: int, n: int) -> str:
    return f"latents-{i:05d}-of-{n:05d}.array_record"


def encode_planes(planes, label: int, clip: int, levels=None) -> bytes:
    """One clip's three planes (each (R1, R2, C)) -> record bytes; `levels` (blocks,) int: the
    per-block token levels of a budgeted cache (the planes are then as decoded at those levels)."""
    if len(planes) != 3:
        raise ValueError(f"expected three planes (xy, yt, xt), got {len(planes)}")
    arrays = {k: np.asarray(z, np.float32) for k, z in zip(PLANES, planes)}
    for k, z in arrays.items():
        if z.ndim != 3:
            raise ValueError(f"plane {k} must be (R1, R2, C), got {z.shape}")
    buf = io.BytesIO()
    extra = {} if levels is None else {"levels": np.asarray(levels, np.int32)}
    np.savez(buf, **arrays, label=np.int32(label), clip=np.int64(clip), **extra)
    return buf.getvalue()


def decode_planes(data: bytes) -> dict:
    """Record bytes -> {'xy', 'yt', 'xt': float32 arrays, 'label': int32, 'clip': int64} (+ 'levels'
    (blocks,) int32 in a budgeted cache)."""
    f = load_npz(data)
    out = {k: f[k] for k in PLANES}
    out["label"], out["clip"] = np.int32(f["label"]), np.int64(f["clip"])
    if "levels" in f:
        out["levels"] = f["levels"]
    return out


def read_metadata(path) -> dict:
    """metadata.json of a complete cache, with a clear error when DIR is not one."""
    root = epath.Path(path)
    meta = root / "metadata.json"
    if not meta.exists():
        why = ("encode_latents did not finish: run the same command again to resume"
               if (root / "spec.json").exists() else "not a latent cache (no metadata.json)")
        raise DataError(f"latent cache {path}: {why}")
    try:
        m = json.loads(meta.read_text())
        m["plane_shapes"] = [tuple(s) for s in m["plane_shapes"]]
        m["num_shards"], m["num_clips"] = int(m["num_shards"]), int(m["num_clips"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"latent cache {meta}: unreadable metadata ({type(e).__name__}: {e})") from None
    return m


class LatentSource:
    """Random access to the records of a complete cache (grain MapDataset source; picklable)."""

    def __init__(self, path):
        self.path = str(path)
        self.metadata = read_metadata(path)
        n = self.metadata["num_shards"]
        self.paths = [str(epath.Path(path) / shard_name(i, n)) for i in range(n)]
        missing = [p for p in self.paths if not epath.Path(p).exists()]
        if missing:
            raise DataError(f"latent cache {path}: {len(missing)} of {n} shards are missing, e.g. {missing[0]}")
        self._records = LazyRecords(self.paths)
        if len(self._records) != self.metadata["num_clips"]:
            raise DataError(f"latent cache {path}: the shards hold {len(self._records)} records, metadata.json "
                            f"says {self.metadata['num_clips']}")

    def __len__(self):
        return self.metadata["num_clips"]

    def __getitem__(self, i):
        return decode_planes(self._records[i])


class _Check:
    """Decoded record -> the record, after checking its plane shapes against the metadata."""

    def __init__(self, path: str, plane_shapes):
        self.path, self.shapes = path, [tuple(s) for s in plane_shapes]

    def __call__(self, rec: dict) -> dict:
        for k, want in zip(PLANES, self.shapes):
            if rec[k].shape != want:
                raise DataError(f"latent cache {self.path}: clip {int(rec['clip'])} plane {k} is {rec[k].shape}, "
                                f"metadata.json says {want}")
        return rec


def make_latent_dataset(path, batch_size: int, *, seed: int = 0, data_options=None,
                        process_index: Optional[int] = None, process_count: Optional[int] = None):
    """Per-host training batches {'xy', 'yt', 'xt': (B, R1, R2, C) float32, 'label', 'clip'}
    of a cache: records strided over hosts, shuffled with `seed` (re-drawn every epoch),
    repeated forever. A grain iterator, so `get_state()`/`set_state()` checkpoint its position."""
    import grain

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = LatentSource(path)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if len(ds) == 0:
        raise DataError(f"latent cache {path}: host {process_index} of {process_count} gets no records "
                        f"({len(source)} clips)")
    ds = ds.shuffle(seed=int(seed)).repeat().map(_Check(str(path), source.metadata["plane_shapes"]))
    return batched(ds, data_options, batch_size, drop_remainder=True)


def make_sampled_latents(path, num_clips: int, batch_size: int, *, seed: int = 0, data_options=None,
                         process_index: Optional[int] = None, process_count: Optional[int] = None):
    """ceil(num_clips / process_count) records per host drawn uniformly with replacement (fixed by
    (seed, host)), in batches (the last may be shorter): the clips of the latent statistics."""
    import grain

    if num_clips <= 0 or batch_size <= 0:
        raise ValueError(f"num_clips and batch_size must be positive, got {num_clips}, {batch_size}")
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = LatentSource(path)
    local = -(-int(num_clips) // int(process_count))
    picks = np.random.default_rng([int(seed), int(process_index)]).integers(0, len(source), local)
    ds = grain.MapDataset.source(picks.tolist()).map(source.__getitem__)
    ds = ds.map(_Check(str(path), source.metadata["plane_shapes"]))
    return batched(ds, data_options, batch_size, drop_remainder=False)
