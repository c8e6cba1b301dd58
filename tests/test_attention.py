"""models/layers.py attention: the plain (heads-first) path equals jax.nn.dot_product_attention and
a float64 NumPy softmax attention, with the model's additive bias and boolean masks; chunked
queries equal the whole."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordtok_jax.models.layers import Compute, attention, plain_attention


def _inputs(seed, b=2, nq=37, nk=29, h=3, d=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (nq, nk, nk))
    bias = (rng.uniform(0, 1, (b, 1, 1, nk)) > 0.7).astype(np.float32)  # the official +1 on padded keys
    mask = rng.uniform(0, 1, (b, 1, 1, nk)) > 0.3
    mask[:, ..., 0] = True  # every query keeps a key
    return q, k, v, bias, mask


def _numpy_attention(q, k, v, bias, mask, scale):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("use_bias, use_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_plain_attention_matches_float64_and_jax_nn(use_bias, use_mask):
    q, k, v, bias, mask = _inputs(0)
    bias, mask = (bias if use_bias else None), (mask if use_mask else None)
    scale = 8 ** -0.5
    got = np.asarray(plain_attention(q, k, v, bias=bias, mask=mask, scale=scale))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, bias, mask, scale), atol=2e-6)
    ref = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")
    np.testing.assert_allclose(got, np.asarray(ref), atol=2e-6)


def test_bfloat16_inputs_keep_float32_softmax():
    q, k, v, bias, _ = _inputs(1)
    scale = 8 ** -0.5
    got = plain_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), bias=bias, scale=scale)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), _numpy_attention(q, k, v, bias, None, scale), atol=3e-2)


@pytest.mark.parametrize("impl", [None, "xla", "chunked"])
def test_every_cpu_implementation_agrees(impl):
    q, k, v, bias, mask = _inputs(2, nq=50)
    compute = Compute(attention_impl=impl, query_chunk=16)  # 50 queries: 4 chunks, the last one padded
    got = np.asarray(attention(q, k, v, bias=bias, mask=mask, scale=0.3, compute=compute))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, bias, mask, 0.3), atol=2e-6)


@pytest.mark.parametrize("use_mask", [False, True])
def test_splash_kernel_in_interpret_mode_matches_plain(use_mask):
    """The Pallas TPU splash kernel (interpreted on CPU), lengths not multiples of its block, with
    and without a key mask, forward and gradients."""
    q, k, v, _, mask = _inputs(3, b=2, nq=130, nk=70, h=2, d=8)
    mask = mask if use_mask else None
    compute = Compute(attention_impl="splash_interpret")

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v) ** 2)

    splash = lambda q, k, v: attention(q, k, v, bias=None, mask=mask, scale=0.35, compute=compute)
    plain = lambda q, k, v: plain_attention(q, k, v, mask=mask, scale=0.35)
    np.testing.assert_allclose(np.asarray(splash(q, k, v)), np.asarray(plain(q, k, v)), atol=1e-5)
    g_splash = jax.grad(lambda *a: loss(splash, *a), argnums=(0, 1, 2))(q, k, v)
    g_plain = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_splash, g_plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_splash_leaves_the_official_bias_to_plain_attention():
    q, k, v, bias, _ = _inputs(4)
    got = attention(q, k, v, bias=bias, mask=None, scale=0.3, compute=Compute(attention_impl="splash"))
    np.testing.assert_allclose(np.asarray(got), _numpy_attention(q, k, v, bias, None, 0.3), atol=2e-6)
