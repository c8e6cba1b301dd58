"""Inflated Inception-V1 (I3D, Kinetics-400) in Flax NNX, for FVD features.

Reproduces, in inference mode, the PyTorch `InceptionI3d(400, in_channels=3)` of piergiaj/pytorch-i3d
as used (with `i3d_pretrained_400.pt`) by the DIGAN/TATS/VideoGPT-style FVD code that the official
CoordTok evaluation loads; its state_dict layout is `tests/data/reference/i3d_state_dict.json`.

Layout: our API is channel-last. Videos are (B, T, H, W, 3) float in [-1, 1] at 224x224 (see
`preprocess`), where the PyTorch model takes (B, 3, T, H, W). Torch Conv3d kernels (O, I, kT, kH, kW)
become DHWIO (kT, kH, kW, I, O).

Semantics (piergiaj, eval mode):
* Unit3D: TF-"SAME" padding computed per dimension from the input size n, kernel k and stride s as
  pad = max(k - s, 0) if n % s == 0 else max(k - n % s, 0), pad // 2 before and the rest after
  (zeros, like F.pad), then a Conv3d without bias (the logits unit has one), BatchNorm3d (eps 1e-3,
  running statistics) and ReLU; the logits unit has no BatchNorm and no ReLU.
* MaxPool3dSamePadding: the same padding, filled with 0 (F.pad) -- not -inf -- then max pooling
  (floor mode, no further padding).
* Inception modules: b0 1x1 | b1a 1x1 -> b1b 3x3 | b2a 1x1 -> b2b 3x3 | 3x3x3/1 max pool -> b3b 1x1,
  concatenated on channels in that order.
* Head: AvgPool3d kernel (2, 7, 7), stride 1, no padding; dropout (identity at eval); 1x1x1 logits
  conv with bias; squeeze of the spatial dims; mean over the remaining time steps -> (B, 400).
  The model needs T >= 9 frames and 193 <= H, W <= 224 (so the head sees a 7x7 map).

Convolutions run at `precision` (default HIGHEST: full float32 also on GPUs/TPUs, whose default
would use TF32/bfloat16 passes).
"""

from __future__ import annotations

import functools
import io
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NUM_CLASSES = 400
BN_EPS = 1e-3
RESOLUTION = 224
MIN_FRAMES = 9
DEFAULT_PRECISION = jax.lax.Precision.HIGHEST
# (name, input channels, (b0, b1a, b1b, b2a, b2b, b3b) output channels), in network order.
MIXED = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)
# Stem units: (name, in, out, kernel, stride).
STEM = (("Conv3d_1a_7x7", 3, 64, 7, 2), ("Conv3d_2b_1x1", 64, 64, 1, 1),
        ("Conv3d_2c_3x3", 64, 192, 3, 1))
# Max pools: name -> (kernel, stride); the 4a/5a pools run before Mixed_4b / Mixed_5b.
POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
         "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
AVG_POOL = (2, 7, 7)
_BN_KEYS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _triple(v) -> tuple[int, int, int]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * 3


def same_padding(sizes: Sequence[int], kernel: Sequence[int],
                 stride: Sequence[int]) -> list[tuple[int, int]]:
    """piergiaj's `compute_pad` per dimension: [(before, after)] for sizes (T, H, W)."""
    pads = []
    for n, k, s in zip(sizes, kernel, stride):
        p = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads.append((p // 2, p - p // 2))
    return pads


def max_pool_same(x: jax.Array, kernel: Sequence[int], stride: Sequence[int]) -> jax.Array:
    """MaxPool3dSamePadding on (B, T, H, W, C): zero SAME padding (as F.pad), then a VALID max pool."""
    kernel, stride = _triple(kernel), _triple(stride)
    x = jnp.pad(x, [(0, 0), *same_padding(x.shape[1:4], kernel, stride), (0, 0)])
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *kernel, 1), (1, *stride, 1), "VALID")


class BatchNorm3d(nnx.Module):
    """Inference BatchNorm (eps 1e-3): (x - mean) / sqrt(var + eps) * scale + bias, over channels."""

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.asarray(np.ones(channels, np.float32)))
        self.bias = nnx.Param(jnp.asarray(np.zeros(channels, np.float32)))
        self.mean = nnx.BatchStat(jnp.asarray(np.zeros(channels, np.float32)))
        self.var = nnx.BatchStat(jnp.asarray(np.ones(channels, np.float32)))

    def __call__(self, x: jax.Array) -> jax.Array:
        mul = jax.lax.rsqrt(self.var[...] + BN_EPS) * self.scale[...]
        return (x - self.mean[...]) * mul + self.bias[...]


