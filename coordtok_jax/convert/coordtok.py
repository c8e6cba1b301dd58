"""CoordTok parameters <-> the official PyTorch state_dict (keys, shapes, layouts).

The official `CoordTok.state_dict()` (reference: coordtok_L_state_dict.json) names every tensor
by module path; this package stacks identical layers on a leading axis and stores kernels in
Flax layouts. `official_entries(depths)` is the one table that relates the two, in the official
key order:

* Linear: torch weight (out, in) = Flax kernel (in, out) transposed; packed q/k/v projections
  (timm `attn.qkv`, nn.MultiheadAttention `in_proj_weight`) are (3D, D) = [Wq; Wk; Wv], which is
  the transpose of our (D, 3D) = [Wq | Wk | Wv] kernel.
* Conv3d / Conv2d patch embeddings: torch (out, in, *kernel) = Flax (*kernel, in, out) with the
  last two axes moved to the front, reversed.
* LayerNorm: weight = scale, bias = bias.
* Layer stacks: `...layers.blocks.X` row i (model.scan_layers=True, stacked) or
  `...layers.blocks.{i}.X` (scan_layers=False, one tree per layer) = `...layers.{i}.X`; the cross/self encoder's
  MLP is `mlp.0` / `mlp.3` (nn.Sequential(Linear, GELU, Dropout, Linear)) and its attention is
  `in_proj_weight` / `out_proj.weight` (bias-free nn.MultiheadAttention).
* Learned tables (weight tokens, cls token, positional tables incl. the decoder's
  (1, T/pt, H/px, W/py, D)) have the same layout in both.

All transforms are transposes and row selections, so conversions are bit-exact. Functions here
take NumPy arrays (or anything with `.transpose`, indexing and `.shape`) and import no torch;
`coordtok_jax.convert.torch_io` wraps them for torch tensors and files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.errors import UserError
from coordtok_jax.models.config import scan_layers, validate

# Prefixes that official checkpoint files add or carry besides the model itself.
DDP_PREFIX = "module."
LPIPS_PREFIX = "decoder.lpips_loss."  # the frozen LPIPS net inside stage-2 files


class ConversionError(UserError, ValueError):
    """A checkpoint that does not match the configuration; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One official tensor: its key, where it lives in our tree, and how it is laid out."""

    key: str
    path: tuple[str, ...]  # path in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layer: Optional[int]  # row of a stacked (scanned) parameter, None if not stacked
    kind: str  # 'same' | 'linear' | 'conv'


def _to_official(x, kind: str):
    if kind == "linear":
        return x.transpose(1, 0)
    if kind == "conv":  # (*k, in, out) -> (out, in, *k)
        n = x.ndim
        return x.transpose((n - 1, n - 2) + tuple(range(n - 2)))
    return x


def _from_official(x, kind: str):
    if kind == "linear":
        return x.transpose(1, 0)
    if kind == "conv":  # (out, in, *k) -> (*k, in, out)
        n = x.ndim
        return x.transpose(tuple(range(2, n)) + (1, 0))
    return x


def layer_counts(config: Any) -> tuple[int, int, int]:
    """(ViT3D, cross/self encoder, decoder) depths of a model config (validated)."""
    validate(config)
    return int(config.enc_patch_num_layers), int(config.enc_num_layers), int(config.dec_num_layers)


def is_per_layer(blocks: Mapping) -> bool:
    """Whether a stack's `blocks` subtree is one tree per layer (keys 0, 1, ...: scan_layers=False)
    rather than stacked (scan_layers=True)."""
    return bool(blocks) and all(str(k).isdigit() for k in blocks)


def stack_depth(blocks: Mapping, leaf: tuple[str, ...]) -> int:
    """A stack's depth, read off its `blocks` subtree in either layout (`leaf`: a path in one block)."""
    if is_per_layer(blocks):
        return len(blocks)
    return int(_lookup(blocks, leaf).shape[0])


def layer_counts_of(params: Mapping) -> tuple[int, int, int]:
    """The same depths, read off a parameter tree (either layer-stack layout)."""
    enc, leaf = params["encoder"], ("norm1", "scale")
    return (
        stack_depth(enc["encoder"]["layers"]["blocks"], leaf),
        stack_depth(enc["transformer"]["layers"]["blocks"], leaf),
        stack_depth(params["decoder"]["transformer"]["layers"]["blocks"], leaf),
    )


def stack_entry(path: str, i: int, scanned: bool) -> tuple[str, Optional[int]]:
    """(path, row) of layer `i`'s parameters under a stack's `blocks` path: row i of the stacked
    arrays, or the per-layer subtree `blocks.{i}`."""
    return (path, i) if scanned else (f"{path}.{i}", None)


