"""Triplane SiT state <-> the official PyTorch state_dict (keys, order, shapes, layouts).

`sit_official_entries(depth)` is the one table relating the official `SiT.state_dict()`
(reference: sit_L2_state_dict.json) and our state tree (`nnx.to_pure_dict(nnx.state(model))`:
the Params plus the `pos_embed_xy` Buffer), in the official key order. Layout rules are those of
convert/coordtok.py (Linear weight = kernel transposed; timm `attn.qkv` (3D, D) = our (D, 3D)
[Wq | Wk | Wv] transposed; Conv2d (out, in, kh, kw) = Flax (kh, kw, in, out); blocks: row i of
`blocks.blocks.X` (scan_layers=True) or `blocks.blocks.{i}.X` (False) = `blocks.{i}.X`), so
conversions are bit-exact. Module names:
official `t_embedder.mlp.0/2` = our `t_embedder.fc1/fc2`, `adaLN_modulation.1` (after the
SiLU of an nn.Sequential) = our `adaLN_modulation`; everything else keeps its name.

`pos_embed_xy` is the fixed 2D sin-cos table, saved by the official (requires_grad=False
Parameter, also in the EMA). Import keeps the file's values after checking they equal the
recomputed table within 1e-6 (an EMA of a constant may move it by a few float32 ulps).

Official SiT files are `{'model', 'ema', 'opt', 'args'}` without the DDP prefix; sampling uses
'ema' (`find_model`: ckpt['ema'] if present, else the whole file) — see `unwrap_sit_checkpoint`.
Everything but the `*_torch_*` helpers and `read_sit_checkpoint` works on NumPy and imports no torch.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_dtypes
import numpy as np

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.convert.coordtok import (
    ConversionError,
    Entry,
    is_float,
    is_per_layer,
    apply_entries,
    mismatch_error,
    stack_depth,
    stack_entry,
    tree_from_entries,
)
from coordtok_jax.models.config import scan_layers
from coordtok_jax.models.sit import sincos_2d, validate_sit

POS_EMBED_TOLERANCE = 1e-6
CHECKPOINT_PARTS = ("ema", "model")


def sit_official_entries(depth: int, scanned: bool = True) -> list[Entry]:
    """Every tensor of the official triplane SiT state_dict, in its order, for our layer-stack
    layout (`scanned`: config.model.scan_layers)."""
    out: list[Entry] = []

    def add(key, path, kind="same", layer=None):
        out.append(Entry(key, tuple(path.split(".")), layer, kind))

    def linear(key, path, layer=None):
        add(f"{key}.weight", f"{path}.kernel", "linear", layer)
        add(f"{key}.bias", f"{path}.bias", "same", layer)

    for name in ("pos_embed_xy", "pos_embed_t", "type_embed"):
        add(name, name)
    for plane in ("xy", "yt", "xt"):
        add(f"x_embedder_{plane}.proj.weight", f"x_embedder_{plane}.proj.kernel", "conv")
        add(f"x_embedder_{plane}.proj.bias", f"x_embedder_{plane}.proj.bias")
    linear("t_embedder.mlp.0", "t_embedder.fc1")
    linear("t_embedder.mlp.2", "t_embedder.fc2")
    add("y_embedder.embedding_table.weight", "y_embedder.embedding_table")
    for i in range(depth):
        k, (p, r) = f"blocks.{i}", stack_entry("blocks.blocks", i, scanned)
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            linear(f"{k}.{name}", f"{p}.{name}", r)
        linear(f"{k}.adaLN_modulation.1", f"{p}.adaLN_modulation", r)
    for plane in ("xy", "yt", "xt"):
        linear(f"final_layer_{plane}.linear", f"final_layer_{plane}.linear")
        linear(f"final_layer_{plane}.adaLN_modulation.1", f"final_layer_{plane}.adaLN_modulation")
    return out


def _depth_of(params: Mapping) -> int:
    return stack_depth(params["blocks"]["blocks"], ("adaLN_modulation", "bias"))


def _pos_embed_table(model_config: Any) -> np.ndarray:
    g = validate_sit(model_config)
    return sincos_2d(g.hidden_size, g.grids[0][0])[None]


def sit_to_official(params: Mapping, model_config: Any = None) -> dict[str, Any]:
    """Our state tree -> {official key: array} in the official order (NumPy in, NumPy out).

    `params` is `nnx.to_pure_dict(nnx.state(model))` (Params + the pos_embed_xy Buffer). A
    Param-only tree (a trainer's params or EMA) needs `model_config` to recompute pos_embed_xy.
    """
    if "pos_embed_xy" not in params:
        if model_config is None:
            raise ConversionError("the tree has no 'pos_embed_xy' (a Param-only tree?): pass the whole "
                                  "nnx.state(model), or model_config to recompute the fixed table")
        params = {**params, "pos_embed_xy": _pos_embed_table(model_config)}
    scanned = not is_per_layer(params["blocks"]["blocks"])
    return apply_entries(params, sit_official_entries(_depth_of(params), scanned))


def sit_official_shapes(model_config: Any) -> dict[str, tuple[int, ...]]:
    """{official key: shape} for `model_config`, from the JAX model's abstract state."""
    import jax
    from flax import nnx

    from coordtok_jax.models.sit import TriplaneSiT

    abstract = sharding_lib.eval_shape(lambda: TriplaneSiT(model_config, rngs=nnx.Rngs(0)))
    tree = nnx.to_pure_dict(nnx.state(abstract))
    stand_ins = jax.tree.map(lambda x: np.empty(x.shape, np.bool_), tree)  # cheap, no memory
    return {k: tuple(v.shape) for k, v in sit_to_official(stand_ins).items()}


def describe_sit(arrays: Mapping[str, Any]) -> str:
    """What a SiT state_dict's shapes say about its configuration (for error messages)."""
    idx = {int(k.split(".")[1]) for k in arrays if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    shape = lambda key: tuple(arrays[key].shape) if key in arrays else "?"
    return (f"{len(arrays)} tensors, depth {max(idx) + 1 if idx else 0}, x_embedder_xy.proj.weight "
            f"{shape('x_embedder_xy.proj.weight')}, pos_embed_xy {shape('pos_embed_xy')}, pos_embed_t "
            f"{shape('pos_embed_t')}, label table {shape('y_embedder.embedding_table.weight')}, "
            f"final_layer_xy.linear.weight {shape('final_layer_xy.linear.weight')}")


def check_sit_official(arrays: Mapping[str, Any], model_config: Any, source: str = "state_dict") -> None:
    """Raises ConversionError listing every missing, unexpected, wrongly shaped or non-float key
    and a pos_embed_xy that is not the fixed sin-cos table."""
    want = sit_official_shapes(model_config)
    missing = [k for k in want if k not in arrays]
    unexpected = [k for k in arrays if k not in want]
    ok = [k for k in want if k in arrays]
    wrong = [f"{k}: {tuple(arrays[k].shape)}, expected {want[k]}" for k in ok if tuple(arrays[k].shape) != want[k]]
    bad_dtype = [f"{k}: {arrays[k].dtype}" for k in ok if not is_float(arrays[k])]
    table = []
    key = "pos_embed_xy"
    if key in arrays and tuple(arrays[key].shape) == want[key] and is_float(arrays[key]):
        x = np.asarray(arrays[key])
        # half-precision files round the table: allow their rounding error (|values| <= 1)
        tol = max(POS_EMBED_TOLERANCE, float(ml_dtypes.finfo(x.dtype).eps)) if x.dtype.itemsize < 4 else POS_EMBED_TOLERANCE
        diff = float(np.max(np.abs(x.astype(np.float64) - _pos_embed_table(model_config))))
        if not diff <= tol:
            table = [f"{key}: max |difference| from the fixed 2D sin-cos table {diff:.3g} > {tol:g} "
                     "(another grid, width or layout?)"]
    if missing or unexpected or wrong or bad_dtype or table:
        g = validate_sit(model_config)
        raise mismatch_error(
            f"{source} does not match the SiT configuration (depth={g.depth}, hidden_size={g.hidden_size}, "
            f"planes {g.plane_shapes}, patch {g.patch}, label rows {g.table_rows}, out_channels "
            f"{g.out_channels}; {len(want)} tensors expected, {len(arrays)} given):",
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong),
             ("not floating point", bad_dtype), ("wrong fixed table", table)),
            f"hint: {source} looks like {describe_sit(arrays)}; pass the matching config")


