r"""Sample videos with a trained triplane SiT and its tokenizer.

    python -m coordtok_jax.sample --workdir=SIT_WORKDIR --num_videos=K --output=DIR
        [--sampler=sde|ode] [--steps=N] [--cfg_scale=S] [--seed=0] [--batch=8] [--step=N]
        [--fvd --i3d=i3d_pretrained_400.pt]

Loads the SiT's EMA parameters and latent statistics from its checkpoint (latest or --step) and
the tokenizer named by its config, draws Gaussian planes, integrates them with the configured
sampler (official: SDE Euler-Maruyama, 250 steps, last step 0.04; --sampler / --steps
override), de-normalises, decodes every frame (one joint decoder pass per video) and writes
DIR/sample_XXXX.mp4 and DIR/grid.gif. --fvd computes gFVD (StyleGAN-V protocol: I3D logits of
the generated videos vs the same number of random real clips of config.data).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from absl import flags

from coordtok_jax import cli

FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("workdir", None, "The SiT run (train_sit workdir).")
    flags.DEFINE_integer("num_videos", 8, "Videos to generate.")
    flags.DEFINE_string("output", None, "Directory for the mp4s and grid.gif.")
    flags.DEFINE_enum("sampler", None, ["sde", "ode"], "Override config.sampler.mode.")
    flags.DEFINE_integer("steps", None, "Override config.sampler.num_steps.")
    flags.DEFINE_integer("seed", 0, "Seed of the initial noise (and SDE noise).")
    flags.DEFINE_integer("batch", 8, "Videos per sampling call.")
    flags.DEFINE_integer("step", None, "SiT checkpoint step (default: the latest).")
    flags.DEFINE_bool("fvd", False, "Compute gFVD against random real clips (needs --i3d).")
    flags.DEFINE_string("i3d", None, "I3D weights (i3d_pretrained_400.pt) for --fvd.")
    flags.DEFINE_integer("fps", 8, "Frame rate of the written videos.")
    flags.DEFINE_float("cfg_scale", None, "Override config.sampler.cfg_scale (classifier-free guidance; "
                       "class-conditional SiTs only).")
    flags.DEFINE_string("attention", None, "Tokenizer attention_impl override for decoding (e.g. chunked, cudnn).")


def load_sit(workdir: str, step: Optional[int] = None, mesh=None):
    """(config, graphdef, buffers, EMA params, (mean, std), step) of a train_sit checkpoint; with
    `mesh`, the weights replicated over it and the model constraining activations by the rules."""
    import jax

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.io.checkpoint import read_config, require_kind, resolve_step, restore_partial
    from coordtok_jax.models.sit import split_sit

    _, step = resolve_step(workdir, step)
    config = read_config(workdir, step)
    require_kind(config, "sit", workdir, "sample")
    graphdef, abstract_params, buffers = split_sit(config, sharding_lib.rules_of(config) if mesh else None)
    dev = sharding_lib.replicated(mesh) if mesh else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sds = lambda shape: jax.ShapeDtypeStruct(shape, np.float32, sharding=dev)
    item = {"ema": jax.tree.map(lambda x: sds(x.shape), abstract_params),
            "latent_mean": sds((3, config.model.in_channels)), "latent_std": sds((3, config.model.in_channels))}
    restored, step = restore_partial(workdir, item, step)
    return config, graphdef, buffers, restored["ema"], (restored["latent_mean"], restored["latent_std"]), step


def sample(workdir: str, output: str, *, num_videos: int = 8, sampler: Optional[str] = None,
           steps: Optional[int] = None, seed: int = 0, batch: int = 8, step: Optional[int] = None,
           fvd: bool = False, i3d_path: Optional[str] = None, fps: int = 8,
           attention_impl: Optional[str] = None, cfg_scale: Optional[float] = None, progress: bool = True) -> dict:
    """Generates `num_videos` videos into `output`; returns a summary (and 'gfvd' with --fvd)."""
    import jax
    from etils import epath
    from flax import nnx
    from tqdm import tqdm

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.data.video_io import write_video
    from coordtok_jax.io.runs import load_tokenizer

    if num_videos <= 0 or batch <= 0:
        raise ValueError(f"--num_videos and --batch must be positive, got {num_videos}, {batch}")
    if fvd and not i3d_path:
        raise ValueError("--fvd needs --i3d=i3d_pretrained_400.pt")
    t0 = time.perf_counter()
    # a ('data',) mesh: weights replicated, each batch of videos split over the devices by the rules
    mesh = sharding_lib.make_mesh((-1,), ("data",))
    config, graphdef, buffers, ema, (mean, std), step = load_sit(workdir, step, mesh)
    overrides = {} if attention_impl is None else {"attention_impl": attention_impl}
    tokenizer, _, _ = load_tokenizer(config.tokenizer, mesh=mesh, rules=sharding_lib.rules_of(config), **overrides)
    tok_graphdef, tok_params = nnx.split(tokenizer)
    generate = make_generator(config, graphdef, buffers, tok_graphdef, tokenizer.geometry, batch, mode=sampler,
                              steps=steps, cfg_scale=cfg_scale, out_sharding=sharding_lib.replicated(mesh))

    out = epath.Path(output)
    out.mkdir(parents=True, exist_ok=True)
    videos = []
    key = jax.random.key(seed)
    n_calls = -(-num_videos // batch)
    with jax.set_mesh(mesh):
        for i in tqdm(range(n_calls), unit="batch", desc="sampling", disable=not progress):
            videos.append(np.asarray(generate(ema, tok_params, mean, std, jax.random.fold_in(key, i))[0]))
    videos = np.concatenate(videos)[:num_videos]
    written = []
    for i, v in enumerate(videos):
        path = out / f"sample_{i:04d}.mp4"
        write_video(path, v, fps=fps)
        written.append(str(path))
    write_grid_gif(videos[:16], out / "grid.gif", fps)
    summary = dict(step=step, videos=len(videos), shape=list(videos.shape[1:]), outputs=written,
                   grid=str(out / "grid.gif"), seconds=time.perf_counter() - t0)
    if fvd:
        summary["gfvd"] = generated_fvd(config, videos, i3d_path, seed, progress)
    return summary


def write_grid_gif(videos: np.ndarray, path, fps: int) -> None:
    """Up to 16 videos (N, T, H, W, 3) uint8 tiled in a grid, one animated GIF."""
    from etils import epath
    from PIL import Image

    n = len(videos)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    _, T, H, W, _ = videos.shape
    canvas = np.zeros((T, rows * H, cols * W, 3), np.uint8)
    for i, v in enumerate(videos):
        r, c = divmod(i, cols)
        canvas[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = v
    frames = [Image.fromarray(f) for f in canvas]
    with epath.Path(path).open("wb") as f:
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / max(fps, 1)),
                       loop=0)


def make_generator(config, graphdef, buffers, tok_graphdef, geometry, batch: int, *, mode: Optional[str] = None,
                   steps: Optional[int] = None, cfg_scale: Optional[float] = None, out_sharding=None):
    """jitted (ema, tokenizer params, latent mean, std, key) -> (uint8 videos (batch, T, H, W, 3),
    std of the sampled normalised planes): Gaussian planes integrated by config.sampler (mode /
    steps / cfg_scale override it), de-normalised, every frame decoded in one joint decoder pass."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from coordtok_jax.diffusion.latent_stats import denormalize
    from coordtok_jax.diffusion.samplers import make_sample_fn
    from coordtok_jax.metrics.quality import frames_in_unit_range
    from coordtok_jax.models.decode_video import decode_video
    from coordtok_jax.diffusion.transport import make_transport

    s = config.sampler
    sample_fn = make_sample_fn(make_transport(config), None, mode=(mode or s.mode).upper(),
                               num_sampling_steps=int(steps or s.num_steps), diffusion_form=s.diffusion_form,
                               diffusion_norm=s.diffusion_norm, last_step=s.last_step,
                               last_step_size=s.last_step_size)

    num_classes = int(config.model.num_classes)
    cfg_scale = float(s.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale)
    if cfg_scale != 1.0 and (num_classes <= 1 or config.model.class_dropout_prob <= 0):
        raise ValueError(f"config.sampler.cfg_scale={cfg_scale} needs a class-conditional SiT trained with label "
                         f"dropout (config.model.num_classes > 1 and class_dropout_prob > 0), got num_classes="
                         f"{num_classes}, class_dropout_prob={config.model.class_dropout_prob}")

    def generate(ema, tok_params, mean, std, key):
        model = nnx.merge(graphdef, ema, buffers)
        k0, k1 = jax.random.split(key)
        keys = jax.random.split(k0, 3)
        x0 = tuple(jax.random.normal(k, (batch,) + tuple(shape), jnp.float32)
                   for k, shape in zip(keys, geometry.plane_shapes))
        # unconditional (official): every label is 0; class-conditional: uniformly random classes
        y = (jax.random.randint(jax.random.fold_in(k0, 3), (batch,), 0, num_classes) if num_classes > 1
             else jnp.zeros((batch,), jnp.int32))
        if cfg_scale != 1.0:
            velocity = lambda x, t: tuple(model.forward_with_cfg(tuple(x), t, y, cfg_scale))
        else:
            velocity = lambda x, t: tuple(model(tuple(x), t, y))
        planes = sample_fn(velocity, x0, k1)
        spread = jnp.mean(jnp.stack([jnp.std(z) for z in planes]))
        video = decode_video(nnx.merge(tok_graphdef, tok_params), denormalize(planes, mean, std))
        return (frames_in_unit_range(video) * 255.0 + 0.5).astype(jnp.uint8), spread

    return jax.jit(generate, out_shardings=out_sharding)