def official_entries(depths: tuple[int, int, int], scanned: bool = True) -> list[Entry]:
    """Every tensor of the official CoordTok state_dict, in its order, for the given
    (ViT3D, cross/self encoder, decoder) depths (see `layer_counts`) and layer-stack layout
    (`scanned`: config.model.scan_layers)."""
    n_vit, n_enc, n_dec = depths
    out: list[Entry] = []

    def add(key, path, kind="same", layer=None):
        out.append(Entry(key, tuple(path.split(".")), layer, kind))

    def linear(key, path, bias=True, layer=None):
        add(f"{key}.weight", f"{path}.kernel", "linear", layer)
        if bias:
            add(f"{key}.bias", f"{path}.bias", "same", layer)

    def norm(key, path, layer=None):
        add(f"{key}.weight", f"{path}.scale", "same", layer)
        add(f"{key}.bias", f"{path}.bias", "same", layer)

    def conv(key, path):
        add(f"{key}.weight", f"{path}.kernel", "conv")
        add(f"{key}.bias", f"{path}.bias")

    def vit_blocks(key, path, n, qkv_bias):
        for i in range(n):
            k, (p, r) = f"{key}.layers.{i}", stack_entry(f"{path}.layers.blocks", i, scanned)
            norm(f"{k}.norm1", f"{p}.norm1", r)
            linear(f"{k}.attn.qkv", f"{p}.attn.qkv", qkv_bias, r)
            linear(f"{k}.attn.proj", f"{p}.attn.proj", True, r)
            norm(f"{k}.norm2", f"{p}.norm2", r)
            linear(f"{k}.mlp.fc1", f"{p}.mlp.fc1", True, r)
            linear(f"{k}.mlp.fc2", f"{p}.mlp.fc2", True, r)

    for plane in ("xy", "yt", "xt"):
        add(f"weight_tokens_{plane}", f"weight_tokens_{plane}")
    add("encoder.cross_pos_emb", "encoder.cross_pos_emb")
    add("encoder.encoder.cls_token", "encoder.encoder.cls_token")
    add("encoder.encoder.pos_emb", "encoder.encoder.pos_emb")
    conv("encoder.encoder.patch_embed.proj", "encoder.encoder.patch_embed")
    vit_blocks("encoder.encoder", "encoder.encoder", n_vit, qkv_bias=False)
    norm("encoder.encoder.norm", "encoder.encoder.norm")
    for plane in ("xy", "yt", "xt"):
        conv(f"encoder.patch_embeds_{plane}.proj", f"encoder.patch_embeds_{plane}")
    for i in range(n_enc):
        k, (p, r) = f"encoder.transformer.layers.{i}", stack_entry("encoder.transformer.layers.blocks", i, scanned)
        norm(f"{k}.norm1", f"{p}.norm1", r)
        add(f"{k}.cross_attn.in_proj_weight", f"{p}.cross_attn.qkv.kernel", "linear", r)
        add(f"{k}.cross_attn.out_proj.weight", f"{p}.cross_attn.proj.kernel", "linear", r)
        norm(f"{k}.norm2", f"{p}.norm2", r)
        add(f"{k}.self_attn.in_proj_weight", f"{p}.self_attn.qkv.kernel", "linear", r)
        add(f"{k}.self_attn.out_proj.weight", f"{p}.self_attn.proj.kernel", "linear", r)
        norm(f"{k}.norm3", f"{p}.norm3", r)
        linear(f"{k}.mlp.0", f"{p}.mlp.fc1", True, r)
        linear(f"{k}.mlp.3", f"{p}.mlp.fc2", True, r)
    norm("encoder.transformer.norm", "encoder.transformer.norm")
    for plane in ("xy", "yt", "xt"):
        linear(f"encoder.projectors_{plane}", f"encoder.projectors_{plane}")
    add("decoder.transformer.pos_embed", "decoder.transformer.pos_embed")
    linear("decoder.transformer.patch_embed", "decoder.transformer.patch_embed")
    vit_blocks("decoder.transformer", "decoder.transformer", n_dec, qkv_bias=True)
    norm("decoder.transformer.norm", "decoder.transformer.norm")
    linear("decoder.projector", "decoder.projector")
    return out


def _lookup(tree: Mapping, path: tuple[str, ...]):
    node = tree
    for name in path:
        node = node[int(name)] if name.isdigit() and name not in node else node[name]
    return node


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (str(k),)))
        else:
            flat[prefix + (str(k),)] = v
    return flat


def apply_entries(params: Mapping, entries) -> dict[str, Any]:
    """{official key: array} for each Entry, read from our tree and laid out as the official."""
    out = {}
    for e in entries:
        x = _lookup(params, e.path)
        if e.layer is not None:
            x = x[e.layer]
        out[e.key] = _to_official(x, e.kind)
    return out


def tree_from_entries(arrays: Mapping[str, Any], entries) -> dict:
    """The inverse of `apply_entries`: {official key: array} -> our tree (float32 NumPy), per-layer
    entries stacked along the leading axis in layer order."""
    stacked: dict[tuple[str, ...], list] = {}
    tree: dict = {}
    for e in entries:
        x = _from_official(np.asarray(arrays[e.key]).astype(np.float32, copy=False), e.kind)
        if e.layer is None:
            _insert(tree, e.path, np.ascontiguousarray(x))
        else:
            stacked.setdefault(e.path, []).append((e.layer, x))
    for path, rows in stacked.items():
        rows.sort(key=lambda r: r[0])
        _insert(tree, path, np.stack([r[1] for r in rows]))
    return tree