def sit_from_official(arrays: Mapping[str, Any], model_config: Any, source: str = "state_dict") -> dict:
    """{official key: NumPy array} -> our state tree (nested dict of float32 NumPy arrays, with
    pos_embed_xy). Strict: every problem is listed in one ConversionError. Half precision is
    widened to float32 (exact)."""
    check_sit_official(arrays, model_config, source)
    return tree_from_entries(arrays, sit_official_entries(validate_sit(model_config).depth, scan_layers(model_config)))


def unwrap_sit_checkpoint(obj: Mapping[str, Any], which: str = "ema") -> dict[str, Any]:
    """An official SiT checkpoint `{'model', 'ema', 'opt', 'args'}` -> the state_dict to load.

    which='ema' is the official `find_model` (ckpt['ema'] if present, else the whole dict, as
    sample_sit does); which='model' takes the raw weights (ckpt['model'], else the whole dict).
    """
    if which not in CHECKPOINT_PARTS:
        raise ValueError(f"which must be one of {CHECKPOINT_PARTS}, got {which!r}")
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a checkpoint dict or a state_dict, got {type(obj).__name__}")
    if which in obj:
        if not isinstance(obj[which], Mapping):
            raise ConversionError(f"checkpoint[{which!r}] is a {type(obj[which]).__name__}, expected a state_dict")
        return dict(obj[which])
    return dict(obj)


# ---- torch (lazy import) ---------------------------------------------------------------------

def read_sit_checkpoint(path) -> dict[str, Any]:
    """torch.load(path, weights_only=True) that also admits the argparse.Namespace the official
    trainer stores under 'args' (nothing else executable)."""
    import argparse

    from coordtok_jax.convert.torch_io import import_torch

    torch = import_torch()
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ConversionError(f"cannot read {path} as a PyTorch SiT checkpoint: {type(e).__name__}: {e}") from e


def sit_to_torch_state_dict(model) -> dict[str, Any]:
    """A TriplaneSiT -> the official `SiT.state_dict()` (keys, order, shapes; float32 CPU tensors)."""
    import jax
    from flax import nnx

    from coordtok_jax.convert.torch_io import import_torch

    torch = import_torch()
    tree = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.to_pure_dict(nnx.state(model)))
    return {k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in sit_to_official(tree).items()}


def sit_from_torch_state_dict(state_dict: Mapping[str, Any], model_config: Any, which: str = "ema",
                              source: str = "state_dict"):
    """A TriplaneSiT with the weights of an official state_dict or checkpoint dict (strict)."""
    from coordtok_jax.convert.torch_io import tensor_to_numpy
    from coordtok_jax.models.sit import sit_model_from_params

    sd = unwrap_sit_checkpoint(state_dict, which)
    arrays = {k: tensor_to_numpy(v, k) for k, v in sd.items()}
    return sit_model_from_params(sit_from_official(arrays, model_config, source), model_config)
