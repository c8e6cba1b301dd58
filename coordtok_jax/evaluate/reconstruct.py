r"""Reconstruct a video file with a trained CoordTok (or decode saved tokens).

    python -m coordtok_jax.reconstruct --workdir=DIR --input=VIDEO --output=OUT.mp4
        [--side_by_side] [--save_tokens=FILE.npz] [--mode=all|chunks|official] [--step=N]
    python -m coordtok_jax.reconstruct --workdir=DIR --from_tokens=FILE.npz --output=OUT.mp4 [--input=VIDEO]

Any size and length: frames are resized (PIL bicubic, shorter side) and center-cropped to the
model's H x W as in training; the video is cut into consecutive T-frame windows (the last one
shorter and padded as in training), each encoded to its triplane tokens and decoded, and the
windows are stitched back. Writes OUT.mp4 at the input's resolution (the reconstruction
upsampled, bicubic, onto the center-cropped region the model saw; with --side_by_side next to
that region of the input) and OUT_psnr.png (per-frame PSNR), and prints the token count and the
PSNR (mean of per-frame PSNR on [0, 1] frames, at the model's resolution, as in training). --save_tokens writes the planes of every window
(npz: z_xy, z_yt, z_xt, n_frames, fps, step); --from_tokens decodes such a file.

A nested-token tokenizer (config.model.nested_tokens) decodes at `--token_budget=F`: at most F of
the temporal-plane tokens over all the video's windows, split over the temporal blocks by
`--allocation` (ilp or greedy on the scorer of `python -m coordtok_jax.train_scorer`, or
uniform); --save_tokens then stores the chosen levels with the planes (dropped cells zeroed),
and --from_tokens decodes them at those levels.
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from absl import flags
from etils import epath

from coordtok_jax import cli
from coordtok_jax.evaluate import budgets

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "Run (or torch-import) directory holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("input", None, "Video file to reconstruct (local or gs://).")
    flags.DEFINE_string("output", None, "Output .mp4 (the PSNR plot goes next to it as *_psnr.png).")
    flags.DEFINE_bool("side_by_side", False, "Write original | reconstruction.")
    flags.DEFINE_string("save_tokens", None, "Write the triplane tokens of every window to this .npz.")
    flags.DEFINE_string("from_tokens", None, "Decode tokens saved with --save_tokens instead of encoding --input.")
    flags.DEFINE_enum("mode", "all", ["all", "chunks", "official"],
                      "all: every patch in one joint pass (the paper's protocol, the default); chunks: contiguous "
                      "chunks of --points_per_call, remainder decoded; official: the official decode_video's "
                      "slicing exactly (equal chunks, remainder and a partial temporal patch left at zero).")
    flags.DEFINE_integer("points_per_call", 1024, "Chunk size for --mode=chunks and --mode=official.")
    flags.DEFINE_integer("batch", 1, "Windows encoded/decoded per call.")
    flags.DEFINE_integer("max_frames", None, "Use at most this many frames of --input.")
    flags.DEFINE_float("fps", None, "Output frame rate (default: the input's, else 8).")
    flags.DEFINE_string("attention", None, "Override config.model.attention_impl (e.g. chunked, cudnn).")
    flags.DEFINE_float("token_budget", None, "Nested-token tokenizers: at most this fraction of the temporal-plane "
                       "tokens over the video's windows (e.g. 0.5); --save_tokens then stores the levels too.")
    flags.DEFINE_enum("allocation", "ilp", list(budgets.METHODS), "How --token_budget is split over the temporal "
                      "blocks: uniform, or greedy / ilp on the scorer's predictions (python -m coordtok_jax.train_scorer).")


def video_fps(path: str, default: float = 8.0) -> float:
    import av

    try:
        with epath.Path(path).open("rb") as f, av.open(f) as container:
            rate = container.streams.video[0].average_rate
            return float(rate) if rate else default
    except Exception:  # noqa: BLE001 - the frame rate is cosmetic
        return default


def windows(num_frames: int, T: int) -> list[tuple[int, int]]:
    """Consecutive (start, length) windows of at most T frames covering num_frames."""
    return [(s, min(T, num_frames - s)) for s in range(0, num_frames, T)]


def choose_levels(model, workdir, planes_all, n_frames, fraction: float, method: str) -> np.ndarray:
    """(windows, blocks) levels: the windows' temporal-plane tokens within `fraction` of the full
    budget, split by `method` on the scorer's predictions (uniform: no scorer)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    nt = model.nested
    T = model.geometry.video_shape[0]
    scores = np.zeros((len(planes_all), nt.blocks, len(nt.levels)))
    if method != "uniform":
        scorer, _ = budgets.load_scorer(workdir, nt, model.geometry.channels)
        graphdef, params = nnx.split(model)
        scorer_graphdef, scorer_state = nnx.split(scorer)
        planes = tuple(jnp.asarray(np.stack([p[i] for p in planes_all])) for i in range(3))
        score = jax.jit(budgets.make_score_planes(graphdef, scorer_graphdef))
        scores = np.asarray(score(params, scorer_state, planes))
    return budgets.allocate(scores, budgets.valid_blocks(n_frames, T, nt), nt, fraction, method)


