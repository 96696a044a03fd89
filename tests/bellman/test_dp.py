import itertools

import numpy as np
import pytest

from bossflow import Schedule, bellman_schedules
from bossflow.bellman import bellman_paths
from bossflow.errors import CostMatrixError


def brute_force(c: np.ndarray, k: int) -> tuple[float, tuple[int, ...]]:
    n = c.shape[0] - 1
    best = (np.inf, ())
    for inner in itertools.combinations(range(1, n), k - 1):
        path = (0, *inner, n)
        total = sum(c[a, b] for a, b in zip(path[:-1], path[1:]))
        if total < best[0]:
            best = (total, path)
    return best


@pytest.mark.parametrize("n", [1, 2, 5, 9, 12])
def test_dp_matches_brute_force_for_every_k(n):
    rng = np.random.default_rng(n)
    for _ in range(3):
        c = rng.random((n + 1, n + 1))
        paths = bellman_paths(c, range(1, n + 1))
        for k in range(1, n + 1):
            cost, path = brute_force(c, k)
            assert paths[k].indices == path
            assert paths[k].cost == pytest.approx(cost, rel=1e-12)


def test_identity_path_when_k_equals_n_and_cost_is_path_sum():
    rng = np.random.default_rng(0)
    c = rng.random((11, 11))
    paths = bellman_paths(c, [10, 4])
    assert paths[10].indices == tuple(range(11))
    for p in paths.values():
        assert p.cost == sum(c[a, b] for a, b in zip(p.indices[:-1], p.indices[1:]))
        assert p.indices[0] == 0 and p.indices[-1] == 10 and p.steps in (10, 4)


def test_ties_go_to_smallest_index():
    c = np.zeros((6, 6))
    paths = bellman_paths(c, [1, 2, 3])
    assert paths[2].indices == (0, 1, 5)
    assert paths[3].indices == (0, 1, 2, 5)


def test_known_answer_prefers_cheap_region():
    # Jumps that land beyond index 3 are expensive unless they start at 3 or later.
    n = 6
    c = np.ones((n + 1, n + 1))
    c[3:, :] = 0.0
    c[:3, :4] = 0.0
    assert bellman_paths(c, [2])[2].indices == (0, 3, 6)


def test_bellman_schedules_on_plain_array_use_uniform_grid():
    c = np.random.default_rng(1).random((5, 5))
    s = bellman_schedules(c, [2])[2]
    assert isinstance(s, Schedule)
    np.testing.assert_allclose(s.times, np.asarray(s.indices) / 4)
    assert s.method == "bellman" and s.cost == bellman_paths(c, [2])[2].cost


@pytest.mark.parametrize(
    "cost, budgets, message",
    [
        (np.zeros((3, 4)), [1], "square"),
        (np.zeros((1, 1)), [1], "at least 2 x 2"),
        (np.array([[0, np.nan], [0, 0]]), [1], "non-finite"),
        (np.zeros((4, 4)), [4], "between 1 and N = 3"),
        (np.zeros((4, 4)), [0], "between 1 and N = 3"),
        (np.zeros((4, 4)), [2.7], "must be integers, got 2.7"),  # was truncated to 2
        (np.zeros((4, 4)), [True], "must be integers, got True"),
        (np.zeros((4, 4)), 2, r"a list of step counts K, e.g. \[2\]"),
    ],
)
def test_bad_matrices_give_clear_errors(cost, budgets, message):
    with pytest.raises(CostMatrixError, match=message):
        bellman_paths(cost, budgets)


def test_nan_below_diagonal_is_ignored():
    c = np.random.default_rng(2).random((5, 5))
    c[3, 1] = np.nan
    assert bellman_paths(c, [2])[2].indices[0] == 0
