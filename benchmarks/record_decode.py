r"""Decoding ArrayRecord records (.npz bytes) in grain's reader threads: np.load vs records.load_npz.

    python benchmarks/record_decode.py [--frames=128 --size=128] [--threads=4] [--seconds=20]

np.load parses every .npy header with ast.literal_eval. On CPython 3.11 two threads in the AST
constructor at once corrupt its interpreter-wide recursion counter and one of them raises
SystemError "AST constructor recursion depth mismatch" (cpython gh-106905), so a data pipeline
decoding with np.load in reader threads fails at random, and so does any other thread parsing
Python at that moment (a traceback being formatted, pytest's report). This prints:
  1. ms per decoded clip (T x size x size x 3 uint8, the `prepare` record), one thread;
  2. for --seconds each: --threads threads decoding small latent records (the header parse is the
     largest share there) while the main thread parses Python (as a traceback being formatted
     does), with thread switches made frequent (--switch_interval), and how many calls failed.
"""

from __future__ import annotations

import ast
import io
import os
import sys
import threading
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_FRAMES = flags.DEFINE_integer("frames", 128, "T of the clip record.")
_SIZE = flags.DEFINE_integer("size", 128, "H = W of the clip record.")
_THREADS = flags.DEFINE_integer("threads", 4, "Decoding threads (grain's read_threads default).")
_SECONDS = flags.DEFINE_float("seconds", 20.0, "Duration of each threaded run.")
_SWITCH = flags.DEFINE_float("switch_interval", 1e-6, "sys.setswitchinterval for the threaded runs: the "
                             "race needs a thread switch inside the AST constructor; 5e-3 is Python's default, "
                             "where it is rarer (but it crashed CI) and the counts are mostly 0.")


def _np_load(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _per_call_ms(fn, data, n=30):
    fn(data)
    t0 = time.perf_counter()
    for _ in range(n):
        fn(data)
    return (time.perf_counter() - t0) / n * 1e3


def _stress(fn, data, threads: int, seconds: float):
    """`threads` threads call fn(data) in a loop while the main thread parses Python source."""
    stop, calls, errors = threading.Event(), [0] * threads, [0] * threads
    first_error = []

    def work(i):
        while not stop.is_set():
            try:
                fn(data)
            except SystemError as e:
                errors[i] += 1
                first_error.append(str(e))
            calls[i] += 1

    default_interval = sys.getswitchinterval()
    sys.setswitchinterval(_SWITCH.value)
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    main_errors, main_calls, t_end = 0, 0, time.time() + seconds
    while time.time() < t_end:
        try:
            ast.parse("x = {'a': (1, 2), 'b': [f(y) for y in z]}\n" * 20)
        except SystemError as e:
            main_errors += 1
            first_error.append(str(e))
        main_calls += 1
    stop.set()
    for w in workers:
        w.join()
    sys.setswitchinterval(default_interval)
    return sum(calls), sum(errors), main_calls, main_errors, (first_error or [""])[0]


def main(argv):
    del argv
    import jax  # noqa: F401  (as in a trainer: jax runs a Python gc callback, a chance to switch threads)

    from coordtok_jax.data import records
    from coordtok_jax.generation import latent_cache

    rng = np.random.default_rng(0)
    clip = records.encode_clip(rng.integers(0, 256, (_FRAMES.value, _SIZE.value, _SIZE.value, 3), np.uint8),
                               3, "v.mp4")
    planes = latent_cache.encode_planes([rng.standard_normal(s).astype(np.float32)
                                    for s in [(16, 16, 8), (32, 16, 8), (32, 16, 8)]], 0, 7)
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} cores, "
          f"switch interval {_SWITCH.value:g} s in the threaded runs\n")
    print(f"| decoder | clip record {_FRAMES.value}x{_SIZE.value}x{_SIZE.value}x3, ms (1 thread) | "
          f"latent record: calls in {_THREADS.value} threads, {_SECONDS.value:g} s | SystemErrors "
          f"in decoding threads | SystemErrors in the main thread's parses |")
    print("|---|---:|---:|---:|---:|")
    for name, fn in [("np.load", _np_load), ("records.load_npz", records.load_npz)]:
        ms = _per_call_ms(fn, clip)
        calls, errs, main_calls, main_errs, first = _stress(fn, planes, _THREADS.value, _SECONDS.value)
        print(f"| {name} | {ms:.2f} | {calls} | {errs} | {main_errs} of {main_calls} |", flush=True)
        if first:
            print(f"|   e.g. | {first} | | | |")


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