def kept_only(planes, levels, nt):
    """One window's planes with the temporal planes' dropped cells zeroed (what a budget keeps)."""
    z_xy, z_yt, z_xt = planes
    keep = nt.kept[np.asarray(levels)].reshape(nt.blocks * nt.rows, nt.cols, 1)
    return [z_xy, np.where(keep, z_yt, 0.0).astype(z_yt.dtype), np.where(keep, z_xt, 0.0).astype(z_xt.dtype)]


def reconstruct(workdir: str, output: str, *, input_path: Optional[str] = None, from_tokens: Optional[str] = None,
                save_tokens: Optional[str] = None, side_by_side: bool = False, mode: str = "all",
                points_per_call: int = 1024, batch: int = 1, step: Optional[int] = None,
                max_frames: Optional[int] = None, fps: Optional[float] = None,
                attention_impl: Optional[str] = None, token_budget: Optional[float] = None,
                allocation: str = "ilp") -> dict:
    """Runs the reconstruction; returns a summary (frames, windows, tokens, psnr, outputs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.data.video import to_model_input
    from coordtok_jax import pictures
    from coordtok_jax.data.video_io import crop_box, decode_frames, resize, resize_center_crop, write_video
    from coordtok_jax.io.runs import load_tokenizer
    from coordtok_jax.metrics.quality import frames_in_unit_range, psnr_per_frame
    from coordtok_jax.models import nested as nested_lib
    from coordtok_jax.models.decode_video import decode_video

    if not input_path and not from_tokens:
        raise ValueError("give --input (a video to reconstruct) or --from_tokens (saved tokens to decode)")
    if batch <= 0:
        raise ValueError(f"--batch must be positive, got {batch}")
    overrides = {} if attention_impl is None else {"attention_impl": attention_impl}
    # windows split over as many local devices as divide the batch (one device for --batch=1)
    devices = jax.local_devices()
    n_dev = max(d for d in range(1, len(devices) + 1) if batch % d == 0)
    mesh = sharding_lib.make_mesh((n_dev,), ("data",), devices=devices[:n_dev])
    model, config, step = load_tokenizer(workdir, step, mesh=mesh, **overrides)
    rows = lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh, sharding_lib.rules_of(config), x.shape))
    g = model.geometry
    T, H, W = g.video_shape
    pad_value = float(config.data.get("pad_value", -3.0))
    graphdef, params = nnx.split(model)
    ppc = points_per_call if mode in ("chunks", "official") else None

    original = raw = saved_levels = None
    if token_budget is not None:
        budgets.require_nested(model, "--token_budget")
    if input_path:
        raw = decode_frames(input_path, max_frames)
        original = resize_center_crop(raw, H, W)
        fps = fps or video_fps(input_path)
    if from_tokens:
        with epath.Path(from_tokens).open("rb") as f, np.load(f) as data:
            tokens = {k: data[k] for k in data.files}
        for name, shape in zip(("z_xy", "z_yt", "z_xt"), g.plane_shapes):
            if name not in tokens or tuple(tokens[name].shape[1:]) != shape:
                got = tokens[name].shape if name in tokens else "missing"
                raise ValueError(f"{from_tokens}: {name} must be (windows,) + {shape} for this model, got {got}")
        n_frames = tokens["n_frames"].astype(np.int32)
        if "levels" in tokens:  # saved at a token budget: decoded at the saved levels
            if token_budget is not None:
                raise ValueError(f"{from_tokens} was saved at a token budget (its dropped cells are gone); "
                                 "decode it without --token_budget")
            budgets.require_nested(model, f"{from_tokens} (saved at a token budget)")
            saved_levels = tokens["levels"].astype(np.int32)
            nested_lib.check_levels(saved_levels, len(n_frames), model.nested)
        fps = fps or float(tokens.get("fps", 8.0))
        if original is not None and len(original) != int(n_frames.sum()):
            raise ValueError(f"--input has {len(original)} frames, the tokens describe {int(n_frames.sum())}")
    else:
        spans = windows(len(original), T)
        n_frames = np.array([n for _, n in spans], np.int32)
    fps = fps or 8.0
    num_windows = len(n_frames)

    @jax.jit
    def encode(params, clips, n):
        return nnx.merge(graphdef, params).encode(to_model_input(clips, n, pad_value), n)

    @jax.jit
    def decode(params, planes, levels):
        model = nnx.merge(graphdef, params)
        return frames_in_unit_range(decode_video(model, model.apply_levels(planes, levels), T, ppc, mode=mode))

    t0 = time.perf_counter()
    batches = [list(range(b0, min(b0 + batch, num_windows))) for b0 in range(0, num_windows, batch)]
    fill = lambda idx: idx + [idx[-1]] * (batch - len(idx))  # fixed batch: one compilation
    planes_all, recon = [], []
    with jax.set_mesh(mesh):  # the encode/decode programs run with their mesh set
        for idx in batches:  # 1. the tokens of every window
            if from_tokens:
                planes = [tokens[k][fill(idx)] for k in ("z_xy", "z_yt", "z_xt")]
            else:
                clips = np.zeros((batch, T, H, W, 3), np.uint8)
                for j, w in enumerate(fill(idx)):
                    s, length = spans[w]
                    clips[j, :length] = original[s:s + length]
                planes = encode(params, rows(clips), rows(np.asarray(n_frames[fill(idx)])))
            planes_all.extend([np.asarray(p[j]) for p in planes] for j in range(len(idx)))
        # 2. a token budget: per-block levels over all the video's windows (evaluate/budgets.py)
        levels_all = saved_levels
        if token_budget is not None:
            levels_all = choose_levels(model, workdir, planes_all, n_frames, token_budget, allocation)
        for idx in batches:  # 3. decode
            planes = tuple(rows(np.stack([planes_all[w][i] for w in fill(idx)])) for i in range(3))
            levels = None if levels_all is None else rows(levels_all[fill(idx)])
            frames = np.asarray(decode(params, planes, levels))
            for j, w in enumerate(idx):
                recon.append(frames[j, : n_frames[w]])
    if levels_all is not None:  # what is saved is what was decoded: dropped cells carry nothing
        planes_all = [kept_only(p, lv, model.nested) for p, lv in zip(planes_all, levels_all)]
    recon = np.concatenate(recon)
    recon_u8 = np.round(recon * 255.0).astype(np.uint8)
    seconds = time.perf_counter() - t0

    out = epath.Path(output)
    written = [str(out)]
    # back at the input's resolution: the reconstruction upsampled (bicubic) onto the region of the
    # input the model saw (the center crop), next to that region of the input itself
    shown, shown_original = recon_u8, original
    if raw is not None:
        y0, x0, ch, cw = crop_box(raw.shape[1], raw.shape[2], H, W)
        shown = resize(recon_u8, ch, cw)
        shown_original = raw[: len(recon_u8), y0:y0 + ch, x0:x0 + cw]
    video = shown if not (side_by_side and original is not None) else np.concatenate([shown_original, shown], axis=2)
    write_video(out, video, fps=max(1, int(round(fps))))
    per_window = np.full(num_windows, g.num_latent_tokens, np.int64)
    if levels_all is not None:
        per_window = g.latent_xy ** 2 + model.nested.tokens(levels_all)
    summary = dict(step=step, frames=int(len(recon_u8)), windows=num_windows,
                   tokens_per_window=float(per_window.mean()), tokens=int(per_window.sum()), seconds=seconds, fps=fps,
                   output_size=list(shown.shape[1:3]), model_size=[H, W])
    if levels_all is not None:
        summary["levels"] = levels_all
    if original is not None:
        per_frame = np.asarray(psnr_per_frame(jnp.asarray(recon), jnp.asarray(original, jnp.float32) / 255.0))
        summary["psnr"] = float(per_frame.mean())
        summary["psnr_per_frame"] = per_frame
        plot = out.parent / f"{out.stem}_psnr.png"
        pictures.line_plot([("PSNR", np.arange(len(per_frame)), per_frame)], plot, xlabel="frame",
                           title=f"per-frame PSNR at {H}x{W} (mean {summary['psnr']:.2f} dB), step {step}")
        written.append(str(plot))
    if save_tokens:
        stacked = {k: np.stack([p[i] for p in planes_all]) for i, k in enumerate(("z_xy", "z_yt", "z_xt"))}
        with epath.Path(save_tokens).open("wb") as f:
            extra = {} if levels_all is None else {"levels": levels_all, "token_levels": np.array(model.nested.levels)}
            np.savez(f, **stacked, n_frames=n_frames, fps=np.float32(fps), step=np.int64(step),
                     video_shape=np.array(g.video_shape), **extra)
        written.append(str(save_tokens))
    summary["outputs"] = written
    return summary


def main(argv):
    s = reconstruct(FLAGS.workdir, FLAGS.output, input_path=FLAGS.input, from_tokens=FLAGS.from_tokens,
                    save_tokens=FLAGS.save_tokens, side_by_side=FLAGS.side_by_side,
                    mode=FLAGS.mode, points_per_call=FLAGS.points_per_call, batch=FLAGS.batch, step=FLAGS.step,
                    max_frames=FLAGS.max_frames, fps=FLAGS.fps, attention_impl=FLAGS.attention,
                    token_budget=FLAGS.token_budget, allocation=FLAGS.allocation)
    psnr = f", PSNR {s['psnr']:.2f} dB" if "psnr" in s else ""
    print(f"{s['frames']} frames in {s['windows']} windows: {s['tokens']} tokens "
          f"({s['tokens_per_window']:g} per window){psnr} ({s['seconds']:.1f} s, step {s['step']})")
    for path in s["outputs"]:
        print(f"wrote {path}")


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError, FileNotFoundError), required=("workdir", "output"), hint=", with --input and/or --from_tokens")
