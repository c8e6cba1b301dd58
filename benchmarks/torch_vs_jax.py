r"""JAX vs the self-contained PyTorch CoordTok, side by side in one process: same config, same
weights (converted), same batch.

    python benchmarks/torch_vs_jax.py [--sizes=tiny,medium] [--steps=5] [--decode_batch=1] \
        [--variants=default,jax_nn+scan]

Rows per config:
* train step (stage 1): sample `num_points` patch coordinates per video, gather their targets
  from the uint8 clip, encode, decode, L2 loss, backward, AdamW (the official hyperparameters).
  JAX: the trainer's jitted step (train/step.py). PyTorch: the same work in eager mode, float32.
* encode: one batch of clips -> planes (no gradient).
* decode video: every patch of the clip in one joint decoder call per video ("all" mode).

`medium` is the S model (Table 5 Small: width 512, 8 heads, 8/8/8 layers; 91M parameters at this
clip size) on 32x64x64 clips, as in train_step.py.
Medians over --steps timed calls after a warm-up call (which includes JAX compilation, reported
separately). Both frameworks use all CPU cores (torch.get_num_threads() is printed).

`--variants` times JAX variants of the same model side by side against the one PyTorch measurement:
`default` (the model as configured), `jax_nn` (attention through jax.nn.dot_product_attention's XLA
implementation instead of models/layers.py plain_attention), `scan` (layer stacks scanned one
layer per iteration, scan_unroll=1), `unroll` (stacks fully unrolled), `loop` (scan_layers=False:
one parameter tree per layer, a Python loop), `chunkN` (attention_impl='chunked', N queries per
chunk: a chunk's (N, keys) logits stay in cache); combine with '+'.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))

_SIZES = flags.DEFINE_list("sizes", ["tiny", "medium"], "Configs: tiny, medium, or a configs/coordtok.py size.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls per measurement after one warm-up call.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Videos per encode / full-video decode call.")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "cpu", "Device of the PyTorch model: cpu or cuda.")
_VARIANTS = flags.DEFINE_list("variants", ["default"], "JAX variants: default, jax_nn, scan, unroll, loop, chunkN, combined with +.")


def apply_variant(config, variant: str, plain):
    """Sets the config fields of a variant; returns the attention function to use (`plain`: the model's)."""
    import jax

    parts = set(variant.split("+")) - {"default"}
    chunks = {p for p in parts if p.startswith("chunk") and p[5:].isdigit() and int(p[5:]) > 0}
    unknown = parts - {"jax_nn", "scan", "unroll", "loop"} - chunks
    if unknown or len(chunks) > 1:
        raise app.UsageError(f"--variants: unknown {sorted(unknown or chunks)}; known: default, jax_nn, scan, unroll, "
                             "loop, chunkN (one per variant)")
    with config.unlocked():
        if "scan" in parts:
            config.model.scan_unroll = 1
        if "unroll" in parts:
            config.model.scan_unroll = 64
        if "loop" in parts:
            config.model.scan_layers = False
        for c in chunks:  # query-chunked attention, N queries per chunk
            config.model.attention_impl = "chunked"
            config.model.attention_query_chunk = int(c[5:])
    if "jax_nn" in parts:
        return lambda q, k, v, *, bias=None, mask=None, scale: jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, scale=scale, implementation="xla")
    return plain


