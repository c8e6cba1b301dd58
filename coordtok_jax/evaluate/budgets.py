"""Token budgets at evaluation (issue 17): per-block PSNR, level measurement, allocation, the scorer file.

* `block_psnr`: per temporal block, the mean over its valid frames of per-frame PSNR (the
  official protocol's per-frame PSNR on [0, 1] frames), and which blocks hold a valid frame.
* `make_measure`: jit-able (params, video, n_frames) -> planes, fills and the measured per-block
  PSNR at every level (each level decoded for all blocks at once, every patch in one joint pass).
* `allocate`: per-block levels for a batch under a total budget (a fraction of the temporal-plane
  tokens) from per-block scores, by `uniform`, `greedy` or `ilp` (models/token_budget.py);
  blocks without a valid frame get the lowest level.
* `save_scorer` / `load_scorer`: the trained scorer in WORKDIR/scorer/ (msgpack + JSON),
  written atomically.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx, serialization

from coordtok_jax.data.video import to_model_input
from coordtok_jax.metrics.quality import frames_in_unit_range, psnr_per_frame, valid_frames
from coordtok_jax.models import token_budget
from coordtok_jax.models.decode_video import decode_video
from coordtok_jax.models.nested import NestedTokens, block_of_frames, uniform_levels
from coordtok_jax.models.scorer import BlockScorer, block_features, num_features

METHODS = ("uniform", "greedy", "ilp")
SCORER_DIR = "scorer"


def require_nested(model, what: str) -> NestedTokens:
    if getattr(model, "nested", None) is None:
        raise ValueError(f"{what} needs a tokenizer trained with config.model.nested_tokens=True "
                         "(this checkpoint's model has fixed-size planes)")
    return model.nested


def block_psnr(pred: jax.Array, target: jax.Array, n_frames: jax.Array, nt: NestedTokens):
    """pred, target (B, T, H, W, 3) in [0, 1] -> (psnr (B, blocks), valid (B, blocks) bool)."""
    T = pred.shape[1]
    frame_psnr = psnr_per_frame(pred, target)  # (B, T)
    keep = valid_frames(T, n_frames).astype(jnp.float32)  # (B, T)
    member = jnp.asarray(block_of_frames(T, nt)[:, None] == np.arange(nt.blocks)[None], jnp.float32)  # (T, blocks)
    count = keep @ member
    total = (frame_psnr * keep) @ member
    return total / jnp.maximum(count, 1.0), count > 0


def valid_blocks(n_frames, num_frames: int, nt: NestedTokens) -> np.ndarray:
    """(B, blocks) bool: the blocks that hold at least one of the video's first n_frames frames."""
    n = np.asarray(n_frames).reshape(-1)
    member = block_of_frames(num_frames, nt)[:, None] == np.arange(nt.blocks)[None]
    return ((np.arange(num_frames)[None] < n[:, None]).astype(np.int64) @ member.astype(np.int64)) > 0


def _fills(model):
    return model.nested_fill_yt[...], model.nested_fill_xt[...]


def make_measure(graphdef, pad_value: float):
    """(params, video uint8, n_frames) -> dict(features (B, blocks, F), psnr (B, blocks, L),
    valid (B, blocks)): the measured per-block PSNR at each level, every block at that level."""

    def measure(params, video, n_frames):
        model = nnx.merge(graphdef, params)
        nt = model.nested
        planes = model.encode(to_model_input(video, n_frames, pad_value), n_frames)
        target = video.astype(jnp.float32) / 255.0
        psnrs = []
        for level in range(len(nt.levels)):
            levels = jnp.asarray(uniform_levels(video.shape[0], nt, level))
            pred = frames_in_unit_range(decode_video(model, model.apply_levels(planes, levels)))
            psnr, valid = block_psnr(pred, target, n_frames, nt)
            psnrs.append(psnr)
        return {"features": block_features(planes, _fills(model), nt), "psnr": jnp.stack(psnrs, -1), "valid": valid}

    return measure


def make_score_planes(graphdef, scorer_graphdef):
    """(params, scorer_state, planes) -> the scorer's predicted per-block PSNR (B, blocks, L) for
    planes already encoded (the one scoring path: evaluate, reconstruct and encode_latents)."""

    def score(params, scorer_state, planes):
        model = nnx.merge(graphdef, params)
        return nnx.merge(scorer_graphdef, scorer_state)(block_features(planes, _fills(model), model.nested))

    return score


def make_predict(graphdef, scorer_graphdef, pad_value: float):
    """(params, scorer_state, video uint8, n_frames) -> predicted per-block PSNR (B, blocks, L):
    encode, then `make_score_planes`."""
    score = make_score_planes(graphdef, scorer_graphdef)

    def predict(params, scorer_state, video, n_frames):
        planes = nnx.merge(graphdef, params).encode(to_model_input(video, n_frames, pad_value), n_frames)
        return score(params, scorer_state, planes)

    return predict