class Unit3D(nnx.Module):
    """piergiaj Unit3D: SAME-padded Conv3d (+ bias if use_bias) -> BatchNorm3d -> ReLU (optional)."""

    def __init__(self, cin: int, cout: int, kernel=1, stride=1, *, rng: Optional[np.random.Generator],
                 use_batch_norm: bool = True, use_bias: bool = False, activation: bool = True,
                 precision=DEFAULT_PRECISION):
        """rng: He-normal kernel initialisation, or None for zero placeholders (to be loaded)."""
        self.kernel_shape, self.stride = _triple(kernel), _triple(stride)
        self.activation, self.precision = activation, precision
        shape = (*self.kernel_shape, cin, cout)
        if rng is None:
            w = np.zeros(shape, np.float32)
        else:
            std = math.sqrt(2.0 / (cin * math.prod(self.kernel_shape)))
            w = rng.standard_normal(shape, np.float32) * np.float32(std)
        self.kernel = nnx.Param(jnp.asarray(w))
        self.bias = nnx.Param(jnp.asarray(np.zeros(cout, np.float32))) if use_bias else None
        self.bn = BatchNorm3d(cout) if use_batch_norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        pads = same_padding(x.shape[1:4], self.kernel_shape, self.stride)
        y = jax.lax.conv_general_dilated(
            x, self.kernel[...], self.stride, pads,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...]
        if self.bn is not None:
            y = self.bn(y)
        return jax.nn.relu(y) if self.activation else y


class InceptionModule(nnx.Module):
    """piergiaj InceptionModule: [b0 1x1, b1a 1x1 -> b1b 3x3, b2a 1x1 -> b2b 3x3, pool -> b3b 1x1]."""

    def __init__(self, cin: int, out: Sequence[int], *, rng, precision=DEFAULT_PRECISION):
        kw = dict(rng=rng, precision=precision)
        self.b0 = Unit3D(cin, out[0], 1, **kw)
        self.b1a = Unit3D(cin, out[1], 1, **kw)
        self.b1b = Unit3D(out[1], out[2], 3, **kw)
        self.b2a = Unit3D(cin, out[3], 1, **kw)
        self.b2b = Unit3D(out[3], out[4], 3, **kw)
        self.b3b = Unit3D(cin, out[5], 1, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.b3b(max_pool_same(x, 3, 1))
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], axis=-1)


def _final_sizes(t: int, h: int, w: int) -> tuple[int, int, int]:
    """(T, H, W) reaching the head: every SAME stage of stride s maps n to ceil(n / s)."""
    t = math.ceil(math.ceil(math.ceil(t / 2) / 2) / 2)        # Conv3d_1a, MaxPool 4a, 5a
    h, w = (math.ceil(n / 32) for n in (h, w))                # Conv3d_1a and the four pools
    return t - AVG_POOL[0] + 1, h - AVG_POOL[1] + 1, w - AVG_POOL[2] + 1


class InceptionI3d(nnx.Module):
    """I3D (400 classes). `model(video)`: (B, T, H, W, 3) in [-1, 1] -> logits (B, 400) float32.

    Attribute names follow the torch state_dict (`Conv3d_1a_7x7`, `Mixed_3b.b1b`, `logits`, ...).
    rngs: an nnx.Rngs for a random He-normal initialisation (BatchNorm at identity statistics), or
    None for zero placeholders (`i3d_from_state_dict` fills them). Jit with nnx.jit or split/merge.
    """

    def __init__(self, *, rngs: Optional[nnx.Rngs] = None, num_classes: int = NUM_CLASSES,
                 precision=DEFAULT_PRECISION):
        rng = None
        if rngs is not None:  # NumPy draws seeded by one key: eager jax.random per shape compiles slowly
            data = np.asarray(jax.random.key_data(rngs.params()), np.uint32).ravel()
            rng = np.random.default_rng(data.tolist())
        self.num_classes = num_classes
        for name, cin, cout, k, s in STEM:
            setattr(self, name, Unit3D(cin, cout, k, s, rng=rng, precision=precision))
        for name, cin, out in MIXED:
            setattr(self, name, InceptionModule(cin, out, rng=rng, precision=precision))
        self.logits = Unit3D(1024, num_classes, 1, rng=rng, use_batch_norm=False, use_bias=True,
                             activation=False, precision=precision)

    def __call__(self, video: jax.Array) -> jax.Array:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"InceptionI3d expects (B, T, H, W, 3) videos, got shape {video.shape}")
        t, h, w = _final_sizes(*video.shape[1:4])
        if t < 1 or h != 1 or w != 1:
            raise ValueError(
                f"InceptionI3d needs >= {MIN_FRAMES} frames at 193..224 pixels (224x224 after "
                f"`preprocess`), got (T, H, W) = {tuple(video.shape[1:4])}")
        x = video.astype(jnp.float32)
        x = self.Conv3d_1a_7x7(x)
        x = max_pool_same(x, *POOLS["MaxPool3d_2a_3x3"])
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x))
        x = max_pool_same(x, *POOLS["MaxPool3d_3a_3x3"])
        x = self.Mixed_3c(self.Mixed_3b(x))
        x = max_pool_same(x, *POOLS["MaxPool3d_4a_3x3"])
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            x = getattr(self, name)(x)
        x = max_pool_same(x, *POOLS["MaxPool3d_5a_2x2"])
        x = self.Mixed_5c(self.Mixed_5b(x))
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, *AVG_POOL, 1), (1,) * 5, "VALID")
        x = self.logits(x / math.prod(AVG_POOL))   # dropout: identity at eval
        return jnp.mean(x[:, :, 0, 0, :], axis=1)   # squeeze H, W; mean over time


