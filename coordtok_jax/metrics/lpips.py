"""LPIPS (VGG16 variant) as a Flax NNX module, with the official LPIPS semantics used by CoordTok.

d(x, y) = sum over taps k of mean_{h,w} sum_c w_k[c] * dropout((n_k(x) - n_k(y))**2)[h, w, c], where
* x, y are (N, H, W, 3) images in [-1, 1] (channel-last), first scaled per RGB channel:
  (x - [-.030, -.088, -.188]) / [.458, .448, .450];
* the taps are torchvision VGG16 `features` after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
  (3x3 convs, stride 1, padding 1, bias, ReLU; 2x2/2 max pools between blocks);
* n_k unit-normalises over channels: f / (sqrt(sum_c f**2) + 1e-10);
* w_k are the LPIPS NetLinLayer weights (`lin{k}.model.1.weight`, a 1x1 conv C->1 without bias),
  preceded by Dropout(p=0.5), which is only applied when called with deterministic=False and a key.

All weights are frozen pretrained values: they live in `Frozen` variables (not `nnx.Param`, so an
optimizer built over nnx.Param never sees them) and are wrapped in stop_gradient. Gradients flow to
the inputs (stage-2 training backpropagates the LPIPS loss into the reconstruction). The one
deliberate difference from PyTorch: at a position whose features are all exactly zero, the norm's
gradient is 0 instead of PyTorch's NaN (forward values are identical). Identical images give exactly
0 (and a zero gradient). x and y go through VGG as separate passes, so a gradient w.r.t. x needs
no backward pass through the target's VGG.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from coordtok_jax.io.pth import load_pth

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16 `features`: conv indices per block (a 2x2 max pool precedes blocks 2..5).
BLOCKS = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
CHANNELS = (64, 128, 256, 512, 512)
CONV_INDICES = tuple(i for block in BLOCKS for i in block)
DROPOUT_P = 0.5
EPS = 1e-10

VGG_HELP = ("set config.lpips.vgg_path to torchvision's ImageNet VGG16 weights `vgg16-397923af.pth` "
            "(https://download.pytorch.org/models/vgg16-397923af.pth; a full vgg16 state_dict or its "
            "`features.*` subset)")
LIN_HELP = ("set config.lpips.lin_path to the LPIPS linear layers `vgg.pth` (lpips/weights/v0.1/vgg.pth "
            "of the LPIPS repository richzhang/PerceptualSimilarity, also in the `lpips` pip package)")


class Frozen(nnx.Variable):
    """A frozen pretrained weight: not an nnx.Param, so optimizers over nnx.Param skip it."""


def conv_shapes() -> dict[str, tuple[int, ...]]:
    """Expected torchvision `features.{i}.weight` [O, I, 3, 3] / `.bias` [O] shapes."""
    shapes, cin = {}, 3
    for block, cout in zip(BLOCKS, CHANNELS):
        for i in block:
            shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
            shapes[f"features.{i}.bias"] = (cout,)
            cin = cout
    return shapes


def lin_shapes() -> dict[str, tuple[int, ...]]:
    return {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(CHANNELS)}


def check_state_dict(sd: Mapping[str, np.ndarray], expected: dict, what: str) -> None:
    """ValueError listing every missing, unexpected and wrongly shaped key of `what`."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k}: {tuple(np.shape(sd[k]))} (expected {expected[k]})"
                 for k in expected if k in sd and tuple(np.shape(sd[k])) != expected[k]]
    if missing or unexpected or misshaped:
        raise ValueError(f"{what} weights do not match: missing keys {missing}, "
                         f"unexpected keys {unexpected}, misshaped {misshaped}")


