r"""Train the token-budget scorer of a nested-token tokenizer (issue 17).

    python -m coordtok_jax.train_scorer --workdir=DIR [--num_clips=256] [--eval_clips=64] [--steps=1500]

The tokenizer (config.model.nested_tokens=True) stays frozen. `num_clips` random training clips
are encoded and decoded at every level of config.model.token_levels (all blocks at that level,
every patch in one joint pass); the per-block PSNR (mean over the block's valid frames of
per-frame PSNR) is the target. A small MLP on the planes' block features (models/scorer.py) is
fitted to it with AdamW (full batch; the last fifth of the clips held back for early stopping), and
checked on `eval_clips` clips of the evaluation split:
RMSE in dB and the Pearson correlation of predicted vs measured per-block PSNR (all levels) and
of the predicted vs measured gain from the lowest to the full level. Writes DIR/scorer/
(state.msgpack, scorer.json with those numbers); `evaluate --token_budget` and `reconstruct
--token_budget` then allocate tokens with it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from tqdm import tqdm

from coordtok_jax import cli
from coordtok_jax.data.pipeline import make_sampled_dataset
from coordtok_jax.evaluate import budgets
from coordtok_jax.evaluate.run import pad_batch

FLAGS = flags.FLAGS


def measure_clips(model, config, num_clips: int, batch: int, *, train: bool, seed: int, desc: str) -> dict:
    """Measured per-block PSNR at every level of `num_clips` clips: features, psnr, valid (NumPy)."""
    graphdef, params = nnx.split(model)
    measure = jax.jit(budgets.make_measure(graphdef, float(config.data.get("pad_value", -3.0))))
    T, H, W = model.geometry.video_shape
    dataset = make_sampled_dataset(config.data, (T, H, W), num_clips, batch, seed=seed, train=train)
    out = {"features": [], "psnr": [], "valid": []}
    with tqdm(total=num_clips, unit="clip", desc=desc) as bar:
        for local in dataset:
            n = len(local["n_frames"])
            local, _ = pad_batch(local, batch)  # one compiled shape: the padding rows are dropped below
            got = measure(params, jnp.asarray(local["video"]), jnp.asarray(local["n_frames"], jnp.int32))
            for k in out:
                out[k].append(np.asarray(got[k])[:n])
            bar.update(n)
    return {k: np.concatenate(v) for k, v in out.items()}


def fit(scorer, train: dict, steps: int, lr: float = 3e-3, weight_decay: float = 1e-2, val_fraction: float = 0.2,
        progress: bool = True) -> dict:
    """Full-batch AdamW on the mean squared error over valid blocks and every level, with early
    stopping: the last `val_fraction` of the clips are held back, and the scorer keeps the
    parameters of the step with the lowest validation error (checked every 25 steps).
    Returns {'train_loss': curve, 'best_step', 'val_rmse_db'}."""
    n = train["features"].shape[0]
    n_val = int(round(n * val_fraction)) if n >= 5 else 0
    part = lambda d, sl: {k: v[sl] for k, v in d.items()}
    fit_set, val_set = part(train, slice(0, n - n_val)), part(train, slice(n - n_val, n))

    def flat(d):
        f = jnp.asarray(d["features"].reshape(-1, d["features"].shape[-1]))
        t = jnp.asarray(d["psnr"].reshape(-1, d["psnr"].shape[-1]))
        return f, t, jnp.asarray(d["valid"].reshape(-1, 1), jnp.float32)

    feats, target, weight = flat(fit_set)
    scorer.mean[...] = jnp.mean(feats, axis=0)
    scorer.scale[...] = jnp.std(feats, axis=0) + 1e-3
    scorer.offset[...] = jnp.sum(target[:, 0:1] * weight) / jnp.maximum(jnp.sum(weight), 1.0)
    optimizer = nnx.Optimizer(scorer, optax.adamw(lr, weight_decay=weight_decay), wrt=nnx.Param)

    def mse(s, f, t, w):
        return jnp.sum((s(f) - t) ** 2 * w) / jnp.maximum(jnp.sum(w) * t.shape[-1], 1.0)

    @nnx.jit
    def step(scorer, optimizer):
        loss, grads = nnx.value_and_grad(lambda s: mse(s, feats, target, weight))(scorer)
        optimizer.update(scorer, grads)
        return loss

    val = flat(val_set) if n_val else None
    val_error = nnx.jit(lambda s: mse(s, *val)) if val else None
    best = (np.inf, 0, nnx.state(scorer))
    losses = []
    for i in tqdm(range(steps), unit="step", desc="fit scorer", disable=not progress):
        losses.append(float(step(scorer, optimizer)))
        if val and ((i + 1) % 25 == 0 or i + 1 == steps):
            err = float(val_error(scorer))
            if err < best[0]:
                best = (err, i + 1, jax.tree.map(jnp.copy, nnx.state(scorer)))
    if val:
        nnx.update(scorer, best[2])
    return {"train_loss": losses, "best_step": best[1] if val else steps,
            "val_rmse_db": float(np.sqrt(best[0])) if val else None}


def accuracy(scorer, data: dict) -> dict:
    """RMSE (dB) and correlations of predicted vs measured per-block PSNR on valid blocks."""
    pred = np.asarray(scorer(jnp.asarray(data["features"])))
    valid = data["valid"]
    p, m = pred[valid], data["psnr"][valid]
    return {"rmse_db": float(np.sqrt(np.mean((p - m) ** 2))), "pearson_psnr": budgets.pearson(p, m),
            "pearson_gain": budgets.pearson(p[:, -1] - p[:, 0], m[:, -1] - m[:, 0]), "blocks": int(valid.sum())}


def train_scorer(workdir: str, *, num_clips: int = 256, eval_clips: int = 64, steps: int = 1500, batch: int = 8,
                 hidden: int = 64, seed: int = 0, step=None, progress: bool = True, reuse: bool = True) -> dict:
    from coordtok_jax.io.runs import load_tokenizer

    t0 = time.perf_counter()
    model, config, ckpt_step = load_tokenizer(workdir, step)
    nt = budgets.require_nested(model, "train_scorer")
    key = {"tokenizer_step": int(ckpt_step), "levels": list(nt.levels), "num_clips": num_clips,
           "eval_clips": eval_clips, "seed": seed}
    cached = budgets.load_measurements(workdir, key) if reuse else None
    if cached is None:
        train = measure_clips(model, config, num_clips, batch, train=True, seed=seed, desc="measure (train)")
        held = measure_clips(model, config, eval_clips, batch, train=False, seed=seed + 1, desc="measure (held-out)")
        budgets.save_measurements(workdir, key, train, held)
    else:
        train, held = cached
    scorer = budgets.new_scorer(nt, model.geometry.channels, hidden, seed)
    fitted = fit(scorer, train, steps, progress=progress)
    meta = {"levels": list(nt.levels), "blocks": nt.blocks, "hidden": hidden, "tokenizer_step": int(ckpt_step),
            "num_clips": num_clips, "eval_clips": eval_clips, "steps": steps, "best_step": fitted["best_step"],
            "val_rmse_db": fitted["val_rmse_db"],
            "train": accuracy(scorer, train), "held_out": accuracy(scorer, held),
            "measured_mean_psnr_by_level": [float(v) for v in held["psnr"][held["valid"]].mean(axis=0)],
            "seconds": round(time.perf_counter() - t0, 1)}
    folder = budgets.save_scorer(workdir, scorer, meta)
    meta["folder"] = str(folder)
    return meta


def define_flags():
    flags.DEFINE_string("workdir", None, "Tokenizer run directory (config.model.nested_tokens=True).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("num_clips", 256, "Training clips measured at every level.")
    flags.DEFINE_integer("eval_clips", 64, "Held-out clips for the accuracy report.")
    flags.DEFINE_integer("steps", 1500, "Adam steps (full batch).")
    flags.DEFINE_integer("batch", 8, "Clips per measuring call.")
    flags.DEFINE_integer("hidden", 64, "Width of the scorer's MLP.")
    flags.DEFINE_integer("seed", 0, "Seed of the clip draw and the scorer's initialisation.")
    flags.DEFINE_bool("reuse_measurements", True, "Refit on DIR/scorer/measured.npz when it was measured for the "
                      "same checkpoint, levels, clips and seed (the measuring is what takes the time).")


def main(argv):
    meta = train_scorer(FLAGS.workdir, num_clips=FLAGS.num_clips, eval_clips=FLAGS.eval_clips, steps=FLAGS.steps,
                        batch=FLAGS.batch, hidden=FLAGS.hidden, seed=FLAGS.seed, step=FLAGS.step,
                        reuse=FLAGS.reuse_measurements)
    h = meta["held_out"]
    by_level = ", ".join(f"{k}: {v:.2f}" for k, v in zip(meta["levels"], meta["measured_mean_psnr_by_level"]))
    print(f"scorer written to {meta['folder']} ({meta['seconds']} s)")
    print(f"held-out ({h['blocks']} blocks): RMSE {h['rmse_db']:.2f} dB, correlation predicted vs measured PSNR "
          f"{h['pearson_psnr']}, of the gain lowest -> full {h['pearson_gain']}")
    print(f"measured held-out PSNR by cells per block: {by_level}")


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError, FileNotFoundError), required=("workdir",))
