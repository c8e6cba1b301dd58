"""Random-access clip sources behind `config.data.source`.

Every source has `__len__`, `name` (for messages), `describe(i)` (what record i is: a file, a
record of a shard) and `load(i, rng) -> {'video': uint8 (T, H, W, 3), 'n_frames': int, 'label': int}`,
where `rng` (a NumPy Generator, deterministic per stream position) picks the random window.
Sources are picklable so grain worker processes can use them; file handles open lazily.
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np
from etils import epath

from coordtok_jax.data import records
from coordtok_jax.data.shards import LazyRecords
from coordtok_jax.data.synthetic import clip_motion, synthetic_clip
from coordtok_jax.data.video_io import VIDEO_EXTENSIONS, decode_window, resize_center_crop, take_window
from coordtok_jax.errors import UserError
from coordtok_jax.remote import check_reachable


class DataError(UserError, RuntimeError):
    """A data source that cannot produce clips; the message names the source and why."""


def _fit(frames: np.ndarray, shape, start, rng):
    """Resize/crop when needed, then take the T-frame window."""
    T, H, W = shape
    if frames.shape[1:3] != (H, W):
        frames = resize_center_crop(frames, H, W)
    video, n = take_window(frames, T, start, rng)
    return video, n


class SyntheticSource:
    """Procedural clips, deterministic per (seed, index) (data/synthetic.py)."""

    def __init__(self, shape, num_clips: int, seed: int, min_frames: Optional[int] = None, short_fraction: float = 0.25,
                 texture: float = 1.0, motion: float = 1.0, max_shapes: int = 3,
                 centered: bool = False, fast_fraction: float = 0.0, fast_motion: float = 1.0,
                 labels: bool = False):
        if num_clips <= 0:
            raise DataError(f"synthetic: config.data.num_clips must be positive, got {num_clips}")
        self.shape, self.num_clips, self.seed = tuple(shape), int(num_clips), int(seed)
        self.min_frames, self.short_fraction, self.texture = min_frames, short_fraction, float(texture)
        self.motion, self.max_shapes, self.centered = float(motion), int(max_shapes), bool(centered)
        self.fast_fraction, self.fast_motion = float(fast_fraction), float(fast_motion)
        self.labels = bool(labels)  # label = the kind of the clip's largest shape (else -1)
        clip_motion(self.seed, 0, self.motion, self.fast_fraction, self.fast_motion)  # checks the fraction
        self.name = f"synthetic(seed={seed}, {num_clips} clips)"

    def __len__(self):
        return self.num_clips

    def describe(self, i):
        return f"synthetic clip {i}"

    def motion_of(self, i) -> float:
        """Clip i's motion scale (config.data.synthetic_motion, or _fast_motion for a fraction)."""
        return clip_motion(self.seed, i, self.motion, self.fast_fraction, self.fast_motion)

    def load(self, i, rng):
        del rng  # deterministic per index
        video, n, label = synthetic_clip(self.seed, i, self.shape, min_frames=self.min_frames,
                                         short_fraction=self.short_fraction, texture=self.texture,
                                         motion=self.motion_of(i), max_shapes=self.max_shapes,
                                         centered=self.centered, with_label=True)
        return {"video": video, "n_frames": n, "label": label if self.labels else -1}


