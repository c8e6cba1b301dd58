"""SiT transport (stochastic interpolants) over pytrees: paths, score/noise/velocity conversions, losses.

Semantics of the official ``transport/`` package (willisma/SiT, used unchanged apart from the triplane tuple
handling by CoordTok's ``train_sit.py``), re-derived and re-implemented here for JAX:

* Interpolant ``x_t = alpha_t * x1 + sigma_t * x0`` with ``x1`` = data and ``x0 ~ N(0, I)``. Time runs from
  ``t = 0`` (noise) to ``t = 1`` (data) for **all** paths (alpha_0 ~ 0, sigma_0 ~ 1, alpha_1 = 1, sigma_1 = 0):

  ===========  =========================================  ==========================================
  path         alpha_t                                    sigma_t
  ===========  =========================================  ==========================================
  ``linear``   ``t``  (SiT ``ICPlan``)                     ``1 - t``
  ``gvp``      ``sin(pi t / 2)``  (``GVPCPlan``)           ``cos(pi t / 2)``
  ``vp``       ``exp(m(t))``, ``m(t) = -(1-t)^2 (b1-b0)/4  ``sqrt(1 - exp(2 m(t)))``
               - (1-t) b0 / 2`` (``VPCPlan``, b0 = 0.1,
               b1 = 20; SiT calls them sigma_min/max)
  ===========  =========================================  ==========================================

* Conditional velocity ``u_t = d_alpha * x1 + d_sigma * x0`` (linear: ``x1 - x0``). With ``r = d_alpha / alpha``
  the probability-flow ODE ``dx/dt = v`` is written ``v = -drift_mean + drift_var * score`` with
  ``drift_mean = -r x`` and ``drift_var = r sigma^2 - sigma d_sigma`` (VP: ``r = drift_var = beta_t / 2``,
  ``beta_t = b0 + (1 - t)(b1 - b0)``). Eliminating ``x1`` between ``x = alpha x1 + sigma x0`` and ``v``:
  ``x0 = (alpha/d_alpha * v - x) / (alpha/d_alpha * d_sigma - sigma)`` (the "noise"; SiT's sign: the noise
  model predicts ``x0`` itself) and ``score = -x0 / sigma = (alpha/d_alpha * v - x) / (sigma^2 -
  alpha/d_alpha * d_sigma * sigma)``; linear: ``score = (t v - x) / (1 - t)``.
* SDE diffusion coefficients ``w(t)`` (``dx = [v + w score] dt + sqrt(2 w) dW``), ``norm`` = ``--diffusion-norm``:
  ``constant``: norm; ``SBDM``: norm * drift_var; ``sigma``: norm * sigma_t; ``linear``: norm * (1 - t);
  ``decreasing``: (norm cos(pi t) + 1)^2 / 4; ``increasing-decreasing``: norm sin(pi t)^2. The last one is
  unreachable officially (dictionary key typo ``inccreasing-decreasing``); it is implemented here with the
  evident intended formula (both spellings accepted).
* Losses (``Transport.training_losses``): ``t ~ U[t0, t1)`` per sample, velocity: ``|v_pred - u_t|^2``; noise:
  ``w |eps_pred - x0|^2``; score: ``w |sigma s_pred + x0|^2`` (i.e. target ``-x0 / sigma``), with
  ``w = 1`` (None), ``(drift_var / sigma)^2`` ('velocity') or ``drift_var / sigma^2`` ('likelihood'); the loss
  weight is ignored for velocity prediction (as officially). For pytrees (CoordTok: three triplanes of different
  shapes) the per-sample loss is the mean over leaves of each leaf's per-sample mean (official: the mean of the
  three per-plane MSEs; the official noise/score branches crash on tuples, here they follow the same rule).
* ``train_eps`` / ``sample_eps`` = ``None`` take SiT's ``create_transport`` defaults (VP: 1e-5 / 1e-3; linear
  and GVP with noise/score prediction: 1e-3 / 1e-3; velocity + linear/GVP: 0 / 0). Explicit values are honoured
  (``create_transport`` silently forces 0 for velocity + linear/GVP; identical at the defaults).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PATHS = ("linear", "gvp", "vp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def expand_t(t, leaf):
    """Reshape a per-sample ``(B,)`` coefficient to broadcast against ``leaf`` of shape ``(B, ...)``."""
    t = jnp.asarray(t)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (jnp.ndim(leaf) - t.ndim))


def _tmap(fn, *trees):
    return jax.tree.map(fn, *trees)


@dataclasses.dataclass(frozen=True)
class LinearPath:
    """SiT ``ICPlan``: ``alpha_t = t``, ``sigma_t = 1 - t``."""

    name = "linear"

    def alpha(self, t):
        return t

    def d_alpha(self, t):
        return jnp.ones_like(t)

    def sigma(self, t):
        return 1 - t

    def d_sigma(self, t):
        return -jnp.ones_like(t)

    def d_alpha_alpha_ratio(self, t):
        """``d_alpha / alpha`` (infinite at t = 0)."""
        return 1 / t

    def alpha_d_alpha_ratio(self, t):
        """``alpha / d_alpha`` (finite on [0, 1])."""
        return t

    def drift_var(self, t):
        """``r sigma^2 - sigma d_sigma`` = ``(1 - t) / t`` for linear (SiT's ``compute_drift(...)[1]``)."""
        sigma = self.sigma(t)
        return self.d_alpha_alpha_ratio(t) * sigma ** 2 - sigma * self.d_sigma(t)

    # ---------- pytree-level functions; t has shape (B,) ----------
    def plan(self, t, x0, x1):
        """``(x_t, u_t)`` with ``x_t = alpha x1 + sigma x0`` and ``u_t = d_alpha x1 + d_sigma x0``."""
        a, s, da, ds = self.alpha(t), self.sigma(t), self.d_alpha(t), self.d_sigma(t)
        xt = _tmap(lambda e, d: expand_t(a, d) * d + expand_t(s, e) * e, x0, x1)
        ut = _tmap(lambda e, d: expand_t(da, d) * d + expand_t(ds, e) * e, x0, x1)
        return xt, ut

    def compute_drift(self, x, t):
        """Probability-flow decomposition ``v = -drift_mean + drift_var * score``: ``(-r x, drift_var(t))``."""
        r = self.d_alpha_alpha_ratio(t)
        return _tmap(lambda xi: -expand_t(r, xi) * xi, x), self.drift_var(t)

    def compute_diffusion(self, t, form="constant", norm=1.0):
        """SDE diffusion coefficient ``w(t)`` (same shape as ``t``); independent of ``x`` for all forms."""
        t = jnp.asarray(t)
        if form == "constant":
            return norm * jnp.ones_like(t)
        if form == "SBDM":
            return norm * self.drift_var(t)
        if form == "sigma":
            return norm * self.sigma(t)
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(jnp.pi * t) + 1) ** 2
        if form in ("increasing-decreasing", "inccreasing-decreasing"):
            return norm * jnp.sin(jnp.pi * t) ** 2
        raise ValueError(f"unknown diffusion form {form!r}; expected one of {DIFFUSION_FORMS}")

    def get_score_from_velocity(self, velocity, x, t):
        """``score = (alpha/d_alpha * v - x) / (sigma^2 - alpha/d_alpha * d_sigma * sigma)``."""
        q, s, ds = self.alpha_d_alpha_ratio(t), self.sigma(t), self.d_sigma(t)
        var = s ** 2 - q * ds * s
        return _tmap(lambda v, xi: (expand_t(q, v) * v - xi) / expand_t(var, xi), velocity, x)

    def get_noise_from_velocity(self, velocity, x, t):
        """``x0 = (alpha/d_alpha * v - x) / (alpha/d_alpha * d_sigma - sigma)``."""
        q, s, ds = self.alpha_d_alpha_ratio(t), self.sigma(t), self.d_sigma(t)
        den = q * ds - s
        return _tmap(lambda v, xi: (expand_t(q, v) * v - xi) / expand_t(den, xi), velocity, x)

    def get_velocity_from_score(self, score, x, t):
        """``v = drift_var * score - drift_mean = drift_var * score + (d_alpha / alpha) x``."""
        drift_mean, var = self.compute_drift(x, t)
        return _tmap(lambda sc, dm: expand_t(var, sc) * sc - dm, score, drift_mean)

    def get_score_from_noise(self, noise, t):
        """``score = -x0 / sigma``."""
        s = self.sigma(t)
        return _tmap(lambda e: -e / expand_t(s, e), noise)

    def get_noise_from_score(self, score, t):
        """``x0 = -sigma * score``."""
        s = self.sigma(t)
        return _tmap(lambda sc: -expand_t(s, sc) * sc, score)

    def get_velocity_from_noise(self, noise, x, t):
        return self.get_velocity_from_score(self.get_score_from_noise(noise, t), x, t)


