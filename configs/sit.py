r"""Triplane SiT configurations (latent diffusion on CoordTok planes).

    --config=configs/sit.py:ARG   with ARG = SIZE[,classes=shapes][,runlocal], SIZE in {S/2, B/2, L/2, XL/2, tiny, cpu}
    --config.tokenizer=/path/to/tokenizer/workdir

* `L/2`: the released CoordTok-SiT-L/2 (official train_sit.py / sample_sit.py defaults): depth 24,
  width 1024, 16 heads, patch 2, on the released tokenizer's planes xy 16x16x8, yt / xt 32x16x8
  (official `input_size=[32, 16]` = [latent_resolution_t, latent_resolution_xy]); unconditional
  (num_classes=1, class_dropout_prob=0: no null-class row); learn_sigma=True (the sigma half of
  the output is discarded). 461,462,720 numbers in the state_dict (incl. the fixed pos_embed_xy).
* `S/2`, `B/2`, `XL/2`: the standard SiT sizes (12/384/6, 12/768/12, 28/1152/16), same planes.
* `classes=shapes`: class-conditional on the synthetic clips' largest shape (disc / square / ring:
  data.synthetic_labels, 3 classes, label dropout 0.1 for classifier-free guidance, `sample
  --cfg_scale`), for trying the class-conditional path on a CPU.
* `tiny`: depth 2, width 64, 2 heads on the tiny tokenizer's planes (xy 8x8x8, yt / xt 8x8x8)
  for CPU tests.

Training follows the official train_sit.py: linear path, velocity prediction, t ~ U[0, 1),
AdamW lr 1e-4 without weight decay, global batch 64, EMA 0.9999 every step, no clipping,
600K steps; latents normalised per plane and channel with statistics over 2048 clips.
Sampling (README): SDE Euler-Maruyama, 250 steps, diffusion form 'sigma', last step 'Mean' 0.04.
"""

import ml_collections

from coordtok_jax import config_lib, sharding
from coordtok_jax.data.config import CPU_DATA, data_config
from coordtok_jax.data.synthetic import SHAPE_KINDS

_SIZES = {  # depth, hidden_size, num_heads
    "S/2": (12, 384, 6),
    "B/2": (12, 768, 12),
    "L/2": (24, 1024, 16),
    "XL/2": (28, 1152, 16),
    "tiny": (2, 64, 2),
    "cpu": (2, 64, 2),  # the README's CPU generation job, on the `cpu` tokenizer's 16x16 planes
}
LOCAL_SIZES = ("tiny", "cpu")  # CPU-scale sizes: they imply runlocal
# What the `cpu` SiT changes from the defaults (measured: benchmarks/RESULTS.md, "a CPU recipe"):
# the `cpu` tokenizer's data, a large learning rate with a short EMA, 2x the batch. 3e-3 rather than
# 1e-3: the denoiser's error at t = 0.3 after 2,000 steps 0.269 vs 0.292 (3e-4: 0.319), stable to 12,000.
CPU_RECIPE = {
    "optimizer.learning_rate": 3e-3,
    "optimizer.warmup_steps": 50,
    "ema_decay": 0.99,
    "batch_size": 16,
    "total_steps": 3000,
    "log_every": 50,
    "save_every": 1000,
    "eval_every": 1000,
    "eval_num_videos": 8,
    "stats_num_clips": 256,
}



