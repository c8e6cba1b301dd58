"""Transport (SiT interpolants / losses) and SDE/ODE samplers (coordtok_jax.diffusion).

Model calls are counted with ``jax.debug.callback`` inside the velocity function: the callback runs once per
executed call, also inside the compiled ``fori_loop`` / ``while_loop``, so the count checks the real loop.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coordtok_jax.diffusion.samplers import (_A, _B4, _B5, _C, SamplerConfig, make_sample_fn, sample_ode,
                                             sample_sde)
from coordtok_jax.diffusion.transport import Transport, expand_t, make_path

PATHS = ["linear", "gvp", "vp"]
MU = (1.5, -0.5)     # per-leaf data mean
S = (0.7, 1.3)       # per-leaf data std


def _tree(seed, batch, dtype=np.float32):
    """A pytree of two differently shaped leaves, N(0, 1) (NumPy RNG: no XLA compilation)."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((batch, 2, 3)), dtype), jnp.asarray(rng.standard_normal((batch, 4)), dtype))


def gaussian_velocity(x, t):
    """Exact marginal velocity E[x1 - x0 | x_t = x] of the linear path for data N(mu, s^2) per leaf.

    x_t = t x1 + (1-t) x0 has mean m = t mu and variance V = t^2 s^2 + (1-t)^2; Cov(x1 - x0, x_t) =
    t s^2 - (1-t), E[x1 - x0] = mu, hence v = mu + (t s^2 - (1-t)) / V (x - t mu) = m' + (std'/std)(x - m).
    The flow map from t = 0 to 1 is x0 -> mu + s x0.
    """
    def leaf(xi, mu, s):
        tt = expand_t(t, xi)
        var = tt ** 2 * s ** 2 + (1 - tt) ** 2
        return mu + (tt * s ** 2 - (1 - tt)) / var * (xi - tt * mu)
    return tuple(leaf(xi, mu, s) for xi, mu, s in zip(x, MU, S))


def exact_map(x0):
    return tuple(mu + s * xi for xi, mu, s in zip(x0, MU, S))


def counting(fn):
    """Wrap ``fn`` so every executed call (also inside compiled loops) increments ``calls[0]``."""
    calls = [0]

    def _inc():
        calls[0] += 1

    def wrapped(x, t):
        jax.debug.callback(_inc)
        return fn(x, t)
    return wrapped, calls


# ------------------------------------------------------------------------------------------------ transport
def test_linear_plan_velocity_target_and_loss_on_pytree():
    tr = Transport()
    x1 = _tree(0, 6)

    def model_fn(xt, t, scale):
        return tuple(scale * xi + expand_t(t, xi) for xi in xt)

    losses = jax.jit(lambda x, k: tr.training_losses(model_fn, x, k, dict(scale=0.5)))
    out = losses(x1, jax.random.key(1))
    t = np.asarray(out["t"])
    assert t.shape == (6,) and np.all((t >= 0) & (t < 1))
    per_leaf = []
    for a, e, xt, u, p in zip(x1, out["x0"], out["xt"], out["target"], out["pred"]):
        a, e = np.asarray(a), np.asarray(e)
        tt = t.reshape((-1,) + (1,) * (a.ndim - 1))
        np.testing.assert_allclose(np.asarray(xt), tt * a + (1 - tt) * e, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(u), a - e, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(p), 0.5 * np.asarray(xt) + tt, rtol=1e-6, atol=1e-6)
        per_leaf.append(((np.asarray(p) - (a - e)) ** 2).reshape(6, -1).mean(1))
    np.testing.assert_allclose(np.asarray(out["loss"]), np.mean(per_leaf, axis=0), rtol=1e-5)
    # pure function of the key
    np.testing.assert_array_equal(losses(x1, jax.random.key(1))["loss"], out["loss"])
    assert not np.allclose(losses(x1, jax.random.key(2))["loss"], out["loss"])


