r"""CoordTok tokenizer configurations.

    --config=configs/coordtok.py:ARG   with ARG = SIZE[,stage=1|2][,tokens=nested][,data=mixed][,runlocal],
                                       SIZE in {L, B, S, tiny, cpu}
    --config.model.enc_num_layers=12   overrides any field

`L,stage=1` and `L,stage=2` are the paper's runs: global batch 256 clips of 128 frames,
1024 random patches (1M steps) then 16 whole frames + LPIPS (50K steps, from the stage-1
checkpoint via --config.init_from).

* `L`: the released CoordTok_UCF101_1M_50K.pth (853,410,496 parameters): 128x128x128 video,
  width 1024, ViT3D 8 layers, cross/self encoder 24, decoder 24, 16 heads; triplane
  z_xy 16x16x8, z_yt / z_xt 32x16x8 = 1280 tokens.
* `B`, `S`: the paper's Base and Small (Table 5: B 768 wide, 12 heads, ViT3D 8 / cross-self 12 /
  decoder 12 layers; S 512 wide, 8 heads, 8 / 8 / 8) with the released latent geometry.
* `cpu`: the README's main job: tiny's widths with 16x16 latent planes and 2x2-pixel decoder
  patches, and CPU_RECIPE's data / schedule (held-out PSNR and wall time: benchmarks/RESULTS.md).
* `tiny`: exactly the reference small configuration (coordtok_small_state_dict.json,
  511,408 parameters): 16x32x32 video, width 64, 2 layers each. Runs in seconds on a CPU.

`tokens=nested` (any size) turns on nested triplane tokens (issue 17, coordtok_jax/models/nested.py:
the temporal planes decode at any per-block token budget; off, the model is the official one);
`data=mixed` makes half the synthetic clips still and half fast (the token-budget measurements:
`configs/coordtok.py:cpu,tokens=nested,data=mixed`).
"""

import ml_collections

from coordtok_jax import config_lib, sharding
from coordtok_jax.data.config import CPU_DATA, data_config

# Logical axis names of parameters and activations -> mesh axes (the table and what it means:
# coordtok_jax/sharding.py). Parameters: 'embed' over 'fsdp' (ZeRO-3), 'mlp'/'heads' over 'tensor';
# activations: the batch over ('data', 'fsdp'), heads/MLP over 'tensor'. Override entries with
# --config.logical_axis_rules; mesh axes the mesh lacks are ignored.
LOGICAL_AXIS_RULES = sharding.LOGICAL_AXIS_RULES

# The stacks of each size (the paper's Table 5 for L / B / S; `tiny` is the reference small model).
_ARCH = {  # width, heads, ViT3D layers, cross/self encoder layers, decoder layers
    "L": (1024, 16, 8, 24, 24),
    "B": (768, 12, 8, 12, 12),
    "S": (512, 8, 8, 8, 8),
    "tiny": (64, 2, 2, 2, 2),
    "cpu": (64, 2, 2, 2, 2),
}
# Video and latent geometry: the released model's (L, B, S), the tiny reference's, and `cpu`: tiny's
# with a decoder grid that matches 16x16 latent planes (2x2-pixel patches), the README's main job
# (benchmarks/RESULTS.md, "a CPU recipe", for what each change bought).
_RELEASED_GEOMETRY = dict(
    video_shape=(128, 128, 128), enc_patch_size_t=8, enc_patch_size_xy=16,
    latent_resolution_xy=16, latent_resolution_t=32, latent_n_features=8,
    latent_patch_size_xy=8, latent_patch_size_t=16, dec_patch_size_t=1, dec_patch_size_xy=8,
)
_TINY_GEOMETRY = dict(
    video_shape=(16, 32, 32), enc_patch_size_t=4, enc_patch_size_xy=8,
    latent_resolution_xy=8, latent_resolution_t=8, latent_n_features=8,
    latent_patch_size_xy=4, latent_patch_size_t=4, dec_patch_size_t=1, dec_patch_size_xy=4,
)
_GEOMETRY = {
    "L": _RELEASED_GEOMETRY, "B": _RELEASED_GEOMETRY, "S": _RELEASED_GEOMETRY, "tiny": _TINY_GEOMETRY,
    "cpu": dict(_TINY_GEOMETRY, latent_resolution_xy=16, latent_resolution_t=16, dec_patch_size_xy=2),
}
LOCAL_SIZES = ("tiny", "cpu")  # CPU-scale sizes: they imply runlocal