@dataclasses.dataclass(frozen=True)
class GVPPath(LinearPath):
    """SiT ``GVPCPlan``: ``alpha_t = sin(pi t / 2)``, ``sigma_t = cos(pi t / 2)`` (alpha^2 + sigma^2 = 1)."""

    name = "gvp"

    def alpha(self, t):
        return jnp.sin(t * jnp.pi / 2)

    def d_alpha(self, t):
        return jnp.pi / 2 * jnp.cos(t * jnp.pi / 2)

    def sigma(self, t):
        return jnp.cos(t * jnp.pi / 2)

    def d_sigma(self, t):
        return -jnp.pi / 2 * jnp.sin(t * jnp.pi / 2)

    def d_alpha_alpha_ratio(self, t):
        return jnp.pi / (2 * jnp.tan(t * jnp.pi / 2))

    def alpha_d_alpha_ratio(self, t):
        return 2 / jnp.pi * jnp.tan(t * jnp.pi / 2)


@dataclasses.dataclass(frozen=True)
class VPPath(LinearPath):
    """SiT ``VPCPlan`` (VP-SDE with linear beta schedule, time flipped so that t = 1 is data).

    ``m(t) = -(1-t)^2 (b1 - b0) / 4 - (1-t) b0 / 2``, ``m'(t) = (1-t)(b1 - b0)/2 + b0/2 = beta_t / 2``,
    ``alpha = exp(m)``, ``d_alpha = alpha m'``, ``sigma = sqrt(1 - exp(2m))``, ``d_sigma = -exp(2m) m' / sigma``.
    ``drift_var = r sigma^2 - sigma d_sigma = m' = beta_t / 2`` exactly (SiT's overridden ``compute_drift``).
    Note alpha_0 = exp(-5.025) ~ 6.6e-3 (not exactly 0) and sigma_1 = 0.
    """

    name = "vp"
    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_mean_coeff(self, t):
        return -0.25 * (1 - t) ** 2 * (self.beta_max - self.beta_min) - 0.5 * (1 - t) * self.beta_min

    def d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.beta_max - self.beta_min) + 0.5 * self.beta_min

    def alpha(self, t):
        return jnp.exp(self.log_mean_coeff(t))

    def d_alpha(self, t):
        return self.alpha(t) * self.d_log_mean_coeff(t)

    def sigma(self, t):
        return jnp.sqrt(1 - jnp.exp(2 * self.log_mean_coeff(t)))

    def d_sigma(self, t):
        return -jnp.exp(2 * self.log_mean_coeff(t)) * self.d_log_mean_coeff(t) / self.sigma(t)

    def d_alpha_alpha_ratio(self, t):
        return self.d_log_mean_coeff(t)

    def alpha_d_alpha_ratio(self, t):
        return 1 / self.d_log_mean_coeff(t)

    def drift_var(self, t):
        return self.d_log_mean_coeff(t)


