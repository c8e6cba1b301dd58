r"""Convert CoordTok checkpoints between this trainer (Orbax) and the official PyTorch format.

    # A workdir's latest (or --step) checkpoint -> {'model': state_dict} for the official code
    python -m coordtok_jax.convert torch-export --workdir=DIR [--step=N] --output=FILE.pth

    # An official .pth (e.g. CoordTok_UCF101_1M_50K.pth) -> DIR/checkpoints/0 to start from
    python -m coordtok_jax.convert torch-import --checkpoint=FILE.pth \
        --config=configs/coordtok.py:L --workdir=DIR
    python -m coordtok_jax.train --config=configs/coordtok.py:L,stage=2 \
        --config.init_from=DIR --workdir=NEW_DIR ...

Export writes the official key names, order, shapes and layouts, with DDP's `module.` prefix
like the released file (--nomodule_prefix to leave it out). Import reads with
torch.load(weights_only=True) (or the torch-free restricted reader without torch), accepts
`ckpt['model']` or a bare state_dict, with or without `module.`, skips the frozen LPIPS keys of
stage-2 files, and fails listing every missing, unexpected or wrongly shaped key.
"""

from __future__ import annotations

import json
import time

import numpy as np

import jax
import jax.numpy as jnp
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from coordtok_jax import cli
from coordtok_jax.convert.coordtok import from_official
from coordtok_jax.convert.torch_io import (
    official_numpy,
    read_checkpoint,
    save_checkpoint,
    to_torch_state_dict,
)
from coordtok_jax.models import validate
from coordtok_jax.io.runs import abstract_params
from coordtok_jax.io.checkpoint import (config_to_json, read_config, require_kind, resolve_step, restore_params,
                                           save_params)
from coordtok_jax.train.workdir import write_text_atomic

FLAGS = flags.FLAGS
COMMANDS = ("torch-export", "torch-import", "sit-export", "sit-import")


def define_flags():
    """Defined only when run as a program, so importing this module defines no flags."""
    flags.DEFINE_string("workdir", None, "torch-export: the run to export; torch-import: where to write the checkpoint.")
    flags.DEFINE_integer("step", None, "torch-export: the step to export (default: the latest).")
    flags.DEFINE_string("output", None, "torch-export: the .pth file to write.")
    flags.DEFINE_string("checkpoint", None, "torch-import: the official .pth file to read.")
    config_flags.DEFINE_config_file("config", None, "torch-import: configs/coordtok.py:ARG matching the checkpoint.",
                                    lock_config=True)
    flags.DEFINE_bool("module_prefix", True, "torch-export: prefix keys with DDP's 'module.' as the released file does.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --output file / checkpoints in --workdir.")
    flags.DEFINE_bool("drop_nested", False, "torch-export of a nested-token run: leave out its fill parameters "
                      "(the official format has none), instead of refusing.")
    flags.DEFINE_string("latent_stats", None, "sit-import: JSON with the latent 'mean' and 'std' (3 planes x C), "
                        "as train_sit writes (WORKDIR/latent_stats.json).")


def _export_source(workdir: str, output: str, step, overwrite: bool, kind: str, command: str):
    """(checkpoint directory, step, config) of the run an export reads, after refusing to overwrite
    `output` and a workdir of the wrong kind."""
    if epath.Path(output).exists() and not overwrite:
        raise FileExistsError(f"--output={output} exists; pass --overwrite to replace it")
    directory, step = resolve_step(workdir, step)
    config = read_config(workdir, step)
    require_kind(config, kind, workdir, command)
    return directory, step, config


# Parameters of options the official model does not have (nested triplane tokens, issue 17).
NESTED_PARAMS = ("nested_fill_yt", "nested_fill_xt")


def torch_export(workdir: str, output: str, step=None, *, module_prefix: bool = True, overwrite: bool = False,
                 drop_nested: bool = False) -> dict:
    """Writes the checkpoint of `workdir` (latest or `step`) as an official .pth; returns a summary.

    A run with nested triplane tokens has parameters the official format has no key for: refused
    unless `drop_nested` (the exported model then decodes the full planes only)."""
    out = epath.Path(output)
    if config_nested(workdir, step) and not drop_nested:
        raise ValueError(f"{workdir} was trained with nested triplane tokens (config.model.nested_tokens): the "
                         f"official format has no place for {', '.join(NESTED_PARAMS)}; pass --drop_nested to "
                         "export without them (the official model then decodes at the full token budget only)")
    directory, step, config = _export_source(workdir, output, step, overwrite, "tokenizer", "torch-export")
    validate(config.model)
    params, step = restore_params(str(directory.parent), abstract_params(config.model), step)
    dropped = [k for k in NESTED_PARAMS if k in params]
    params = {k: v for k, v in params.items() if k not in NESTED_PARAMS}
    state_dict = to_torch_state_dict(params)
    save_checkpoint(state_dict, out, module_prefix=module_prefix, step=step,
                    config=config_to_json(config.model))
    n = sum(int(v.numel()) for v in state_dict.values())
    return dict(step=step, tensors=len(state_dict), parameters=n, output=str(out), dropped=dropped)


