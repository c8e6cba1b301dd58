"""Small video files for the data tests, written with PyAV."""

from __future__ import annotations

import pathlib

import av
import numpy as np


def moving_frames(length: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 (length, height, width, 3): a bright square moving over a smooth gradient."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(40, 200, size=3)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((length, height, width, 3), np.uint8)
    for t in range(length):
        img = base + 30 * np.sin(xx / width * 6 + t * 0.2)[..., None] + 20 * np.cos(yy / height * 4)[..., None]
        y0, x0 = (t * 2) % max(1, height - 8), (t * 3) % max(1, width - 8)
        img[y0 : y0 + 8, x0 : x0 + 8] = 250
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def write_video(path, frames: np.ndarray, codec: str = "mpeg4", fps: int = 25, gop: int = 0) -> pathlib.Path:
    """`gop` > 0: a key frame every `gop` frames (so that seeking lands inside the clip)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if codec == "mpeg4":
            stream.options = {"qscale": "1"}  # near-lossless, so decoded frames are close to the input
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_empty_video(path) -> pathlib.Path:
    """A valid container with a video stream and no frames."""
    path = pathlib.Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.height, stream.width = 16, 16
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_tree(root, lengths=(40, 24, 12), size=(48, 64), codecs=("mpeg4", "libx264")) -> dict:
    """root/class_a/*.mp4, root/class_b/*.avi; returns {relative path: frames written}."""
    root = pathlib.Path(root)
    written = {}
    for k, length in enumerate(lengths):
        cls = "class_a" if k % 2 == 0 else "class_b"
        ext = ".mp4" if k % 2 == 0 else ".avi"
        rel = f"{cls}/v{k:02d}{ext}"
        frames = moving_frames(length, size[0], size[1], seed=k)
        write_video(root / rel, frames, codecs[k % len(codecs)] if ext == ".mp4" else "mpeg4")
        written[rel] = frames
    return written


def add_corrupt_files(root) -> list[str]:
    """Truncated, empty, not-a-video and zero-frame files among the good ones."""
    root = pathlib.Path(root)
    good = sorted(root.glob("*/*.mp4"))[0].read_bytes()
    bad = {
        "class_a/truncated.mp4": good[: len(good) // 3],
        "class_b/empty.avi": b"",
        "class_b/text.mp4": b"this is not a video\n" * 10,
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    write_empty_video(root / "class_a/zero_frames.mp4")
    return sorted(list(bad) + ["class_a/zero_frames.mp4"])
