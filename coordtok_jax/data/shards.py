"""ArrayRecord shards: written so that they never look complete before they are, read lazily.

A `ShardWriter` writes records to a local temporary file and, on `finish()`, moves it to its
final path: a rename for a local output, a streamed upload for gs:// (array_record cannot
write to object stores). A writer that is aborted (or never finished) leaves no final file, so
"the final file exists" means "the shard is whole" — what `prepare` and `encode_latents` rely
on to resume and to refuse overwriting. `LazyRecords` is the random-access reader of a list of
shards (local or gs://) that opens them on first use and reopens them in each worker process.
"""

from __future__ import annotations

import shutil
import tempfile
from typing import Optional

from etils import epath


def is_remote(path) -> bool:
    """True for object-store paths (gs://, s3://, ...), which array_record cannot write directly."""
    p = epath.Path(path).as_posix()
    return not p.startswith("/") and "://" in p


def staging_dir(output, prefix: str) -> tuple[epath.Path, bool]:
    """(where shards are written while incomplete, whether it is a local temporary dir to delete)."""
    if is_remote(output):
        return epath.Path(tempfile.mkdtemp(prefix=prefix)), True
    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return out, False


class ShardWriter:
    """Records -> `staging/NAME.tmp`; `finish()` makes `output/NAME` appear whole, `abort()` drops it."""

    def __init__(self, output, name: str, staging: Optional[epath.Path] = None, options: str = "group_size:1"):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.final = epath.Path(output) / name
        self.tmp = epath.Path(staging if staging is not None else output) / (name + ".tmp")
        self._writer = ArrayRecordWriter(str(self.tmp), options)
        self.count = 0
        self.done = False

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.count += 1

    def finish(self) -> epath.Path:
        self.done = True
        self._writer.close()
        if is_remote(self.final):
            with self.tmp.open("rb") as src, self.final.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            self.tmp.unlink()
        else:
            self.tmp.rename(self.final)
        return self.final

    def abort(self) -> None:
        """Drops an unfinished shard (a finished one stays)."""
        if self.done:
            return
        self.done = True
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the partial file is deleted either way
            pass
        self.tmp.unlink(missing_ok=True)


class LazyRecords:
    """Random access (len, [i] -> bytes) over ArrayRecord shards; picklable for grain workers."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]
        self._source = None

    def _open(self):
        if self._source is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        return {"paths": self.paths, "_source": None}  # file handles are reopened in each process

    def __len__(self):
        return len(self._open())

    def __getitem__(self, i) -> bytes:
        return self._open()[int(i)]
