"""Exact-K least-cost paths through a cost matrix (paper eq. 8), all budgets in one pass.

With ``V_1(i) = c[i, N]`` and ``V_k(i) = min_{j > i} c[i, j] + V_{k-1}(j)``, ``V_K(0)`` is the least
total cost of going from grid index 0 to N in exactly K jumps, and backtracking the argmins gives
the path. Each ``k`` is one vectorised (N + 1) x (N + 1) minimum, O(K N^2) work in all. Exact ties
go to the smallest ``j``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import CostMatrixError

__all__ = ["BellmanPath", "bellman_paths", "check_cost_matrix"]


@dataclass(frozen=True)
class BellmanPath:
    """A least-cost path: ``indices`` (K + 1 grid indices from 0 to N) and its total ``cost``."""

    indices: tuple[int, ...]
    cost: float

    @property
    def steps(self) -> int:
        return len(self.indices) - 1


def check_cost_matrix(cost: np.ndarray) -> np.ndarray:
    """Validate a cost matrix for the DP and return it as float64.

    Raises:
        CostMatrixError: not a square 2-D array of at least 2 x 2, or non-finite above the diagonal.
    """
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise CostMatrixError(f"the cost matrix must be square (N+1, N+1), got shape {c.shape}")
    if c.shape[0] < 2:
        raise CostMatrixError(
            f"the cost matrix must be at least 2 x 2 (a grid with N >= 1 intervals), got {c.shape}"
        )
    if not np.isfinite(c).all():  # fast path first: the full check is cheap, the masked one not
        above = np.triu(~np.isfinite(c), 1)
        if above.any():
            bad = tuple(int(v) for v in np.argwhere(above)[0])
            raise CostMatrixError(
                f"the cost matrix has a non-finite entry above the diagonal at {bad}; recompute it "
                "(a model returning NaN is caught there) or mask with a large finite value"
            )
    return c


def bellman_paths(cost: np.ndarray, budgets: Iterable[int]) -> dict[int, BellmanPath]:
    """Least-cost paths from index 0 to N with exactly K jumps, for every K in ``budgets``.

    Args:
        cost: (N + 1, N + 1) matrix; ``cost[i, j]`` for ``i < j`` is the cost of jumping from i to j.
        budgets: the numbers of steps K wanted, each in 1..N.

    Returns:
        ``{K: BellmanPath}``; ``path.cost`` equals the sum of ``cost[i, j]`` along ``path.indices``.
    """
    c = check_cost_matrix(cost)
    n = c.shape[0] - 1
    if isinstance(budgets, (int, np.integer)) or not isinstance(budgets, Iterable):
        raise CostMatrixError(f"budgets must be a list of step counts K, e.g. [{budgets}]")
    budgets = list(budgets)
    bad = [k for k in budgets if isinstance(k, bool) or not isinstance(k, (int, np.integer))]
    if bad:
        raise CostMatrixError(f"the numbers of steps K must be integers, got {bad[0]!r}")
    ks = sorted({int(k) for k in budgets})
    if not ks:
        raise CostMatrixError("ask for at least one number of steps K")
    if ks[0] < 1 or ks[-1] > n:
        raise CostMatrixError(
            f"the number of steps K must be between 1 and N = {n} (the fine grid's intervals); "
            f"got {ks[0] if ks[0] < 1 else ks[-1]}. Use a finer grid (larger --kmax) for more steps."
        )
    kmax = ks[-1]
    idx = np.arange(n + 1)
    # Only forward jumps (j > i) are allowed: +inf elsewhere.
    step_cost = np.where(idx[:, None] < idx[None, :], c, np.inf)
    value = step_cost[:, n].copy()  # V_1(i) = c[i, N]  (inf for i = N)
    choice = np.empty((kmax + 1, n + 1), dtype=np.int64)
    choice[1] = n
    # Rows in cache-sized blocks, each against the columns right of its first row: the upper
    # triangle only, read once per level. Same minima as the full (N+1) x (N+1) min-plus product.
    block = 32
    buf = np.empty((block, n + 1))
    for k in range(2, kmax + 1):
        new_value = np.full(n + 1, np.inf)
        for a in range(0, n, block):
            b = min(a + block, n)
            total = np.add(step_cost[a:b, a + 1 :], value[a + 1 :], out=buf[: b - a, : n - a])
            arg = total.argmin(axis=1)  # first minimum: smallest j on exact ties
            choice[k, a:b] = arg + a + 1
            new_value[a:b] = total[np.arange(b - a), arg]
        choice[k, n] = n
        value = new_value
    paths = {}
    for k in ks:
        idx = [0]
        for level in range(k, 0, -1):
            idx.append(int(choice[level, idx[-1]]))
        total_cost = float(sum(c[a, b] for a, b in zip(idx[:-1], idx[1:])))
        paths[k] = BellmanPath(tuple(idx), total_cost)
    return paths
