"""The CoordTok train step: sample coordinates, gather targets, L2 (+ LPIPS), AdamW update.

Loss scale. The official loss is, per GPU, the SUM over its local batch of per-video MSE (mean
over points and values), plus lpips_loss_scale x the SUM of LPIPS over all its B x 16 frames;
DDP then averages gradients over GPUs. Here the loss is the MEAN over the global batch of
  per-video MSE + lpips_weight x (sum of LPIPS over that video's K frames),
i.e. the official per-GPU objective divided by the per-GPU batch size: the same ratio between the
two terms and the same optimum; with Adam only the balance against eps and weight decay moves
(spec 9, row 10), and the result no longer depends on how many devices share the batch.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from coordtok_jax.data.video import to_model_input
from coordtok_jax.models.patches import indices_to_coords
from coordtok_jax.train import sampling
from coordtok_jax.train.state import TrainState, learning_rate


def frames_from_points(values: jax.Array, geometry, num_frames: int) -> jax.Array:
    """Stage-2 point values (B, K*gx*gy, pt*px*py*3) -> frames (B*K*pt, H, W, 3)."""
    _, gx, gy = geometry.dec_grid
    pt, px, py = geometry.dec_patch
    return einops.rearrange(values, "b (k x y) (pt px py c) -> (b k pt) (x px) (y py) c",
                            k=num_frames, x=gx, y=gy, pt=pt, px=px, py=py, c=3)


def make_loss_fn(graphdef, geometry, config, lpips_graphdef=None):
    """loss_fn(params, video, n_frames, key, lpips_state=None) -> (loss, metrics).

    The frozen LPIPS network travels as an argument (its graphdef + state from nnx.split), not as
    a closure, so its 15M weights are not baked into the compiled program as constants.
    """
    stage = config.stage
    use_lpips = stage == 2 and config.lpips_weight > 0
    if use_lpips and lpips_graphdef is None:
        raise ValueError("config.lpips_weight > 0 needs the LPIPS network (config.lpips.vgg_path / lin_path)")

    def loss_fn(params, video, n_frames, key, lpips_state=None):
        k_coords, k_drop = jax.random.split(key)
        if stage == 1:
            idx = sampling.sample_stage1(k_coords, n_frames, geometry, config.num_points)
        else:
            idx = sampling.sample_stage2(k_coords, n_frames, geometry, config.num_frames)
        coords = indices_to_coords(idx, geometry.dec_grid)
        targets = sampling.gather_targets(video, idx, geometry)
        model = nnx.merge(graphdef, params)
        pred = model(to_model_input(video, n_frames, config.data.pad_value), n_frames, coords)
        l2 = jnp.mean((pred - targets) ** 2, axis=(1, 2))
        per_video = l2
        metrics = {"l2": jnp.mean(l2)}
        if use_lpips:
            lpips = nnx.merge(lpips_graphdef, lpips_state)
            dist = lpips(frames_from_points(pred, geometry, config.num_frames),
                         frames_from_points(targets, geometry, config.num_frames),
                         deterministic=not config.lpips.dropout, key=k_drop)
            lp = dist.reshape(video.shape[0], -1).sum(axis=1)
            per_video = per_video + config.lpips_weight * lp
            metrics["lpips"] = jnp.mean(lp)
        loss = jnp.mean(per_video)
        metrics["loss"] = loss
        return loss, metrics

    return loss_fn


def make_train_step(graphdef, geometry, config, tx: optax.GradientTransformation, lpips_graphdef=None):
    """train_step(state, batch, lpips_state=None) -> (state, metrics); batch = {'video': uint8,
    'n_frames': int32}; lpips_state = nnx.split(lpips)[1] in stage 2.

    With config.grad_accum_steps = A > 1 the batch is split into A micro-batches whose gradients
    are averaged (a lax.scan, so memory is that of one micro-batch).
    """
    loss_fn = make_loss_fn(graphdef, geometry, config, lpips_graphdef)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = int(config.grad_accum_steps)

    def compute_grads(params, video, n_frames, key, lpips_state):
        if accum == 1:
            (_, metrics), grads = grad_fn(params, video, n_frames, key, lpips_state)
            return grads, metrics
        if video.shape[0] % accum:
            raise ValueError(f"batch {video.shape[0]} is not divisible by config.grad_accum_steps={accum}")
        split = lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:])
        zeros = jax.tree.map(jnp.zeros_like, params)

        def micro(carry, inputs):
            i, v, n = inputs
            (_, m), g = grad_fn(params, v, n, jax.random.fold_in(key, i), lpips_state)
            return jax.tree.map(jnp.add, carry, g), m

        grads, metrics = jax.lax.scan(micro, zeros, (jnp.arange(accum), split(video), split(n_frames)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        return grads, jax.tree.map(jnp.mean, metrics)

    def train_step(state: TrainState, batch: dict, lpips_state=None):
        key = jax.random.fold_in(state.rng, state.step)
        grads, metrics = compute_grads(state.params, batch["video"], batch["n_frames"], key, lpips_state)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        bad = ~jnp.isfinite(metrics["loss"])
        first = jnp.where((state.first_nonfinite < 0) & bad, state.step, state.first_nonfinite)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=learning_rate(config, state.step),
                       decode_failures=jnp.sum(batch.get("decode_failures", jnp.zeros((), jnp.int32))))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, first_nonfinite=first)
        return new, metrics

    return train_step