def make_path(name: str):
    """``'linear' | 'gvp' | 'vp'`` (case-insensitive; SiT CLI spells them Linear / GVP / VP)."""
    key = str(name).lower()
    if key == "linear":
        return LinearPath()
    if key == "gvp":
        return GVPPath()
    if key == "vp":
        return VPPath()
    raise ValueError(f"unknown path {name!r}; expected one of {PATHS}")


def _normal_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                                        for k, x in zip(keys, leaves)])


def _batch_size(tree) -> int:
    return jnp.shape(jax.tree.leaves(tree)[0])[0]


def _time_dtype(tree):
    """float64 for float64 data, else float32 (bfloat16 times would be far too coarse)."""
    return jnp.float64 if jnp.result_type(jax.tree.leaves(tree)[0]) == jnp.float64 else jnp.float32


def per_sample_mean(tree):
    """Mean over leaves of each leaf's mean over all non-batch axes -> ``(B,)``."""
    means = [jnp.mean(x.reshape(x.shape[0], -1), axis=1) for x in jax.tree.leaves(tree)]
    return sum(means) / len(means)


@dataclasses.dataclass(frozen=True)
class Transport:
    """Transport configuration (hashable: usable as a static jit argument).

    ``path``: linear | gvp | vp; ``prediction``: velocity | noise | score; ``loss_weight``: None | velocity |
    likelihood; ``train_eps`` / ``sample_eps``: see the module docstring (None = SiT defaults).
    """

    path: str = "linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = 0.0
    sample_eps: float | None = 0.0

    def __post_init__(self):
        path = str(self.path).lower()
        if path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}; expected one of {PATHS}")
        pred = str(self.prediction).lower()
        if pred not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {PREDICTIONS}")
        weight = None if self.loss_weight in (None, "None", "none") else str(self.loss_weight).lower()
        if weight not in LOSS_WEIGHTS:
            raise ValueError(f"unknown loss weight {self.loss_weight!r}; expected one of {LOSS_WEIGHTS}")
        if path == "vp":
            default_train, default_sample = 1e-5, 1e-3
        elif pred != "velocity":
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        train_eps = default_train if self.train_eps is None else float(self.train_eps)
        sample_eps = default_sample if self.sample_eps is None else float(self.sample_eps)
        for name, value in (("path", path), ("prediction", pred), ("loss_weight", weight),
                            ("train_eps", train_eps), ("sample_eps", sample_eps)):
            object.__setattr__(self, name, value)

    @property
    def path_obj(self):
        return make_path(self.path)

    # ------------------------------------------------------------------ time interval
    def check_interval(self, *, sde=False, eval=False, diffusion_form="SBDM", reverse=False,
                       last_step_size=0.0) -> tuple[float, float]:
        """SiT's ``check_interval``: the integration / training time interval ``(t0, t1)``.

        eps = sample_eps if eval else train_eps. VP: t1 = 1 - eps (ODE, or SDE without last step) else
        1 - last_step_size. Linear/GVP with a non-velocity model or an SDE: t0 = eps if (SBDM and SDE) or the
        model is not a velocity model, else 0; t1 as for VP. Otherwise (0, 1). ``reverse`` flips to ``1 - t``.
        """
        t0, t1 = 0.0, 1.0
        eps = self.sample_eps if eval else self.train_eps
        t1_shrunk = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if self.path == "vp":
            t1 = t1_shrunk
        elif self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0.0
            t1 = t1_shrunk
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return float(t0), float(t1)

    def sample_t(self, key, batch: int, dtype=jnp.float32):
        """``t ~ U[t0, t1)`` per sample with the training interval."""
        t0, t1 = self.check_interval()
        return jax.random.uniform(key, (batch,), dtype, minval=t0, maxval=t1)

    # ------------------------------------------------------------------ loss
    def loss_weight_fn(self, t):
        """Per-sample weight for noise/score predictions (1 for velocity prediction or loss_weight None)."""
        if self.prediction == "velocity" or self.loss_weight is None:
            return jnp.ones_like(t)
        path = self.path_obj
        var, sigma = path.drift_var(t), path.sigma(t)
        if self.loss_weight == "velocity":
            return (var / sigma) ** 2
        return var / sigma ** 2

    def training_losses(self, model_fn: Callable[..., Any], x1, key, model_kwargs=None) -> dict:
        """Flow-matching loss for a batch of (pytree) data ``x1``; pure function of ``key``.

        Returns ``loss`` (B,), ``pred``, ``target`` (the regression target: u_t, x0 or -x0/sigma) and, for
        inspection, ``t``, ``x0``, ``xt``. ``model_fn(xt, t, **model_kwargs)`` must return the structure of x1.
        """
        model_kwargs = {} if model_kwargs is None else model_kwargs
        key_t, key_noise = jax.random.split(key)
        t = self.sample_t(key_t, _batch_size(x1), _time_dtype(x1))
        x0 = _normal_like(key_noise, x1)
        path = self.path_obj
        xt, ut = path.plan(t, x0, x1)
        pred = model_fn(xt, t, **model_kwargs)
        if jax.tree.structure(pred) != jax.tree.structure(x1) or any(
                jnp.shape(p) != jnp.shape(x) for p, x in zip(jax.tree.leaves(pred), jax.tree.leaves(x1))):
            raise ValueError("model output must have the structure and shapes of x1")
        if self.prediction == "velocity":
            target = ut
            loss = per_sample_mean(_tmap(lambda p, u: (p - u) ** 2, pred, ut))
        else:
            sigma = path.sigma(t)
            if self.prediction == "noise":
                target = x0
                err = _tmap(lambda p, e: (p - e) ** 2, pred, x0)
            else:
                target = path.get_score_from_noise(x0, t)
                err = _tmap(lambda p, e: (expand_t(sigma, p) * p + e) ** 2, pred, x0)
            loss = self.loss_weight_fn(t) * per_sample_mean(err)
        return dict(loss=loss, pred=pred, target=target, t=t, x0=x0, xt=xt)

    # ------------------------------------------------------------------ model output conversions
    def to_velocity_fn(self, model_fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a model ``model_fn(x, t) -> prediction`` as the probability-flow velocity ``v(x, t)``.

        velocity: identity; score: ``-drift_mean + drift_var * s``; noise: the same with ``s = -eps / sigma``
        (SiT's ``get_drift``).
        """
        if self.prediction == "velocity":
            return model_fn
        path = self.path_obj

        def velocity_fn(x, t, **kwargs):
            out = model_fn(x, t, **kwargs)
            score = out if self.prediction == "score" else path.get_score_from_noise(out, t)
            return path.get_velocity_from_score(score, x, t)

        return velocity_fn


__all__ = ["PATHS", "PREDICTIONS", "LOSS_WEIGHTS", "DIFFUSION_FORMS", "LinearPath", "GVPPath", "VPPath",
           "make_path", "Transport", "expand_t", "per_sample_mean", "make_transport"]


def make_transport(config) -> Transport:
    """The Transport of a SiT config's `transport` section (path, prediction, loss weight, eps)."""
    t = config.transport
    return Transport(path=str(t.path).lower(), prediction=str(t.prediction).lower(), loss_weight=t.loss_weight,
                     train_eps=t.train_eps, sample_eps=t.sample_eps)
