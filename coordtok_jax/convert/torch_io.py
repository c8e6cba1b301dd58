"""CoordTok <-> PyTorch: state_dicts with the official keys, and official checkpoint files.

    sd = to_torch_state_dict(model)                  # {official key: torch.Tensor}
    model = from_torch_state_dict(sd, config.model)   # strict; accepts the official wrappers
    arrays = read_checkpoint("CoordTok_UCF101_1M_50K.pth")

torch is imported only by the functions that build or read torch tensors (the `[torch]` extra);
`read_checkpoint` falls back to the torch-free restricted reader when torch is not installed.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import jax
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from coordtok_jax import sharding as sharding_lib
from coordtok_jax.convert.coordtok import ConversionError, from_official, strip_wrappers, to_official
from coordtok_jax.models.coordtok import CoordTok

PathLike = Union[str, os.PathLike, epath.Path]


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "PyTorch is needed for torch tensors: pip install 'coordtok-jax[torch]' "
            "(on a CPU machine: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
        ) from e
    return torch


def model_params(model: nnx.Module) -> dict:
    """The model's parameters as a nested dict of NumPy arrays (gathered to this host)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


def to_official_numpy(model_or_params) -> dict[str, np.ndarray]:
    """A CoordTok (or its parameter tree) -> {official key: C-contiguous NumPy array}, in order."""
    params = model_params(model_or_params) if isinstance(model_or_params, nnx.Module) else model_or_params
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), dict(params))
    return {k: np.array(v, order="C", copy=True) for k, v in to_official(params).items()}


def to_torch_state_dict(model: CoordTok) -> dict[str, Any]:
    """The official `CoordTok.state_dict()`: exactly its keys, order, shapes and layouts
    (a CoordTok or its parameter tree; float32 CPU tensors)."""
    torch = import_torch()
    return {k: torch.from_numpy(v) for k, v in to_official_numpy(model).items()}


def tensor_to_numpy(value, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()
    if isinstance(value, jax.Array):
        return np.asarray(value)
    raise ConversionError(f"state_dict[{key!r}] is a {type(value).__name__}, expected a tensor")


def official_numpy(state_dict: Mapping[str, Any], source: str = "state_dict") -> tuple[dict[str, np.ndarray], list[str]]:
    """Unwraps (`['model']`, `module.`, LPIPS keys skipped) and converts tensors to NumPy."""
    stripped, skipped = strip_wrappers(state_dict)
    return {k: tensor_to_numpy(v, k) for k, v in stripped.items()}, skipped


def params_from_torch_state_dict(state_dict: Mapping[str, Any], config: Any, source: str = "state_dict") -> dict:
    """Official state_dict (or checkpoint dict) -> our parameter tree of float32 NumPy arrays."""
    arrays, _ = official_numpy(state_dict, source)
    return from_official(arrays, config, source)


def model_from_params(params: Mapping, config: Any) -> CoordTok:
    """A CoordTok holding `params` (nested dict), without initialising random weights first."""
    abstract = sharding_lib.eval_shape(lambda: CoordTok(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state.replace_by_pure_dict(jax.tree.map(jax.numpy.asarray, dict(params)))
    return nnx.merge(graphdef, state)


def from_torch_state_dict(state_dict: Mapping[str, Any], config: Any) -> CoordTok:
    """A CoordTok with the weights of an official state_dict (strict, see `from_official`).

    `state_dict` may be `CoordTok.state_dict()`, `model.module.state_dict()` of a DDP model
    (`module.` prefix) or a whole official checkpoint file's dict (`ckpt['model']` is used;
    stage-2 files' frozen LPIPS keys are skipped).
    """
    return model_from_params(params_from_torch_state_dict(state_dict, config), config)


def read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Loads a .pth file as `torch.load(path, map_location='cpu', weights_only=True)` does.

    Without torch installed, the torch-free restricted reader (io/pth.py) is used; both
    refuse pickled code. Errors name the file.
    """
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        from coordtok_jax.io.pth import load_pth

        return load_pth(path)
    try:
        with path.open("rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError for bad files
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e


def save_checkpoint(state_dict: Mapping[str, Any], path: PathLike, *, module_prefix: bool = True, **extra) -> None:
    """Writes `{'model': state_dict, **extra}` with torch.save, as the official trainer does.

    `module_prefix` adds DDP's `module.` to every key like the released files, so the official
    stage-2 trainer (which loads into its DDP model with strict=False) finds them; the official
    SiT trainer / sampler / README strip it.
    """
    torch = import_torch()
    model = {(f"module.{k}" if module_prefix else k): v for k, v in state_dict.items()}
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    with tmp.open("wb") as f:
        torch.save({"model": model, **extra}, f)
    tmp.rename(path)
