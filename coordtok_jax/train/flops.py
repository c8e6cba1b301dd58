"""Analytic FLOPs of a CoordTok training step, for the MFU estimate.

Conventions (those of the official FLOPs accounting): matmul/conv FLOPs only (1 MAC =
2 FLOPs; norms, softmax, GELU and the bilinear gather are ignored), training = 3 x forward for
trainable modules, attention = 4 * S_q * S_kv * D per layer, frozen LPIPS = forward of the target
frames + forward and input-gradient of the predicted frames. With the released config this
reproduces the reference: 836.0 TFLOP per stage-1 step and 3,572.6 per stage-2 step at batch 256.
"""

from __future__ import annotations

from coordtok_jax.models.config import validate

# Dense bf16 peak per device (FLOP/s), by jax device_kind prefix (lower case).
PEAK_BF16 = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
    "nvidia h100": 989e12,
    "nvidia h200": 989e12,
    "nvidia a100": 312e12,
    "nvidia l4": 121e12,
}

VGG16_CONVS = ((3, 64), (64, 64), "pool", (64, 128), (128, 128), "pool", (128, 256), (256, 256), (256, 256), "pool",
               (256, 512), (512, 512), (512, 512), "pool", (512, 512), (512, 512), (512, 512))


def vgg16_forward_flops(height: int, width: int) -> float:
    total, h, w = 0.0, height, width
    for layer in VGG16_CONVS:
        if layer == "pool":
            h, w = h // 2, w // 2
        else:
            total += 2.0 * h * w * layer[0] * layer[1] * 9
    return total


def forward_flops(model_cfg, num_points: int) -> dict[str, float]:
    """Forward FLOPs per video by module for decoding num_points points."""
    g = validate(model_cfg)
    d, dd = model_cfg.enc_embed_dim, model_cfg.dec_embed_dim
    r = model_cfg.mlp_ratio
    m = g.num_memory_tokens
    s = m + 1  # + cls
    pt, ph, pw = g.enc_patch
    block = lambda tokens, width: 2.0 * tokens * (4 + 2 * r) * width**2  # qkv + proj + mlp
    vit = 2.0 * 3 * pt * ph * pw * d * m + model_cfg.enc_patch_num_layers * (block(s, d) + 4.0 * s * s * d)

    q = sum(g.num_query_tokens)
    cross_layer = (2.0 * q * d * d + 2.0 * m * 2 * d * d + 2.0 * q * d * d  # q, kv, out projections
                   + 2.0 * q * 4 * d * d + 2.0 * q * 2 * r * d * d  # self-attention + MLP
                   + 4.0 * q * m * d + 4.0 * q * q * d)  # attention scores
    c = g.channels
    heads = 0.0
    for (g1, g2), (p1, p2) in ((g.query_grid_xy, g.query_patch_xy), (g.query_grid_t, g.query_patch_t),
                               (g.query_grid_t, g.query_patch_t)):
        heads += 2.0 * g1 * g2 * (p1 * p2 * c) * d * 2  # patch embed + projector
    cross = model_cfg.enc_num_layers * cross_layer + heads

    n = num_points
    dec = (2.0 * 3 * c * dd * n + 2.0 * dd * g.patch_values * n
           + model_cfg.dec_num_layers * (block(n, dd) + 4.0 * n * n * dd))
    return {"vit3d": vit, "cross_self": cross, "decoder": dec}


def train_flops_per_step(config) -> float:
    """FLOPs of one optimizer step at config.batch_size (all micro-batches)."""
    g = validate(config.model)
    if config.stage == 1:
        points, lpips_frames = config.num_points, 0
    else:
        points = config.num_frames * g.dec_grid[1] * g.dec_grid[2]
        lpips_frames = config.num_frames * g.dec_patch[0] if config.lpips_weight > 0 else 0
    per_video = 3.0 * sum(forward_flops(config.model, points).values())
    per_video += 3.0 * lpips_frames * vgg16_forward_flops(*g.video_shape[1:])
    return per_video * config.batch_size


def peak_flops(device, override: float | None = None) -> float | None:
    """bf16 peak FLOP/s of one device (config override first); None when unknown (e.g. CPU)."""
    if override:
        return float(override)
    kind = getattr(device, "device_kind", "").lower()
    for prefix, value in PEAK_BF16.items():
        if kind.startswith(prefix):
            return value
    return None


def sit_forward_flops(sit_cfg) -> float:
    """Forward FLOPs of the triplane SiT for one sample (same conventions as forward_flops)."""
    from coordtok_jax.models.sit import FREQUENCY_EMBEDDING_SIZE, validate_sit

    g = validate_sit(sit_cfg)
    d, n, p, r = g.hidden_size, sum(g.num_tokens), g.patch, sit_cfg.mlp_ratio
    block = 2.0 * n * (4 + 2 * r) * d * d + 4.0 * n * n * d + 2.0 * d * 6 * d  # + adaLN modulation
    embed = 2.0 * n * g.channels * p * p * d
    final = 2.0 * n * d * p * p * g.out_channels + 3 * 2.0 * d * 2 * d
    timestep = 2.0 * (FREQUENCY_EMBEDDING_SIZE * d + d * d)
    return g.depth * block + embed + final + timestep


def sit_train_flops_per_step(config, tokenizer_model_cfg=None) -> float:
    """FLOPs of one SiT optimizer step at config.batch_size: 3 x forward of the SiT, plus the
    frozen tokenizer's encoder forward when clips are encoded on the fly (tokenizer_model_cfg)."""
    per_sample = 3.0 * sit_forward_flops(config.model)
    if tokenizer_model_cfg is not None:
        fwd = forward_flops(tokenizer_model_cfg, 0)
        per_sample += fwd["vit3d"] + fwd["cross_self"]
    return per_sample * config.batch_size