# ---------------------------------------------------------------------------- torch state_dict

def _units(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, int, int, bool]]:
    """torch unit prefix -> (in, out, kernel, has_bn)."""
    units = {name: (cin, cout, k, True) for name, cin, cout, k, _ in STEM}
    for name, cin, o in MIXED:
        for b, (i, c, k) in {"b0": (cin, o[0], 1), "b1a": (cin, o[1], 1), "b1b": (o[1], o[2], 3),
                             "b2a": (cin, o[3], 1), "b2b": (o[3], o[4], 3), "b3b": (cin, o[5], 1)}.items():
            units[f"{name}.{b}"] = (i, c, k, True)
    units["logits"] = (1024, num_classes, 1, False)
    return units


def expected_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """The torch state_dict keys -> shapes that `i3d_from_state_dict` needs (no num_batches_tracked)."""
    shapes = {}
    for prefix, (cin, cout, k, bn) in _units(num_classes).items():
        shapes[f"{prefix}.conv3d.weight"] = (cout, cin, k, k, k)
        if bn:
            shapes.update({f"{prefix}.bn.{p}": (cout,) for p in _BN_KEYS})
        else:
            shapes[f"{prefix}.conv3d.bias"] = (cout,)
    return shapes


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor (torch only imported by whoever made it)
        v = v.detach().cpu()
        v = v.float() if str(v.dtype) == "torch.bfloat16" else v
        v = v.numpy()
    return np.asarray(v, np.float32)


def _unwrap(sd: Any) -> dict:
    while (isinstance(sd, Mapping) and len(sd) == 1 and next(iter(sd)) in ("state_dict", "model")
           and isinstance(next(iter(sd.values())), Mapping)):
        sd = next(iter(sd.values()))
    if not isinstance(sd, Mapping):
        raise ValueError(f"expected an I3D state_dict (a dict of tensors), got {type(sd).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def _unit(model: InceptionI3d, prefix: str) -> Unit3D:
    obj = model
    for part in prefix.split("."):
        obj = getattr(obj, part)
    return obj


def i3d_from_state_dict(state_dict: Mapping[str, Any], *, precision=DEFAULT_PRECISION) -> InceptionI3d:
    """InceptionI3d from a piergiaj state_dict (numpy arrays or torch tensors; keys as
    i3d_state_dict.json, `num_batches_tracked` ignored, an optional `module.` prefix stripped).

    Strict: raises ValueError listing every missing, unexpected and wrongly shaped key.
    """
    sd = {k: v for k, v in _unwrap(state_dict).items() if not k.endswith(".num_batches_tracked")}
    from coordtok_jax.metrics.lpips import check_state_dict

    check_state_dict(sd, expected_shapes(), "I3D (InceptionI3d(400))")
    model = InceptionI3d(rngs=None, precision=precision)
    for prefix, (_, _, _, bn) in _units().items():
        unit = _unit(model, prefix)
        w = _to_numpy(sd[f"{prefix}.conv3d.weight"])  # (O, I, kT, kH, kW) -> DHWIO
        unit.kernel[...] = jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0)))
        if bn:
            for key, attr in _BN_KEYS.items():
                getattr(unit.bn, attr)[...] = jnp.asarray(_to_numpy(sd[f"{prefix}.bn.{key}"]))
        else:
            unit.bias[...] = jnp.asarray(_to_numpy(sd[f"{prefix}.conv3d.bias"]))
    return model


def i3d_state_dict(model: InceptionI3d) -> dict[str, np.ndarray]:
    """The inverse of `i3d_from_state_dict`: torch-layout float32 numpy arrays (no num_batches_tracked)."""
    sd = {}
    for prefix, (_, _, _, bn) in _units(model.num_classes).items():
        unit = _unit(model, prefix)
        sd[f"{prefix}.conv3d.weight"] = np.transpose(np.asarray(unit.kernel[...]), (4, 3, 0, 1, 2))
        if bn:
            for key, attr in _BN_KEYS.items():
                sd[f"{prefix}.bn.{key}"] = np.asarray(getattr(unit.bn, attr)[...])
        else:
            sd[f"{prefix}.conv3d.bias"] = np.asarray(unit.bias[...])
    return sd


