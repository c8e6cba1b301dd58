"""SDE and ODE samplers for a SiT transport, model-agnostic over pytrees (CoordTok: a tuple of three planes).

``velocity_fn(x, t) -> pytree`` is the probability-flow velocity (``Transport.to_velocity_fn`` wraps noise or
score models); ``t`` is a ``(B,)`` array. Time runs from ``t0`` (noise) to ``t1`` (data) as in SiT.

SDE (SiT ``Sampler.sample_sde``; CoordTok README: Euler, 250 steps, diffusion ``sigma``, last step ``Mean``
0.04): ``dx = f dt + sqrt(2 w(t)) dW`` with ``f = v + w * score(v)``. Grid ``linspace(t0, t1, num_steps)``
with ``(t0, t1) = Transport.check_interval(sde=True, ...)`` (linear + velocity + ``sigma``: ``t0 = 0``,
``t1 = 1 - last_step_size = 0.96``, ``dt = 0.96 / 249``); ``num_steps - 1`` steps at ``t_0 .. t_{N-2}``:

* Euler-Maruyama: ``x <- x + f(x, t) dt + sqrt(2 w(t) dt) eps``: **one** model call per step (the official
  code evaluates the model twice with identical input, once for the drift and once for the score);
* Heun: ``xh = x + sqrt(2 w dt) eps``, ``K1 = f(xh, t)``, ``K2 = f(xh + dt K1, t + dt)``,
  ``x <- xh + dt (K1 + K2) / 2`` (two calls);

then the last step at ``t1``: ``Mean``: ``x + last_step_size * f(x, t1)`` (no noise); ``Euler``:
``x + last_step_size * v(x, t1)``; ``Tweedie``: ``(x + sigma^2 score) / alpha`` (= E[x1 | x_t1]); None: ``x``
(and ``last_step_size`` is then 0, so the grid ends at ``1 - sample_eps``). ``Euler``/``Tweedie`` crash
officially on tuple inputs and are implemented here from their evident intent. Model calls (Euler):
``num_steps`` with a last step, ``num_steps - 1`` without. Noise: step ``i`` uses ``fold_in(key, i)``, split per
leaf, so results are reproducible per key and identical between the ``lax.fori_loop`` and Python loops.

ODE (SiT ``Sampler.sample_ode``, torchdiffeq ``odeint`` on ``linspace(t0, t1, num_steps)``): ``dx/dt = v(x, t)``
from ``t0`` to ``t1`` (``(0, 1)`` for velocity + linear/GVP). ``euler`` / ``heun`` step on that grid, i.e.
``num_steps - 1`` steps (as torchdiffeq's fixed-grid solvers; SiT's docstring says ``num_steps`` steps);
``dopri5`` is an adaptive Dormand-Prince 5(4) in ``lax.while_loop`` with torchdiffeq-like error control
(per-leaf RMS of ``err / (atol + rtol max(|x|, |x_new|))``, max over leaves; factor ``0.9 err^-1/5`` clipped to
[0.2, 10], accepted steps never shrink; optional PI control ``pi_beta``) and Hairer's initial step; for dopri5
``num_steps`` only sets the number of saved points officially and is ignored here. ``reverse=True`` integrates
data -> noise (from ``t1`` down to ``t0`` with the same ``v(x, t)``); the official reverse branch is broken
(asserts ``t0 < t1`` after flipping the interval, and would evaluate the model at ``1 - t``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from coordtok_jax.diffusion.transport import Transport, expand_t

_tmap = jax.tree.map


def _batch(x) -> int:
    return jnp.shape(jax.tree.leaves(x)[0])[0]


def _dtype(x):
    """Dtype for times / step sizes: float64 for float64 data, else float32 (also for bfloat16 data)."""
    return jnp.float64 if jnp.result_type(jax.tree.leaves(x)[0]) == jnp.float64 else jnp.float32


def _tfull(x, t):
    return jnp.full((_batch(x),), t, _dtype(x))


def _axpy(a, y, x):
    """``x + a * y`` over trees (result in x's dtype); ``a`` scalar or per-sample ``(B,)``."""
    return _tmap(lambda yi, xi: (xi + expand_t(a, xi) * yi).astype(xi.dtype), y, x)


def _noise(key, x):
    leaves, treedef = jax.tree.flatten(x)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])


def _loop(n, body, init, python_loop):
    if python_loop:
        for i in range(n):
            init = body(i, init)
        return init
    return lax.fori_loop(0, n, body, init)


