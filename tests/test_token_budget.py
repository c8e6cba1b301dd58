"""models/token_budget.py: the exact allocation equals brute force on small cases, every allocator
keeps the budget, greedy is never better than the optimum, bad input is named."""

import itertools

import numpy as np
import pytest

from coordtok_jax.models.token_budget import allocate_greedy, allocate_ilp, tokens_of, uniform_allocation

LEVELS = [4, 8, 12, 16]


def _scores(seed, blocks):
    """Concave-ish increasing quality per block with random slopes, plus noise (not always concave)."""
    rng = np.random.default_rng(seed)
    slope = rng.uniform(0.2, 3.0, (blocks, 1))
    base = rng.uniform(15, 30, (blocks, 1))
    return base + slope * np.log1p(np.arange(len(LEVELS)))[None] * 4 + rng.normal(0, 0.3, (blocks, len(LEVELS)))


def _brute_force(scores, budget):
    best, best_value = None, -np.inf
    for choice in itertools.product(range(len(LEVELS)), repeat=scores.shape[0]):
        if tokens_of(choice, LEVELS).sum() <= budget:
            value = scores[np.arange(scores.shape[0]), choice].sum()
            if value > best_value:
                best, best_value = np.array(choice), value
    return best, best_value


@pytest.mark.parametrize("seed, blocks, budget", [(0, 3, 24), (1, 4, 40), (2, 5, 44), (3, 5, 80), (4, 6, 30)])
def test_ilp_is_optimal_and_greedy_is_feasible(seed, blocks, budget):
    scores = _scores(seed, blocks)
    _, want = _brute_force(scores, budget)
    value = lambda c: scores[np.arange(blocks), c].sum()
    exact = allocate_ilp(scores, LEVELS, budget)
    assert tokens_of(exact, LEVELS).sum() <= budget
    assert value(exact) == pytest.approx(want, abs=1e-9)
    for allocator in (allocate_greedy, uniform_allocation):
        choice = allocator(scores, LEVELS, budget)
        assert tokens_of(choice, LEVELS).sum() <= budget
        assert value(choice) <= want + 1e-9


def test_greedy_spends_where_the_gain_is():
    """One block gains a lot from tokens, the other nothing: the budget goes to the first."""
    scores = np.array([[20.0, 25.0, 30.0, 35.0], [30.0, 30.0, 30.0, 30.0]])
    for allocator in (allocate_greedy, allocate_ilp):
        np.testing.assert_array_equal(allocator(scores, LEVELS, 20), [3, 0])
    np.testing.assert_array_equal(uniform_allocation(scores, LEVELS, 20), [1, 1])  # 2 x 8 tokens <= 20 < 2 x 12


def test_errors_name_the_problem():
    scores = _scores(0, 3)
    with pytest.raises(ValueError, match="budget 11 is below 12, every one of the 3 blocks at the lowest level"):
        allocate_ilp(scores, LEVELS, 11)
    with pytest.raises(ValueError, match="increasing order"):
        allocate_greedy(scores, [4, 4, 8, 16], 40)
    with pytest.raises(ValueError, match=r"scores must be \(blocks, 4 levels\)"):
        allocate_greedy(scores[:, :3], LEVELS, 40)
