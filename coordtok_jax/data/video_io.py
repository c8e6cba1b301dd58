"""Video decoding (PyAV) and the official per-frame preprocessing.

Official (tools/datasets.py): every frame goes through PIL bicubic `Resize(size)` of the shorter
side (torchvision rule: long side = int(size * long / short)) and `CenterCrop(size)`
(top = round((h - size) / 2)), then ToTensor. `resize_center_crop` does exactly that for square
targets; for H != W it resizes so the frame covers (H, W) and center-crops the same way.
"""

from __future__ import annotations

from typing import BinaryIO, Union

import numpy as np
from etils import epath
from PIL import Image

PathLike = Union[str, epath.PathLike]
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


def decode_frames(source: Union[PathLike, BinaryIO], max_frames: int | None = None) -> np.ndarray:
    """All frames (or the first max_frames) of a video file as uint8 (L, h, w, 3) RGB.

    `source` is a local or gs:// path (read through etils.epath) or an open binary file.
    Raises ValueError for a file without a decodable video stream or without frames.
    """
    import av

    def _decode(fileobj) -> list:
        with av.open(fileobj, mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
            return frames

    if hasattr(source, "read"):
        frames = _decode(source)
    else:
        try:
            with epath.Path(source).open("rb") as f:
                frames = _decode(f)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, av.error.FFmpegError) as e:  # an empty, truncated or non-video file
            raise ValueError(f"{source}: not a readable video ({type(e).__name__}: {e})") from e
    if not frames:
        raise ValueError("no decodable frames" if hasattr(source, "read") else f"{source}: no decodable frames")
    return np.stack(frames)


def resized_shape(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Size after resizing (h, w) so that it covers (out_h, out_w), torchvision's int() rule."""
    if h * out_w <= w * out_h:  # height is the limiting side (the shorter side for square outputs)
        return out_h, max(out_w, int(out_h * w / h))
    return max(out_h, int(out_w * h / w)), out_w


def resize_center_crop(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 (L, h, w, 3) -> uint8 (L, out_h, out_w, 3): PIL bicubic resize, then center crop."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (L, h, w, 3), got shape {frames.shape}")
    _, h, w, _ = frames.shape
    rh, rw = resized_shape(h, w, out_h, out_w)
    top = int(round((rh - out_h) / 2.0))
    left = int(round((rw - out_w) / 2.0))
    out = np.empty((frames.shape[0], out_h, out_w, 3), np.uint8)
    for i, frame in enumerate(frames):
        img = Image.fromarray(frame)
        if (rh, rw) != (h, w):
            img = img.resize((rw, rh), Image.BICUBIC)
        out[i] = np.asarray(img)[top : top + out_h, left : left + out_w]
    return out


def crop_box(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) in the (h, w) input of the region `resize_center_crop` keeps."""
    rh, rw = resized_shape(h, w, out_h, out_w)
    top, left = int(round((rh - out_h) / 2.0)), int(round((rw - out_w) / 2.0))
    sy, sx = h / rh, w / rw
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    return y0, x0, min(h - y0, int(round(out_h * sy))), min(w - x0, int(round(out_w * sx)))


def resize(frames: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 (L, h, w, 3) -> uint8 (L, out_h, out_w, 3), PIL bicubic (no crop)."""
    if frames.shape[1:3] == (out_h, out_w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((out_w, out_h), Image.BICUBIC)) for f in frames])


def decode_window(source: PathLike, num_frames: int, start: int | None, rng: np.random.Generator | None):
    """`take_window(decode_frames(source), num_frames, start, rng)` without decoding the whole file.

    The clip length comes from the container (the stream's frame count); the start is drawn
    exactly as take_window draws it; the decoder seeks to the key frame at or before the window
    and decodes until the window is complete, so a window costs at most one group of pictures
    plus `num_frames` decoded frames, not the clip. Frame positions are read from the
    presentation timestamps. Clips shorter than the window (the whole clip, padded), files whose
    container does not state its frame count, and any window the seek does not reproduce frame
    for frame (timestamps that are not consecutive frame positions) decode the whole file: the
    result is always the frames a full decode gives. (A container that overstates its frame count
    could move where random windows may start; the window's frames are still the file's.)
    """
    import av

    def _window(fileobj):
        with av.open(fileobj, mode="r") as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            length, rate = int(stream.frames or 0), stream.average_rate
            if length <= 0 or not rate or stream.time_base is None:
                return None
            if length < num_frames:
                return None  # a short clip is the whole clip: nothing to skip
            first = start
            if first is None:
                first = int(rng.integers(0, length - num_frames + 1)) if rng is not None else 0
            first = min(max(int(first), 0), length - num_frames)
            origin = stream.start_time or 0
            if first > 0:
                container.seek(origin + int(first / (rate * stream.time_base)), stream=stream, backward=True)
            stream.thread_type = "AUTO"
            frames, expected = [], first
            for frame in container.decode(stream):
                if frame.pts is None:
                    return None
                index = round(float((frame.pts - origin) * stream.time_base * rate))
                if index < expected:
                    continue
                if index != expected:  # a gap or a timestamp that is not a frame position
                    return None
                frames.append(frame.to_ndarray(format="rgb24"))
                expected += 1
                if len(frames) == num_frames:
                    return np.stack(frames), num_frames
            return None

    try:
        with epath.Path(source).open("rb") as f:
            window = _window(f)
    except (OSError, ValueError, av.error.FFmpegError):
        window = None  # decode_frames below names the file and the cause
    if window is not None:
        return window
    return take_window(decode_frames(source), num_frames, start, rng)


def take_window(frames: np.ndarray, num_frames: int, start: int | None, rng: np.random.Generator | None):
    """A num_frames window of a clip -> (uint8 (num_frames, H, W, 3), n_frames).

    Clips of at least num_frames frames: the window at `start` (or a uniformly random start from
    `rng`, like the official random.randint(0, L - T)). Shorter clips: the whole clip, padded with
    zero frames after n_frames = L.
    """
    length = frames.shape[0]
    if length >= num_frames:
        if start is None:
            start = int(rng.integers(0, length - num_frames + 1)) if rng is not None else 0
        start = min(max(int(start), 0), length - num_frames)
        return frames[start : start + num_frames], num_frames
    pad = np.zeros((num_frames - length,) + frames.shape[1:], np.uint8)
    return np.concatenate([frames, pad]), length


def write_video(path: PathLike, frames: np.ndarray, fps: int = 8) -> None:
    """uint8 (L, H, W, 3) -> an H.264 mp4 at `path` (local or gs://; written locally, then copied).

    Odd sizes are padded by one pixel (yuv420p needs even sizes).
    """
    import shutil
    import tempfile

    import av

    frames = np.asarray(frames, np.uint8)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    out = epath.Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/video.mp4"
        with av.open(local, mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst)
