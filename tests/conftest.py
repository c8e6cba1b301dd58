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
# libtpu (the [tpu] extra, for compiling TPU programs on this host) takes a process lock by default:
# allow the pytest-xdist workers and CLI subprocesses to load it side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

# Official facts the parity tests compare with: state_dict key layouts (names, shapes, dtypes) of the
# released CoordTok-L, the reference small CoordTok, SiT-L/2 and the I3D of the FVD protocol, and the
# LPIPS linear layers (lpips/weights/v0.1/vgg.pth, a legacy-format torch file).
REFERENCE = ROOT / "tests" / "data" / "reference"


@pytest.fixture(scope="session")
def reference_dir():
    """tests/data/reference: the official state_dict layouts and the LPIPS linear weights."""
    assert REFERENCE.is_dir(), f"{REFERENCE} is missing"
    return REFERENCE


@pytest.fixture(scope="session")
def devices():
    assert jax.device_count() == 8, "tests expect 8 simulated CPU devices"
    return jax.devices()


def save_random_tokenizer(workdir, config, step: int) -> None:
    """A checkpoint of `config`'s tokenizer with random N(0, 0.05^2) parameters (no trainer run:
    for tests that only need a loadable tokenizer)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from coordtok_jax.models.coordtok import CoordTok
    from coordtok_jax.io.checkpoint import save_params

    abstract = nnx.eval_shape(lambda: CoordTok(config.model, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(np.float32) * 0.05),
                          nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    save_params(str(workdir), params, config, step=step)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A tiny tokenizer checkpoint (random parameters) for the SiT tests, which only need its encoder."""
    import coordtok

    workdir = tmp_path_factory.mktemp("tokenizer")
    save_random_tokenizer(workdir, coordtok.get_config("tiny"), step=5)
    return workdir