def allocate(scores, valid, nt: NestedTokens, fraction: float, method: str) -> np.ndarray:
    """Per-block level indices (B, blocks) for a batch: the temporal-plane tokens of the batch at
    most `fraction` of the full budget, the summed score as large as `method` can make it.

    scores (B, blocks, L) (predicted or measured PSNR), valid (B, blocks): blocks without a valid
    frame are held at the lowest level and cost its tokens."""
    if method not in METHODS:
        raise ValueError(f"allocation method must be one of {METHODS}, got {method!r}")
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"--token_budget must be a fraction in (0, 1] of the temporal-plane tokens, got {fraction}")
    scores = np.asarray(scores, np.float64)
    valid = np.asarray(valid, bool)
    batch, blocks, n_levels = scores.shape
    levels = 2 * np.asarray(nt.levels)  # tokens of a block (both temporal planes) at each level
    budget = int(np.floor(fraction * batch * nt.full_tokens + 1e-9))
    least = int(levels[0]) * batch * blocks
    if budget < least:
        raise ValueError(f"--token_budget={fraction} gives {budget} tokens, below the {least} of every block at the "
                         f"lowest level ({nt.levels[0] / nt.cells:.3g} of a block)")
    flat = scores.reshape(-1, n_levels).copy()
    flat[~valid.reshape(-1)] = -np.arange(n_levels) * 1e-3  # padding-only blocks: more tokens never pay
    if method == "uniform":
        choice = token_budget.uniform_allocation(flat, levels, budget)
    elif method == "greedy":
        choice = token_budget.allocate_greedy(flat, levels, budget)
    else:
        choice = token_budget.allocate_ilp(flat, levels, budget)
    choice = choice.reshape(batch, blocks)
    if method != "uniform":
        choice[~valid] = 0
    return choice.astype(np.int32)


def new_scorer(nt: NestedTokens, channels: int, hidden: int = 64, seed: int = 0) -> BlockScorer:
    return BlockScorer(num_features(nt, channels), len(nt.levels), hidden, rngs=nnx.Rngs(seed))


def save_scorer(workdir, scorer: BlockScorer, meta: dict) -> epath.Path:
    """WORKDIR/scorer/{state.msgpack, scorer.json}; each file written to a temporary name first."""
    folder = epath.Path(workdir) / SCORER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(scorer))
    blobs = {"state.msgpack": serialization.msgpack_serialize(jax.tree.map(np.asarray, state)),
             "scorer.json": json.dumps(meta, indent=2).encode()}
    for name, blob in blobs.items():
        tmp = folder / f".{name}.tmp-{os.getpid()}"
        tmp.write_bytes(blob)
        tmp.replace(folder / name)
    return folder


def save_measurements(workdir, key: dict, train: dict, held: dict) -> None:
    """WORKDIR/scorer/measured.npz: the measured per-block PSNRs and features (train_ / held_ arrays)
    and the JSON `key` they were measured for; written to a temporary name first."""
    folder = epath.Path(workdir) / SCORER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".measured.npz.tmp-{os.getpid()}"
    with tmp.open("wb") as f:
        np.savez(f, key=np.asarray(json.dumps(key, sort_keys=True)),
                 **{f"train_{k}": v for k, v in train.items()}, **{f"held_{k}": v for k, v in held.items()})
    tmp.replace(folder / "measured.npz")


def load_measurements(workdir, key: dict):
    """(train, held) from WORKDIR/scorer/measured.npz when it was measured for `key`, else None."""
    path = epath.Path(workdir) / SCORER_DIR / "measured.npz"
    if not path.exists():
        return None
    try:
        with path.open("rb") as f, np.load(f) as data:
            if str(data["key"]) != json.dumps(key, sort_keys=True):
                return None
            return tuple({k[len(p):]: data[k] for k in data.files if k.startswith(p)} for p in ("train_", "held_"))
    except (OSError, ValueError, KeyError):
        return None  # unreadable: measure again


def load_scorer(workdir, nt: NestedTokens, channels: int) -> tuple[BlockScorer, dict]:
    folder = epath.Path(workdir) / SCORER_DIR
    if not (folder / "state.msgpack").exists():
        raise FileNotFoundError(f"{folder}/state.msgpack is missing: train the scorer first "
                                f"(python -m coordtok_jax.train_scorer --workdir={workdir})")
    meta = json.loads((folder / "scorer.json").read_text())
    if list(meta.get("levels", [])) != list(nt.levels):
        raise ValueError(f"{folder}: the scorer was trained for levels {meta.get('levels')}, this tokenizer has "
                         f"{list(nt.levels)}; retrain it")
    scorer = new_scorer(nt, channels, int(meta.get("hidden", 64)))
    state = serialization.msgpack_restore((folder / "state.msgpack").read_bytes())
    nnx.update(scorer, jax.tree.map(jnp.asarray, state))
    return scorer, meta


def pearson(a, b) -> Optional[float]:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])