class LPIPS(nnx.Module):
    """LPIPS-VGG16 distance. `model(x, y)` -> (N,) float32; see the module docstring."""

    def __init__(self, convs, lins, *, dtype=jnp.float32, precision=None):
        """convs: 13 (kernel HWIO, bias) pairs in VGG order; lins: 5 (C,) vectors (float32)."""
        self.dtype = dtype
        self.precision = precision
        self.kernels = nnx.List([Frozen(jnp.asarray(w, jnp.float32)) for w, _ in convs])
        self.biases = nnx.List([Frozen(jnp.asarray(b, jnp.float32)) for _, b in convs])
        self.lins = nnx.List([Frozen(jnp.asarray(w, jnp.float32)) for w in lins])

    @classmethod
    def from_state_dicts(cls, vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray],
                         dtype=jnp.float32, precision=None) -> "LPIPS":
        """From torchvision `features.{i}.weight/bias` (`classifier.*` ignored) and LPIPS lin weights."""
        vgg = {k: v for k, v in vgg.items() if not k.startswith("classifier.")}
        check_state_dict(vgg, conv_shapes(), "LPIPS VGG16")
        check_state_dict(lin, lin_shapes(), "LPIPS linear-layer")
        convs = [(np.transpose(np.asarray(vgg[f"features.{i}.weight"], np.float32), (2, 3, 1, 0)),
                  np.asarray(vgg[f"features.{i}.bias"], np.float32)) for i in CONV_INDICES]
        lins = [np.asarray(lin[k], np.float32).reshape(-1) for k in lin_shapes()]
        return cls(convs, lins, dtype=dtype, precision=precision)

    @classmethod
    def random(cls, key: jax.Array, dtype=jnp.float32, precision=None) -> "LPIPS":
        """Random weights of the right shapes (He-normal convs, U(0, 8/C) lin weights), for tests."""
        # NumPy generator seeded by the key: eager jax.random per shape would compile for seconds
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
        convs = []
        for o, i, kh, kw in (s for k, s in conv_shapes().items() if k.endswith("weight")):
            std = np.sqrt(2.0 / (i * kh * kw))
            convs.append(((std * rng.standard_normal((kh, kw, i, o))).astype(np.float32),
                          (0.01 * rng.standard_normal(o)).astype(np.float32)))
        lins = [rng.uniform(0, 8 / c, c).astype(np.float32) for c in CHANNELS]
        return cls(convs, lins, dtype=dtype, precision=precision)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """The five unit-normalised VGG taps (N, H_k, W_k, C_k), float32, of images in [-1, 1]."""
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        h = ((x.astype(jnp.float32) - shift) / scale).astype(self.dtype)
        taps, j = [], 0
        for b, block in enumerate(BLOCKS):
            if b > 0:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max,
                                          (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
            for _ in block:
                w = jax.lax.stop_gradient(self.kernels[j][...]).astype(self.dtype)
                bias = jax.lax.stop_gradient(self.biases[j][...]).astype(self.dtype)
                h = jax.lax.conv_general_dilated(
                    h, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                    precision=self.precision)
                h = jax.nn.relu(h + bias)
                j += 1
            taps.append(_normalize(h.astype(jnp.float32)))
        return taps

    def __call__(self, x: jax.Array, y: jax.Array, *, deterministic: bool = True,
                 rngs: Union[nnx.Rngs, jax.Array, None] = None,
                 key: Optional[jax.Array] = None) -> jax.Array:
        """LPIPS distances (N,) float32 between images x, y (N, H, W, 3) in [-1, 1].

        Dropout(0.5) before each linear layer (as the official stage-2 training, which runs LPIPS
        in train mode) is applied only if deterministic=False; it then needs `rngs` (an nnx.Rngs,
        whose 'dropout' stream is used, or a PRNG key) or, equivalently, `key` (a PRNG key).
        """
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two (N, H, W, 3) images of equal shape, got {x.shape}, {y.shape}")
        if rngs is not None and key is not None:
            raise ValueError("LPIPS: pass either `rngs` or `key`, not both")
        rngs = key if rngs is None else rngs
        if not deterministic and rngs is None:
            raise ValueError("LPIPS(deterministic=False) needs `rngs` (an nnx.Rngs or a PRNG key) or `key`")
        # Separate VGG passes: under jax.grad w.r.t. x, the target's pass needs no backward.
        taps = list(zip(self.features(x), self.features(y)))
        keeps = [None] * len(taps)
        if not deterministic:
            key = rngs.dropout() if isinstance(rngs, nnx.Rngs) else rngs
            # one draw for all taps (one RNG kernel: much faster to compile than five)
            sizes = [fx.size for fx, _ in taps]
            keep = jax.random.bernoulli(key, 1.0 - DROPOUT_P, (sum(sizes),))
            bounds = np.cumsum([0] + sizes)
            keeps = [keep[a:b].reshape(fx.shape) for a, b, (fx, _) in zip(bounds[:-1], bounds[1:], taps)]
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for k, (fx, fy) in enumerate(taps):
            d = (fx - fy) ** 2
            if keeps[k] is not None:
                d = jnp.where(keeps[k], d / (1.0 - DROPOUT_P), 0.0)
            w = jax.lax.stop_gradient(self.lins[k][...])
            total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))  # 1x1 conv C->1, mean
        # Identical images: exactly 0 (the true value and gradient; XLA may otherwise leave ~1e-17
        # of rounding noise, as compiled convs need not round identically in different places).
        same = jnp.all((x == y).reshape(x.shape[0], -1), axis=1)
        return jnp.where(same, 0.0, total)


def _normalize(f: jax.Array) -> jax.Array:
    """f / (||f||_2 over channels + 1e-10), with a finite gradient where the norm is exactly 0."""
    s = jnp.sum(f * f, axis=-1, keepdims=True)
    positive = s > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
    return f / (norm + EPS)


def _unwrap(sd, keys=("state_dict", "model", "net")):
    """A state_dict possibly wrapped as {'state_dict': ...}/{'model': ...}; 'module.' prefixes dropped."""
    while isinstance(sd, dict) and len(sd) == 1 and next(iter(sd)) in keys and isinstance(
            next(iter(sd.values())), dict):
        sd = next(iter(sd.values()))
    if not isinstance(sd, dict):
        raise ValueError(f"expected a state_dict (a dict of tensors), got {type(sd).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _read(path, help_text: str, what: str) -> dict:
    if path is None or str(path) == "":
        raise FileNotFoundError(f"no {what} file given: {help_text}")
    try:
        if str(path).endswith(".npz"):  # the same keys saved with np.savez (no torch file needed)
            from etils import epath

            with epath.Path(path).open("rb") as f, np.load(f) as data:
                return {k: data[k] for k in data.files}
        return _unwrap(load_pth(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found at {str(path)!r}: {help_text}") from None


def load_lpips(vgg_path, lin_path, dtype=jnp.float32, precision=None) -> LPIPS:
    """LPIPS from torchvision's vgg16 .pth (full, `features.*` subset, or the bare `features`
    Sequential's '{i}.weight' keys) and the LPIPS `vgg.pth` linear layers; torch is not needed.
    A `.npz` with the same keys is accepted for either file."""
    vgg = _read(vgg_path, VGG_HELP, "LPIPS VGG16 weights")
    lin = _read(lin_path, LIN_HELP, "LPIPS linear-layer weights")
    if vgg and all(k.split(".")[0].isdigit() for k in vgg):
        vgg = {f"features.{k}": v for k, v in vgg.items()}
    return LPIPS.from_state_dicts(vgg, lin, dtype=dtype, precision=precision)
