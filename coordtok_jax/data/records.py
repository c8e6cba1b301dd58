"""The ArrayRecord record format of pre-decoded clips (written by `prepare`, read by sources).

One record = one whole clip, already resized and center-cropped, stored as an uncompressed .npz:
`video` uint8 (L, H, W, 3), `label` int32 (-1 when unknown) and `name` (the source file).

Records are decoded by grain's reader threads. `np.load` parses each .npy header with
`ast.literal_eval`, and on CPython 3.11 concurrent `ast.parse` calls corrupt the interpreter-wide
AST recursion counter (SystemError "AST constructor recursion depth mismatch", cpython gh-106905;
it also hits whatever other thread parses at that moment, e.g. a traceback being printed).
`load_npz` therefore reads the headers numpy writes without `ast`.
"""

from __future__ import annotations

import io
import re
import struct
import threading
import zipfile

import numpy as np

# The header np.save writes: repr of a dict with sorted keys, then spaces and a newline.
_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': (True|False), 'shape': \(((?:\d+, )*\d*,?)\), \}\s*")
_FALLBACK_LOCK = threading.Lock()  # numpy's own parser, for headers this module did not write


def _read_exactly(f, n: int, member: str) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise ValueError(f"npz member {member!r} is truncated")
    return b


def _read_npy(f, member: str) -> np.ndarray:
    magic = _read_exactly(f, 8, member)
    if magic[:6] != b"\x93NUMPY":
        raise ValueError(f"npz member {member!r} is not a .npy array")
    major = magic[6]
    if major not in (1, 2, 3):
        raise ValueError(f"npz member {member!r}: unknown .npy format version {major}")
    size = 2 if major == 1 else 4
    (hlen,) = struct.unpack("<H" if major == 1 else "<I", _read_exactly(f, size, member))
    raw_header = _read_exactly(f, hlen, member)
    m = _HEADER.fullmatch(raw_header.decode("utf8" if major == 3 else "latin1"))
    if m is None:  # e.g. a structured dtype: let numpy parse it, one thread at a time
        rest = magic + struct.pack("<H" if major == 1 else "<I", hlen) + raw_header + f.read()
        with _FALLBACK_LOCK:
            return np.load(io.BytesIO(rest), allow_pickle=False)
    dtype = np.dtype(m.group(1))
    if dtype.hasobject:
        raise ValueError(f"npz member {member!r} holds Python objects")
    shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    fortran = m.group(2) == "True"
    arr = np.empty(shape[::-1] if fortran else shape, dtype)
    view, got = memoryview(arr.reshape(-1).view(np.uint8)), 0
    while got < arr.nbytes:  # in 256 KiB pieces, as np.load (one huge zip read is slower)
        n = f.readinto(view[got:got + (1 << 18)])
        if not n:
            break
        got += n
    if got != arr.nbytes or f.read(1):  # (reading to the end also checks the member's CRC)
        raise ValueError(f"npz member {member!r}: the data does not match its header ({dtype} {shape})")
    return arr.T if fortran else arr


def load_npz(data: bytes) -> dict:
    """Uncompressed or deflated .npz bytes -> {name: array}, equal to `dict(np.load(...))` but
    safe to call from many threads at once (see the module docstring)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            out = {}
            for name in z.namelist():
                with z.open(name) as f:
                    out[name[:-4] if name.endswith(".npy") else name] = _read_npy(f, name)
            return out
    except zipfile.BadZipFile as e:
        raise ValueError(f"not a readable .npz record ({len(data)} bytes): {e}") from None


def encode_clip(video: np.ndarray, label: int = -1, name: str = "") -> bytes:
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be uint8 (L, H, W, 3), got {video.dtype} {video.shape}")
    buf = io.BytesIO()
    np.savez(buf, video=video, label=np.int32(label), name=np.asarray(name))
    return buf.getvalue()


def decode_clip(data: bytes) -> dict:
    f = load_npz(data)
    return {"video": f["video"], "label": int(f["label"]), "name": str(f["name"])}


def clip_view(data: bytes) -> dict:
    """`decode_clip` without copying the frames: the video of a stored (uncompressed) record, as
    `encode_clip` writes it, is a read-only view into `data`, so a reader copies only the window
    it keeps. Deflated or unusual records fall back to `decode_clip`. (The ArrayRecord reader has
    already checked the record's chunk hashes; the zip member's CRC is not recomputed here.)"""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            info = z.getinfo("video.npy")
            small = {n[:-4]: _read_npy(z.open(n), n) for n in ("label.npy", "name.npy")}
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"not a readable clip record ({len(data)} bytes): {e}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return decode_clip(data)
    local = info.header_offset
    if data[local:local + 4] != b"PK\x03\x04":
        raise ValueError("clip record: bad local header of video.npy")
    name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
    start = local + 30 + name_len + extra_len
    magic = data[start:start + 8]
    if magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        return decode_clip(data)
    size = 2 if magic[6] == 1 else 4
    (hlen,) = struct.unpack("<H" if size == 2 else "<I", data[start + 8:start + 8 + size])
    m = _HEADER.fullmatch(data[start + 8 + size:start + 8 + size + hlen].decode("latin1"))
    if m is None or m.group(2) == "True":
        return decode_clip(data)
    dtype = np.dtype(m.group(1))
    shape = tuple(int(d) for d in m.group(3).replace(" ", "").split(",") if d)
    offset = start + 8 + size + hlen
    count = int(np.prod(shape)) if shape else 1
    if dtype.hasobject or offset + count * dtype.itemsize > len(data) or \
            count * dtype.itemsize != info.file_size - (8 + size + hlen):
        raise ValueError(f"clip record: video.npy does not match its header ({dtype} {shape})")
    video = np.frombuffer(data, dtype, count, offset).reshape(shape)
    return {"video": video, "label": int(small["label"]), "name": str(small["name"])}
