"""The ArrayRecord record format of pre-decoded clips (written by `prepare`, read by sources).

One record = one whole clip, already resized and center-cropped, stored as an uncompressed .npz:
`video` uint8 (L, H, W, 3), `label` int32 (-1 when unknown) and `name` (the source file).
"""

from __future__ import annotations

import io

import numpy as np


def encode_clip(video: np.ndarray, label: int = -1, name: str = "") -> bytes:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (L, H, W, 3), got {video.dtype} {video.shape}")
    buf = io.BytesIO()
    np.savez(buf, video=video, label=np.int32(label), name=np.asarray(name))
    return buf.getvalue()


def decode_clip(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {"video": f["video"], "label": int(f["label"]), "name": str(f["name"])}