def to_official(params: Mapping) -> dict[str, Any]:
    """Our parameter tree (pure dict) -> {official key: array} in the official order.

    Arrays keep their type: NumPy in, NumPy out (jax arrays work too).
    """
    scanned = not is_per_layer(params["decoder"]["transformer"]["layers"]["blocks"])
    return apply_entries(params, official_entries(layer_counts_of(params), scanned))


def official_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """{official key: shape} for `config`, derived from the JAX model's abstract parameters."""
    import jax
    from flax import nnx

    from coordtok_jax.models.coordtok import CoordTok

    abstract = sharding_lib.eval_shape(lambda: CoordTok(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    shapes = jax.tree.map(lambda x: np.empty(x.shape, np.bool_), params)  # cheap stand-ins
    return {k: tuple(v.shape) for k, v in to_official(shapes).items()}


def strip_wrappers(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official checkpoint dict -> (model tensors keyed like `CoordTok.state_dict()`, skipped keys).

    Accepts the file's top level (`{'model': ...}`, with or without other entries such as
    'epoch' and 'optimizer') or the state_dict itself; strips the DDP `module.` prefix; skips
    the frozen LPIPS network that stage-2 files carry under `decoder.lpips_loss.`.
    """
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    out, skipped = {}, []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise ConversionError(f"state_dict key {key!r} is not a string")
        name = key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key
        if name.startswith(LPIPS_PREFIX):
            skipped.append(key)
            continue
        if name in out:
            raise ConversionError(f"state_dict holds {name!r} twice (with and without the {DDP_PREFIX!r} prefix)")
        out[name] = value
    return out, skipped


def check_official(arrays: Mapping[str, Any], config: Any, source: str = "state_dict") -> None:
    """Raises ConversionError listing every missing, unexpected and wrongly shaped key."""
    want = official_shapes(config)
    missing = [k for k in want if k not in arrays]
    unexpected = [k for k in arrays if k not in want]
    wrong = [
        f"{k}: {tuple(arrays[k].shape)}, expected {want[k]}"
        for k in want
        if k in arrays and tuple(arrays[k].shape) != want[k]
    ]
    bad_dtype = [
        f"{k}: {arrays[k].dtype}" for k in want if k in arrays and not is_float(arrays[k])
    ]
    if missing or unexpected or wrong or bad_dtype:
        g = validate(config)
        n_vit, n_enc, n_dec = layer_counts(config)
        raise mismatch_error(
            f"{source} does not match the configuration (video_shape={g.video_shape}, depths "
            f"ViT3D/encoder/decoder={n_vit}/{n_enc}/{n_dec}, {len(want)} tensors expected, {len(arrays)} given):",
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
             ("not floating point", bad_dtype)),
            f"hint: {source} looks like {describe_official(arrays)}; pass the matching config")


def describe_official(arrays: Mapping[str, Any]) -> str:
    """What a CoordTok state_dict's shapes say about its configuration (for error messages)."""
    def depth(prefix):
        idx = {int(k[len(prefix):].split(".")[0]) for k in arrays
               if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        return max(idx) + 1 if idx else 0

    def shape(key):
        return tuple(arrays[key].shape) if key in arrays else "?"

    return (f"{len(arrays)} tensors, depths ViT3D/encoder/decoder="
            f"{depth('encoder.encoder.layers.')}/{depth('encoder.transformer.layers.')}/"
            f"{depth('decoder.transformer.layers.')}, encoder cls_token {shape('encoder.encoder.cls_token')}, "
            f"decoder pos_embed {shape('decoder.transformer.pos_embed')}, "
            f"weight_tokens_xy {shape('weight_tokens_xy')}, weight_tokens_yt {shape('weight_tokens_yt')}")


def mismatch_error(header: str, sections, hint: str) -> ConversionError:
    """One ConversionError listing every problem: the header, the hint (first and last, so it is
    seen however the message is cut), and each non-empty (title, items) section."""
    lines = [header, hint]
    for title, items in sections:
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {item}" for item in items)
    lines.append(hint)
    return ConversionError("\n".join(lines))


def is_float(x) -> bool:
    dtype = np.dtype(x.dtype)
    return np.issubdtype(dtype, np.floating) or dtype == np.dtype(ml_dtypes.bfloat16)


def from_official(arrays: Mapping[str, np.ndarray], config: Any, source: str = "state_dict") -> dict:
    """{official key: NumPy array} -> our parameter tree (nested dict of float32 NumPy arrays).

    Strict: any missing, unexpected or wrongly shaped key raises ConversionError listing them
    all. Half-precision tensors are widened to float32 (exact).
    """
    check_official(arrays, config, source)
    return tree_from_entries(arrays, official_entries(layer_counts(config), scan_layers(config)))


def _insert(tree: dict, path: Iterable[str], value) -> None:
    path = tuple(int(n) if str(n).isdigit() else n for n in path)  # per-layer subtrees: keys 0, 1, ...
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value