def list_videos(root: epath.Path, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> tuple[list[str], list[str]]:
    """UCF-101-style tree root/class/file -> (sorted relative paths, sorted class names)."""
    root = epath.Path(root)
    if not root.is_dir():
        raise DataError(f"folder: config.data.root={str(root)!r} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    files = sorted(
        str(p.relative_to(root)) for p in root.glob("*/*") if p.suffix.lower() in exts and not p.is_dir()
    )
    if not files:
        raise DataError(f"folder: no video files ({', '.join(exts)}) under {str(root)!r}/CLASS/")
    classes = sorted({f.split("/")[0] for f in files})
    return files, classes


class FolderSource:
    """Video files under root/class/*.ext, decoded with PyAV.

    Train: a random T-frame window per draw. Eval (`list_file`): lines `relative/path.avi [start]`
    give fixed windows (start 0 when omitted); labels follow the sorted class folders.
    """

    def __init__(self, root, shape, list_file: Optional[str] = None, extensions: Sequence[str] = VIDEO_EXTENSIONS):
        self.root = epath.Path(root)
        self.shape = tuple(shape)
        files, self.classes = list_videos(self.root, extensions)
        self.starts: list[Optional[int]]
        if list_file:
            lines = [ln.split() for ln in epath.Path(list_file).read_text().splitlines() if ln.strip()]
            bad = [ln for ln in lines if len(ln) > 2 or (len(ln) == 2 and not ln[1].lstrip("-").isdigit())]
            if bad:
                raise DataError(f"folder: {list_file}: expected 'relative/path [start]' per line, got {bad[:3]}")
            self.files = [ln[0] for ln in lines]
            self.starts = [int(ln[1]) if len(ln) == 2 else 0 for ln in lines]
            missing = sorted(set(self.files) - set(files))
            if missing:
                raise DataError(f"folder: {len(missing)} files of {list_file} are not under {str(self.root)!r}: {missing[:5]}")
        else:
            self.files = files
            self.starts = [None] * len(files)
        self.name = f"folder({str(self.root)!r}, {len(self.files)} videos)"

    def __len__(self):
        return len(self.files)

    def describe(self, i):
        return str(self.root / self.files[i])

    def load(self, i, rng):
        rel = self.files[i]
        T, H, W = self.shape
        video, n = decode_window(self.root / rel, T, self.starts[i], rng)  # seeks to the window
        if video.shape[1:3] != (H, W):
            video = resize_center_crop(video, H, W)
        return {"video": video, "n_frames": n, "label": self.classes.index(rel.split("/")[0])}


def shard_paths(path: str) -> list[str]:
    """ArrayRecord shards from a directory (its *.array_record files) or a glob, sorted."""
    check_reachable(path, "config.data.path")
    p = epath.Path(path)
    if p.is_dir():
        paths = sorted(str(x) for x in p.glob("*.array_record"))
    else:
        paths = sorted(str(x) for x in p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else (
            [str(p)] if p.exists() else [])
    if not paths:
        raise DataError(f"array_record: no *.array_record shards at config.data.path={path!r}")
    return paths


class ArrayRecordSource:
    """Pre-decoded clips (data/records.py format) in ArrayRecord shards, local or gs://."""

    def __init__(self, path: str, shape, allow_resize: bool = False):
        self.path = path
        self.shape = tuple(shape)
        self.allow_resize = bool(allow_resize)
        self.paths = shard_paths(path)
        self._records = LazyRecords(self.paths)
        self._len = len(self._records)
        meta_path = epath.Path(self.paths[0]).parent / "metadata.json"
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); re-run coordtok_jax.prepare") from e
        self.classes = meta.get("classes", [])
        self.name = f"array_record({path!r}, {len(self.paths)} shards, {self._len} clips)"
        if meta.get("height") and meta.get("width"):
            self._check_resolution((int(meta["height"]), int(meta["width"])), str(meta_path))

    def _check_resolution(self, hw, where: str) -> None:
        """Prepared shards at another resolution than the model's are an error (they were prepared
        for another config) unless config.data.allow_resize says to resize them on the fly."""
        if tuple(hw) != self.shape[1:] and not self.allow_resize:
            raise DataError(
                f"{where}: the prepared clips are {hw[0]}x{hw[1]} but the model takes {self.shape[1]}x{self.shape[2]}; "
                f"prepare them at --height={self.shape[1]} --width={self.shape[2]}, or set "
                f"--config.data.allow_resize=True to resize every clip while training")

    def __len__(self):
        return self._len

    def describe(self, i):
        return f"record {i} of {self.path}"

    def load(self, i, rng):
        clip = records.clip_view(self._records[i])  # the frames stay in the record's bytes ...
        self._check_resolution(clip["video"].shape[1:3], self.describe(i))
        video, n = _fit(clip["video"], self.shape, None, rng)
        return {"video": np.array(video), "n_frames": n, "label": clip["label"]}  # ... but the window


class TfdsSource:
    """Any TFDS dataset with a video feature, through `tfds.data_source` (ArrayRecord format)."""

    def __init__(self, name: str, split: str, shape, data_dir: Optional[str] = None,
                 video_key: str = "video", label_key: Optional[str] = "label"):
        import tensorflow_datasets as tfds

        self.shape = tuple(shape)
        self.dataset, self.split, self.data_dir = name, split, data_dir
        self.video_key, self.label_key = video_key, label_key
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        except Exception as e:  # noqa: BLE001 - re-raised with what was asked for
            raise DataError(f"tfds: cannot open {name!r} split {split!r} in data_dir={data_dir!r}: {e}") from e
        self.name = f"tfds({name}, {split}, {len(self._source)} clips)"

    def __len__(self):
        return len(self._source)

    def describe(self, i):
        return f"{self.dataset}/{self.split}[{i}]"

    def load(self, i, rng):
        example = self._source[i]
        if self.video_key not in example:
            raise DataError(f"tfds: {self.dataset} has no feature {self.video_key!r} (config.data.video_key); "
                            f"features: {sorted(example)}")
        frames = np.asarray(example[self.video_key])
        if frames.dtype != np.uint8 or frames.ndim != 4:
            raise ValueError(f"feature {self.video_key!r} is {frames.dtype} {frames.shape}, expected uint8 (L, h, w, 3)")
        if frames.shape[0] == 0:
            raise ValueError("zero frames")
        video, n = _fit(frames, self.shape, None, rng)
        label = int(example[self.label_key]) if self.label_key and self.label_key in example else -1
        return {"video": video, "n_frames": n, "label": label}


def make_source(data, shape, *, train: bool = True):
    """The source named by config.data.source for clips of `shape` = (T, H, W)."""
    kind = data.source
    if kind == "synthetic":
        # the held-out split is another seed (clips are a function of (seed, index))
        seed = data.get("synthetic_seed", 0) + (0 if train else 1)
        return SyntheticSource(shape, data.num_clips, seed, data.get("min_frames"),
                               texture=data.get("synthetic_texture", 1.0),
                               motion=data.get("synthetic_motion", 1.0),
                               max_shapes=data.get("synthetic_max_shapes", 3),
                               centered=data.get("synthetic_centered", False),
                               fast_fraction=data.get("synthetic_fast_fraction", 0.0),
                               fast_motion=data.get("synthetic_fast_motion", 1.0),
                               labels=data.get("synthetic_labels", False))
    if kind == "folder":
        return FolderSource(data.root, shape, None if train else data.get("eval_list"))
    if kind == "array_record":
        return ArrayRecordSource(data.path, shape, data.get("allow_resize", False))
    if kind == "tfds":
        return TfdsSource(data.name, data.split if train else data.get("eval_split", data.split), shape,
                          data.get("data_dir"), data.get("video_key", "video"), data.get("label_key", "label"))
    raise DataError(f"config.data.source must be one of synthetic, folder, array_record, tfds; got {kind!r}")