# Everything but the model that the `cpu` main job changes from tiny, measured on a 2-core VM:
# flat shapes moving slowly (the plateau at the clip's mean colour is left ~2x sooner), a large
# learning rate with warm-up and cosine decay, and 128 points per clip (as good per step as 512,
# 3x cheaper).
CPU_RECIPE = {
    **CPU_DATA,
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 50,
    "optimizer.schedule": "cosine",
    "num_points": 128,
    "total_steps": 3200,
    "log_every": 50,
    "save_every": 800,
    "eval_every": 800,
    "eval_videos": 8,
}


def model_config(size: str) -> ml_collections.ConfigDict:
    if size not in _ARCH:
        raise ValueError(f"unknown CoordTok size {size!r}; choose one of {list(_ARCH)}")
    width, heads, vit3d, cross_self, decoder = _ARCH[size]
    m = ml_collections.ConfigDict(dict(
        _GEOMETRY[size], enc_embed_dim=width, enc_num_heads=heads, enc_patch_num_layers=vit3d,
        enc_num_layers=cross_self, dec_embed_dim=width, dec_num_heads=heads, dec_num_layers=decoder))
    m.mlp_ratio = 4.0
    # 'official': padded memory tokens get +1 on their cross-attention logits and a temporal
    # patch counts as padded when t_p >= floor(n_frames / pt) (what the released weights saw).
    # 'exclude': padded memory tokens are masked out (-inf); partially valid patches are kept.
    m.padding_mask = "official"
    m.dtype = "float32"  # compute dtype: 'bfloat16' on TPU/GPU; parameters stay float32.
    # None / 'xla': plain XLA attention; 'splash': the Pallas TPU kernel; 'cudnn': cuDNN flash (GPU, bf16).
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)
    m.attention_query_chunk = 1024  # queries per chunk when attention_impl='chunked'
    m.remat_policy = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'.
    m.scan_unroll = 1  # layers per iteration of the layer scans (parameters stay stacked)
    # Layer stacks: True, parameters stacked on a 'layers' axis + lax.scan (short compiles);
    # False, one parameter tree per layer in a Python loop (CPU training of S-sized models: ~15-25%
    # faster steps; no gain for tiny / cpu; 3.4x longer compiles of L on TPU: benchmarks/RESULTS.md).
    m.scan_layers = True
    # Nested triplane tokens (models/nested.py; off = the official model): the temporal planes cut
    # into token_blocks blocks, each decodable at any of token_levels (fractions of its cells).
    m.nested_tokens = False
    m.token_blocks = 4
    m.token_levels = (0.25, 0.5, 0.75, 1.0)
    m.token_order = "time_first"  # or 'coarse_to_fine' (models/nested.py)
    return m


# `data=mixed`: half the synthetic clips still, half moving fast (where a token budget matters).
MIXED_DATA = {"data.synthetic_motion": 0.0, "data.synthetic_fast_fraction": 0.5, "data.synthetic_fast_motion": 1.0}