def _norm_name(name, choices, what):
    key = None if name is None or str(name).lower() == "none" else str(name).lower()
    if key not in choices:
        raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(map(str, choices))}")
    return key


# ---------------------------------------------------------------------------------------------- SDE
def sample_sde(velocity_fn: Callable[[Any, Any], Any], transport: Transport, x0, key, *, num_steps: int = 250,
               method: str = "euler", diffusion_form: str = "sigma", diffusion_norm: float = 1.0,
               last_step: str | None = "Mean", last_step_size: float = 0.04, python_loop: bool = False):
    """Integrate the reverse-time SDE from noise ``x0`` (a pytree) to data; returns the final pytree.

    See the module docstring for the schedule. ``python_loop=True`` unrolls the steps in Python (same values,
    one trace per step) — for debugging or counting model calls without callbacks.
    """
    method = _norm_name(method, ("euler", "heun"), "SDE method")
    last_step = _norm_name(last_step, (None, "mean", "tweedie", "euler"), "last step")
    if num_steps < 2:
        raise ValueError("num_steps must be >= 2")
    if last_step is None:
        last_step_size = 0.0
    path = transport.path_obj
    t0, t1 = transport.check_interval(sde=True, eval=True, diffusion_form=diffusion_form,
                                      last_step_size=last_step_size)
    with jax.ensure_compile_time_eval():
        w_ends = path.compute_diffusion(jnp.asarray([t0, t1], jnp.float32), diffusion_form, diffusion_norm)
        if not bool(jnp.all(jnp.isfinite(w_ends))):
            raise ValueError(f"diffusion {diffusion_form!r} is not finite on [{t0}, {t1}] for path "
                             f"{transport.path!r}; use sample_eps > 0 or another diffusion form")
    ts = jnp.linspace(t0, t1, num_steps, dtype=_dtype(x0))
    dt = (t1 - t0) / (num_steps - 1)

    def drift(x, t):
        """``(f, v, score)`` with ``f = v + w score``: one model call."""
        v = velocity_fn(x, t)
        score = path.get_score_from_velocity(v, x, t)
        w = path.compute_diffusion(t, diffusion_form, diffusion_norm)
        return _axpy(w, score, v), v, score

    def body(i, x):
        t = _tfull(x, ts[i])
        eps = _noise(jax.random.fold_in(key, i), x)
        amp = jnp.sqrt(2 * path.compute_diffusion(t, diffusion_form, diffusion_norm) * dt)
        if method == "euler":
            f = drift(x, t)[0]
            return _axpy(amp, eps, _axpy(dt, f, x))
        xh = _axpy(amp, eps, x)
        k1 = drift(xh, t)[0]
        k2 = drift(_axpy(dt, k1, xh), t + dt)[0]
        return _axpy(dt / 2, _tmap(jnp.add, k1, k2), xh)

    x = _loop(num_steps - 1, body, x0, python_loop)
    if last_step is None:
        return x
    t = _tfull(x, ts[-1])
    f, v, score = drift(x, t)
    if last_step == "mean":
        return _axpy(last_step_size, f, x)
    if last_step == "euler":
        return _axpy(last_step_size, v, x)
    alpha, sigma = path.alpha(t), path.sigma(t)
    return _tmap(lambda xi, si: ((xi + expand_t(sigma ** 2, si) * si) / expand_t(alpha, xi)).astype(xi.dtype),
                 x, score)


# ---------------------------------------------------------------------------------------------- ODE
# Dormand-Prince 5(4) tableau; B5 is also the 7th row of A (FSAL), E = B5 - B4 the embedded error weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((),
      (1 / 5,),
      (3 / 40, 9 / 40),
      (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))


def _combo(x, h, coeffs, ks):
    """``x + h * sum_j coeffs[j] * ks[j]`` (zero coefficients skipped)."""
    def leaf(xi, *ki):
        acc = sum(c * k for c, k in zip(coeffs, ki) if c != 0.0)
        return (xi + h * acc).astype(xi.dtype)
    return _tmap(leaf, x, *ks)


def _rms_ratio(err, x, x_new, atol, rtol):
    """torchdiffeq's mixed norm: max over leaves of RMS(err / (atol + rtol * max(|x|, |x_new|)))."""
    norms = [jnp.sqrt(jnp.mean((e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)))) ** 2))
             for e, a, b in zip(jax.tree.leaves(err), jax.tree.leaves(x), jax.tree.leaves(x_new))]
    return jnp.max(jnp.stack(norms))