def load_i3d(path, *, precision=DEFAULT_PRECISION) -> InceptionI3d:
    """InceptionI3d from `i3d_pretrained_400.pt` (or any .pt/.pth/.npz with that state_dict).

    .pt/.pth: `torch.load(map_location='cpu', weights_only=True)` when torch is importable, else the
    torch-free `coordtok_jax.io.pth.load_pth`. Local and gs:// paths. Errors name the file.
    """
    from etils import epath

    name = str(path)
    try:
        data = epath.Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"I3D weights not found: {name} (the piergiaj/pytorch-i3d "
                                "Kinetics-400 checkpoint `i3d_pretrained_400.pt`)") from None
    try:
        if name.endswith(".npz"):
            with np.load(io.BytesIO(data)) as f:
                sd = {k: f[k] for k in f.files}
        else:
            try:
                import torch
            except ImportError:
                torch = None
            if torch is not None:
                sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            else:
                from coordtok_jax.io.pth import load_pth
                sd = load_pth(path)
        return i3d_from_state_dict(sd, precision=precision)
    except Exception as e:  # noqa: BLE001 -- re-raised naming the file
        raise ValueError(f"{name}: cannot load I3D weights: {e}") from e


# ---------------------------------------------------------------------------- preprocessing, features

def target_size(h: int, w: int, resolution: int = RESOLUTION) -> tuple[int, int]:
    """Resized (H, W) with the shorter side = resolution, the other ceil(side * resolution / short)."""
    scale = resolution / min(h, w)
    return (resolution, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), resolution)


def preprocess(videos: jax.Array, *, resolution: int = RESOLUTION,
               value_range: tuple[float, float] = (0.0, 255.0)) -> jax.Array:
    """The official FVD preprocessing (DIGAN/TATS `preprocess_single`), batched and jit-able.

    videos: (B, T, H, W, 3) uint8 or float with values in `value_range` (default [0, 255]).
    Returns (B, T, resolution, resolution, 3) float32 in [-1, 1]: x -> (x - lo) / (hi - lo), bilinear
    resize of the shorter side to `resolution` (half-pixel centres, no antialiasing: torch
    F.interpolate(mode='bilinear', align_corners=False), whose default has antialias=False),
    center crop (offsets (size - resolution) // 2), then (x - 0.5) * 2.
    """
    if videos.ndim != 5:
        raise ValueError(f"preprocess expects (B, T, H, W, C) videos, got shape {videos.shape}")
    lo, hi = (float(v) for v in value_range)
    x = (jnp.asarray(videos).astype(jnp.float32) - lo) / (hi - lo)
    b, t, h, w, c = x.shape
    th, tw = target_size(h, w, resolution)
    if (th, tw) != (h, w):
        x = jax.image.resize(x, (b, t, th, tw, c), method="bilinear", antialias=False,
                             precision=jax.lax.Precision.HIGHEST)
    top, left = (th - resolution) // 2, (tw - resolution) // 2
    x = x[:, :, top:top + resolution, left:left + resolution, :]
    return (x - 0.5) * 2.0


@functools.partial(jax.jit, static_argnames=("graphdef", "value_range"))
def _features(graphdef, state, videos, value_range):
    return nnx.merge(graphdef, state)(preprocess(videos, value_range=value_range))


def i3d_features(model: InceptionI3d, videos, *, batch_size: Optional[int] = None,
                 value_range: tuple[float, float] = (0.0, 255.0),
                 progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """I3D logits (N, 400) float32 numpy of N raw videos (N, T, H, W, 3) (numpy or jax arrays), as
    the official FVD code (`preprocess` then the model).

    Runs in jitted batches of `batch_size` (default min(N, 16)); a smaller last batch is zero-padded
    to `batch_size`, so one compilation per video shape serves every call with the same batch_size.
    progress(done, total) is called after each batch.
    """
    n = int(videos.shape[0])
    batch_size = int(batch_size) if batch_size else max(min(n, 16), 1)
    graphdef, state = nnx.split(model)
    value_range = tuple(float(v) for v in value_range)
    out = []
    for i in range(0, n, batch_size):
        batch = videos[i:i + batch_size]
        m = int(batch.shape[0])
        if m < batch_size:
            pad = [(0, batch_size - m)] + [(0, 0)] * (batch.ndim - 1)
            batch = jnp.pad(batch, pad) if isinstance(batch, jax.Array) else np.pad(np.asarray(batch), pad)
        out.append(np.asarray(_features(graphdef, state, batch, value_range), np.float32)[:m])
        if progress is not None:
            progress(min(i + batch_size, n), n)
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)
