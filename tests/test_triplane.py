"""triplane_gather against a float64 NumPy reference, map_coordinates, and exact gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import numpy_reference as ref
from coordtok_jax.models import triplane_gather


def _planes(key, batch=2, rxy=6, rt=9, c=5):
    k1, k2, k3 = jax.random.split(key, 3)
    return (
        jax.random.normal(k1, (batch, rxy, rxy, c)),
        jax.random.normal(k2, (batch, rt, rxy, c)),
        jax.random.normal(k3, (batch, rt, rxy, c)),
    )


def _coords(key, batch=2, n=37):
    c = jax.random.uniform(key, (batch, n, 3))
    # Include the corners, edges and exact grid points (i / (R - 1)), where floor/clamp matter.
    special = jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5], [0.5, 1.0, 0.0], [3 / 8, 2 / 5, 4 / 5]])
    return c.at[:, : special.shape[0]].set(special)


def test_matches_float64_reference():
    planes = _planes(jax.random.key(0))
    coords = _coords(jax.random.key(1))
    got = np.asarray(triplane_gather(planes, coords))
    want = ref.gather(planes, coords)
    assert got.shape == (2, 37, 15)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_matches_map_coordinates():
    planes = _planes(jax.random.key(2), batch=1)
    coords = _coords(jax.random.key(3), batch=1)
    got = np.asarray(triplane_gather(planes, coords))
    t, x, y = coords[0, :, 0], coords[0, :, 1], coords[0, :, 2]
    pieces = []
    for plane, (a, b) in zip(planes, ((x, y), (t, y), (t, x))):
        r1, r2 = plane.shape[1:3]
        pts = jnp.stack([a * (r1 - 1), b * (r2 - 1)])
        pieces.append(jnp.stack(
            [jax.scipy.ndimage.map_coordinates(plane[0, ..., ch], pts, order=1, mode="nearest")
             for ch in range(plane.shape[-1])], axis=-1))
    np.testing.assert_allclose(got[0], np.concatenate(pieces, axis=-1), rtol=1e-5, atol=1e-5)


def test_feature_order_and_plane_axes():
    """xy is sampled at (x, y), yt at (t, y), xt at (t, x): a plane that varies along one axis only."""
    r = 5
    ramp = jnp.arange(r, dtype=jnp.float32)
    z_xy = jnp.broadcast_to(ramp[:, None, None], (1, r, r, 1))  # value = x index
    z_yt = jnp.broadcast_to(ramp[None, :, None], (1, r, r, 1))  # value = y index
    z_xt = jnp.broadcast_to(ramp[:, None, None], (1, r, r, 1)) * 10  # value = 10 * t index
    coords = jnp.array([[[0.25, 0.5, 1.0]]])  # t=1, x=2, y=4 in index units
    np.testing.assert_allclose(np.asarray(triplane_gather((z_xy, z_yt, z_xt), coords))[0, 0], [2.0, 4.0, 10.0])


def test_out_of_range_coordinates_clamp_to_edges():
    planes = _planes(jax.random.key(4), batch=1)
    inside = jnp.array([[[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])
    outside = jnp.array([[[-0.5, 1.7, -3.0], [2.0, -1e-3, 1.0001]]])
    np.testing.assert_array_equal(np.asarray(triplane_gather(planes, outside)), np.asarray(triplane_gather(planes, inside)))


def test_gradients_are_exact_bilinear_weights():
    planes = _planes(jax.random.key(5), batch=1, rxy=4, rt=6, c=2)
    coords = _coords(jax.random.key(6), batch=1, n=9)
    weights = jax.random.normal(jax.random.key(7), (1, 9, 6))
    grads = jax.grad(lambda p: jnp.sum(triplane_gather(p, coords) * weights))(planes)
    # d/dplane of sum_n w_n . bilinear(plane, a_n, b_n) = scatter of w_n with the 4 corner weights.
    c = np.asarray(coords, np.float64)[0]
    w = np.asarray(weights, np.float64)[0]
    for k, (plane, (ia, ib)) in enumerate(zip(planes, ((1, 2), (0, 2), (0, 1)))):
        r1, r2, ch = plane.shape[1:]
        want = np.zeros((r1, r2, ch))
        for n in range(c.shape[0]):
            sa, sb = c[n, ia] * (r1 - 1), c[n, ib] * (r2 - 1)
            i0a, i0b = int(np.floor(sa)), int(np.floor(sb))
            i1a, i1b = min(i0a + 1, r1 - 1), min(i0b + 1, r2 - 1)
            fa, fb = sa - i0a, sb - i0b
            g = w[n, k * ch : (k + 1) * ch]
            want[i0a, i0b] += g * (1 - fa) * (1 - fb)
            want[i0a, i1b] += g * (1 - fa) * fb
            want[i1a, i0b] += g * fa * (1 - fb)
            want[i1a, i1b] += g * fa * fb
        np.testing.assert_allclose(np.asarray(grads[k])[0], want, rtol=1e-5, atol=1e-5)


def test_check_grads_float64():
    with jax.enable_x64(True):
        planes = tuple(p.astype(jnp.float64) for p in _planes(jax.random.key(8), batch=1, rxy=4, rt=5, c=3))
        coords = _coords(jax.random.key(9), batch=1, n=11).astype(jnp.float64)
        check_grads(lambda *p: triplane_gather(p, coords), planes, order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def test_bad_shapes_raise():
    planes = _planes(jax.random.key(10))
    with pytest.raises(ValueError, match="coords must be"):
        triplane_gather(planes, jnp.zeros((2, 5, 2)))
    with pytest.raises(ValueError, match="z_yt"):
        triplane_gather((planes[0], planes[1][:1], planes[2]), jnp.zeros((2, 5, 3)))
