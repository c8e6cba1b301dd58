r"""Encode clips once with a frozen tokenizer into a latent cache for SiT training.

    python -m coordtok_jax.encode_latents --config=configs/sit.py:L/2 \
        --config.tokenizer=TOKENIZER_WORKDIR --output=gs://BUCKET/ucf101_latents [--passes=4] \
        [--num_clips=N] [--num_shards=S] [--batch=B] [--overwrite]

then train with `python -m coordtok_jax.train_sit ... --config.latents=gs://BUCKET/ucf101_latents`.

What is encoded: clip k (k = 0 .. N-1, N = --num_clips or --passes x the records of
config.data's training split) is record `k % len(source)` with its random T-frame window drawn
by (config.data.seed, k), so each pass sees every video once with a new window. A record that
fails to load is replaced by the next one (counted in metadata.json, as in training).

How: the tokenizer is replicated, each global batch of B clips is split over all devices of all
hosts (data parallel), and host h writes shards h*S/P .. (h+1)*S/P - 1 of the S shards (clips are
dealt to shards in contiguous ranges). Shards appear under their final names only when whole
(data/shards.py); rerunning the same command after a crash or preemption skips the finished
shards and encodes the rest. Format and layout: generation/latent_cache.py.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import Optional

import numpy as np
from absl import flags

from coordtok_jax import cli

FLAGS = flags.FLAGS
CLIPS_PER_SHARD = 1024  # default shard size


def define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/sit.py:SIZE with config.tokenizer (and config.data) set.",
                                    lock_config=True)
    flags.DEFINE_string("output", None, "Cache directory, local or gs://.")
    flags.DEFINE_integer("passes", 1, "Clips per training record (each with its own random window).", lower_bound=1)
    flags.DEFINE_integer("num_clips", None, "Clips to encode (default: --passes x the records).", lower_bound=1)
    flags.DEFINE_integer("num_shards", None, f"Shards (a multiple of the process count; default ~{CLIPS_PER_SHARD} "
                         "clips each).", lower_bound=1)
    flags.DEFINE_integer("batch", None, "Global batch (default config.batch_size; divisible by the device count).",
                         lower_bound=1)
    flags.DEFINE_bool("overwrite", False, "Delete an existing (complete or partial) cache in --output first.")
    flags.DEFINE_float("token_budget", None, "Nested-token tokenizers: keep at most this fraction of each batch's "
                       "temporal-plane tokens (the records then store the per-block levels).")
    flags.DEFINE_enum("allocation", "uniform", ["uniform", "greedy", "ilp"], "How --token_budget is split over "
                      "the temporal blocks (greedy / ilp: the tokenizer's scorer, python -m coordtok_jax.train_scorer).")


class _LoadClip:
    """Clip index k -> the training clip k (record k % n, window by (seed, k)); picklable."""

    def __init__(self, source, seed: int, max_failures: int):
        from coordtok_jax.data.pipeline import ClipLoader

        self.loader = ClipLoader(source, seed, 0, max_failures)
        self.n = len(source)

    def __call__(self, k):
        clip = self.loader(int(k), int(k) % self.n)
        clip["clip"] = np.int64(k)
        return clip


class _Budget:
    """Per global batch: the tokenizer's planes cut to per-block levels under the token budget
    (evaluate/budgets.py), identically on every host (scores and lengths are all-gathered)."""

    def __init__(self, tok, config, mesh, rows, fraction, method):
        import jax
        from flax import nnx

        from coordtok_jax.evaluate import budgets
        from coordtok_jax.models import ConfigError
        from coordtok_jax.models.nested import nested_tokens

        self.nt = nested_tokens(tok.config.model, tok.geometry)
        if self.nt is None:
            raise ConfigError(f"--token_budget needs a tokenizer trained with config.model.nested_tokens=True; "
                              f"{config.tokenizer} has fixed-size planes")
        budgets.allocate(np.zeros((1, self.nt.blocks, len(self.nt.levels))), np.ones((1, self.nt.blocks), bool),
                         self.nt, fraction, method)  # checks the budget and the method before anything runs
        self.fraction, self.method, self.mesh, self.rows = float(fraction), method, mesh, rows
        self.frames = tok.geometry.video_shape[0]
        self.cut = jax.jit(lambda p, planes, lv: nnx.merge(tok.graphdef, p).apply_levels(planes, lv),
                           out_shardings=rows)
        self.score = None
        if method != "uniform":
            scorer, _ = budgets.load_scorer(config.tokenizer, self.nt, tok.geometry.channels)
            scorer_graphdef, self.scorer_state = nnx.split(scorer)
            self.score = jax.jit(budgets.make_score_planes(tok.graphdef, scorer_graphdef))
        self.budgets = budgets

    def __call__(self, tok_params, planes, n_frames_local):
        """(cut planes (global, sharded like the batch), levels (global batch, blocks) NumPy)."""
        import jax
        from jax.experimental import multihost_utils

        n_frames = np.asarray(multihost_utils.process_allgather(np.asarray(n_frames_local), tiled=True)).reshape(-1)
        batch = len(n_frames)
        scores = np.zeros((batch, self.nt.blocks, len(self.nt.levels)))
        if self.score is not None:
            scores = np.asarray(multihost_utils.process_allgather(
                self.score(tok_params, self.scorer_state, planes), tiled=True))
        valid = self.budgets.valid_blocks(n_frames, self.frames, self.nt)
        levels = self.budgets.allocate(scores, valid, self.nt, self.fraction, self.method)
        local = batch // jax.process_count()
        mine = levels[jax.process_index() * local:(jax.process_index() + 1) * local]
        global_levels = multihost_utils.host_local_array_to_global_array(mine, self.mesh, self.rows.spec)
        return self.cut(tok_params, planes, global_levels), levels


def _spec(config, geometry, tok_step, source, num_clips, num_shards) -> dict:
    from coordtok_jax.generation.latent_cache import DATA_IO_KEYS, FORMAT
    from coordtok_jax.io.checkpoint import config_to_json

    data = {k: v for k, v in config_to_json(config.data).items() if k not in DATA_IO_KEYS}  # what, not how
    return dict(format=FORMAT, tokenizer=str(config.tokenizer), tokenizer_step=int(tok_step),
                plane_shapes=[list(s) for s in geometry.plane_shapes], video_shape=list(geometry.video_shape),
                data=data, source=source.name, source_records=len(source),
                num_clips=int(num_clips), num_shards=int(num_shards))


def _check_resumable(existing: dict, spec: dict, output) -> None:
    differ = [k for k in spec if existing.get(k) != json.loads(json.dumps(spec[k]))]
    if differ:
        lines = "\n  ".join(f"{k}: cache has {existing.get(k)!r}, this run {spec[k]!r}" for k in differ)
        raise FileExistsError(f"{output} holds a partial cache of another encoding (spec.json):\n  {lines}\n"
                              f"pass --overwrite to delete it and start over")


def _clear(out) -> None:
    for p in list(out.glob("latents-*.array_record")) + list(out.glob("latents-*.array_record.tmp")):
        p.unlink()
    for name in ("spec.json", "metadata.json"):
        (out / name).unlink(missing_ok=True)


def encode_latents(config, output: str, *, passes: int = 1, num_clips: Optional[int] = None,
                   num_shards: Optional[int] = None, batch_size: Optional[int] = None, overwrite: bool = False,
                   progress: bool = True, token_budget: Optional[float] = None, allocation: str = "uniform") -> dict:
    """Writes the cache (resuming a partial one); returns its metadata.

    `token_budget` (a nested-token tokenizer): each global batch keeps at most that fraction of its
    temporal-plane tokens, split over the blocks by `allocation` ('uniform', or 'greedy' / 'ilp' on
    the scorer in the tokenizer's workdir); the records then hold the planes as decoded at the
    chosen levels, and the levels."""
    import jax
    from etils import epath
    from jax.experimental import multihost_utils
    from tqdm import tqdm

    import grain

    from coordtok_jax import sharding as sharding_lib
    from coordtok_jax.generation import latent_cache
    from coordtok_jax.data.pipeline import batched
    from coordtok_jax.data.shards import ShardWriter, staging_dir
    from coordtok_jax.data.sources import make_source
    from coordtok_jax.models import ConfigError
    from coordtok_jax.train.trainer import maybe_initialize_distributed
    from coordtok_jax.generation.frozen_tokenizer import frozen_tokenizer

    # --- processes, mesh, frozen tokenizer -------------------------------------------------
    maybe_initialize_distributed(config.get("distributed", "auto"))
    n_proc, host, is_main = jax.process_count(), jax.process_index(), jax.process_index() == 0
    batch_size = int(batch_size or config.batch_size)
    if batch_size % jax.device_count():
        raise ConfigError(f"--batch={batch_size} must be divisible by the {jax.device_count()} devices")
    local_batch = batch_size // n_proc
    # a ('data',) mesh: the tokenizer replicated, every batch split over all devices by the rules
    mesh = sharding_lib.make_mesh((-1,), ("data",))
    rules = sharding_lib.rules_of(config)
    tok = frozen_tokenizer(config, mesh)
    g, tok_params, tok_step = tok.geometry, tok.params, tok.step
    rows = sharding_lib.batch_sharding(mesh, rules, (batch_size,))
    enc = jax.jit(tok.encode, out_shardings=rows)
    budget = None if token_budget is None else _Budget(tok, config, mesh, rows, token_budget, allocation)

    # --- what to encode, and what is already there ------------------------------------------
    source = make_source(config.data, g.video_shape, train=True)
    total = int(num_clips or passes * len(source))
    if num_shards is None:
        num_shards = n_proc * max(1, -(-total // (n_proc * CLIPS_PER_SHARD)))
    if num_shards % n_proc or num_shards > total:
        raise ConfigError(f"--num_shards={num_shards} must be a multiple of the {n_proc} processes and at most "
                          f"the {total} clips")
    out = epath.Path(output)
    spec = _spec(config, g, tok_step, source, total, num_shards)
    if budget is not None:  # (only then: the spec of an ordinary cache is unchanged)
        spec.update(token_budget=float(token_budget), allocation=allocation, token_levels=list(budget.nt.levels))
    if (out / "metadata.json").exists() and not overwrite:
        raise FileExistsError(f"{output} already holds a complete latent cache (metadata.json); pass --overwrite")
    multihost_utils.sync_global_devices("encode_latents: checked")
    if overwrite:
        if is_main and out.exists():
            _clear(out)
    elif (out / "spec.json").exists():
        _check_resumable(json.loads((out / "spec.json").read_text()), spec, output)
    multihost_utils.sync_global_devices("encode_latents: cleared")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "spec.json").exists():
            (out / "spec.json").write_text(json.dumps(spec, indent=2))

    bounds = np.linspace(0, total, num_shards + 1).round().astype(np.int64)
    per_host = num_shards // n_proc
    mine = range(host * per_host, (host + 1) * per_host)
    pending = [s for s in mine if not (out / latent_cache.shard_name(s, num_shards)).exists()]
    clips = np.concatenate([np.arange(bounds[s], bounds[s + 1]) for s in pending] or [np.zeros(0, np.int64)])
    shard_of = np.searchsorted(bounds, clips, side="right") - 1
    counts = multihost_utils.process_allgather(np.asarray([len(clips), -(-len(clips) // local_batch)]))
    counts = np.asarray(counts).reshape(n_proc, 2)
    n_batches, todo = int(counts[:, 1].max()), int(counts[:, 0].sum())
    if is_main:
        done = total - todo
        print(f"encoding {todo} clips of {source.name} into {output} ({num_shards} shards"
              + (f", {done} clips already done" if done else "") + f"), batch {batch_size} over "
              f"{jax.device_count()} devices")

    # --- encode, write ----------------------------------------------------------------------
    ds = grain.MapDataset.source(clips.tolist()).map(
        _LoadClip(source, config.data.seed, config.data.get("max_consecutive_failures", 64)))
    it = iter(batched(ds, config.data, local_batch, drop_remainder=False))
    staging, temporary = staging_dir(out, "coordtok_latents_")
    writers: dict[int, ShardWriter] = {}
    left = {s: int(bounds[s + 1] - bounds[s]) for s in pending}
    failures = written = 0
    T = g.video_shape[0]
    start = time.perf_counter()

    def emit(planes, local, offset, levels=None):
        nonlocal written
        planes = [np.asarray(z) for z in multihost_utils.global_array_to_host_local_array(planes, mesh, rows.spec)]
        mine = None if levels is None else levels[host * local_batch:(host + 1) * local_batch]
        for i in range(len(local["clip"])):
            k = int(local["clip"][i])
            s = int(shard_of[offset + i])
            if s not in writers:
                writers[s] = ShardWriter(out, latent_cache.shard_name(s, num_shards), staging)
            writers[s].write(latent_cache.encode_planes([z[i] for z in planes], int(local["label"][i]), k,
                                                        None if mine is None else mine[i]))
            written += 1
            left[s] -= 1
            if left[s] == 0:
                writers.pop(s).finish()

    bar = tqdm(total=todo, unit="clip", desc="encode latents", disable=not (progress and is_main), file=sys.stdout,
               dynamic_ncols=True, mininterval=1.0)
    previous = None  # (device planes, host batch, offset): written once the next batch is dispatched
    try:
        for b in range(n_batches):
            local = next(it, None)
            video = np.zeros((local_batch,) + tuple(g.video_shape) + (3,), np.uint8)
            n_frames = np.full((local_batch,), T, np.int32)
            if local is not None:
                v = len(local["clip"])
                video[:v], n_frames[:v] = local["video"], local["n_frames"]
                failures += int(np.sum(local["decode_failures"]))
            with jax.set_mesh(mesh):
                planes = enc(tok_params, multihost_utils.host_local_array_to_global_array(video, mesh, rows.spec),
                             multihost_utils.host_local_array_to_global_array(n_frames, mesh, rows.spec))
                levels = None
                if budget is not None:
                    planes, levels = budget(tok_params, planes, n_frames)
            if previous is not None:
                emit(*previous)
            previous = (planes, local, b * local_batch, levels) if local is not None else None
            bar.update(min(batch_size, todo - bar.n))
        if previous is not None:
            emit(*previous)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()
        if temporary:
            shutil.rmtree(staging, ignore_errors=True)
    if writers or any(v for v in left.values()):
        raise RuntimeError(f"encode_latents: shards {sorted(writers)} did not receive all their clips (data ended?)")

    # --- metadata (last: marks the cache complete) -----------------------------------------
    multihost_utils.sync_global_devices("encode_latents: shards written")
    sums = np.asarray(multihost_utils.process_allgather(np.asarray([failures, written]))).reshape(n_proc, 2).sum(0)
    seconds = time.perf_counter() - start
    metadata = dict(spec, clips_per_shard=np.diff(bounds).tolist(), skipped_records=int(sums[0]),
                    encoded_this_run=int(sums[1]), seconds_this_run=round(seconds, 1))
    if is_main:
        (out / "metadata.json").write_text(json.dumps(metadata, indent=2))
        print(f"wrote {total} clips' latents to {output} ({int(sums[1])} this run, {seconds:.1f} s, "
              f"{int(sums[1]) / max(seconds, 1e-9):.1f} clips/s); {int(sums[0])} unreadable records skipped")
    multihost_utils.sync_global_devices("encode_latents: done")
    return metadata


def main(argv):
    encode_latents(FLAGS.config, FLAGS.output, passes=FLAGS.passes, num_clips=FLAGS.num_clips,
                   num_shards=FLAGS.num_shards, batch_size=FLAGS.batch, overwrite=FLAGS.overwrite,
                   token_budget=FLAGS.token_budget, allocation=FLAGS.allocation)


def run():
    cli.run(__name__, define_flags, main, errors=(ValueError, FileNotFoundError), required=("config", "output"),
            log_level="warning")