def test_sample_t_bounds_and_check_interval():
    key = jax.random.key(0)
    assert Transport(train_eps=0.1).check_interval() == (0.0, 1.0)       # velocity + linear ignores eps
    tr = Transport(prediction="noise", train_eps=0.1)
    t = np.asarray(tr.sample_t(key, 20000))
    assert t.min() >= 0.1 and t.max() < 0.9 and t.min() < 0.101 and t.max() > 0.899
    vp = Transport(path="VP", train_eps=None, sample_eps=None)
    assert (vp.train_eps, vp.sample_eps) == (1e-5, 1e-3)
    assert vp.check_interval() == (0.0, 1 - 1e-5)
    assert vp.check_interval(eval=True) == (0.0, 1 - 1e-3)
    lin = Transport()
    assert lin.check_interval(sde=True, eval=True, diffusion_form="sigma", last_step_size=0.04) == (0.0, 0.96)
    assert Transport(sample_eps=1e-3).check_interval(sde=True, eval=True, diffusion_form="SBDM",
                                                     last_step_size=0.04) == (1e-3, 0.96)
    assert lin.check_interval(eval=True) == (0.0, 1.0)
    assert Transport(prediction="score", sample_eps=None).check_interval(eval=True) == (1e-3, 1 - 1e-3)
    t = jnp.asarray([0.3, 0.6])   # weight 1 without loss_weight, and for velocity prediction whatever the weight
    np.testing.assert_array_equal(Transport(prediction="score", train_eps=None).loss_weight_fn(t), 1.0)
    np.testing.assert_array_equal(Transport(loss_weight="likelihood").loss_weight_fn(t), 1.0)


@pytest.mark.parametrize("prediction,weight", [("noise", "velocity"), ("score", "likelihood")])
def test_noise_and_score_losses(prediction, weight):
    tr = Transport(path="gvp", prediction=prediction, loss_weight=weight, train_eps=None)
    x1 = _tree(2, 5)
    out = jax.jit(lambda x, k: tr.training_losses(lambda xt, t: tuple(0.3 * xi for xi in xt), x, k))(
        x1, jax.random.key(3))
    t = np.asarray(out["t"], np.float64)
    assert t.min() >= 1e-3 and t.max() < 1 - 1e-3
    sigma = np.cos(np.pi * t / 2)
    var = np.pi / (2 * np.tan(np.pi * t / 2)) * sigma ** 2 + sigma * np.pi / 2 * np.sin(np.pi * t / 2)
    w = {None: np.ones_like(t), "velocity": (var / sigma) ** 2, "likelihood": var / sigma ** 2}[weight]
    np.testing.assert_allclose(tr.loss_weight_fn(jnp.asarray(t, jnp.float32)), w, rtol=1e-4)
    per_leaf = []
    for d, e, xt, p, tgt in zip(x1, out["x0"], out["xt"], out["pred"], out["target"]):
        d, e, p = np.asarray(d), np.asarray(e), np.asarray(p)
        s = sigma.reshape((-1,) + (1,) * (e.ndim - 1))
        a = np.sin(np.pi * t / 2).reshape(s.shape)
        np.testing.assert_allclose(np.asarray(xt), a * d + s * e, rtol=1e-5, atol=1e-5)   # GVP interpolant
        expected_target = e if prediction == "noise" else -e / s
        np.testing.assert_allclose(np.asarray(tgt), expected_target, rtol=1e-4, atol=1e-5)
        per_leaf.append(((p - expected_target) ** 2 * (1 if prediction == "noise" else s ** 2)).reshape(5, -1)
                        .mean(1))
    np.testing.assert_allclose(np.asarray(out["loss"]), w * np.mean(per_leaf, axis=0), rtol=1e-4)


