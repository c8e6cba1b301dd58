r"""CoordTok tokenizer configurations.

    --config=configs/coordtok.py:ARG   with ARG = SIZE[,stage=1|2], SIZE in {L, B, S, tiny, cpu}
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
"""

import ml_collections

from coordtok_jax import sharding

# Logical axis names of parameters and activations -> mesh axes (the table and what it means:
# coordtok_jax/sharding.py). Parameters: 'embed' over 'fsdp' (ZeRO-3), 'mlp'/'heads' over 'tensor';
# activations: the batch over ('data', 'fsdp'), heads/MLP over 'tensor'. Override entries with
# --config.logical_axis_rules; mesh axes the mesh lacks are ignored.
LOGICAL_AXIS_RULES = sharding.LOGICAL_AXIS_RULES

_RELEASED_LATENTS = dict(
    latent_resolution_xy=16,
    latent_resolution_t=32,
    latent_n_features=8,
    latent_patch_size_xy=8,
    latent_patch_size_t=16,
)

_SIZES = {
    "L": dict(
        video_shape=(128, 128, 128),
        enc_embed_dim=1024, enc_num_heads=16, enc_patch_num_layers=8, enc_num_layers=24,
        enc_patch_size_t=8, enc_patch_size_xy=16,
        dec_embed_dim=1024, dec_num_heads=16, dec_num_layers=24,
        dec_patch_size_t=1, dec_patch_size_xy=8,
        **_RELEASED_LATENTS,
    ),
    "B": dict(
        video_shape=(128, 128, 128),
        enc_embed_dim=768, enc_num_heads=12, enc_patch_num_layers=8, enc_num_layers=12,
        enc_patch_size_t=8, enc_patch_size_xy=16,
        dec_embed_dim=768, dec_num_heads=12, dec_num_layers=12,
        dec_patch_size_t=1, dec_patch_size_xy=8,
        **_RELEASED_LATENTS,
    ),
    "S": dict(  # Table 5 Small: 512 wide, 8 heads, 8 layers in each of the three stacks
        video_shape=(128, 128, 128),
        enc_embed_dim=512, enc_num_heads=8, enc_patch_num_layers=8, enc_num_layers=8,
        enc_patch_size_t=8, enc_patch_size_xy=16,
        dec_embed_dim=512, dec_num_heads=8, dec_num_layers=8,
        dec_patch_size_t=1, dec_patch_size_xy=8,
        **_RELEASED_LATENTS,
    ),
    "tiny": dict(
        video_shape=(16, 32, 32),
        enc_embed_dim=64, enc_num_heads=2, enc_patch_num_layers=2, enc_num_layers=2,
        enc_patch_size_t=4, enc_patch_size_xy=8,
        latent_resolution_xy=8, latent_resolution_t=8, latent_n_features=8,
        latent_patch_size_xy=4, latent_patch_size_t=4,
        dec_embed_dim=64, dec_num_heads=2, dec_num_layers=2,
        dec_patch_size_t=1, dec_patch_size_xy=4,
    ),
}
# `cpu`: tiny's encoder and widths with a decoder grid that matches 16x16 latent planes (2x2-pixel
# patches), the README's main job (benchmarks/RESULTS.md, "a CPU recipe", for what each change bought).
_SIZES["cpu"] = dict(_SIZES["tiny"], latent_resolution_xy=16, latent_resolution_t=16, dec_patch_size_xy=2)

# Everything but the model that the `cpu` main job changes from tiny, measured on a 2-core VM:
# flat shapes moving slowly (the plateau at the clip's mean colour is left ~2x sooner), a large
# learning rate with warm-up and cosine decay, and 128 points per clip (as good per step as 512,
# 3x cheaper).
CPU_RECIPE = {
    "data.synthetic_texture": 0.0,
    "data.synthetic_motion": 0.15,
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 50,
    "optimizer.schedule": "cosine",
    "num_points": 128,
    "total_steps": 2800,
    "log_every": 50,
    "save_every": 700,
    "eval_every": 700,
    "eval_videos": 8,
}
LOCAL_SIZES = ("tiny", "cpu")  # CPU-scale: data-parallel mesh, short clips, minutes-long schedules


def model_config(size: str) -> ml_collections.ConfigDict:
    if size not in _SIZES:
        raise ValueError(f"unknown CoordTok size {size!r}; choose one of {sorted(_SIZES)}")
    m = ml_collections.ConfigDict(dict(_SIZES[size]))
    m.mlp_ratio = 4.0
    # 'official': padded memory tokens get +1 on their cross-attention logits and a temporal
    # patch counts as padded when t_p >= floor(n_frames / pt) (what the released weights saw).
    # 'exclude': padded memory tokens are masked out (-inf); partially valid patches are kept.
    m.padding_mask = "official"
    m.dtype = "float32"  # compute dtype: 'bfloat16' on TPU/GPU; parameters stay float32.
    # None lets JAX choose; 'cudnn' selects the cuDNN flash kernel (GPU, bf16/fp16 only).
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)
    m.attention_query_chunk = 1024  # queries per chunk when attention_impl='chunked'
    m.remat_policy = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'.
    return m


def _optional_str():
    return ml_collections.FieldReference(None, field_type=str)


