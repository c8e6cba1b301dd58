"""Test setup: 8 simulated CPU devices (set before jax is imported), configs importable."""

import os
import pathlib
import sys

# 8 simulated devices; LLVM -O0 halves XLA:CPU compile time, which dominates these tiny-model
# tests (floating-point semantics are the same: XLA:CPU does not enable fast-math either way).
# Subprocesses (trainer CLI tests) inherit both through the environment.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir():
    """../shared/reference when this checkout has it (tests that need it skip otherwise)."""
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not beside this checkout")
    return REFERENCE


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()
