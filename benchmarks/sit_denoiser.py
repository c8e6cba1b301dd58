r"""How far a trained SiT is from its data: denoiser error vs the optimal linear denoiser, and the
spatial statistics of its samples vs the data's (issue 13).

    python benchmarks/sit_denoiser.py --workdir=SIT_WORKDIR [--step=N] [--fit_clips=8192] [--clips=256] \
        [--sampler=sde --steps=20] [--samples=32]

On the SiT's own data (config.data, the eval split; planes from its tokenizer, normalised with the
run's latent statistics):

* x1 error: for t in --times, x_t = t x1 + (1 - t) x0 on --clips held-out clips; the SiT's data
  estimate x1 + ... = x_t + (1 - t) v(x_t, t) and its mean squared error per plane (normalised
  units), against the held-out error of the Wiener filter (the best linear denoiser: mean and
  covariance of each plane fitted on --fit_clips training clips). A denoiser that has learned the
  data's second-order statistics is at or below the Wiener error; a model above it samples planes
  with too little spatial correlation.
* samples: --samples planes drawn with the run's sampler (--sampler / --steps override it); per
  plane the within-sample std and the lag-1 correlation along rows and columns (each sample's mean
  removed), next to the same numbers for the data.

Prints two tables and writes them as JSON to --output (default WORKDIR/denoiser_STEP.json).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from coordtok_jax.data.pipeline import make_sampled_dataset  # noqa: E402
from coordtok_jax.data.video import to_model_input  # noqa: E402
from coordtok_jax.diffusion.latent_stats import normalize  # noqa: E402
from coordtok_jax.diffusion.samplers import make_sample_fn  # noqa: E402
from coordtok_jax.diffusion.transport import make_transport  # noqa: E402
from coordtok_jax.generation.sample import load_sit  # noqa: E402
from coordtok_jax.io.runs import load_tokenizer  # noqa: E402

PLANES = ("xy", "yt", "xt")
flags.DEFINE_string("workdir", None, "A train_sit workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("fit_clips", 8192, "Training clips for the Wiener filter's mean and covariance.")
flags.DEFINE_integer("clips", 256, "Held-out clips for the denoiser errors.")
flags.DEFINE_list("times", ["0.1", "0.2", "0.3", "0.4", "0.5"], "Interpolation times t (0 = noise, 1 = data).")
flags.DEFINE_integer("samples", 32, "Planes to sample for the spatial statistics.")
flags.DEFINE_enum("sampler", None, ["sde", "ode"], "Override config.sampler.mode.")
flags.DEFINE_integer("steps", None, "Override config.sampler.num_steps.")
flags.DEFINE_integer("batch", 256, "Clips per encode call.")
flags.DEFINE_string("output", None, "JSON output (default WORKDIR/denoiser.json).")
FLAGS = flags.FLAGS


def encode_clips(config, tokenizer, mean, std, num: int, batch: int, *, train: bool, seed: int):
    """num clips of config.data -> three normalised planes, numpy (num, R1, R2, C)."""
    encode = jax.jit(lambda f, n: normalize(tokenizer.encode(to_model_input(f, n), n), mean, std))
    out = [[] for _ in PLANES]
    for b in make_sampled_dataset(config.data, tokenizer.geometry.video_shape, num, min(batch, num), seed=seed,
                                  train=train, process_index=0, process_count=1):
        for k, z in enumerate(encode(b["video"], b["n_frames"])):
            out[k].append(np.asarray(z))
    return [np.concatenate(z)[:num] for z in out]


def spatial_stats(z) -> dict:
    """Within-sample std and lag-1 correlations along rows / columns of planes (B, R1, R2, C)."""
    z = np.asarray(z, np.float64)
    z = z - z.mean(axis=(1, 2), keepdims=True)
    var = np.mean(z * z)
    return dict(std=float(np.sqrt(var)), lag1_rows=float(np.mean(z[:, 1:] * z[:, :-1]) / var),
                lag1_cols=float(np.mean(z[:, :, 1:] * z[:, :, :-1]) / var))


def main(argv):
    del argv
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    t0 = time.perf_counter()
    config, graphdef, buffers, ema, (mean, std), step = load_sit(FLAGS.workdir, FLAGS.step)
    tokenizer, _, _ = load_tokenizer(config.tokenizer)
    model = nnx.merge(graphdef, ema, buffers)
    train = encode_clips(config, tokenizer, mean, std, FLAGS.fit_clips, FLAGS.batch, train=True, seed=1)
    held = encode_clips(config, tokenizer, mean, std, FLAGS.clips, FLAGS.batch, train=False, seed=2)
    n = len(held[0])
    y = jnp.zeros((n,), jnp.int32)  # unconditional (class-conditional runs: class 0)
    velocity = jax.jit(lambda x, t: model(x, t, y))

    rows = []
    rng = np.random.default_rng(0)
    fits = []
    for z in train:  # mean and covariance of each flattened plane (float64)
        flat = z.reshape(len(z), -1).astype(np.float64)
        fits.append((flat.mean(0), np.cov(flat.T)))
    for t in (float(s) for s in FLAGS.times):
        noise = [rng.standard_normal(z.shape).astype(np.float32) for z in held]
        xt = tuple(t * z + (1 - t) * e for z, e in zip(held, noise))
        v = velocity(tuple(jnp.asarray(a) for a in xt), jnp.full((n,), t, jnp.float32))
        row = dict(t=t)
        for name, z, a, b, (mu, cov) in zip(PLANES, held, xt, v, fits):
            row[f"sit_{name}"] = float(np.mean((np.asarray(a) + (1 - t) * np.asarray(b) - z) ** 2))
            x = a.reshape(n, -1).astype(np.float64)
            gain = t * cov @ np.linalg.inv(t * t * cov + (1 - t) ** 2 * np.eye(len(cov)))
            wiener = mu + (x - t * mu) @ gain.T
            row[f"wiener_{name}"] = float(np.mean((wiener - z.reshape(n, -1)) ** 2))
        rows.append(row)

    s = config.sampler
    sample_fn = make_sample_fn(make_transport(config), None, mode=(FLAGS.sampler or s.mode).upper(),
                               num_sampling_steps=int(FLAGS.steps or s.num_steps), diffusion_form=s.diffusion_form,
                               diffusion_norm=s.diffusion_norm, last_step=s.last_step,
                               last_step_size=s.last_step_size)
    m = FLAGS.samples
    keys = jax.random.split(jax.random.key(0), 4)
    x0 = tuple(jax.random.normal(k, (m,) + z.shape[1:]) for k, z in zip(keys, held))
    ym = jnp.zeros((m,), jnp.int32)
    sampled = jax.jit(lambda x, k: sample_fn(lambda x, t: tuple(model(tuple(x), t, ym)), x, k))(x0, keys[3])
    stats = {name: dict(data=spatial_stats(z), samples=spatial_stats(p)) for name, z, p in zip(PLANES, held, sampled)}

    print(f"SiT {FLAGS.workdir} step {step}: x1 error (normalised planes; {n} held-out clips) vs the Wiener filter "
          f"fitted on {FLAGS.fit_clips} clips")
    print("| t | " + " | ".join(f"{p} SiT | {p} Wiener" for p in PLANES) + " |")
    print("|---:|" + "---:|" * (2 * len(PLANES)))
    for r in rows:
        print(f"| {r['t']:.1f} | " + " | ".join(f"{r['sit_' + p]:.3f} | {r['wiener_' + p]:.3f}" for p in PLANES) + " |")
    print(f"\nsamples ({m}, {(FLAGS.sampler or s.mode).upper()} {int(FLAGS.steps or s.num_steps)} steps) vs data")
    print("| plane | std data | std samples | lag-1 rows data | samples | lag-1 cols data | samples |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for p in PLANES:
        d, g = stats[p]["data"], stats[p]["samples"]
        print(f"| {p} | {d['std']:.3f} | {g['std']:.3f} | {d['lag1_rows']:.3f} | {g['lag1_rows']:.3f} | "
              f"{d['lag1_cols']:.3f} | {g['lag1_cols']:.3f} |")
    out = FLAGS.output or os.path.join(FLAGS.workdir, f"denoiser_{step}.json")
    with open(out + ".tmp", "w") as f:
        json.dump(dict(step=step, x1_error=rows, spatial=stats, seconds=time.perf_counter() - t0), f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"\nwrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