class GeneratedFVD:
    """gFVD of generated videos against `num_videos` random real clips of config.data (StyleGAN-V
    protocol: I3D logits). The real clips' statistics are computed once, at the first call."""

    def __init__(self, config, i3d_path: str, num_videos: int, *, seed: int = 0, progress: bool = False):
        from coordtok_jax.metrics.i3d import load_i3d

        self.config, self.num_videos, self.seed, self.progress = config, int(num_videos), int(seed), progress
        self.i3d = load_i3d(i3d_path)
        self.real = None

    def __call__(self, videos: np.ndarray) -> float:
        from coordtok_jax.data.pipeline import make_sampled_dataset
        from coordtok_jax.metrics.fvd import FeatureStats, compute_stats, fvd
        from coordtok_jax.metrics.i3d import i3d_features

        if self.real is None:
            n = self.num_videos
            batches = (b["video"] for b in make_sampled_dataset(
                self.config.data, videos.shape[1:4], n, min(n, 8), seed=self.seed, train=True, process_index=0,
                process_count=1))
            self.real = compute_stats(batches, self.i3d, num_clips=n, progress=self.progress, desc="real clips")
        return fvd(self.real, FeatureStats.from_features(i3d_features(self.i3d, videos)))


def generated_fvd(config, videos: np.ndarray, i3d_path: str, seed: int, progress: bool) -> float:
    """gFVD: I3D logits of the generated videos vs as many random real clips of config.data."""
    return GeneratedFVD(config, i3d_path, len(videos), seed=seed, progress=progress)(videos)


def main(argv):
    s = sample(FLAGS.workdir, FLAGS.output, num_videos=FLAGS.num_videos, sampler=FLAGS.sampler,
               steps=FLAGS.steps, seed=FLAGS.seed, batch=FLAGS.batch, step=FLAGS.step, fvd=FLAGS.fvd,
               i3d_path=FLAGS.i3d, fps=FLAGS.fps, attention_impl=FLAGS.attention, cfg_scale=FLAGS.cfg_scale)
    fvd = f", gFVD {s['gfvd']:.1f}" if "gfvd" in s else ""
    print(f"{s['videos']} videos {tuple(s['shape'])} from SiT step {s['step']}{fvd} ({s['seconds']:.1f} s)\n"
          f"wrote {len(s['outputs'])} mp4s and {s['grid']}")


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError,), required=("workdir", "output"))