def data_config() -> ml_collections.ConfigDict:
    """config.data: which clips, and how the grain pipeline reads them (coordtok_jax/data)."""
    d = ml_collections.ConfigDict()
    d.source = "synthetic"  # synthetic | folder | array_record | tfds
    d.seed = 0  # shuffle and random windows
    d.pad_value = -3.0  # official: frames past n_frames are -1 in [0, 1] space, -3 after v*2-1
    d.min_frames = 29
    # synthetic: procedural clips, deterministic per (synthetic_seed, index)
    d.num_clips = 10_000
    d.synthetic_seed = 0
    d.synthetic_texture = 1.0  # 0 = flat backgrounds and shapes (same layout and motion)
    d.synthetic_motion = 1.0  # scales pan, velocities and spin (0 = still pictures)
    # folder: root/class/*.avi|mp4|..., decoded with PyAV; eval_list = 'relative/path [start]' lines
    d.root = _optional_str()
    d.eval_list = _optional_str()
    # array_record: a directory of *.array_record shards (or a glob), local or gs://
    d.path = _optional_str()
    d.allow_resize = False  # prepared shards at another resolution than the model: error unless True
    # tfds: tfds.data_source(name, split, data_dir)
    d.name = _optional_str()
    d.split = "train"
    d.eval_split = "test"
    d.data_dir = _optional_str()
    d.video_key = "video"
    d.label_key = "label"
    # grain
    d.num_workers = 0  # worker processes (0 = in-process)
    d.worker_buffer_size = 2
    d.read_threads = 4
    d.prefetch = 8
    d.max_consecutive_failures = 64
    return d


def _parse_arg(arg: str) -> tuple[str, dict]:
    """'L,stage=2' -> ('L', {'stage': '2'})."""
    parts = [p.strip() for p in (arg or "tiny").split(",") if p.strip()]
    size, options = (parts[0] if parts and "=" not in parts[0] else "tiny"), {}
    for p in parts[1:] if parts and "=" not in parts[0] else parts:
        if "=" not in p:
            raise ValueError(f"config argument {arg!r}: expected SIZE[,key=value...], got {p!r}")
        k, v = p.split("=", 1)
        options[k] = v
    unknown = set(options) - {"stage"}
    if unknown:
        raise ValueError(f"config argument {arg!r}: unknown options {sorted(unknown)} (known: stage)")
    return size, options


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """ARG = SIZE[,stage=1|2]: SIZE in {L, B, S, tiny, cpu}; stage 1 (N random patches, L2) or stage 2
    (whole frames, L2 + LPIPS, started from a stage-1 checkpoint with --config.init_from)."""
    size, options = _parse_arg(arg)
    stage = int(options.get("stage", 1))
    if stage not in (1, 2):
        raise ValueError(f"config argument {arg!r}: stage must be 1 or 2")
    tiny = size in LOCAL_SIZES
    config = ml_collections.ConfigDict()
    config.size = size
    config.stage = stage
    config.seed = 0
    config.model = model_config(size)
    config.data = data_config()
    if tiny:
        config.data.min_frames = 9  # the synthetic source makes some clips shorter than T.

    # The step. Paper: global batch 256 videos x 128 frames; stage 1 decodes N = 1024 random
    # patches per video (L2); stage 2 decodes K = 16 whole frames per video (L2 + LPIPS).
    config.batch_size = 8 if tiny else 256  # global, all hosts and micro-batches
    config.grad_accum_steps = 1
    config.num_points = 256 if tiny else 1024
    config.num_frames = 4 if tiny else 16
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
    config.total_steps = (300 if stage == 1 else 100) if tiny else (1_000_000 if stage == 1 else 50_000)
    config.log_every = 10 if tiny else 100
    config.save_every = 100 if tiny else 5_000
    config.keep_last = 3
    config.keep_every = 0 if tiny else 50_000
    config.eval_every = 100 if tiny else 5_000
    config.eval_videos = 2 if tiny else 4
    # Full-clip decoding in eval: None = every patch in one joint pass (the paper's protocol); large
    # models decode in contiguous chunks like the official decode_video.
    config.eval_points_per_call = ml_collections.FieldReference(None if tiny else 4096, field_type=int)
    config.peak_flops_per_device = ml_collections.FieldReference(None, field_type=float)  # MFU; None = known table
    if size == "cpu":
        for dotted, value in CPU_RECIPE.items():
            *parents, leaf = dotted.split(".")
            node = config
            for p in parents:
                node = node[p]
            node[leaf] = value

    # Mesh and parameter sharding.
    config.mesh = ml_collections.ConfigDict()
    # (data, fsdp) or (data, fsdp, tensor); one entry may be -1 = fill with the remaining devices. The
    # batch is split over data x fsdp chips; fsdp also splits every weight and Adam moment (ZeRO-3);
    # tensor splits attention heads and the MLP (Megatron). See launch/README.md for each slice.
    # FSDP over every chip for the real sizes (the only way L + AdamW fits a v5e chip; measured per slice in
    # launch/README.md); data parallel for the CPU-scale configs.
    config.mesh.shape = (-1, 1) if tiny else (1, -1)  # one entry may be -1 = the remaining devices
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