def make_config(name):
    import coordtok

    config = coordtok.get_config("S" if name == "medium" else name)
    with config.unlocked():
        if name == "medium":
            config.model.video_shape = (32, 64, 64)
            config.batch_size, config.num_points = 2, 256
        elif name != "tiny":
            config.batch_size = 8
        config.mesh.shape = (1, 1)
    return config


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, steps):
    """(first call seconds, median of `steps` further calls in seconds)."""
    start = time.perf_counter()
    fn()
    _sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def torch_train_step(model, opt, video_u8, n_frames, num_points, geometry):
    """The official stage-1 step in PyTorch: coordinates with replacement over valid frames."""
    import torch

    b = video_u8.shape[0]
    pt, px, py = model.dec_patch
    gt, gx, gy = model.dec_grid
    dev = video_u8.device
    max_t = torch.clamp(n_frames // pt, min=1)
    t = (torch.rand(b, num_points, device=dev) * max_t[:, None]).long()
    x = torch.randint(0, gx, (b, num_points), device=dev)
    y = torch.randint(0, gy, (b, num_points), device=dev)
    video = video_u8.float() / 255.0 * 2.0 - 1.0  # ToTensor then v * 2 - 1, as the data pipeline
    patches = video.reshape(b, gt, pt, gx, px, gy, py, 3).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, gt * gx * gy, -1)
    target = torch.gather(patches, 1, ((t * gx + x) * gy + y)[..., None].expand(-1, -1, patches.shape[-1]))
    denom = torch.tensor([max(n - 1, 1) for n in (gt, gx, gy)], dtype=torch.float32, device=dev)
    coords = torch.stack([t, x, y], dim=-1).float() / denom
    out = model(video, n_frames, coords)
    loss = ((out - target) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.convert.torch import coordtok as torch_model
    from coordtok_jax.convert.torch_io import to_torch_state_dict
    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.models import validate
    from coordtok_jax.models.decode_video import decode_video
    from coordtok_jax.train.state import make_optimizer, tokenizer_state
    from coordtok_jax.train.step import make_train_step

    dev = jax.devices()[0]
    tdev = torch.device(_TORCH_DEVICE.value)
    print(f"jax {jax.__version__} on {dev.platform} {getattr(dev, 'device_kind', '')} ({os.cpu_count()} cores) | "
          f"torch {torch.__version__} on {tdev}, {torch.get_num_threads()} threads | float32")
    print("| config | JAX variant | what | batch | JAX first call s | JAX ms | PyTorch first call s | PyTorch ms | "
          "PyTorch / JAX |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    from coordtok_jax.models import layers

    plain = layers.plain_attention
    for name in _SIZES.value:
        base = make_config(name)
        g = validate(base.model)
        T, H, W = g.video_shape
        mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=[dev])
        rng = np.random.default_rng(0)
        b = base.batch_size
        video_u8 = rng.integers(0, 256, size=(b, T, H, W, 3), dtype=np.uint8)
        n_frames = np.full((b,), T, np.int32)
        db = _DECODE_BATCH.value
        clip = jnp.asarray(to_model_input(video_u8[:db], n_frames[:db]))
        n_patches = g.dec_grid[0] * g.dec_grid[1] * g.dec_grid[2]
        torch_times = {}
        for variant in _VARIANTS.value:
            config = make_config(name)
            layers.plain_attention = apply_variant(config, variant, plain)
            tx = make_optimizer(config)
            plan = tokenizer_state(config, mesh, tx)
            graphdef, state = plan.graphdef, plan.create()

            def row(what, batch, jax_t):
                (jf, jm), (tf, tm) = jax_t, torch_times[what]
                print(f"| {name} | {variant} | {what} | {batch} | {jf:.1f} | {jm * 1e3:.1f} | {tf:.1f} | "
                      f"{tm * 1e3:.1f} | {tm / jm:.2f} |", flush=True)

            step = jax.jit(make_train_step(graphdef, g, config, tx), donate_argnums=0)
            batch = jax.device_put({"video": video_u8, "n_frames": n_frames}, dev)
            holder = {"state": state}

            def jax_step():
                holder["state"], m = step(holder["state"], batch)
                jax.block_until_ready(m)

            params = state.params
            model = nnx.merge(graphdef, params)
            if not torch_times:  # PyTorch once per config, from the first variant's weights
                kwargs = {k: config.model[k] for k in list(torch_model.RELEASED) + ["mlp_ratio", "padding_mask"]}
                tmodel = torch_model.CoordTok(**kwargs)
                tmodel.load_state_dict(to_torch_state_dict(model), strict=True)
                tmodel.to(tdev).train()
                o = config.optimizer
                opt = torch.optim.AdamW(tmodel.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                                        weight_decay=o.weight_decay)
                tv, tn = torch.from_numpy(video_u8).to(tdev), torch.from_numpy(n_frames.astype(np.int64)).to(tdev)
                torch_times["train step"] = timed(
                    lambda: torch_train_step(tmodel, opt, tv, tn, config.num_points, g), _STEPS.value)
                tmodel.load_state_dict(to_torch_state_dict(model), strict=True)
                tmodel.eval()
                tclip = torch.from_numpy(np.array(clip)).to(tdev)
                with torch.no_grad():
                    torch_times["encode"] = timed(lambda: tmodel.encode(tclip), _STEPS.value)
                    tplanes = tuple(torch.from_numpy(np.array(z)).to(tdev) for z in tmodel.encode(tclip))
                    torch_times["decode video"] = timed(lambda: tmodel.decode_video(tplanes), _STEPS.value)
            # functional jax.jit over the parameters (nnx.jit re-walks the module graph every call)
            encode = jax.jit(lambda p, v: nnx.merge(graphdef, p).encode(v))
            decode = jax.jit(lambda p, z: decode_video(nnx.merge(graphdef, p), z))
            planes = encode(params, clip)
            row("encode", db, timed(lambda: jax.block_until_ready(encode(params, clip)), _STEPS.value))
            row("decode video", db, timed(lambda: jax.block_until_ready(decode(params, planes)), _STEPS.value))
            row("train step", b, timed(jax_step, _STEPS.value))
        layers.plain_attention = plain
        print(f"(decode video: {n_patches} patches per video in one joint call)")

if __name__ == "__main__":
    from coordtok_jax import cli  # --help exits 0, a usage error is one line

    cli.run(__name__, lambda: None, main, log_level="warning")