def model_config(size: str) -> ml_collections.ConfigDict:
    if size not in _SIZES:
        raise ValueError(f"unknown SiT size {size!r}; choose one of {list(_SIZES)}")
    depth, hidden, heads = _SIZES[size]
    m = ml_collections.ConfigDict()
    m.hidden_size = hidden
    m.depth = depth
    m.num_heads = heads
    m.patch_size = 2
    m.mlp_ratio = 4.0
    m.in_channels = 8  # C of the tokenizer planes
    m.latent_resolution_xy = 8 if size == "tiny" else 16  # z_xy (Rxy, Rxy, C)
    m.latent_resolution_t = {"tiny": 8, "cpu": 16}.get(size, 32)  # z_yt, z_xt (Rt, Rxy, C)
    m.num_classes = 1  # official: unconditional (every label is 0)
    m.class_dropout_prob = 0.0  # > 0 adds the null-class row for classifier-free guidance
    m.learn_sigma = True
    # 'zeros' (official) or 'sincos': the start of the learned yt / xt position table
    m.pos_embed_t_init = "zeros"
    m.dtype = "float32"  # compute dtype ('bfloat16' on accelerators); parameters stay float32
    m.attention_impl = ml_collections.FieldReference(None, field_type=str)  # None | xla | splash | cudnn | chunked
    m.attention_query_chunk = 1024
    m.remat_policy = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'
    m.scan_unroll = 1  # layers per iteration of the layer scans (parameters stay stacked)
    # Layer stacks: True, parameters stacked on a 'layers' axis + lax.scan (short compiles);
    # False, one parameter tree per layer in a Python loop (CPU training of S-sized models: ~15-25%
    # faster steps; no gain for tiny / cpu; 3.4x longer compiles of L on TPU: benchmarks/RESULTS.md).
    m.scan_layers = True
    return m


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    """ARG = SIZE[,classes=shapes][,runlocal]: SIZE in {S/2, B/2, L/2, XL/2, tiny, cpu}; classes=shapes:
    class-conditional on the synthetic clips' largest shape; runlocal: SIZE's model with a schedule
    that runs on a CPU (implied by tiny and cpu)."""
    size, options = config_lib.parse_arg(arg, sizes=list(_SIZES), default="tiny", local_sizes=LOCAL_SIZES,
                                         options={"classes": ("shapes",)})
    local = options["runlocal"]
    config = ml_collections.ConfigDict()
    config.size = size
    config.seed = 0
    config.model = model_config(size)
    # The frozen tokenizer: a CoordTok workdir (or checkpoint folder) whose planes match
    # config.model (in_channels, latent_resolution_xy / _t).
    config.tokenizer = ml_collections.FieldReference(None, field_type=str)
    config.data = data_config()
    # Or train from a latent cache (python -m coordtok_jax.encode_latents): its data config
    # and tokenizer are adopted, the tokenizer is loaded only for the sampling evals.
    config.latents = ml_collections.FieldReference(None, field_type=str)
    if local:
        config.data.min_frames = 9

    config.batch_size = 8 if local else 64  # global
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 1e-4
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.0
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"  # official; or "cosine" (decay to 0 at total_steps)
    config.optimizer.grad_clip_norm = 0.0  # 0 = none (official)
    config.ema_decay = 0.9999  # every step, EMA initialised to the model; sampling uses the EMA

    config.transport = ml_collections.ConfigDict()
    config.transport.path = "Linear"  # x_t = t x1 + (1 - t) x0, x1 = data, x0 ~ N(0, I)
    config.transport.prediction = "velocity"
    config.transport.loss_weight = ml_collections.FieldReference(None, field_type=str)
    config.transport.train_eps = 0.0
    config.transport.sample_eps = 0.0

    config.sampler = ml_collections.ConfigDict()
    config.sampler.mode = "sde"  # official README: SDE, Euler-Maruyama
    config.sampler.num_steps = 20 if local else 250
    config.sampler.diffusion_form = "sigma"
    config.sampler.diffusion_norm = 1.0
    config.sampler.last_step = "Mean"
    config.sampler.last_step_size = 0.04
    config.sampler.cfg_scale = 1.0  # > 1 needs a class-conditional model (class_dropout_prob > 0)

    # Latent normalisation statistics (per plane and channel), recomputed from this many clips.
    config.stats_num_clips = 16 if local else 2048

    config.total_steps = 100 if local else 600_000
    config.log_every = 10 if local else 100
    config.save_every = 50 if local else 10_000
    config.keep_last = 3
    config.keep_every = 0  # also keep every N-th step's checkpoint (0 = off)
    # In-loop eval (0 = off): eval_num_videos samples from the EMA (eval_sampler_steps steps of the
    # configured sampler, None = config.sampler.num_steps) -> WORKDIR/samples/step_N.gif and the
    # sampled latents' spread; with eval_i3d (i3d_pretrained_400.pt) also gFVD vs as many real clips.
    config.eval_every = 0 if local else 25_000
    config.eval_num_videos = 4 if local else 16
    config.eval_sampler_steps = ml_collections.FieldReference(None, field_type=int)
    config.eval_i3d = ml_collections.FieldReference(None, field_type=str)
    config.debug = ml_collections.ConfigDict()
    config.debug.kill_at_step = 0  # tests: SIGKILL after saving this step

    config.mesh = ml_collections.ConfigDict()
    # FSDP over every chip for the real sizes (the only way L + AdamW fits a v5e chip; measured per slice in
    # launch/README.md); data parallel for the CPU-scale configs.
    config.mesh.shape = (-1, 1) if local else (1, -1)  # one entry may be -1 = the remaining devices
    config.mesh.axes = ("data", "fsdp")
    config.logical_axis_rules = sharding.LOGICAL_AXIS_RULES  # the same table as the tokenizer
    config.distributed = "auto"
    if size == "cpu":  # the cpu tokenizer's data, and the recipe above
        config_lib.override(config, {**CPU_DATA, **CPU_RECIPE})
    if options.get("classes") == "shapes":  # class-conditional on the synthetic clips' largest shape
        config_lib.override(config, {"data.synthetic_labels": True, "model.num_classes": len(SHAPE_KINDS),
                                     "model.class_dropout_prob": 0.1})
    return config


def validate(config: ml_collections.ConfigDict):
    """Raises coordtok_jax.models.ConfigError naming the field when the model cannot work."""
    from coordtok_jax.models.sit import validate_sit

    return validate_sit(config.model)
