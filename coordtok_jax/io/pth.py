"""Torch-free reader of PyTorch checkpoint files (`torch.save` output) into NumPy arrays.

Both serialisation formats are read:

* zip (torch >= 1.6 default): `<top>/data.pkl` (the pickled object, storages as persistent ids
  `('storage', storage_type, key, location, numel)`), `<top>/data/<key>` (raw storage bytes) and
  `<top>/byteorder`; the top folder name varies with the file name, so it is looked up.
* legacy (`_use_new_zipfile_serialization=False`, and files from torch < 1.6 such as torchvision's
  `vgg16-397923af.pth` or LPIPS' `vgg.pth`): pickled magic number, protocol version, sys_info, the
  main pickle (persistent ids `('storage', storage_type, key, location, numel, view_metadata)`), a
  pickled list of storage keys, then per key an int64 element count and the raw data.

Unpickling is restricted like `torch.load(weights_only=True)`: only the globals a state_dict needs
(OrderedDict, the tensor/parameter rebuild functions, storage classes, torch dtypes, torch.Size) are
resolved, to local stand-ins; anything else raises ValueError naming the file and the global, before
it can run. Tensors become C-contiguous NumPy arrays with the tensor's dtype (bfloat16 via
ml_dtypes), shape and values (strides and storage offsets are honoured); nested containers are
returned as plain dicts/lists/tuples and other leaves (ints, strings, ...) pass through.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from typing import Any, Union

import ml_dtypes
import numpy as np
from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
}
_UNTYPED_STORAGES = {("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")}
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16,
    "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64,
    "complex128": np.complex128, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}


class _StorageType:
    """Stand-in for a torch storage class; `dtype` None means untyped (bytes)."""

    def __init__(self, dtype):
        self.dtype = None if dtype is None else np.dtype(dtype)


class _Dtype:
    """Stand-in for a torch.dtype (argument of _rebuild_tensor_v3)."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A storage referenced by the pickle; `data` (1-D array) is filled once its bytes are read."""

    def __init__(self, key: str, dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None
        self.view = None  # (root _Storage, element offset, element count) for legacy views

    def array(self) -> np.ndarray:
        if self.view is not None:
            root, offset, size = self.view
            return root.array()[offset:offset + size]
        return self.data


class _TensorRef:
    def __init__(self, storage, offset, size, stride, dtype=None):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride, self.dtype = tuple(size), tuple(stride), dtype


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, hooks, dtype, *_):
    return _TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, *_unused):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_TENSOR_TYPES = {("torch", "Tensor"), ("torch._tensor", "Tensor"),
                 ("torch.nn.parameter", "Parameter"), ("torch", "nn.Parameter")}


_TENSOR_TYPE = _Dtype(np.float32)  # inert marker for torch.Tensor / nn.Parameter


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storages: dict, load_storage=None):
        super().__init__(file)
        self._path, self._storages, self._load_storage = path, storages, load_storage

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            import collections
            return collections.OrderedDict
        if module == "torch._utils":
            fn = {"_rebuild_tensor": _rebuild_tensor, "_rebuild_tensor_v2": _rebuild_tensor,
                  "_rebuild_tensor_v3": _rebuild_tensor_v3, "_rebuild_parameter": _rebuild_parameter,
                  "_rebuild_parameter_with_state": _rebuild_parameter}.get(name)
            if fn is not None:
                return fn
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return _rebuild_from_type_v2
        if (module, name) in _TENSOR_TYPES:
            return _TENSOR_TYPE  # only used as `new_type` of _rebuild_from_type_v2, which ignores it
        if (module, name) in _UNTYPED_STORAGES:
            return _StorageType(None)
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _Dtype(_TORCH_DTYPES[name])
        if (module, name) == ("torch", "Size"):
            return tuple
        raise ValueError(
            f"{self._path}: refusing to unpickle global {module}.{name} (only tensors, storages and "
            "plain containers are allowed, as torch.load(weights_only=True))")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) not in (5, 6):
            raise ValueError(f"{self._path}: unsupported persistent id {pid!r:.200} (expected a storage)")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"{self._path}: persistent id names an unknown storage type {storage_type!r}")
        key = str(key)
        storage = self._storages.get(key)
        if storage is None:
            dtype = storage_type.dtype if storage_type.dtype is not None else np.dtype(np.uint8)
            storage = self._storages[key] = _Storage(key, dtype, int(numel))
            if self._load_storage is not None:
                self._load_storage(storage)
        view_metadata = pid[5] if len(pid) == 6 else None
        if view_metadata is not None:  # legacy storage view: (view_key, element offset, element count)
            _view_key, offset, size = view_metadata
            view = _Storage(f"{key}[{offset}:{offset + size}]", storage.dtype, int(size))
            view.view = (storage, int(offset), int(size))
            return view
        return storage