def config_nested(workdir: str, step=None) -> bool:
    """Whether the run's checkpoint config has nested triplane tokens (False when unreadable:
    the export then reports what is wrong)."""
    try:
        _, step = resolve_step(workdir, step)
        return bool(read_config(workdir, step).model.get("nested_tokens", False))
    except Exception:  # noqa: BLE001 - the export's own checks name the problem
        return False


def torch_import(checkpoint: str, config, workdir: str, *, overwrite: bool = False) -> dict:
    """Writes WORKDIR/checkpoints/0 (parameters and config) from an official .pth; returns a summary."""
    validate(config.model)
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --overwrite or choose another --workdir")
    raw = read_checkpoint(checkpoint)
    arrays, skipped = official_numpy(raw, source=str(checkpoint))
    params = from_official(arrays, config.model, source=str(checkpoint))
    started = [k for k in NESTED_PARAMS if config.model.get("nested_tokens", False)]
    for k in started:  # a nested-token run from released weights: the fills start at zero
        params[k] = np.zeros((config.model.latent_n_features,), np.float32)
    if ckpt_dir.exists() and overwrite:
        ckpt_dir.rmtree()
    path = save_params(workdir, jax.tree.map(jax.numpy.asarray, params), config, step=0)
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
    n = sum(int(v.size) for v in jax.tree.leaves(params))
    return dict(tensors=len(arrays), parameters=n, skipped=len(skipped), checkpoint=str(path), started=started)


def sit_export(workdir: str, output: str, step=None, *, overwrite: bool = False) -> dict:
    """A train_sit checkpoint -> {'model', 'ema', 'args'} with the official SiT keys (no 'opt': the
    official sampler reads 'ema' only), and beside it OUTPUT.latent_stats.json, the latent mean/std
    (3 planes x C) that sampling needs and no official checkpoint holds (what sit-import reads back)."""
    from coordtok_jax.convert.sit import sit_to_official
    from coordtok_jax.convert.torch_io import import_torch
    from coordtok_jax.io.checkpoint import restore_partial
    from coordtok_jax.models.sit import split_sit

    torch = import_torch()
    out = epath.Path(output)
    _, step, config = _export_source(workdir, output, step, overwrite, "sit", "sit-export")
    _, abstract, _ = split_sit(config)
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
    vec = jax.ShapeDtypeStruct((3, config.model.in_channels), jnp.float32, sharding=dev)
    restored, step = restore_partial(workdir, {"params": sds, "ema": sds, "latent_mean": vec, "latent_std": vec}, step)
    to_torch = lambda tree: {k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in
                             sit_to_official(jax.tree.map(np.asarray, tree), config.model).items()}
    ckpt = {"model": to_torch(restored["params"]), "ema": to_torch(restored["ema"]),
            "args": {"step": step, **config_to_json(config.model)}}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    with tmp.open("wb") as f:
        torch.save(ckpt, f)
    tmp.rename(out)
    stats = out.parent / f"{out.name}.latent_stats.json"
    write_text_atomic(stats, json.dumps({"mean": np.asarray(restored["latent_mean"]).tolist(),
                                         "std": np.asarray(restored["latent_std"]).tolist(), "step": step}, indent=2))
    return dict(step=step, tensors=len(ckpt["ema"]), output=str(out), latent_stats=str(stats))


