r"""CoordTok tokenizer configurations.

    --config=configs/coordtok.py:ARG   with ARG in {L, B, S, tiny}
    --config.model.enc_num_layers=12   overrides any field

* `L`: the released CoordTok_UCF101_1M_50K.pth (853,410,496 parameters): 128x128x128 video,
  width 1024, ViT3D 8 layers, cross/self encoder 24, decoder 24, 16 heads; triplane
  z_xy 16x16x8, z_yt / z_xt 32x16x8 = 1280 tokens.
* `B`, `S`: the paper's smaller model sizes (Table 5) with the released latent geometry. The
  widths/depths are the standard ViT-B (768, 12 heads) and ViT-S (384, 6 heads) with 12-layer
  encoder and decoder and an 8-layer ViT3D, as the L model pairs them.
* `tiny`: exactly the reference small configuration (coordtok_small_state_dict.json,
  511,408 parameters): 16x32x32 video, width 64, 2 layers each. Runs in seconds on a CPU.
"""

import ml_collections

# Logical parameter axes -> mesh axes. 'embed' is sharded over 'fsdp' (ZeRO-3 style); the rest are
# replicated. A tensor-parallel mesh would map 'mlp', 'qkv' and 'heads' onto its model axis.
LOGICAL_AXIS_RULES = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("qkv", None),
    ("heads", None),
    ("norm", None),
    ("layers", None),
)

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
    "S": dict(
        video_shape=(128, 128, 128),
        enc_embed_dim=384, enc_num_heads=6, enc_patch_num_layers=8, enc_num_layers=12,
        enc_patch_size_t=8, enc_patch_size_xy=16,
        dec_embed_dim=384, dec_num_heads=6, dec_num_layers=12,
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
    # folder: root/class/*.avi|mp4|..., decoded with PyAV; eval_list = 'relative/path [start]' lines
    d.root = _optional_str()
    d.eval_list = _optional_str()
    # array_record: a directory of *.array_record shards (or a glob), local or gs://
    d.path = _optional_str()
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


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    size = arg or "tiny"
    config = ml_collections.ConfigDict()
    config.size = size
    config.seed = 0
    config.model = model_config(size)

    config.data = data_config()

    # Mesh and parameter sharding (used by the trainer and the sharded-init helpers).
    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1)  # (data, fsdp); one entry may be -1 = fill with the remaining devices.
    config.mesh.axes = ("data", "fsdp")
    config.logical_axis_rules = LOGICAL_AXIS_RULES

    if size == "tiny":
        config.data.min_frames = 9  # the synthetic source makes some clips shorter than T.
    return config


def validate(config: ml_collections.ConfigDict):
    """Raises coordtok_jax.models.ConfigError naming the field when the geometry cannot work."""
    from coordtok_jax.models.config import validate as validate_model

    return validate_model(config.model)
