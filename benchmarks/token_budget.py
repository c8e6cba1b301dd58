r"""Token budgets on held-out clips (issue 17): PSNR vs budget, scorer-driven vs uniform allocation.

    python benchmarks/token_budget.py --nested=DIR --fixed=DIR [--clips=64] [--batch=8] \
        [--budgets=0.375,0.5,0.625,0.75] [--plot=benchmarks/token_budget.png]

--nested: a tokenizer trained with `configs/coordtok.py:cpu,tokens=nested,data=mixed` whose scorer
was trained (python -m coordtok_jax.train_scorer); --fixed: the same size without nested tokens,
trained for the same steps on the same data (`cpu,data=mixed`). On `--clips` held-out clips of
the nested run's data (half still, half fast):

* the nested model's PSNR (mean over videos of the mean per-frame PSNR over valid frames) at
  every uniform level of config.model.token_levels, and the fixed model's at its full tokens;
* at each budget in --budgets (fraction of the temporal-plane tokens of all clips together):
  uniform (the largest level that fits everywhere), greedy and ILP on the scorer's predictions,
  and ILP on the measured per-block PSNRs (the oracle: what a perfect scorer would reach);
  all, still and fast clips (fast = any change between consecutive valid frames);
* the scorer's accuracy on these clips (RMSE, Pearson correlation of predicted vs measured
  per-block PSNR, and of the gain from the lowest to the full level).

Prints a table, writes the plot (PSNR vs temporal tokens: uniform vs adaptive) and a JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

from coordtok_jax import pictures  # noqa: E402
from coordtok_jax.data.pipeline import make_sampled_dataset  # noqa: E402
from coordtok_jax.data.video import to_model_input  # noqa: E402
from coordtok_jax.evaluate import budgets  # noqa: E402
from coordtok_jax.evaluate.token_scorer import accuracy  # noqa: E402
from coordtok_jax.io.runs import load_tokenizer  # noqa: E402
from coordtok_jax.metrics.quality import frames_in_unit_range, psnr_per_frame, video_mean  # noqa: E402
from coordtok_jax.models.decode_video import decode_video  # noqa: E402
from coordtok_jax.models.nested import uniform_levels  # noqa: E402
from coordtok_jax.models.scorer import block_features  # noqa: E402

_NESTED = flags.DEFINE_string("nested", None, "Nested-token tokenizer workdir (with scorer/).")
_FIXED = flags.DEFINE_string("fixed", None, "Same-size fixed-token tokenizer workdir (optional).")
_CLIPS = flags.DEFINE_integer("clips", 64, "Held-out clips.")
_BATCH = flags.DEFINE_integer("batch", 8, "Clips per call.")
_BUDGETS = flags.DEFINE_list("budgets", ["0.375", "0.5", "0.625", "0.75"],
                             "Fractions of the temporal-plane tokens.")
_SEED = flags.DEFINE_integer("seed", 1, "Seed of the held-out clip draw.")
_PLOT = flags.DEFINE_string("plot", "benchmarks/token_budget.png", "Output plot.")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers here.")


def held_out(config, shape, clips, batch, seed):
    data = list(make_sampled_dataset(config.data, shape, clips, batch, seed=seed))
    return [(np.asarray(b["video"]), np.asarray(b["n_frames"], np.int32)) for b in data]


def make_fns(model, pad_value):
    graphdef, params = nnx.split(model)

    @jax.jit
    def encode(params, video, n_frames):
        m = nnx.merge(graphdef, params)
        planes = m.encode(to_model_input(video, n_frames, pad_value), n_frames)
        feats = block_features(planes, (m.nested_fill_yt[...], m.nested_fill_xt[...]), m.nested) \
            if m.nested is not None else jnp.zeros((video.shape[0], 1, 1))
        return planes, feats

    @jax.jit
    def decode(params, planes, levels, video, n_frames):
        m = nnx.merge(graphdef, params)
        pred = frames_in_unit_range(decode_video(m, m.apply_levels(planes, levels)))
        target = video.astype(jnp.float32) / 255.0
        per_video = video_mean(psnr_per_frame(pred, target), n_frames)
        blocks = budgets.block_psnr(pred, target, n_frames, m.nested)[0] if m.nested is not None else per_video
        return per_video, blocks

    return params, encode, decode


def main(argv):
    del argv
    t0 = time.perf_counter()
    model, config, step = load_tokenizer(_NESTED.value)
    nt = budgets.require_nested(model, "benchmarks/token_budget.py")
    scorer, meta = budgets.load_scorer(_NESTED.value, nt, model.geometry.channels)
    T, H, W = model.geometry.video_shape
    batches = held_out(config, (T, H, W), _CLIPS.value, _BATCH.value, _SEED.value)
    video = np.concatenate([v for v, _ in batches])
    n_frames = np.concatenate([n for _, n in batches])
    diffs = [np.abs(np.diff(v[:n].astype(np.int16), axis=0)).max() if n > 1 else 0 for v, n in zip(video, n_frames)]
    fast = np.asarray(diffs) > 0
    params, encode, decode = make_fns(model, float(config.data.get("pad_value", -3.0)))
    planes_b, feats_b = zip(*(encode(params, jnp.asarray(v), jnp.asarray(n)) for v, n in batches))
    predicted = np.concatenate([np.asarray(scorer(f)) for f in feats_b])
    valid = budgets.valid_blocks(n_frames, T, nt)

    cache = {}

    def run(levels):
        """levels (clips, blocks) -> (per-video PSNR, per-block PSNR); each allocation decoded once."""
        key = np.asarray(levels, np.int32).tobytes()
        if key not in cache:
            cache[key] = decode_all(levels)
        return cache[key]

    def decode_all(levels):
        out_v, out_b, i = [], [], 0
        for planes, (v, n) in zip(planes_b, batches):
            pv, pb = decode(params, planes, jnp.asarray(levels[i:i + len(n)]), jnp.asarray(v), jnp.asarray(n))
            out_v.append(np.asarray(pv))
            out_b.append(np.asarray(pb))
            i += len(n)
        return np.concatenate(out_v), np.concatenate(out_b)

    # Uniform levels: the budget curve, and the measured per-block PSNRs (the oracle's scores).
    curve, measured = [], []
    for level in range(len(nt.levels)):
        pv, pb = run(uniform_levels(len(n_frames), nt, level))
        curve.append(pv)
        measured.append(pb)
    measured = np.stack(measured, axis=-1)
    acc = accuracy(scorer, {"features": np.concatenate([np.asarray(f) for f in feats_b]), "psnr": measured,
                            "valid": valid})

    def split(pv):
        return {"all": float(pv.mean()), "still": float(pv[~fast].mean()) if (~fast).any() else None,
                "fast": float(pv[fast].mean()) if fast.any() else None}

    rows = []
    for f in (float(b) for b in _BUDGETS.value):
        row = {"budget": f}
        for name, scores, method in (("uniform", predicted, "uniform"), ("greedy", predicted, "greedy"),
                                     ("ilp", predicted, "ilp"), ("oracle", measured, "ilp")):
            try:
                levels = budgets.allocate(scores, valid, nt, f, method)
            except ValueError as e:
                row[name] = {"error": str(e)}
                continue
            pv, _ = run(levels)
            row[name] = dict(split(pv), tokens=float(nt.tokens(levels).mean() / nt.full_tokens),
                             predicted=float(np.sum(np.where(valid, np.take_along_axis(
                                 predicted, levels[..., None], -1)[..., 0], 0))))
        rows.append(row)

    fixed = None
    if _FIXED.value:
        fmodel, _, fstep = load_tokenizer(_FIXED.value)
        fparams, fencode, fdecode = make_fns(fmodel, float(config.data.get("pad_value", -3.0)))
        pv = np.concatenate([np.asarray(fdecode(fparams, fencode(fparams, jnp.asarray(v), jnp.asarray(n))[0], None,
                                                jnp.asarray(v), jnp.asarray(n))[0]) for v, n in batches])
        fixed = dict(split(pv), step=int(fstep))

    levels_frac = [k / nt.cells for k in nt.levels]
    print(f"nested tokenizer {_NESTED.value} (step {step}), {len(n_frames)} held-out clips "
          f"({int(fast.sum())} fast, {int((~fast).sum())} still), {nt.blocks} temporal blocks, levels {list(nt.levels)} "
          f"cells of {nt.cells}")
    print("\n| uniform level (share of temporal tokens) | PSNR all | still | fast |\n|---:|---:|---:|---:|")
    for frac, pv in zip(levels_frac, curve):
        s = split(pv)
        print(f"| {frac:.3g} | {s['all']:.2f} | {s['still']:.2f} | {s['fast']:.2f} |")
    if fixed:
        print(f"| fixed-token model (step {fixed['step']}), 1.0 | {fixed['all']:.2f} | {fixed['still']:.2f} | "
              f"{fixed['fast']:.2f} |")
    print("\n| budget | allocation | tokens used | PSNR all | still | fast |\n|---:|---|---:|---:|---:|---:|")
    for row in rows:
        for name in ("uniform", "greedy", "ilp", "oracle"):
            r = row[name]
            if "error" in r:
                print(f"| {row['budget']:g} | {name} | - | {r['error']} | | |")
                continue
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            print(f"| {row['budget']:g} | {name} | {r['tokens']:.3f} | {fmt(r['all'])} | {fmt(r['still'])} | "
                  f"{fmt(r['fast'])} |")
    print(f"\nscorer on these clips: RMSE {acc['rmse_db']:.2f} dB, Pearson predicted vs measured per-block PSNR "
          f"{acc['pearson_psnr']:.3f}, of the gain lowest -> full {acc['pearson_gain']:.3f} ({acc['blocks']} blocks)")
    print(f"({time.perf_counter() - t0:.0f} s)")

    series = [("uniform levels", levels_frac, [float(c.mean()) for c in curve])]
    for name in ("ilp", "greedy", "oracle"):
        pts = [(r[name]["tokens"], r[name]["all"]) for r in rows if "error" not in r[name]]
        series.append((f"{name} ({'measured' if name == 'oracle' else 'scorer'})", [p[0] for p in pts], [p[1] for p in pts]))
    if fixed:
        series.append(("fixed-token model", [1.0], [fixed["all"]]))
    pictures.line_plot(series, _PLOT.value, xlabel="share of the temporal-plane tokens", ylabel="dB",
                       title=f"held-out PSNR vs token budget ({len(n_frames)} clips, half still / half fast)")
    print(f"wrote {_PLOT.value}")
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump({"curve": [split(c) for c in curve], "levels": list(nt.levels), "rows": rows, "fixed": fixed,
                       "scorer": acc, "scorer_training": meta}, f, indent=2)


if __name__ == "__main__":
    flags.mark_flag_as_required("nested")
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