def sit_import(checkpoint: str, config, workdir: str, latent_stats: str, *, overwrite: bool = False) -> dict:
    """An official SiT .pth ('model' and 'ema') + latent stats -> WORKDIR/checkpoints/0 that
    `python -m coordtok_jax.sample` reads (params, ema, latent_mean, latent_std)."""
    from coordtok_jax.convert.sit import read_sit_checkpoint, sit_from_official, unwrap_sit_checkpoint
    from coordtok_jax.convert.torch_io import tensor_to_numpy
    from coordtok_jax.diffusion.latent_stats import load_stats
    from coordtok_jax.models.sit import validate_sit

    validate_sit(config.model)
    if not latent_stats:
        raise ValueError("sit-import needs --latent_stats (the official code keeps them in log.txt only): a JSON "
                         "{'mean': [[...C] x3], 'std': [[...C] x3]} for planes xy, yt, xt, e.g. train_sit's "
                         "latent_stats.json for the same tokenizer")
    mean, std = load_stats(latent_stats)
    c = config.model.in_channels
    if mean.shape != (3, c) or std.shape != (3, c):
        raise ValueError(f"{latent_stats}: mean/std must be (3, {c}), got {mean.shape}, {std.shape}")
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --overwrite or choose another --workdir")
    raw = read_sit_checkpoint(checkpoint)
    trees = {}
    for part in ("model", "ema"):
        sd = unwrap_sit_checkpoint(raw, part)
        arrays = {k: tensor_to_numpy(v, k) for k, v in sd.items()}
        tree = sit_from_official(arrays, config.model, source=f"{checkpoint}[{part!r}]")
        tree.pop("pos_embed_xy", None)  # a fixed buffer, recomputed by the model
        trees[part] = jax.tree.map(jax.numpy.asarray, tree)
    if ckpt_dir.exists() and overwrite:
        ckpt_dir.rmtree()
    state = {"params": trees["model"], "ema": trees["ema"], "latent_mean": jax.numpy.asarray(mean, np.float32),
             "latent_std": jax.numpy.asarray(std, np.float32)}
    path = save_params(workdir, state, config, step=0, state_is_dict=True)
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
    return dict(tensors=len(unwrap_sit_checkpoint(raw, "ema")), checkpoint=str(path))


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)} (see --help); got {argv[1:]}")
    command = argv[1]
    t0 = time.perf_counter()
    if command == "torch-export":
        if not FLAGS.workdir or not FLAGS.output:
            raise app.UsageError("torch-export needs --workdir and --output")
        s = torch_export(FLAGS.workdir, FLAGS.output, FLAGS.step,
                         module_prefix=FLAGS.module_prefix, overwrite=FLAGS.overwrite, drop_nested=FLAGS.drop_nested)
        print(f"wrote {s['output']}: step {s['step']}, {s['tensors']} tensors, {s['parameters']:,} parameters "
              f"({time.perf_counter() - t0:.1f} s)")
        if s["dropped"]:
            print(f"dropped {', '.join(s['dropped'])} (nested tokens): the exported model decodes full planes only")
    elif command == "sit-export":
        if not FLAGS.workdir or not FLAGS.output:
            raise app.UsageError("sit-export needs --workdir and --output")
        s = sit_export(FLAGS.workdir, FLAGS.output, FLAGS.step, overwrite=FLAGS.overwrite)
        print(f"wrote {s['output']}: step {s['step']}, model + ema with {s['tensors']} tensors each, and the "
              f"latent mean/std in {s['latent_stats']} ({time.perf_counter() - t0:.1f} s)")
    elif command == "sit-import":
        if not FLAGS.checkpoint or FLAGS.config is None or not FLAGS.workdir:
            raise app.UsageError("sit-import needs --checkpoint, --config (configs/sit.py:ARG) and --workdir")
        s = sit_import(FLAGS.checkpoint, FLAGS.config, FLAGS.workdir, FLAGS.latent_stats, overwrite=FLAGS.overwrite)
        print(f"wrote {s['checkpoint']}: {s['tensors']} tensors (model and ema) + latent stats "
              f"({time.perf_counter() - t0:.1f} s)")
    else:
        if not FLAGS.checkpoint or FLAGS.config is None or not FLAGS.workdir:
            raise app.UsageError("torch-import needs --checkpoint, --config and --workdir")
        s = torch_import(FLAGS.checkpoint, FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
        skipped = f", skipped {s['skipped']} LPIPS tensors" if s["skipped"] else ""
        skipped += f", {' and '.join(s['started'])} start at zero (nested tokens)" if s["started"] else ""
        print(f"wrote {s['checkpoint']}: {s['tensors']} tensors, {s['parameters']:,} parameters{skipped} "
              f"({time.perf_counter() - t0:.1f} s)\n"
              f"start a run from it with --config.init_from={FLAGS.workdir} and a new --workdir")


def run():
    cli.run(__name__, define_flags, main, errors=(ImportError, ValueError), positional=True)
