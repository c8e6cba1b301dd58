"""A page-retaining memory allocator for CPU runs: the tools re-execute themselves under one.

Why. XLA:CPU allocates every call's buffers anew through posix_memalign, from the thread that
runs the call. glibc serves a block larger than its per-thread heaps (64 MiB) or above its mmap
threshold with a fresh mmap and unmaps it on free, so each train step page-faults and
zero-fills its temporaries again: measured on the 2-core development VM, 19k minor faults and
~40 ms of kernel time per tiny-config step (of 65-90 ms), 215k faults and ~400-450 ms per
medium-config step (benchmarks/RESULTS.md). glibc cannot be told to keep those blocks (its
mmap threshold is capped at 32 MiB and a thread heap cannot grow past 64 MiB); tcmalloc and
jemalloc can.

What. `reexec()` replaces the process, once, by the same command with LD_PRELOAD naming the
first allocator found, configured to keep freed memory for reuse:
  * gperftools tcmalloc (Debian/Ubuntu: `apt install libtcmalloc-minimal4`), with
    TCMALLOC_RELEASE_RATE=0;
  * jemalloc (`apt install libjemalloc2`), with MALLOC_CONF=oversize_threshold:0,
    dirty_decay_ms:-1,muzzy_decay_ms:-1 (its defaults purge blocks over 8 MiB at once, which
    is why a plain LD_PRELOAD of jemalloc changes nothing).
It does so only on a CPU host (JAX_PLATFORMS empty or 'cpu', and no TPU / NVIDIA device files):
accelerator runs keep their buffers in device memory. $COORDTOK_ALLOCATOR=system keeps the
system allocator; $COORDTOK_ALLOCATOR=/path/to/lib.so preloads that library instead.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Callable, Mapping, Optional, Sequence

from coordtok_jax.errors import UserError

CHOICE_ENV = "COORDTOK_ALLOCATOR"  # 'system', a library path, or unset (look for one)
ACTIVE_ENV = "COORDTOK_ALLOCATOR_ACTIVE"  # set in the re-executed process: the library it runs with
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# (library file name, environment that makes it keep freed pages), in order of preference
KNOWN = (
    ("libtcmalloc_minimal.so.4", {"TCMALLOC_RELEASE_RATE": "0"}),
    ("libtcmalloc.so.4", {"TCMALLOC_RELEASE_RATE": "0"}),
    ("libjemalloc.so.2", {"MALLOC_CONF": "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
)


def _accelerator_device_files() -> list[str]:
    return glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*") + glob.glob("/dev/nvidia[0-9]*")


def choose(environ: Mapping[str, str], exists: Callable[[str], bool] = os.path.isfile,
           accelerators: Optional[Sequence[str]] = None) -> Optional[tuple[str, dict]]:
    """(library path, environment to add) to re-execute with, or None to run as is.

    None when: this process already is the re-executed one, $COORDTOK_ALLOCATOR is 'system',
    LD_PRELOAD already names tcmalloc or jemalloc, JAX_PLATFORMS names another platform than
    cpu, the host has accelerator device files, or no known allocator is installed. A library
    named by $COORDTOK_ALLOCATOR that does not exist is a UserError naming it."""
    choice = environ.get(CHOICE_ENV, "").strip()
    if environ.get(ACTIVE_ENV) or choice.lower() == "system":
        return None
    preloaded = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preloaded or "jemalloc" in preloaded:
        return None
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and platforms != "cpu":
        return None
    if not platforms and (accelerators if accelerators is not None else _accelerator_device_files()):
        return None
    if choice:
        if not exists(choice):
            raise UserError(f"${CHOICE_ENV}={choice}: no such library (give a path to a .so, or 'system')")
        extra = next((dict(env) for name, env in KNOWN if os.path.basename(choice) == name), {})
        return choice, extra
    for name, env in KNOWN:
        for d in _DIRS:
            path = os.path.join(d, name)
            if exists(path):
                return path, dict(env)
    return None


def reexec() -> None:
    """Replaces this process (same pid, same command line) by one running under `choose`'s
    allocator; returns without doing anything when `choose` says None. Settings the user gave
    (MALLOC_CONF, TCMALLOC_RELEASE_RATE) are kept."""
    chosen = choose(os.environ)
    if chosen is None or not getattr(sys, "orig_argv", None):
        return
    lib, extra = chosen
    env = dict(os.environ)
    for key, value in extra.items():
        env.setdefault(key, value)
    env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    env[ACTIVE_ENV] = lib
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
