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
import numpy as np
import optax
from flax import nnx

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.data.video import to_model_input
from coordtok_jax.models import validate
from coordtok_jax.models import nested as nested_lib
from coordtok_jax.models.patches import indices_to_coords
from coordtok_jax.train import flops as flops_lib
from coordtok_jax.train import points as points_lib
from coordtok_jax.train.aot import Program
from coordtok_jax.train.state import StatePlan, TrainState, learning_rate

BATCH_KEYS = ("video", "n_frames", "decode_failures")


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
    nested = nested_lib.nested_tokens(config.model, geometry)  # None: the official model
    rules = sharding_lib.rules_of(config)
    points = lambda x: sharding_lib.constrain(x, (sharding_lib.BATCH, "activation_length", None), rules)
    images = lambda x: sharding_lib.constrain(x, (sharding_lib.BATCH, None, None, None), rules)

    def loss_fn(params, video, n_frames, key, lpips_state=None):
        k_coords, k_drop = jax.random.split(key)
        if stage == 1:
            idx = points_lib.sample_stage1(k_coords, n_frames, geometry, config.num_points)
        else:
            idx = points_lib.sample_stage2(k_coords, n_frames, geometry, config.num_frames)
        coords = indices_to_coords(idx, geometry.dec_grid)
        targets = points(points_lib.gather_targets(video, idx, geometry))
        model = nnx.merge(graphdef, params)
        # Nested tokens: every (video, temporal block) at a random budget, drawn on device (a key
        # of its own, so that the official model's coordinates and dropout keys are unchanged).
        levels = None if nested is None else nested_lib.sample_levels(
            jax.random.fold_in(key, 17), video.shape[0], nested)
        pred = points(model(to_model_input(video, n_frames, config.data.pad_value), n_frames, coords, levels))
        l2 = jnp.mean((pred - targets) ** 2, axis=(1, 2))
        per_video = l2
        metrics = {"l2": jnp.mean(l2)}
        if use_lpips:
            lpips = nnx.merge(lpips_graphdef, lpips_state)
            dist = lpips(images(frames_from_points(pred, geometry, config.num_frames)),
                         images(frames_from_points(targets, geometry, config.num_frames)),
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


def step_program(config, plan: StatePlan, tx: optax.GradientTransformation, lpips=None) -> Program:
    """The tokenizer's train step as the trainer runs it and `compile` compiles it: jitted with
    the state's shardings in and out (the state donated), the batch split by 'activation_batch'.

    lpips: None, or (graphdef, state) of the frozen LPIPS network (state concrete or abstract),
    passed replicated. Arguments: (state, {'video', 'n_frames', 'decode_failures'}, lpips state).
    """
    geometry = validate(config.model)
    mesh, rules = plan.mesh, sharding_lib.rules_of(config)
    replicated = sharding_lib.replicated(mesh)
    b = int(config.batch_size)
    shapes = {"video": ((b,) + tuple(geometry.video_shape) + (3,), np.uint8), "n_frames": ((b,), np.int32),
              "decode_failures": ((b,), np.int32)}
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_lib.batch_sharding(mesh, rules, shape))
             for k, (shape, dtype) in shapes.items()}
    lpips_graphdef, lpips_state = lpips if lpips is not None else (None, None)
    step_fn = make_train_step(plan.graphdef, geometry, config, tx, lpips_graphdef)
    jitted = jax.jit(step_fn, in_shardings=(plan.shardings, {k: v.sharding for k, v in batch.items()}, replicated),
                     out_shardings=(plan.shardings, replicated), donate_argnums=0)
    lpips_abstract = None if lpips_state is None else sharding_lib.abstract(lpips_state, replicated)
    return Program("train_step", jitted, (plan.abstract, batch, lpips_abstract), mesh,
                   flops_lib.train_flops_per_step(config))
