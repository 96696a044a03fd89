"""Bellman optimal step sizes: the cost matrix (cost.py) and the dynamic programme (dp.py)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import CostMatrixError
from ..schedule import Schedule, uniform
from .cost import METRICS, CostMatrix, batch_costs, cost_matrix, fine_trajectories
from .dp import BellmanPath, bellman_paths

__all__ = [
    "CostMatrix",
    "cost_matrix",
    "fine_trajectories",
    "batch_costs",
    "METRICS",
    "BellmanPath",
    "bellman_paths",
    "bellman_schedules",
]


def bellman_schedules(cost: CostMatrix | np.ndarray, nfes: Iterable[int]) -> dict[int, Schedule]:
    """Bellman optimal Euler schedules for each budget in ``nfes`` (paper eq. 8).

    Args:
        cost: a :class:`CostMatrix`, or a plain (N + 1, N + 1) array taken on the uniform grid.
        nfes: Euler step counts K (= NFE), each between 1 and N.

    Returns:
        ``{K: Schedule}``; each schedule has ``.times`` (the fine-grid times at the path),
        ``.indices`` (the path in the fine grid), ``.cost`` (its total cost) and provenance.
    """
    if isinstance(cost, CostMatrix):
        values, grid = cost.values, cost.grid
        prov = {"samples": cost.count, "metric": cost.metric, **cost.meta}
    else:
        values = np.asarray(cost, dtype=np.float64)
        if values.ndim != 2:
            raise CostMatrixError(f"the cost matrix must be 2-D, got shape {values.shape}")
        grid = uniform(max(values.shape[0] - 1, 1))
        prov = {}
    paths = bellman_paths(values, nfes)
    fine = "uniform" if np.allclose(grid.times, uniform(len(grid.times) - 1).times) else "custom"
    out = {}
    for k, path in paths.items():
        out[k] = Schedule(
            grid.times[list(path.indices)],
            method="bellman",
            indices=path.indices,
            cost=path.cost,
            provenance={"k_max": len(grid.times) - 1, "fine_grid": fine, **prov},
        )
    return out