def _optional_str():
    return ml_collections.FieldReference(None, field_type=str)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """ARG = SIZE[,stage=1|2][,tokens=fixed|nested][,data=default|mixed][,runlocal]: SIZE in {L, B, S,
    tiny, cpu}; stage 1 (N random patches, L2) or stage 2 (whole frames, L2 + LPIPS, started from a
    stage-1 checkpoint with --config.init_from); tokens=nested: nested triplane tokens (any per-block
    budget, models/nested.py); data=mixed: synthetic clips half still, half fast; runlocal: SIZE's
    model with a schedule that runs on a CPU (implied by tiny and cpu)."""
    size, options = config_lib.parse_arg(arg, sizes=list(_ARCH), default="tiny",
                                         options={"stage": ("1", "2"), "tokens": ("fixed", "nested"),
                                                  "data": ("default", "mixed")},
                                         local_sizes=LOCAL_SIZES)
    stage = int(options.get("stage", 1))
    local = options["runlocal"]
    config = ml_collections.ConfigDict()
    config.size = size
    config.stage = stage
    config.seed = 0
    config.model = model_config(size)
    config.data = data_config()
    if local:
        config.data.min_frames = 9  # the synthetic source makes some clips shorter than T.

    # The step. Paper: global batch 256 videos x 128 frames; stage 1 decodes N = 1024 random
    # patches per video (L2); stage 2 decodes K = 16 whole frames per video (L2 + LPIPS).
    config.batch_size = 8 if local else 256  # global, all hosts and micro-batches
    config.grad_accum_steps = 1
    config.num_points = 256 if local else 1024
    config.num_frames = 4 if local else 16
    config.lpips_weight = 0.0 if stage == 1 else 1.0
    config.lpips = ml_collections.ConfigDict()
    config.lpips.vgg_path = _optional_str()  # torchvision vgg16 ImageNet state_dict (vgg16-397923af.pth)
    config.lpips.lin_path = _optional_str()  # LPIPS linear layers (lpips/weights/v0.1/vgg.pth)
    config.lpips.dropout = True  # the official trains with the heads' Dropout(0.5) active
    config.init_from = _optional_str()  # stage 2: a stage-1 workdir or checkpoint folder

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 1e-3  # on every parameter, as the official
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"  # official; or "cosine" (decay to 0 at total_steps)
    config.optimizer.grad_clip_norm = 0.0  # 0 = no clipping (official)

    # Schedule, logging, checkpoints, evaluation.
    config.total_steps = (300 if stage == 1 else 100) if local else (1_000_000 if stage == 1 else 50_000)
    config.log_every = 10 if local else 100
    config.save_every = 100 if local else 5_000
    config.keep_last = 3
    config.keep_every = 0 if local else 50_000
    config.eval_every = 100 if local else 5_000
    config.eval_videos = 2 if local else 4
    # Full-clip decoding in eval: None = every patch in one joint pass (the paper's protocol); large
    # models decode in contiguous chunks like the official decode_video.
    config.eval_points_per_call = ml_collections.FieldReference(None if local else 4096, field_type=int)
    config.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)  # MFU; None = known table
    if size == "cpu":
        config_lib.override(config, CPU_RECIPE)
    if options.get("tokens") == "nested":  # issue 17: one model, any per-block token budget
        config.model.nested_tokens = True
    if options.get("data") == "mixed":  # synthetic clips half still, half fast (the budget measurements)
        config_lib.override(config, MIXED_DATA)

    # Mesh and parameter sharding.
    config.mesh = ml_collections.ConfigDict()
    # (data, fsdp) or (data, fsdp, tensor); one entry may be -1 = fill with the remaining devices. The
    # batch is split over data x fsdp chips; fsdp also splits every weight and Adam moment (ZeRO-3);
    # tensor splits attention heads and the MLP (Megatron). See launch/README.md for each slice.
    # FSDP over every chip for the real sizes (the only way L + AdamW fits a v5e chip; measured per slice in
    # launch/README.md); data parallel for the CPU-scale configs.
    config.mesh.shape = (-1, 1) if local else (1, -1)  # one entry may be -1 = the remaining devices
    config.mesh.axes = ("data", "fsdp")
    config.logical_axis_rules = LOGICAL_AXIS_RULES
    config.distributed = "auto"  # auto: jax.distributed.initialize() on TPU VMs / when JAX_COORDINATOR_ADDRESS is set

    config.debug = ml_collections.ConfigDict()
    config.debug.kill_at_step = 0  # tests: SIGKILL self at this step after pending saves finished
    return config


def validate(config: ml_collections.ConfigDict):
    """Raises coordtok_jax.models.ConfigError naming the field when the geometry cannot work."""
    from coordtok_jax.models.config import validate as validate_model

    return validate_model(config.model)
