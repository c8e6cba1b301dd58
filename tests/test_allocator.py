"""coordtok_jax/allocator.py: when a CPU tool re-executes itself under a page-retaining allocator,
and that the re-execution happens through the shared CLI preamble (same pid, same arguments,
LD_PRELOAD and the allocator's keep-your-pages setting in the environment)."""

import ctypes.util
import os
import subprocess
import sys
import textwrap

import pytest

from coordtok_jax import allocator
from coordtok_jax.errors import UserError

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def _choose(environ, installed=(TCMALLOC, JEMALLOC), accelerators=()):
    return allocator.choose(environ, exists=lambda p: p in installed, accelerators=list(accelerators))


def test_a_cpu_host_prefers_tcmalloc_then_jemalloc_each_told_to_keep_freed_pages():
    assert _choose({}) == (TCMALLOC, {"TCMALLOC_RELEASE_RATE": "0"})
    assert _choose({"JAX_PLATFORMS": "cpu"}) == (TCMALLOC, {"TCMALLOC_RELEASE_RATE": "0"})
    lib, env = _choose({}, installed=(JEMALLOC,))
    assert lib == JEMALLOC and "oversize_threshold:0" in env["MALLOC_CONF"] and "dirty_decay_ms:-1" in env["MALLOC_CONF"]
    assert _choose({}, installed=()) is None  # nothing installed: run as is


@pytest.mark.parametrize("environ, accelerators", [
    ({allocator.ACTIVE_ENV: TCMALLOC}, ()),  # already re-executed: never loop
    ({allocator.CHOICE_ENV: "system"}, ()),  # opted out
    ({allocator.CHOICE_ENV: "System"}, ()),
    ({"LD_PRELOAD": "/opt/lib/libjemalloc.so.2"}, ()),  # the user preloads one already
    ({"JAX_PLATFORMS": "tpu"}, ()),
    ({"JAX_PLATFORMS": "cuda"}, ()),
    ({}, ("/dev/accel0",)),  # a TPU VM
    ({}, ("/dev/nvidia0",)),  # a GPU host
])
def test_no_reexecution_where_it_does_not_belong(environ, accelerators):
    assert _choose(environ, accelerators=accelerators) is None


def test_a_named_library_is_used_and_a_missing_one_is_named():
    assert _choose({allocator.CHOICE_ENV: "/opt/my/libjemalloc.so.2"}, installed=("/opt/my/libjemalloc.so.2",))[0] \
        == "/opt/my/libjemalloc.so.2"
    assert "MALLOC_CONF" in _choose({allocator.CHOICE_ENV: "/opt/my/libjemalloc.so.2"},
                                    installed=("/opt/my/libjemalloc.so.2",))[1]
    with pytest.raises(UserError, match=r"COORDTOK_ALLOCATOR=/nope/lib.so: no such library"):
        _choose({allocator.CHOICE_ENV: "/nope/lib.so"})
    # a CPU-only setting overrides nothing on an accelerator host: no error there either
    assert _choose({allocator.CHOICE_ENV: "/nope/lib.so", "JAX_PLATFORMS": "tpu"}) is None


def _library_to_preload():
    """A real, harmless shared library to preload in the subprocess test (libm)."""
    name = ctypes.util.find_library("m")
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64"):
        if name and os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    pytest.skip("no libm to preload on this host")


_TOOL = textwrap.dedent("""
    import os, sys
    from absl import flags
    from coordtok_jax import cli
    def define():
        flags.DEFINE_integer("n", 0, "a number")
    def main(argv):
        print("pid", os.getpid(), "n", flags.FLAGS.n, "active", os.environ.get("COORDTOK_ALLOCATOR_ACTIVE"),
              "preload", os.environ.get("LD_PRELOAD"), "rate", os.environ.get("TCMALLOC_RELEASE_RATE"))
    cli.run(__name__, define, main)
""")


def test_a_tool_reexecutes_itself_once_with_the_library_preloaded(tmp_path):
    lib = _library_to_preload()
    script = tmp_path / "tool.py"
    script.write_text(_TOOL)
    env = dict(os.environ, JAX_PLATFORMS="cpu", COORDTOK_ALLOCATOR=lib)
    env.pop(allocator.ACTIVE_ENV, None)
    proc = subprocess.Popen([sys.executable, str(script), "--n=7"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    words = out.split()
    assert words[words.index("pid") + 1] == str(proc.pid)  # replaced in place (exec), not a child
    assert words[words.index("n") + 1] == "7"  # same arguments
    assert words[words.index("active") + 1] == lib
    assert words[words.index("preload") + 1] == lib
    assert out.count("pid") == 1  # ran once

    env[allocator.CHOICE_ENV] = "system"  # opted out: runs as is
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "active None" in out

    env[allocator.CHOICE_ENV] = str(tmp_path / "missing.so")  # a wrong path: one line, exit 2
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: $COORDTOK_ALLOCATOR={tmp_path / 'missing.so'}: no such library (give a path to a .so, or 'system')"]
