"""A training workdir before anything is written to it: the requested config checked against the
one the run was started with, config.json written atomically, and a lock so that one trainer at
a time writes a workdir.

Resuming with a config that changes the parameter or optimizer tree, the data order or the global
batch would either crash deep inside Orbax or silently train something else, so such changes are
refused with one message listing every differing field (old -> new). Fields that only change the
schedule's length, the cadence of logs/evals/saves, paths, the compute dtype, remat or the mesh
are accepted (the checkpoint is restored into the new shardings) and recorded in config.json.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from etils import epath

from coordtok_jax.errors import UserError


class WorkdirError(UserError, RuntimeError):
    pass


# Dotted prefixes of fields a resumed run may change (everything else must match the run's config).
RESUMABLE = (
    "total_steps", "log_every", "save_every", "eval_every", "eval_videos", "eval_points_per_call",
    "eval_num_videos", "eval_sampler_steps", "eval_i3d", "keep_last", "keep_every", "peak_flops_per_device",
    "debug.", "distributed", "init_from", "lpips.vgg_path", "lpips.lin_path", "mesh.", "logical_axis_rules",
    "model.dtype", "model.attention_impl", "model.attention_query_chunk", "model.remat_policy", "model.scan_unroll",
    "data.root", "data.path", "data.data_dir", "data.num_workers", "data.worker_buffer_size",
    "data.read_threads", "data.prefetch", "data.max_consecutive_failures", "data.eval_list", "latents",
    "sample.",
)

# Fields added after runs were saved without them: absent in a saved config.json and at this value
# in the requested one, they are the same model (the options that are off by default).
ABSENT_MEANS = {
    "model.nested_tokens": False, "model.token_blocks": 4, "model.token_levels": [0.25, 0.5, 0.75, 1.0],
    "model.token_order": "time_first",
    "model.pos_embed_t_init": "zeros", "data.synthetic_fast_fraction": 0.0, "data.synthetic_fast_motion": 1.0,
    "data.synthetic_labels": False, "model.scan_layers": True,
}

LOCK_NAME = "LOCK"
STALE_SECONDS = 30 * 60  # a lock from another host not refreshed for this long is stale


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = tree
    return out


def config_differences(saved: dict, requested: dict) -> tuple[list[str], list[str]]:
    """(refused, accepted): 'field: old -> new' lines for fields that differ."""
    old, new = flatten(saved), flatten(requested)
    refused, accepted = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b or (a == "<absent>" and key in ABSENT_MEANS and json.loads(json.dumps(b)) == ABSENT_MEANS[key]):
            continue
        line = f"{key}: {json.dumps(a)} -> {json.dumps(b)}"
        (accepted if any(key == p or key.startswith(p) for p in RESUMABLE) else refused).append(line)
    return refused, accepted


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Writes a sibling temporary file, then renames it over `path` (readers never see half a file)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise WorkdirError(f"cannot write {path}: {e.strerror or e}") from e


def check_config(workdir: epath.Path, requested: dict, has_checkpoint: bool) -> list[str]:
    """Refuses (WorkdirError) a resume whose config changes what the checkpoint holds; returns the
    accepted changes. A workdir without a checkpoint may be restarted with any config."""
    path = workdir / "config.json"
    if not (has_checkpoint and path.exists()):
        return []
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WorkdirError(f"{path} is not valid JSON ({e}); it records the run's config: restore it or use "
                           "another --workdir") from e
    from coordtok_jax.io.checkpoint import KINDS, run_kind

    if run_kind(saved) != run_kind(requested):  # a tokenizer run on a SiT workdir or the reverse
        raise WorkdirError(f"{workdir} holds {KINDS[run_kind(saved)][0]}; this command trains "
                           f"{KINDS[run_kind(requested)][0]}: use another --workdir")
    refused, accepted = config_differences(saved, requested)
    if refused:
        raise WorkdirError(
            f"{workdir} holds a run with another config; resuming it would change: " + "; ".join(refused) +
            ". Use a new --workdir (or --config.init_from=" + str(workdir) + " to start from its parameters)")
    return accepted


def _holder(text: str) -> dict:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale(holder: dict, now: Optional[float] = None) -> bool:
    """A lock is stale when its process is gone (same host) or it was not refreshed for
    STALE_SECONDS (another host, or gs://)."""
    now = time.time() if now is None else now
    if not holder:
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"])
    return now - float(holder.get("time", 0)) > STALE_SECONDS


class Lock:
    """WORKDIR/LOCK holding {host, pid, time}; refresh() updates the time (the trainer calls it at
    every log), release() removes it. Local locks appear atomically (a hard link, which fails when the
    lock exists); on gs:// the
    lock is written and read back (the last writer wins, the other sees a foreign holder)."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / LOCK_NAME
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.held = False

    def _record(self) -> str:
        return json.dumps({**self.me, "time": time.time()})

    def acquire(self) -> "Lock":
        for _ in range(2):
            if self._try_create():
                self.held = True
                return self
            holder = _holder(self.path.read_text()) if self.path.exists() else {}
            if holder and {k: holder.get(k) for k in self.me} == self.me:
                self.held = True
                return self
            if not is_stale(holder):
                age = time.time() - float(holder.get("time", 0))
                raise WorkdirError(
                    f"{self.path}: another trainer (host {holder.get('host')}, pid {holder.get('pid')}, "
                    f"last seen {age:.0f} s ago) is writing this workdir; stop it first, or delete {self.path} if "
                    f"it is gone (locks from other hosts expire after {STALE_SECONDS // 60} min)")
            self._remove()  # stale: take it over
        raise WorkdirError(f"{self.path}: could not take the workdir lock")

    def _try_create(self) -> bool:
        local = not str(self.path).startswith(("gs://", "s3://"))
        if local:  # the record is written first, then hard-linked into place: never seen half-written
            tmp = self.path.parent / f".{LOCK_NAME}.{os.getpid()}"
            try:
                tmp.write_text(self._record())
                os.link(os.fspath(tmp), os.fspath(self.path))
            except FileExistsError:
                return False
            except OSError as e:
                raise WorkdirError(f"cannot create {self.path}: {e.strerror or e}") from e
            finally:
                try:
                    tmp.unlink()
                except OSError:
                    pass
            return True
        if self.path.exists():
            return False
        self.path.write_text(self._record())
        return {k: _holder(self.path.read_text()).get(k) for k in self.me} == self.me

    def refresh(self) -> None:
        if self.held:
            try:
                write_text_atomic(self.path, self._record())
            except WorkdirError:
                pass  # a refresh that fails must not stop training; the next one retries

    def _remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            self._remove()
            self.held = False