def _materialise(ref: _TensorRef, path: str) -> np.ndarray:
    storage = ref.storage
    data = storage.array()
    if data is None:
        raise ValueError(f"{path}: the data of storage {storage.key!r} is missing from the file")
    if ref.dtype is not None and ref.dtype != data.dtype:  # untyped storage: reinterpret the bytes
        usable = data.nbytes - data.nbytes % ref.dtype.itemsize
        data = data.view(np.uint8)[:usable].view(ref.dtype)
    if len(ref.size) != len(ref.stride):
        raise ValueError(f"{path}: tensor size {ref.size} and stride {ref.stride} disagree")
    if any(d == 0 for d in ref.size):
        return np.zeros(ref.size, data.dtype)
    last = ref.offset + sum((d - 1) * s for d, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= data.size:
        raise ValueError(f"{path}: tensor (offset {ref.offset}, size {ref.size}, stride {ref.stride}) "
                         f"reaches past its storage {storage.key!r} of {data.size} elements")
    base = data[ref.offset:]
    strides = tuple(s * data.itemsize for s in ref.stride)
    return np.lib.stride_tricks.as_strided(base, ref.size, strides, writeable=False).copy()


def _convert(obj, path: str):
    if isinstance(obj, _TensorRef):
        return _materialise(obj, path)
    if isinstance(obj, dict):
        return {k: _convert(v, path) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_convert(v, path) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_convert(v, path) for v in obj)
    if isinstance(obj, (_Storage, _StorageType, _Dtype)):
        raise ValueError(f"{path}: bare storages/dtypes outside tensors are not supported")
    return obj


def _load_zip(data: bytes, path: str):
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt or truncated zip checkpoint ({e})") from None
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise ValueError(f"{path}: expected one '<folder>/data.pkl' in the zip archive, found {pkls}")
    top = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if top + "byteorder" in names:
        byteorder = zf.read(top + "byteorder").decode().strip()

    def load_storage(storage: _Storage):
        name = f"{top}data/{storage.key}"
        try:
            raw = zf.read(name)
        except KeyError:
            raise ValueError(f"{path}: storage record {name!r} is missing from the zip archive") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ValueError(f"{path}: storage record {name!r} is corrupt ({e})") from None
        nbytes = storage.numel * storage.dtype.itemsize
        if len(raw) < nbytes:
            raise ValueError(f"{path}: storage record {name!r} holds {len(raw)} bytes, expected {nbytes}")
        dtype = storage.dtype.newbyteorder("<" if byteorder == "little" else ">")
        storage.data = np.frombuffer(raw, dtype, storage.numel).astype(storage.dtype, copy=False)

    try:
        pkl = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: corrupt {pkls[0]!r} ({e})") from None
    return _unpickle(io.BytesIO(pkl), path, {}, load_storage, "the main pickle (data.pkl)")


def _unpickle(f, path, storages, load_storage=None, what="a pickle"):
    try:
        return _RestrictedUnpickler(f, path, storages, load_storage).load()
    except ValueError:
        raise
    except Exception as e:  # UnpicklingError, EOFError, struct errors, ... from a damaged stream
        raise ValueError(f"{path}: corrupt or truncated checkpoint: could not read {what} "
                         f"({type(e).__name__}: {e})") from None


def _load_legacy(data: bytes, path: str):
    f = io.BytesIO(data)
    magic = _unpickle(f, path, {}, what="the magic number")
    if magic != MAGIC_NUMBER:
        raise ValueError(f"{path}: not a PyTorch checkpoint (expected the legacy magic number or a "
                         "zip archive)")
    version = _unpickle(f, path, {}, what="the protocol version")
    if version != PROTOCOL_VERSION:
        raise ValueError(f"{path}: unsupported legacy protocol version {version!r} "
                         f"(expected {PROTOCOL_VERSION})")
    sys_info = _unpickle(f, path, {}, what="sys_info")
    little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    storages: dict[str, _Storage] = {}
    obj = _unpickle(f, path, storages, what="the main pickle")
    keys = _unpickle(f, path, {}, what="the list of storage keys")
    if not isinstance(keys, (list, tuple)):
        raise ValueError(f"{path}: expected a list of storage keys after the main pickle")
    order = "<" if little else ">"
    for key in keys:
        storage = storages.get(str(key))
        header = f.read(8)
        if len(header) < 8:
            raise ValueError(f"{path}: truncated file: expected the element count of storage "
                             f"{key!r}, the file ends at byte {len(data)}")
        (count,) = struct.unpack(order + "q", header)
        if storage is None:
            raise ValueError(f"{path}: storage {key!r} is listed but not used by the pickle")
        if count != storage.numel:
            raise ValueError(f"{path}: storage {key!r} has {count} elements, the pickle says {storage.numel}")
        nbytes = count * storage.dtype.itemsize
        start = f.tell()
        if start + nbytes > len(data):
            raise ValueError(f"{path}: truncated file: expected {nbytes} bytes of data for storage "
                             f"{key!r} at byte {start}, the file ends at byte {len(data)}")
        dtype = storage.dtype.newbyteorder(order)
        storage.data = np.frombuffer(data, dtype, count, start).astype(storage.dtype, copy=False)
        f.seek(start + nbytes)
    missing = [k for k, s in storages.items() if s.data is None]
    if missing:
        raise ValueError(f"{path}: storages {missing} have no data in the file")
    return obj


def load_pth(path: PathLike) -> dict[str, Any]:
    """Reads a PyTorch checkpoint into (nested) dicts of NumPy arrays, without torch.

    Raises FileNotFoundError if `path` does not exist and ValueError (naming the file) if it is
    truncated, corrupt, not a torch checkpoint, or pickles a global outside the allow-list.
    """
    name = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    p = epath.Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"PyTorch checkpoint not found: {name}") from None
    except IsADirectoryError:
        raise ValueError(f"{name}: is a directory, expected a .pth/.pt checkpoint file") from None
    if data[:2] == b"PK":
        obj = _load_zip(data, name)
    else:
        obj = _load_legacy(data, name)
    return _convert(obj, name)