def dopri5(fn: Callable[[Any, Any], Any], x0, span: float, *, atol: float = 1e-6, rtol: float = 1e-3,
           safety: float = 0.9, ifactor: float = 10.0, dfactor: float = 0.2, pi_beta: float = 0.0,
           max_steps: int = 10_000):
    """Adaptive Dormand-Prince 5(4) for ``dx/ds = fn(x, s)`` on ``s in [0, span]`` (``s`` a scalar array).

    Returns ``(x(span), stats)`` with ``stats = dict(nfe, accepted, rejected, success)``; jit-compatible
    (``lax.while_loop``). ``nfe = 2 + 6 * attempts`` (Hairer's initial step: f(x0) — reused as k1 — and one
    probe; FSAL reuses k7 as the next k1). Step factor ``safety * err^-(0.2 - 0.75 pi_beta) *
    err_prev^pi_beta`` (``pi_beta = 0``: standard controller; Hairer's DOPRI5 uses 0.04), clipped to
    [dfactor, ifactor]; accepted steps never shrink (as torchdiffeq).
    """
    dtype = _dtype(x0)
    span = jnp.asarray(span, dtype)
    s0 = jnp.zeros((), dtype)
    f0 = fn(x0, s0)

    # Hairer, Norsett & Wanner II.4 initial step selection (scaled by atol + rtol |x0|).
    def scaled_rms(tree):
        return jnp.max(jnp.stack([jnp.sqrt(jnp.mean((v / (atol + rtol * jnp.abs(x))) ** 2))
                                  for v, x in zip(jax.tree.leaves(tree), jax.tree.leaves(x0))]))
    d0, d1 = scaled_rms(x0), scaled_rms(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), jnp.asarray(1e-6, dtype), 0.01 * d0 / d1)
    f1 = fn(_axpy(h0, f0, x0), h0)
    d2 = scaled_rms(_tmap(jnp.subtract, f1, f0)) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / dmax) ** (1 / 5))
    h_init = jnp.minimum(jnp.minimum(100 * h0, h1), span).astype(dtype)

    def cond(state):
        s, h, x, k1, err_prev, acc, rej, done = state
        return (~done) & (acc + rej < max_steps)

    def body(state):
        s, h, x, k1, err_prev, acc, rej, done = state
        remaining = span - s
        last = h >= remaining
        h_eff = jnp.where(last, remaining, h)
        ks = [k1]
        for i in range(1, 7):
            x_stage = _combo(x, h_eff, _A[i], ks)  # the 7th stage input is the 5th-order solution (FSAL)
            ks.append(fn(x_stage, s + _C[i] * h_eff))
        x_new = x_stage
        err = _combo(_tmap(jnp.zeros_like, x), h_eff, _E, ks)
        ratio = _rms_ratio(err, x, x_new, atol, rtol)
        accept = ratio <= 1.0
        safe_ratio = jnp.maximum(ratio, 1e-10)
        factor = safety * safe_ratio ** (-(0.2 - 0.75 * pi_beta)) * err_prev ** pi_beta
        factor = jnp.clip(factor, jnp.where(accept, 1.0, dfactor), ifactor)
        h_next = (h_eff * factor).astype(dtype)
        pick = lambda a, b: _tmap(lambda u, w: jnp.where(accept, u, w), a, b)  # noqa: E731
        return (jnp.where(accept, jnp.where(last, span, s + h_eff), s), h_next, pick(x_new, x),
                pick(ks[6], k1), jnp.where(accept, safe_ratio, err_prev), acc + accept, rej + (~accept),
                accept & last)

    init = (s0, h_init, x0, f0, jnp.asarray(1e-4, dtype), jnp.int32(0), jnp.int32(0), jnp.asarray(False))
    s, _, x, _, _, acc, rej, done = lax.while_loop(cond, body, init)
    return x, dict(nfe=2 + 6 * (acc + rej), accepted=acc, rejected=rej, success=done)


