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
import sys
import time

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from coordtok_jax.convert.coordtok import ConversionError, from_official
from coordtok_jax.convert.torch_io import (
    official_numpy,
    read_checkpoint,
    save_checkpoint,
    to_torch_state_dict,
)
from coordtok_jax.models import ConfigError, validate
from coordtok_jax.evaluate.loading import abstract_params
from coordtok_jax.train.checkpoint import config_to_json, read_config, resolve_step, restore_params, save_params

FLAGS = flags.FLAGS
COMMANDS = ("torch-export", "torch-import")


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


def torch_export(workdir: str, output: str, step=None, *, module_prefix: bool = True, overwrite: bool = False) -> dict:
    """Writes the checkpoint of `workdir` (latest or `step`) as an official .pth; returns a summary."""
    out = epath.Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--output={output} exists; pass --overwrite to replace it")
    directory, step = resolve_step(workdir, step)
    config = read_config(workdir, step)
    validate(config.model)
    params, step = restore_params(str(directory.parent), abstract_params(config.model), step)
    state_dict = to_torch_state_dict(params)
    save_checkpoint(state_dict, out, module_prefix=module_prefix, step=step,
                    config=config_to_json(config.model))
    n = sum(int(v.numel()) for v in state_dict.values())
    return dict(step=step, tensors=len(state_dict), parameters=n, output=str(out))


def torch_import(checkpoint: str, config, workdir: str, *, overwrite: bool = False) -> dict:
    """Writes WORKDIR/checkpoints/0 (parameters and config) from an official .pth; returns a summary."""
    validate(config.model)
    ckpt_dir = epath.Path(workdir) / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints; pass --overwrite or choose another --workdir")
    raw = read_checkpoint(checkpoint)
    arrays, skipped = official_numpy(raw, source=str(checkpoint))
    params = from_official(arrays, config.model, source=str(checkpoint))
    if ckpt_dir.exists() and overwrite:
        ckpt_dir.rmtree()
    path = save_params(workdir, jax.tree.map(jax.numpy.asarray, params), config, step=0)
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config_to_json(config), indent=2))
    n = sum(int(v.size) for v in jax.tree.leaves(params))
    return dict(tensors=len(arrays), parameters=n, skipped=len(skipped), checkpoint=str(path))


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)} (see --help); got {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # Orbax warns about read-only managers
    command = argv[1]
    t0 = time.perf_counter()
    try:
        if command == "torch-export":
            if not FLAGS.workdir or not FLAGS.output:
                raise app.UsageError("torch-export needs --workdir and --output")
            s = torch_export(FLAGS.workdir, FLAGS.output, FLAGS.step,
                             module_prefix=FLAGS.module_prefix, overwrite=FLAGS.overwrite)
            print(f"wrote {s['output']}: step {s['step']}, {s['tensors']} tensors, {s['parameters']:,} parameters "
                  f"({time.perf_counter() - t0:.1f} s)")
        else:
            if not FLAGS.checkpoint or FLAGS.config is None or not FLAGS.workdir:
                raise app.UsageError("torch-import needs --checkpoint, --config and --workdir")
            s = torch_import(FLAGS.checkpoint, FLAGS.config, FLAGS.workdir, overwrite=FLAGS.overwrite)
            skipped = f", skipped {s['skipped']} LPIPS tensors" if s["skipped"] else ""
            print(f"wrote {s['checkpoint']}: {s['tensors']} tensors, {s['parameters']:,} parameters{skipped} "
                  f"({time.perf_counter() - t0:.1f} s)\n"
                  f"start a run from it with --config.init_from={FLAGS.workdir} and a new --workdir")
    except (ConversionError, ConfigError, FileNotFoundError, FileExistsError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run():
    define_flags()
    app.run(main)
