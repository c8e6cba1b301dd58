r"""Reconstruct synthetic videos with a CoordTok model: encode to triplanes, decode every patch.

    python -m coordtok_jax.demo --config=configs/coordtok.py:tiny --output=/tmp/coordtok_demo

Builds the model of the config (freshly initialised from --config.seed), generates
--num_videos deterministic synthetic clips (some shorter than T, padded as the official data
pipeline pads), encodes them, decodes all patches of each video in one joint decoder pass, and
writes the originals, reconstructions and planes (demo.npz), a frame strip (demo.png: top row
original, bottom row reconstruction) and summary.json to --output. Prints tokens, parameter
count, PSNR and timings. A freshly initialised model reconstructs noise: this checks the whole
path end to end; the trainer produces models worth looking at.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
from ml_collections import config_flags

from coordtok_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program, so importing this module defines no flags."""
    config_flags.DEFINE_config_file("config", None, "configs/coordtok.py:ARG", lock_config=True)
    flags.DEFINE_string("output", "/tmp/coordtok_demo", "Directory for demo.npz, demo.png, summary.json.")
    flags.DEFINE_integer("num_videos", 2, "Synthetic videos to reconstruct.", lower_bound=1)


def _timed(label, fn, *args):
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - start
    print(f"  {label:<34s} {elapsed:8.3f} s")
    return out, elapsed


def reconstruct(config, num_videos: int, output: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from PIL import Image

    from coordtok_jax.data.synthetic import synthetic_clip
    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.metrics.quality import video_psnr
    from coordtok_jax.models import CoordTok, count_params, validate
    from coordtok_jax.models.decode_video import decode_video

    geometry = validate(config.model)  # fails here, naming the field, before anything compiles.
    T, H, W = geometry.video_shape
    os.makedirs(output, exist_ok=True)
    print(f"CoordTok '{config.get('size', '?')}': video {T}x{H}x{W}, "
          f"{geometry.num_latent_tokens} latent tokens, devices: {jax.devices()[0].platform} x {jax.device_count()}")

    clips = [synthetic_clip(config.seed, i, (T, H, W), min_frames=config.data.get("min_frames")) for i in range(num_videos)]
    frames = np.stack([c[0] for c in clips])
    n_frames = np.array([c[1] for c in clips], np.int32)

    model, _ = _timed("init (jit)", nnx.jit(lambda: CoordTok(config.model, rngs=nnx.Rngs(config.seed))))
    print(f"  parameters: {count_params(model):,}")

    num_patches = geometry.dec_grid[0] * geometry.dec_grid[1] * geometry.dec_grid[2]

    @nnx.jit
    def encode(m, f, n):
        return m.encode(to_model_input(f, n, config.data.pad_value), n)

    decode = nnx.jit(lambda m, planes: decode_video(m, planes))  # every patch, one joint pass

    encode(model, frames, n_frames)  # compile
    planes, t_enc = _timed("encode", encode, model, frames, n_frames)
    decode(model, planes)  # compile
    recon, t_dec = _timed(f"decode all {num_patches} patches", decode, model, planes)

    recon01 = np.asarray(jnp.clip((recon + 1) / 2, 0, 1))
    target01 = frames.astype(np.float32) / 255.0
    psnr = np.asarray(video_psnr(recon01, target01, n_frames))
    for i in range(num_videos):
        print(f"  video {i}: n_frames {n_frames[i]:4d}  PSNR {psnr[i]:6.2f} dB")

    np.savez_compressed(
        os.path.join(output, "demo.npz"),
        frames=frames, n_frames=n_frames, reconstruction=(recon01 * 255 + 0.5).astype(np.uint8),
        z_xy=np.asarray(planes[0]), z_yt=np.asarray(planes[1]), z_xt=np.asarray(planes[2]),
    )
    shown = np.linspace(0, max(int(n_frames[0]) - 1, 0), num=min(8, int(n_frames[0]))).astype(int)
    strip = np.concatenate(
        [np.concatenate(list(frames[0, shown]), axis=1),
         np.concatenate(list((recon01[0, shown] * 255 + 0.5).astype(np.uint8)), axis=1)], axis=0)
    Image.fromarray(strip).save(os.path.join(output, "demo.png"))
    summary = dict(
        size=config.get("size"), video_shape=[T, H, W], latent_tokens=geometry.num_latent_tokens,
        parameters=count_params(model), n_frames=n_frames.tolist(), psnr=psnr.tolist(),
        encode_seconds=t_enc, decode_seconds=t_dec, device=jax.devices()[0].platform,
    )
    with open(os.path.join(output, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {output}/demo.npz, demo.png, summary.json")
    return summary


def main(argv):
    reconstruct(FLAGS.config, FLAGS.num_videos, FLAGS.output)


def run():
    cli.run(__name__, define_flags, main, required=("config",), log_level="warning")


if __name__ == "__main__":
    run()
