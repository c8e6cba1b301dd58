"""`config.data`: which clips, and how the grain pipeline reads them (the defaults of every config
script), and the synthetic data of the CPU recipes."""

from __future__ import annotations

import ml_collections

# The synthetic clips of the CPU-scale recipes (configs/coordtok.py:cpu and configs/sit.py:cpu):
# flat shapes on flat backgrounds, moving slowly (measured: benchmarks/RESULTS.md, "a CPU recipe").
CPU_DATA = {"data.synthetic_texture": 0.0, "data.synthetic_motion": 0.15}


def _optional_str():
    return ml_collections.FieldReference(None, field_type=str)


def data_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic | folder | array_record | tfds
    d.seed = 0  # shuffle and random windows
    d.pad_value = -3.0  # official: frames past n_frames are -1 in [0, 1] space, -3 after v*2-1
    d.min_frames = 29
    # synthetic: procedural clips, deterministic per (synthetic_seed, index)
    d.num_clips = 10_000
    d.synthetic_seed = 0
    d.synthetic_texture = 1.0  # 0 = flat backgrounds and shapes (same layout and motion)
    d.synthetic_motion = 1.0  # scales pan, velocities and spin (0 = still pictures)
    d.synthetic_max_shapes = 3  # shapes per clip: 1 .. max_shapes
    d.synthetic_centered = False  # every shape starts at the frame's centre
    # label each clip with the kind of its largest shape (0 disc, 1 square, 2 ring; else -1): the
    # classes of a class-conditional SiT (configs/sit.py:cpu,classes=shapes)
    d.synthetic_labels = False
    # a fraction of the clips moves at synthetic_fast_motion instead (a static / dynamic mix)
    d.synthetic_fast_fraction = 0.0
    d.synthetic_fast_motion = 1.0
    # folder: root/class/*.avi|mp4|..., decoded with PyAV; eval_list = 'relative/path [start]' lines
    d.root = _optional_str()
    d.eval_list = _optional_str()
    # array_record: a directory of *.array_record shards (or a glob), local or gs://
    d.path = _optional_str()
    d.allow_resize = False  # prepared shards at another resolution than the model: error unless True
    # tfds: tfds.data_source(name, split, data_dir)
    d.name = _optional_str()
    d.split = "train"
    d.eval_split = "test"
    d.data_dir = _optional_str()
    d.video_key = "video"
    d.label_key = "label"
    # grain
    d.num_workers = 0  # worker processes (0 = in-process)
    d.worker_buffer_size = 2
    d.read_threads = 4
    d.prefetch = 8
    d.max_consecutive_failures = 64
    return d
