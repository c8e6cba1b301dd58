"""Choosing how many tokens each temporal block keeps under a total budget (issue 17's allocation).

Given, for every block b (a temporal block of one video, over a batch of videos) and every allowed
token count `levels[l]` (ascending), a predicted quality `scores[b, l]` (e.g. a scorer's PSNR),
choose one level per block so that the blocks' tokens sum to at most `budget` and the summed
predicted quality is as large as possible:

    maximise sum_b scores[b, choice_b]   subject to   sum_b levels[choice_b] <= budget.

* `allocate_ilp`: the exact optimum, a binary integer program (scipy.optimize.milp, HiGHS):
  x[b, l] in {0, 1}, one level per block, the token sum within the budget.
* `allocate_greedy`: every block at the lowest level, then repeatedly the upgrade (one block to
  its next level) with the largest predicted gain per extra token that still fits; stops when no
  upgrade fits or none gains. Fast and usually close (the gap is measured, not assumed).
* `uniform_allocation`: the same level everywhere, the largest that fits (the baseline).

All return the chosen level index per block (int array); `tokens_of` turns them into counts.
Budgets below every block at the lowest level are an error naming both numbers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(scores, levels, budget: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64)
    levels = np.asarray(levels, np.int64)
    if scores.ndim != 2 or scores.shape[1] != levels.size:
        raise ValueError(f"scores must be (blocks, {levels.size} levels), got shape {scores.shape}")
    if levels.size == 0 or np.any(np.diff(levels) <= 0) or levels[0] < 0:
        raise ValueError(f"levels must be non-negative token counts in increasing order, got {levels.tolist()}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    least = int(levels[0]) * scores.shape[0]
    if budget < least:
        raise ValueError(f"budget {budget} is below {least}, every one of the {scores.shape[0]} blocks at the "
                         f"lowest level ({int(levels[0])} tokens)")
    return scores, levels


def tokens_of(choice: np.ndarray, levels: Sequence[int]) -> np.ndarray:
    """Token count per block of a choice of level indices."""
    return np.asarray(levels, np.int64)[np.asarray(choice)]


def uniform_allocation(scores, levels: Sequence[int], budget: int) -> np.ndarray:
    """The largest level every block can take at once within the budget."""
    scores, levels = _check(scores, levels, budget)
    fits = np.nonzero(levels * scores.shape[0] <= budget)[0]
    return np.full(scores.shape[0], fits[-1], np.int64)


def allocate_greedy(scores, levels: Sequence[int], budget: int) -> np.ndarray:
    """Marginal-gain upgrades, best gain per extra token first, while the budget allows."""
    scores, levels = _check(scores, levels, budget)
    n_blocks, n_levels = scores.shape
    choice = np.zeros(n_blocks, np.int64)
    spent = int(levels[0]) * n_blocks
    while True:
        nxt = np.minimum(choice + 1, n_levels - 1)
        extra = (levels[nxt] - levels[choice]).astype(np.float64)
        gain = scores[np.arange(n_blocks), nxt] - scores[np.arange(n_blocks), choice]
        can = (choice < n_levels - 1) & (spent + extra <= budget) & (gain > 0)
        if not can.any():
            return choice
        rate = np.where(can, gain / np.maximum(extra, 1e-12), -np.inf)
        b = int(np.argmax(rate))
        spent += int(extra[b])
        choice[b] += 1


def allocate_ilp(scores, levels: Sequence[int], budget: int) -> np.ndarray:
    """The exact optimum (scipy.optimize.milp)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    scores, levels = _check(scores, levels, budget)
    n_blocks, n_levels = scores.shape
    n = n_blocks * n_levels
    one_level = np.kron(np.eye(n_blocks), np.ones(n_levels))  # (blocks, blocks * levels)
    token_sum = np.tile(levels.astype(np.float64), n_blocks)[None]
    result = milp(c=-scores.ravel(), integrality=np.ones(n), bounds=Bounds(0, 1),
                  constraints=[LinearConstraint(one_level, 1, 1), LinearConstraint(token_sum, -np.inf, budget)])
    if not result.success:
        raise RuntimeError(f"the allocation program was not solved: {result.message}")
    return np.argmax(result.x.reshape(n_blocks, n_levels), axis=1).astype(np.int64)