@pytest.mark.parametrize("name", PATHS)
def test_path_derivatives_float64(name):
    path = make_path(name)
    with jax.enable_x64(True):
        t = jnp.linspace(0.02, 0.98, 49, dtype=jnp.float64)
        h = 1e-6
        for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
            fd = (f(t + h) - f(t - h)) / (2 * h)
            np.testing.assert_allclose(np.asarray(df(t)), np.asarray(fd), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(path.d_alpha_alpha_ratio(t), path.d_alpha(t) / path.alpha(t), rtol=1e-10)
        np.testing.assert_allclose(path.alpha_d_alpha_ratio(t), path.alpha(t) / path.d_alpha(t), rtol=1e-10)
        generic = (path.d_alpha(t) / path.alpha(t) * path.sigma(t) ** 2 - path.sigma(t) * path.d_sigma(t))
        np.testing.assert_allclose(path.drift_var(t), generic, rtol=1e-10)
        one = jnp.ones((), jnp.float64)
        assert abs(float(path.alpha(one)) - 1) < 1e-12 and abs(float(path.sigma(one))) < 1e-12
        if name != "vp":
            assert abs(float(path.alpha(0 * one))) < 1e-12 and abs(float(path.sigma(0 * one)) - 1) < 1e-12
        else:  # VP: alpha_0 = exp(-(20 - 0.1)/4 - 0.05)
            np.testing.assert_allclose(float(path.alpha(0 * one)), np.exp(-19.9 / 4 - 0.05), rtol=1e-12)


@pytest.mark.parametrize("name", PATHS)
def test_conversions_are_consistent_and_inverse(name):
    path = make_path(name)
    with jax.enable_x64(True):
        x0, x1 = _tree(4, 8, np.float64), _tree(5, 8, np.float64)
        t = jnp.asarray(np.random.default_rng(6).uniform(0.05, 0.95, 8))

        @jax.jit
        def conversions(x0, x1, t):
            x, v = path.plan(t, x0, x1)
            noise = path.get_noise_from_velocity(v, x, t)
            score = path.get_score_from_velocity(v, x, t)
            vel = [path.get_velocity_from_score(score, x, t), path.get_velocity_from_noise(noise, x, t)]
            vel += [Transport(path=name, prediction="noise").to_velocity_fn(lambda xx, tt: noise)(x, t),
                    Transport(path=name, prediction="score").to_velocity_fn(lambda xx, tt: score)(x, t)]
            return (x, v, path.sigma(t), noise, score, vel, path.get_noise_from_score(score, t),
                    path.get_score_from_noise(noise, t))

        x, v, sig, noise, score, vel, noise2, score2 = conversions(x0, x1, t)
        close = lambda a, b: [np.testing.assert_allclose(p, q, rtol=1e-8, atol=1e-8)  # noqa: E731
                              for p, q in zip(a, b)]
        close(noise, x0)                                               # the noise model predicts +x0
        close(score, tuple(-e / expand_t(sig, e) for e in x0))          # score = -x0 / sigma
        for vi in vel:   # from score, from noise, Transport.to_velocity_fn with oracle noise / score models
            close(vi, v)
        close(noise2, noise)
        close(score2, score)
        if name == "linear":   # the spec's formula score = (t v - x) / (1 - t)
            close(score, tuple((expand_t(t, vi) * vi - xi) / expand_t(1 - t, xi) for vi, xi in zip(v, x)))


def test_diffusion_forms():
    path = make_path("linear")
    t = jnp.asarray([0.25, 0.5])
    np.testing.assert_allclose(path.compute_diffusion(t, "sigma", 2.0), [1.5, 1.0])
    np.testing.assert_allclose(path.compute_diffusion(t, "linear", 1.0), [0.75, 0.5])
    np.testing.assert_allclose(path.compute_diffusion(t, "constant", 3.0), [3.0, 3.0])
    np.testing.assert_allclose(path.compute_diffusion(t, "SBDM", 1.0), path.drift_var(t))
    np.testing.assert_allclose(path.compute_diffusion(t, "decreasing", 1.0),
                               0.25 * (np.cos(np.pi * np.asarray(t)) + 1) ** 2, rtol=1e-6)
    for form in ("increasing-decreasing", "inccreasing-decreasing"):
        np.testing.assert_allclose(path.compute_diffusion(t, form, 1.0), [0.5, 1.0], rtol=1e-6)
    with pytest.raises(ValueError):
        path.compute_diffusion(t, "cosine")
    with pytest.raises(ValueError):   # SBDM is infinite at t0 = 0 (sample_eps = 0): refused, not NaN
        sample_sde(gaussian_velocity, Transport(), _tree(0, 2), jax.random.key(0),
                   num_steps=5, diffusion_form="SBDM")


def test_dopri5_tableau():
    for c, row in zip(_C, _A):
        assert abs(sum(row) - c) < 1e-12
    assert abs(sum(_B5) - 1) < 1e-12 and abs(sum(_B4) - 1) < 1e-12


# ------------------------------------------------------------------------------------------------ samplers
def test_sde_shapes_determinism_and_call_count():
    tr = Transport()
    x0 = {"a": jnp.zeros((3, 2, 2)), "b": (jnp.zeros((3, 5)),)}

    def vel(x, t):
        return jax.tree.map(lambda xi: -xi + expand_t(t, xi), x)

    vf, calls = counting(vel)
    run = jax.jit(lambda x, k: sample_sde(vf, tr, x, k, num_steps=6))
    a = run(x0, jax.random.key(0))
    jax.block_until_ready(a)
    assert calls[0] == 6                                 # one model call per Euler step + the Mean step
    assert jax.tree.structure(a) == jax.tree.structure(x0)
    assert all(p.shape == q.shape for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(x0)))
    b, c = run(x0, jax.random.key(0)), run(x0, jax.random.key(1))
    assert all(np.array_equal(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert not any(np.allclose(p, q) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    traced = [0]

    def vel_traced(x, t):      # plain Python counter: counts trace-time calls (= calls when unrolled)
        traced[0] += 1
        return vel(x, t)

    unrolled = jax.jit(lambda x, k: sample_sde(vel_traced, tr, x, k, num_steps=6, python_loop=True))(
        x0, jax.random.key(0))
    assert traced[0] == 6
    for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(unrolled)):
        np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    for kwargs, expected in ((dict(last_step=None), 5), (dict(method="Heun", last_step="Tweedie"), 2 * 5 + 1)):
        calls[0] = 0
        jax.block_until_ready(jax.jit(lambda x, k: sample_sde(vf, tr, x, k, num_steps=6, **kwargs))(
            x0, jax.random.key(0)))
        assert calls[0] == expected, kwargs


def test_ode_call_counts_and_reverse():
    tr = Transport()
    x0 = _tree(5, 16)
    vf, calls = counting(gaussian_velocity)
    for method, n in (("euler", 9), ("heun", 18)):
        calls[0] = 0
        _, stats = jax.jit(lambda x: sample_ode(vf, tr, x, method=method, num_steps=10, return_stats=True))(x0)
        jax.block_until_ready(_)
        assert calls[0] == n == stats["nfe"]
    calls[0] = 0
    x1, stats = jax.jit(lambda x: sample_ode(vf, tr, x, method="dopri5", return_stats=True))(x0)
    jax.block_until_ready(x1)
    assert calls[0] == int(stats["nfe"]) and bool(stats["success"]) and int(stats["rejected"]) >= 0
    back = jax.jit(lambda x: sample_ode(gaussian_velocity, tr, x, method="dopri5", rtol=1e-5, atol=1e-7,
                                        reverse=True))(exact_map(x0))
    for p, q in zip(back, x0):
        np.testing.assert_allclose(p, q, atol=2e-4)
    back = jax.jit(lambda x: sample_ode(gaussian_velocity, tr, x, method="heun", num_steps=101, reverse=True))(
        exact_map(x0))
    for p, q in zip(back, x0):
        np.testing.assert_allclose(p, q, atol=2e-3)


def _check_stats(x, tol_mean, tol_std):
    for xi, mu, s in zip(x, MU, S):
        xi = np.asarray(xi)
        assert abs(xi.mean() - mu) < tol_mean * s, (xi.mean(), mu)
        assert abs(xi.std() / s - 1) < tol_std, (xi.std(), s)


@pytest.mark.parametrize("method,kwargs,tol_map", [("euler", dict(num_steps=201), 2e-2),
                                                   ("heun", dict(num_steps=51), 1e-3),
                                                   ("dopri5", {}, 1e-2),               # atol 1e-6, rtol 1e-3
                                                   ("dopri5", dict(rtol=1e-4), 1e-3)])
def test_ode_transports_gaussian(method, kwargs, tol_map):
    x0 = _tree(6, 4000)
    x1 = jax.jit(lambda x: sample_ode(gaussian_velocity, Transport(), x, method=method, **kwargs))(x0)
    for p, q in zip(x1, exact_map(x0)):           # deterministic map x0 -> mu + s x0
        np.testing.assert_allclose(p, q, atol=tol_map * 2, rtol=tol_map)
    _check_stats(x1, 0.03, 0.03)


def test_sde_official_schedule_transports_gaussian():
    """README schedule (Euler-Maruyama, 250 steps, sigma diffusion, Mean last step 0.04 from t = 0.96) and the
    other last steps / Heun: the exact-score SDE keeps the marginals, so N(mu, s^2) comes out (+- ~1%; the
    truncation at 0.96 changes the std by < 1%). 1000 samples x 10 dims: RNG dominates the run time."""
    x0 = _tree(7, 1000)
    sample = make_sample_fn(Transport(), dict(mode="SDE"))
    x1 = jax.jit(lambda x, k: sample(gaussian_velocity, x, k))(x0, jax.random.key(8))
    _check_stats(x1, 0.05, 0.04)
    for kwargs in (dict(method="Heun", last_step="Euler", num_steps=50), dict(last_step="Tweedie", num_steps=100)):
        x1 = jax.jit(lambda x, k: sample_sde(gaussian_velocity, Transport(), x, k, **kwargs))(x0, jax.random.key(8))
        _check_stats(x1, 0.05, 0.05)


@pytest.mark.parametrize("name", ["gvp", "vp"])
def test_other_paths_transport_gaussian(name):
    """GVP / VP: exact velocity for data N(mu, s^2) is v = alpha' mu + (alpha alpha' s^2 + sigma sigma') / V
    (x - alpha mu), V = alpha^2 s^2 + sigma^2; the ODE and the SDE (score from v through the path) recover it
    (VP starts at t = 0 where alpha_0 = 6.6e-3, i.e. not exactly N(0, I): negligible here)."""
    tr = Transport(path=name, sample_eps=None)
    path = tr.path_obj

    def vel(x, t):
        out = []
        for xi, mu, s in zip(x, MU, S):
            a, da, sg, ds = (expand_t(f(t), xi) for f in (path.alpha, path.d_alpha, path.sigma, path.d_sigma))
            out.append(da * mu + (a * da * s ** 2 + sg * ds) / (a ** 2 * s ** 2 + sg ** 2) * (xi - a * mu))
        return tuple(out)

    x0 = _tree(11, 1000)
    ode, sde = jax.jit(lambda x, k: (sample_ode(vel, tr, x), sample_sde(vel, tr, x, k, num_steps=100)))(
        x0, jax.random.key(12))
    _check_stats(ode, 0.05, 0.03)
    _check_stats(sde, 0.06, 0.06)


def test_make_sample_fn_maps_official_cli_names():
    args = argparse.Namespace(sampling_method="Euler", diffusion_form="linear", diffusion_norm=0.5,
                              last_step="None", last_step_size=0.04, num_sampling_steps=6, cfg_scale=1.0)
    cfg = SamplerConfig.from_any(args)
    assert (cfg.mode, cfg.num_sampling_steps, cfg.diffusion_norm, cfg.last_step) == ("SDE", 6, 0.5, "None")
    x0, key, tr = _tree(9, 4), jax.random.key(10), Transport()
    got = make_sample_fn(tr, args)(gaussian_velocity, x0, key)
    want = sample_sde(gaussian_velocity, tr, x0, key, num_steps=6, diffusion_form="linear",
                      diffusion_norm=0.5, last_step=None)
    for p, q in zip(got, want):
        np.testing.assert_array_equal(p, q)
    ode = make_sample_fn(tr, {"mode": "ODE", "sampling-method": "heun", "num-sampling-steps": 5})
    for p, q in zip(ode(gaussian_velocity, x0, None),
                    sample_ode(gaussian_velocity, tr, x0, method="heun", num_steps=5)):
        np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError):
        make_sample_fn(tr, dict(mode="SDE", sampling_method="rk4"))(gaussian_velocity, x0, key)