def sample_ode(velocity_fn: Callable[[Any, Any], Any], transport: Transport, x0, *, method: str = "dopri5",
               num_steps: int = 50, atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False,
               return_stats: bool = False, python_loop: bool = False, **dopri_kwargs):
    """Integrate ``dx/dt = v(x, t)`` from noise ``x0`` (t0) to data (t1), or data -> noise if ``reverse``.

    ``method``: ``euler`` / ``heun`` (fixed grid ``linspace(t_start, t_end, num_steps)``, one model call per
    stage: ``num_steps - 1`` resp. ``2 (num_steps - 1)`` calls) or ``dopri5`` (adaptive). With
    ``return_stats`` returns ``(x, dict(nfe, ...))``.
    """
    method = _norm_name(method, ("euler", "heun", "dopri5"), "ODE method")
    t0, t1 = transport.check_interval(sde=False, eval=True)
    t_start, t_end = (t1, t0) if reverse else (t0, t1)
    if method == "dopri5":
        sign = 1.0 if t_end >= t_start else -1.0

        def fn(x, s):
            return _tmap(lambda v: sign * v, velocity_fn(x, _tfull(x, t_start + sign * s)))

        x, stats = dopri5(fn, x0, abs(t_end - t_start), atol=atol, rtol=rtol, **dopri_kwargs)
        return (x, stats) if return_stats else x
    if num_steps < 2:
        raise ValueError("num_steps must be >= 2 (grid points, including both ends)")
    ts = jnp.linspace(t_start, t_end, num_steps, dtype=_dtype(x0))

    def body(i, x):
        t_a, t_b = ts[i], ts[i + 1]
        h = t_b - t_a
        k1 = velocity_fn(x, _tfull(x, t_a))
        if method == "euler":
            return _axpy(h, k1, x)
        k2 = velocity_fn(_axpy(h, k1, x), _tfull(x, t_b))
        return _axpy(h / 2, _tmap(jnp.add, k1, k2), x)

    x = _loop(num_steps - 1, body, x0, python_loop)
    nfe = (num_steps - 1) * (1 if method == "euler" else 2)
    return (x, dict(nfe=nfe)) if return_stats else x


# ---------------------------------------------------------------------------------------------- CLI mapping
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """The official sampling flags (``sample.py`` / ``sample_sit.py``): ``--sampling-method``,
    ``--diffusion-form``, ``--diffusion-norm``, ``--last-step``, ``--last-step-size``, ``--num-sampling-steps``,
    ``--atol``, ``--rtol``, ``--reverse``; ``mode`` is SDE or ODE. ``sampling_method=None`` takes the mode's
    official default (SDE: Euler, ODE: dopri5). Defaults = the CoordTok README command (SDE, 250 steps)."""

    mode: str = "SDE"
    sampling_method: str | None = None
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str | None = "Mean"
    last_step_size: float = 0.04
    num_sampling_steps: int = 250
    atol: float = 1e-6
    rtol: float = 1e-3
    reverse: bool = False

    @classmethod
    def from_any(cls, config_like=None, **overrides) -> "SamplerConfig":
        """From an argparse Namespace, a dict (keys with ``-`` or ``_``) or an object with attributes."""
        values = {}
        for field in dataclasses.fields(cls):
            for name in (field.name, field.name.replace("_", "-")):
                if isinstance(config_like, dict) and name in config_like:
                    values[field.name] = config_like[name]
                elif config_like is not None and not isinstance(config_like, dict) and hasattr(config_like, name):
                    values[field.name] = getattr(config_like, name)
        values.update(overrides)
        return cls(**values)


def make_sample_fn(transport: Transport, config_like=None, **overrides):
    """Returns ``sample(velocity_fn, x0, key) -> x`` for the configured sampler (``key`` unused by ODEs)."""
    cfg = SamplerConfig.from_any(config_like, **overrides)
    mode = str(cfg.mode).upper()
    if mode == "SDE":
        method = cfg.sampling_method or "Euler"

        def sample(velocity_fn, x0, key):
            return sample_sde(velocity_fn, transport, x0, key, num_steps=cfg.num_sampling_steps, method=method,
                              diffusion_form=cfg.diffusion_form, diffusion_norm=cfg.diffusion_norm,
                              last_step=cfg.last_step, last_step_size=cfg.last_step_size)
    elif mode == "ODE":
        method = cfg.sampling_method or "dopri5"

        def sample(velocity_fn, x0, key=None):
            return sample_ode(velocity_fn, transport, x0, method=method, num_steps=cfg.num_sampling_steps,
                              atol=cfg.atol, rtol=cfg.rtol, reverse=cfg.reverse)
    else:
        raise ValueError(f"unknown sampling mode {cfg.mode!r}; expected SDE or ODE")
    return sample


__all__ = ["sample_sde", "sample_ode", "dopri5", "SamplerConfig", "make_sample_fn"]
