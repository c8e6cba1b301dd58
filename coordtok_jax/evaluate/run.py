r"""Evaluate a tokenizer checkpoint with the paper's protocol: rFVD, PSNR, SSIM, LPIPS.

    python -m coordtok_jax.evaluate --workdir=DIR [--config=configs/coordtok.py:L] [--step=N]
        [--num_videos=10000] [--i3d=i3d_pretrained_400.pt] [--mode=all|chunks|official] [--batch=B]

`num_videos` clips (default 10,000) are drawn at random, with replacement, from the evaluation
split of `config.data` (random videos, random T-frame windows; shorter videos padded as in
training). Each clip is encoded and every patch decoded (`--mode=all`: one joint pass, the
paper's protocol, the default: no patch's output depends on how the clip was cut; `--mode=chunks`:
contiguous slices of `--points_per_call`, remainder decoded; `--mode=official`: the official
decode_video's slicing exactly, remainder left at zero, for comparing with its numbers). PSNR,
SSIM and LPIPS are computed per frame on [0, 1] frames and averaged over each video's valid
frames, then over videos. rFVD is the Fréchet distance between I3D logits of the original and the
reconstructed clips (`--i3d`, the official `i3d_pretrained_400.pt`; reconstructed frames past
a clip's length are replaced by the original's padding so both sets see the same padding).
LPIPS needs `config.lpips.vgg_path` / `lin_path`. Metrics without their weights are skipped with
a note, never faked.

The model config comes from the checkpoint; `--config` (default: the checkpoint's config)
supplies the data, the LPIPS paths and the mesh. Batches are sharded over all devices (and
hosts); results go to WORKDIR/eval_STEP.json and eval_STEP.md (or --output_dir).
"""

from __future__ import annotations

import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm import tqdm

from coordtok_jax import cli
from coordtok_jax import sharding as sharding_lib
from coordtok_jax.data.pipeline import distinct_count, make_sampled_dataset
from coordtok_jax.data.video import to_model_input
from coordtok_jax.evaluate import budgets
from coordtok_jax.metrics.fvd import FeatureStats, fvd
from coordtok_jax.io.runs import load_tokenizer
from coordtok_jax.metrics.quality import frames_in_unit_range, valid_frames, video_metrics
from coordtok_jax.models.decode_video import decode_video

METRICS = ("psnr", "ssim", "lpips")


def pad_batch(batch: dict, size: int) -> tuple[dict, np.ndarray]:
    """Pads a (possibly short) last batch to `size` clips; returns it and the valid mask."""
    n = len(batch["n_frames"])
    valid = np.arange(size) < n
    if n == size:
        return batch, valid
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = np.concatenate([v, np.repeat(v[:1], size - n, axis=0)], axis=0)
    return out, valid


def make_eval_step(graphdef, geometry, *, mode: str, points_per_call: Optional[int], pad_value: float,
                   lpips_graphdef=None, i3d_graphdef=None):
    """jit-able (params, lpips_state, i3d_state, video uint8, n_frames) -> per-video metrics."""
    from coordtok_jax.metrics.i3d import preprocess

    T = geometry.video_shape[0]

    def step(params, lpips_state, i3d_state, video, n_frames, levels=None):
        model = nnx.merge(graphdef, params)
        planes = model.apply_levels(model.encode(to_model_input(video, n_frames, pad_value), n_frames), levels)
        pred = frames_in_unit_range(decode_video(model, planes, T, points_per_call, mode=mode))
        target = video.astype(jnp.float32) / 255.0
        lpips = None if lpips_graphdef is None else nnx.merge(lpips_graphdef, lpips_state)
        out = video_metrics(pred, target, n_frames, lpips)
        if i3d_graphdef is not None:
            i3d = nnx.merge(i3d_graphdef, i3d_state)
            keep = valid_frames(T, n_frames)[:, :, None, None, None]
            fake = jnp.where(keep, pred * 255.0, video.astype(jnp.float32))
            out["i3d_real"] = i3d(preprocess(video))
            out["i3d_fake"] = i3d(preprocess(fake))
        return out

    return step


def evaluate(workdir: str, *, config=None, step: Optional[int] = None, num_videos: int = 10_000,
             batch: int = 0, mode: str = "all", points_per_call: Optional[int] = None,
             i3d_path: Optional[str] = None, seed: int = 0, attention_impl: Optional[str] = None,
             output_dir: Optional[str] = None, progress: bool = True, devices=None,
             token_budget: Optional[float] = None, allocation: str = "ilp") -> dict:
    """Runs the evaluation and writes eval_STEP.json / .md; returns the results dict.

    `devices` (default: all) are the devices the batch is sharded over. `token_budget` (a nested-
    token tokenizer only): each batch decoded with at most that fraction of its temporal-plane
    tokens, split over the blocks by `allocation` ('uniform', or 'greedy' / 'ilp' on the scorer's
    predictions from WORKDIR/scorer); results go to eval_STEP_budgetF_ALLOCATION.json / .md.
    """
    t0 = time.perf_counter()
    devices = list(jax.devices() if devices is None else devices)
    # a ('data',) mesh: parameters replicated, the batch split over every device by the rules
    mesh = sharding_lib.make_mesh((len(devices),), ("data",), devices=devices)
    replicated = sharding_lib.replicated(mesh)
    overrides = {} if attention_impl is None else {"attention_impl": attention_impl}
    model, ckpt_config, step = load_tokenizer(workdir, step, mesh=mesh, **overrides)
    config = ckpt_config if config is None else config
    rules = sharding_lib.rules_of(config)
    geometry = model.geometry
    T, H, W = geometry.video_shape
    if mode in ("chunks", "official") and not points_per_call:
        points_per_call = int(config.get("eval_points_per_call") or config.get("num_points") or 1024)
    batch = int(batch) or len(devices)
    if batch % len(devices):
        raise ValueError(f"--batch={batch} must be a multiple of the {len(devices)} devices")
    if batch % jax.process_count():
        raise ValueError(f"--batch={batch} must be a multiple of the {jax.process_count()} processes")
    local_batch = batch // jax.process_count()
    notes = []

    lpips_graphdef = lpips_state = None
    vgg, lin = config.get("lpips", {}).get("vgg_path"), config.get("lpips", {}).get("lin_path")
    if vgg and lin:
        from coordtok_jax.metrics.lpips import load_lpips

        lpips_graphdef, lpips_state = nnx.split(load_lpips(vgg, lin))
        lpips_state = jax.device_put(lpips_state, replicated)
    else:
        notes.append("LPIPS skipped: set config.lpips.vgg_path and config.lpips.lin_path")
    i3d_graphdef = i3d_state = None
    if i3d_path:
        from coordtok_jax.metrics.i3d import MIN_FRAMES, load_i3d

        if T < MIN_FRAMES:
            raise ValueError(f"I3D needs clips of at least {MIN_FRAMES} frames, this model's are {T}")
        i3d_graphdef, i3d_state = nnx.split(load_i3d(i3d_path))
        i3d_state = jax.device_put(i3d_state, replicated)
    else:
        notes.append("rFVD skipped: pass --i3d=i3d_pretrained_400.pt")

    graphdef, params = nnx.split(model)
    allocator = None if token_budget is None else BudgetAllocator(
        model, graphdef, workdir, float(token_budget), allocation, float(config.data.get("pad_value", -3.0)), mesh, rules)
    step_fn = make_eval_step(graphdef, geometry, mode=mode, points_per_call=points_per_call,
                             pad_value=float(config.data.get("pad_value", -3.0)),
                             lpips_graphdef=lpips_graphdef, i3d_graphdef=i3d_graphdef)
    batch_sh = {k: sharding_lib.batch_sharding(mesh, rules, shape)
                for k, shape in (("video", (batch, T, H, W, 3)), ("n_frames", (batch,)))}
    batch_sh["levels"] = sharding_lib.batch_sharding(mesh, rules, (batch, 1))
    eval_step = jax.jit(step_fn, in_shardings=(replicated, replicated, replicated, batch_sh["video"],
                                               batch_sh["n_frames"], batch_sh["levels"]))
    with jax.set_mesh(mesh):  # every program of the loop runs with its mesh set
        dataset = make_sampled_dataset(config.data, (T, H, W), num_videos, local_batch, seed=seed)
        per_host = -(-num_videos // jax.process_count())
        values = {k: [] for k in METRICS}
        real, fake = FeatureStats(), FeatureStats()
        bad_files = set()  # distinct unreadable records (a record can be drawn twice)
        bar = tqdm(total=per_host * jax.process_count(), unit="video", desc=f"eval step {step}",
                   disable=not progress or jax.process_index() != 0)
        for local in dataset:
            local, valid = pad_batch(local, local_batch)
            bad_files.update(int(i) for i in np.ravel(np.asarray(local["failed_records"])[valid]) if i >= 0)
            arrays = [jax.make_array_from_process_local_data(batch_sh[k], np.asarray(local[k])) for k in ("video", "n_frames")]
            levels = None if allocator is None else allocator(params, arrays, valid)
            out = eval_step(params, lpips_state, i3d_state, *arrays, levels)
            out = multihost_utils.process_allgather(out, tiled=True)
            keep = multihost_utils.process_allgather(valid, tiled=False).reshape(-1)
            for k in METRICS:
                if k in out:
                    values[k].append(np.asarray(out[k])[keep])
            if "i3d_real" in out:
                real.update(np.asarray(out["i3d_real"])[keep])
                fake.update(np.asarray(out["i3d_fake"])[keep])
            bar.update(int(keep.sum()))
            if values["psnr"]:
                bar.set_postfix(psnr=f"{np.concatenate(values['psnr']).mean():.2f}")
        bar.close()

    results = {
        "step": int(step),
        "workdir": str(workdir),
        "num_videos": int(sum(len(v) for v in values["psnr"])),
        "tokens_per_video": int(geometry.num_latent_tokens),
        "video_shape": [T, H, W],
        "mode": mode,
        "points_per_call": points_per_call if mode in ("chunks", "official") else None,
        "data_source": str(config.data.source),
        "skipped_files": distinct_count(bad_files),
        "seconds": round(time.perf_counter() - t0, 1),
        "notes": notes,
    }
    for k in METRICS:
        if values[k]:
            v = np.concatenate(values[k]).astype(np.float64)
            results[k] = float(v.mean())
            results[f"{k}_std"] = float(v.std())
    if allocator is not None:
        results.update(allocator.summary(geometry))
    if real.count >= 2:
        results["rfvd"] = fvd(real, fake)
    elif i3d_path:
        notes.append("rFVD needs at least 2 videos")
    if jax.process_index() == 0:
        write_results(results, output_dir or workdir)
    return results


class BudgetAllocator:
    """Per batch: the scorer's predictions (or none, for 'uniform') -> per-block levels under the
    budget (evaluate/budgets.py), as a global array sharded like the batch. The scorer encodes the
    batch itself (the eval step then encodes it again: the host-side allocation sits between the
    two programs; the encode is a small part of an eval step, whose cost is the joint decode)."""

    def __init__(self, model, graphdef, workdir, fraction, method, pad_value, mesh, rules):
        self.nt = budgets.require_nested(model, "--token_budget")
        self.fraction, self.method, self.mesh, self.rules = fraction, method, mesh, rules
        self.predict = None
        if method != "uniform":
            scorer, _ = budgets.load_scorer(workdir, self.nt, model.geometry.channels)
            scorer_graphdef, scorer_state = nnx.split(scorer)
            self.scorer_state = jax.device_put(scorer_state, sharding_lib.replicated(mesh))
            self.predict = jax.jit(budgets.make_predict(graphdef, scorer_graphdef, pad_value))
        self.chosen = []

    def __call__(self, params, arrays, valid_clips) -> jax.Array:
        video, n_frames = arrays
        batch = video.shape[0]
        n = np.asarray(multihost_utils.process_allgather(n_frames, tiled=True))
        valid = budgets.valid_blocks(n, video.shape[1], self.nt)
        if self.predict is None:
            scores = np.zeros((batch, self.nt.blocks, len(self.nt.levels)))
        else:
            scores = np.asarray(multihost_utils.process_allgather(
                self.predict(params, self.scorer_state, video, n_frames), tiled=True))
        levels = budgets.allocate(scores, valid, self.nt, self.fraction, self.method)
        keep = np.asarray(multihost_utils.process_allgather(valid_clips, tiled=False)).reshape(-1)
        self.chosen.append(levels[keep])
        sh = sharding_lib.batch_sharding(self.mesh, self.rules, levels.shape)
        return jax.make_array_from_callback(levels.shape, sh, lambda idx: levels[idx])

    def summary(self, geometry) -> dict:
        chosen = np.concatenate(self.chosen) if self.chosen else np.zeros((0, self.nt.blocks), np.int32)
        temporal = self.nt.tokens(chosen) if len(chosen) else np.zeros(0)
        return {"token_budget": self.fraction, "allocation": self.method,
                "temporal_tokens_per_video": float(temporal.mean()) if len(temporal) else None,
                "full_temporal_tokens": self.nt.full_tokens,
                "tokens_per_video": float(geometry.latent_xy ** 2 + temporal.mean()) if len(temporal) else None,
                "level_histogram": np.bincount(chosen.reshape(-1), minlength=len(self.nt.levels)).tolist(),
                "levels": list(self.nt.levels),
                "allocations": chosen.tolist()}  # per evaluated video, per block: the level index


def results_name(results: dict) -> str:
    """eval_STEP, or eval_STEP_budgetF_ALLOCATION for a token-budget evaluation."""
    name = f"eval_{results['step']}"
    if results.get("token_budget") is not None:
        name += f"_budget{results['token_budget']:g}_{results['allocation']}"
    return name


def markdown(results: dict) -> str:
    fmt = lambda k, spec: format(results[k], spec) if k in results else "n/a"
    lines = [
        f"# CoordTok evaluation, step {results['step']}",
        "",
        f"{results['num_videos']} random {results['video_shape'][0]}-frame clips of {results['data_source']}, "
        f"decode mode `{results['mode']}`" + (f" ({results['points_per_call']} points per call)"
                                                 if results.get("points_per_call") else ""),
        "",
        "| rFVD | PSNR | SSIM | LPIPS | tokens per video |",
        "|---:|---:|---:|---:|---:|",
        f"| {fmt('rfvd', '.1f')} | {fmt('psnr', '.2f')} | {fmt('ssim', '.4f')} | {fmt('lpips', '.4f')} | "
        f"{results['tokens_per_video']} |",
    ]
    if results.get("token_budget") is not None:
        lines += ["", f"Token budget {results['token_budget']:g} of the temporal-plane tokens, allocated by "
                      f"`{results['allocation']}`: {results['temporal_tokens_per_video']:.1f} of "
                      f"{results['full_temporal_tokens']} temporal tokens per video on average; blocks per level "
                      f"{dict(zip(results['levels'], results['level_histogram']))}."]
    lines += [""] + [f"- {n}" for n in results["notes"]] if results["notes"] else []
    return "\n".join(lines) + "\n"


def write_results(results: dict, directory: str) -> None:
    d = epath.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = results_name(results)
    (d / f"{name}.json").write_text(json.dumps(results, indent=2))
    (d / f"{name}.md").write_text(markdown(results))


# The command line: python -m coordtok_jax.evaluate (console script coordtok-evaluate).

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Run (or torch-import) directory holding checkpoints/.")
    config_flags.DEFINE_config_file("config", None, "Data / LPIPS / mesh config (default: the checkpoint's).",
                                    lock_config=False)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_integer("num_videos", 10_000, "Random clips to evaluate (the paper: 10,000).")
    flags.DEFINE_string("i3d", None, "I3D weights (i3d_pretrained_400.pt) for rFVD; skipped without.")
    flags.DEFINE_enum("mode", "all", ["all", "chunks", "official"],
                      "all: every patch in one joint pass (the paper's protocol, the default); chunks: contiguous "
                      "chunks of --points_per_call, remainder decoded; official: the official decode_video's "
                      "slicing exactly (equal chunks, remainder and a partial temporal patch left at zero).")
    flags.DEFINE_integer("points_per_call", None, "Chunk size for --mode=chunks and --mode=official (default: config.num_points).")
    flags.DEFINE_integer("batch", 0, "Clips per step over all devices (default: one per device).")
    flags.DEFINE_integer("seed", 0, "Seed of the clip draw.")
    flags.DEFINE_string("attention", None, "Override config.model.attention_impl (e.g. chunked on CPU, cudnn).")
    flags.DEFINE_string("output_dir", None, "Where to write eval_STEP.json/.md (default: --workdir).")
    flags.DEFINE_float("token_budget", None, "Nested-token tokenizers: at most this fraction of the temporal-plane "
                       "tokens per batch (e.g. 0.5).")
    flags.DEFINE_enum("allocation", "ilp", list(budgets.METHODS), "How --token_budget is split over the temporal "
                      "blocks: uniform, or greedy / ilp on the scorer's predictions (python -m coordtok_jax.train_scorer).")


def main(argv):
    results = evaluate(FLAGS.workdir, config=FLAGS.config, step=FLAGS.step, num_videos=FLAGS.num_videos,
                       batch=FLAGS.batch, mode=FLAGS.mode, points_per_call=FLAGS.points_per_call,
                       i3d_path=FLAGS.i3d, seed=FLAGS.seed, attention_impl=FLAGS.attention,
                       output_dir=FLAGS.output_dir, token_budget=FLAGS.token_budget, allocation=FLAGS.allocation)
    print(markdown(results))
    print(f"wrote {FLAGS.output_dir or FLAGS.workdir}/{results_name(results)}.json")


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError, FileNotFoundError), required=("workdir",))
