"""The Bellman cost matrix: what one Euler jump between two fine-grid times costs (paper eq. 5).

For a fine grid ``0 = tau_0 < ... < tau_N = 1`` and M noises ``z^m``, fine Euler trajectories give
states ``x^m_0..x^m_N`` and velocities ``v^m_i = v(x^m_i, tau_i)``. For ``0 <= i < j <= N``:

    c[i, j] = (1/M) sum_m || x^m_i + (tau_j - tau_i) v^m_i - x^m_j ||^2      (sum over all pixels)

``c[i, i+1] = 0`` by construction (up to float rounding of the Euler states). Entries with
``j <= i`` are 0 and never used.

Trajectories are streamed batch by batch (memory O(batch * N * D)); the per-sample costs are summed
in float64 together with their squares and the count, so a partial result can be saved, resumed and
merged with another exactly (sums add).

Squared L2 uses a Gram expansion in float64 (two batched matrix products per batch). Its rounding
is about 1e-16 of ``|x|^2``: 1e-14 of the largest entry, and up to ~1e-7 relative on the smallest
entries next to the diagonal, far below any difference the DP compares. In float32 the same
expansion cancels catastrophically for small steps (see benchmarks/bench_cost.py). Any other metric goes through the direct path, which forms every
prediction ``x_i + (tau_j - tau_i) v_i`` and calls ``metric(pred, target) -> (n,)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed as dist
from ..checkpoint import module_fingerprint, noise_fingerprint
from ..errors import BossflowError, CheckpointError, ConfigError, CostMatrixError
from ..field import VelocityField, guidance_identity
from ..noise import (
    CondLike,
    NoiseLike,
    cond_fingerprint,
    cond_reader,
    noise_reader,
    same_cond,
)
from ..schedule import Schedule, resolve_grid
from ..solvers import sample

__all__ = [
    "CostMatrix",
    "cost_matrix",
    "fine_trajectories",
    "batch_costs",
    "METRICS",
    "resolve_grid",
]

Metric = Callable[[Tensor, Tensor], Tensor]


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).abs().flatten(1).sum(1)


def _l2(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).flatten(1).norm(dim=1)


def _sq_l2_direct(pred: Tensor, target: Tensor) -> Tensor:
    return (pred - target).flatten(1).pow(2).sum(1)


# name -> per-sample metric; "sq_l2" (the paper's) has a fast path and needs no function.
METRICS: dict[str, Metric | None] = {
    "sq_l2": None,
    "sq_l2_direct": _sq_l2_direct,
    "l2": _l2,
    "l1": _l1,
}


def _metric(metric: str | Metric) -> tuple[str, Metric | None]:
    if callable(metric):
        return getattr(metric, "__name__", "custom"), metric
    try:
        return metric, METRICS[metric]
    except KeyError:
        raise ConfigError(
            f"unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a callable "
            "metric(pred, target) -> (n,) per-sample values"
        ) from None


def fine_trajectories(
    field: VelocityField, noise: Tensor, grid: Schedule, cond: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """Fine Euler trajectories on ``grid``.

    Args:
        field: velocity field.
        noise: (B, ...) states at t = 0.
        grid: fine grid with N + 1 times.
        cond: conditioning of the B samples (``field(x, t, **cond)``), or None.

    Returns:
        ``(states, velocities)``: (B, N + 1, ...) states ``x_0..x_N`` and (B, N, ...) velocities
        ``v_0..v_{N-1}``, in the dtype and on the device of ``noise``.
    """
    n = len(grid.times) - 1
    states = noise.new_empty((noise.shape[0], n + 1, *noise.shape[1:]))
    vels = noise.new_empty((noise.shape[0], n, *noise.shape[1:]))
    states[:, 0] = noise

    def record(step: dict[str, Any]) -> None:
        vels[:, step["i"]] = step["v"]
        states[:, step["i"] + 1] = step["x_next"]

    sample(field, noise, grid, callback=record, cond=cond)
    return states, vels


def batch_costs(
    states: Tensor, velocities: Tensor, times: np.ndarray, metric: str | Metric = "sq_l2"
) -> Tensor:
    """Per-sample one-step costs for a batch of trajectories.

    Args:
        states: (B, N + 1, ...) fine states.
        velocities: (B, N, ...) velocities at the first N states.
        times: (N + 1,) fine grid.
        metric: ``"sq_l2"`` (fast float64 Gram path) or a name in :data:`METRICS` or a callable.

    Returns:
        (B, N + 1, N + 1) float64 per-sample costs; entries with ``j <= i`` are 0.
    """
    _, fn = _metric(metric)
    b, n1 = states.shape[:2]
    n = n1 - 1
    tau = torch.tensor(np.array(times, dtype=np.float64), device=states.device)
    delta = (tau[None, :] - tau[:, None])[:n]  # (N, N+1): tau_j - tau_i for i < N
    upper = torch.ones(n1, n1, dtype=torch.bool, device=states.device).triu(1)
    if fn is None:
        x = states.reshape(b, n1, -1).double()
        v = velocities.reshape(b, n, -1).double()
        gxx = x @ x.transpose(1, 2)  # (B, N+1, N+1): <x_i, x_j>
        gvx = v @ x.transpose(1, 2)  # (B, N, N+1):   <v_i, x_j>
        sq_x = gxx.diagonal(dim1=1, dim2=2)  # |x_i|^2
        sq_v = v.pow(2).sum(-1)  # |v_i|^2
        # || x_i - x_j + d v_i ||^2 = |x_i|^2 + |x_j|^2 - 2<x_i,x_j> + 2d(<v_i,x_i> - <v_i,x_j>) + d^2|v_i|^2
        vx_ii = gvx.diagonal(dim1=1, dim2=2)  # <v_i, x_i>, (B, N)
        c = (
            sq_x[:, :n, None]
            + sq_x[:, None, :]
            - 2.0 * gxx[:, :n, :]
            + 2.0 * delta * (vx_ii[:, :, None] - gvx)
            + delta.pow(2) * sq_v[:, :, None]
        )
        out = torch.zeros(b, n1, n1, dtype=torch.float64, device=states.device)
        out[:, :n, :] = c.clamp_min_(0.0)
        return out * upper
    out = torch.zeros(b, n1, n1, dtype=torch.float64, device=states.device)
    for i in range(n):
        targets = states[:, i + 1 :]  # (B, N - i, ...)
        d = delta[i, i + 1 :].to(states.dtype).view(1, -1, *([1] * (states.ndim - 2)))
        preds = states[:, i : i + 1] + d * velocities[:, i : i + 1]
        vals = fn(preds.flatten(0, 1), targets.flatten(0, 1))
        if vals.shape != (preds.shape[0] * preds.shape[1],):
            raise CostMatrixError(
                f"metric returned shape {tuple(vals.shape)}; it must return one value per sample, "
                f"shape ({preds.shape[0] * preds.shape[1]},)"
            )
        out[:, i, i + 1 :] = vals.double().view(b, -1)
    return out


@dataclass
class CostMatrix:
    """Accumulated one-step costs on a fine grid.

    Attributes:
        grid: the fine grid (N + 1 times).
        sum: (N + 1, N + 1) float64, sum over samples of the per-sample costs.
        sumsq: (N + 1, N + 1) float64, sum of their squares (for standard errors).
        count: number of samples accumulated.
        metric: the metric's name.
        meta: JSON-serialisable facts (model id, seed, ...), carried into schedules.
        identity: what the sums were measured on, set by :func:`cost_matrix`: the weights'
            fingerprint (``None`` for a plain callable), noise sample 0's fingerprint, the noise
            dtype, the sample shape and the seed. A run resuming a cache must match it.
    """

    grid: Schedule
    sum: np.ndarray
    sumsq: np.ndarray
    count: int = 0
    metric: str = "sq_l2"
    meta: dict[str, Any] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, grid: Schedule, metric: str = "sq_l2", meta: dict | None = None) -> CostMatrix:
        n1 = len(grid.times)
        z = np.zeros((n1, n1), dtype=np.float64)
        return cls(grid, z, z.copy(), 0, metric, dict(meta or {}))

    @property
    def n(self) -> int:
        """Number of fine intervals N."""
        return len(self.grid.times) - 1

    @property
    def values(self) -> np.ndarray:
        """(N + 1, N + 1) float64 mean cost ``c[i, j]`` (0 for ``j <= i``)."""
        if self.count == 0:
            raise CostMatrixError("the cost matrix has no samples yet")
        return self.sum / self.count

    @property
    def stderr(self) -> np.ndarray:
        """(N + 1, N + 1) standard error of each mean ``c[i, j]`` over samples."""
        if self.count < 2:
            return np.full_like(self.sum, np.nan)
        mean = self.sum / self.count
        var = np.maximum(self.sumsq / self.count - mean**2, 0.0) * self.count / (self.count - 1)
        return np.sqrt(var / self.count)

    def update(self, costs: Tensor) -> None:
        """Add a batch of per-sample costs, (B, N + 1, N + 1) float64."""
        c = costs.detach().to("cpu", torch.float64)
        self.sum += c.sum(0).numpy()
        self.sumsq += c.pow(2).sum(0).numpy()
        self.count += int(c.shape[0])

    def merge(self, other: CostMatrix) -> CostMatrix:
        """The sum of two partial results on the same grid and metric (e.g. two processes)."""
        if not np.array_equal(self.grid.times, other.grid.times) or self.metric != other.metric:
            raise CostMatrixError("cannot merge cost matrices made on different grids or metrics")
        mine, theirs = (m.identity.get("model_fingerprint") for m in (self, other))
        if mine != theirs:
            raise CostMatrixError(
                f"cannot merge cost matrices of different models (weights fingerprints {mine} and "
                f"{theirs})"
            )
        guidance = [m.identity.get("guidance") for m in (self, other)]
        if guidance[0] != guidance[1]:  # the weights' fingerprint does not see a Guided wrapper
            raise CostMatrixError(
                f"cannot merge cost matrices of differently guided fields ({guidance[0]} and "
                f"{guidance[1]}): another scale or unconditional input is another field"
            )
        first = [m.identity.get("noise_fingerprint") for m in (self, other)]
        if first[0] is not None and first[0] == first[1]:
            raise CostMatrixError(
                "both cost matrices start from the same noise sample, so they overlap and merging "
                "would count those samples twice; make the other from other noises (another seed, "
                "or an offset into the same source)"
            )
        # other noises (that is the point of merging): only the model stays common
        same = self.identity == other.identity
        identity = dict(self.identity) if same else {"model_fingerprint": mine}
        if not same and guidance[0] is not None:
            identity["guidance"] = guidance[0]
        return CostMatrix(
            self.grid,
            self.sum + other.sum,
            self.sumsq + other.sumsq,
            self.count + other.count,
            self.metric,
            dict(self.meta),
            identity,
        )

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write as ``.npz`` (atomically). Holds sums, count, grid, metric and meta."""
        from ..io import atomic_write

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    sum=self.sum,
                    sumsq=self.sumsq,
                    count=np.int64(self.count),
                    grid=np.asarray(self.grid.times),
                    metric=np.str_(self.metric),
                    meta=np.str_(json.dumps(self.meta)),
                    identity=np.str_(json.dumps(self.identity)),
                    values=self.values if self.count else self.sum,
                )

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CostMatrix:
        """Read a file written by :meth:`save`; a clear error if it is not one."""
        import zipfile

        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                keys = ("grid", "sum", "sumsq", "count", "metric", "meta")
                arrays = {k: data[k] for k in keys}
                if "identity" in data.files:  # caches before bossflow recorded it have none
                    arrays["identity"] = data["identity"]
        except FileNotFoundError:
            raise CheckpointError(f"cost matrix file {path} does not exist") from None
        except OSError as err:
            if err.errno is None:  # numpy's words for a file it cannot parse
                raise CheckpointError(
                    f"{path} is not a readable bossflow cost matrix ({err}); delete it to recompute"
                ) from None
            # too many open files, permissions, I/O: the file may well be fine
            raise BossflowError(
                f"cannot read cost matrix {path}: {err.strerror or err} (the file is not "
                "necessarily damaged; fix that and rerun)"
            ) from None
        except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise CheckpointError(
                f"{path} is not a readable bossflow cost matrix ({err}); delete it to recompute"
            ) from None
        return cls._from_arrays(path, arrays)

    @classmethod
    def _from_arrays(cls, path: Path, arrays: dict[str, np.ndarray]) -> CostMatrix:
        """Check what :meth:`load` read: every value a cache can hold, else CheckpointError."""

        def bad(what: str) -> CheckpointError:
            return CheckpointError(
                f"{path} is not a valid bossflow cost matrix: {what}; delete it to recompute"
            )

        grid, s, sq, count = (arrays[k] for k in ("grid", "sum", "sumsq", "count"))
        if grid.ndim != 1 or grid.dtype.kind not in "fiu":
            raise bad(
                f"its grid is a {grid.dtype} array of shape {grid.shape}, not a list of times"
            )
        try:
            fine = Schedule(grid.astype(np.float64), method="fine")
        except BossflowError as err:
            raise bad(f"its grid is not a valid schedule ({err})") from None
        n1 = len(grid)
        for name, a in (("sum", s), ("sumsq", sq)):
            if a.shape != (n1, n1) or a.dtype.kind not in "fiu":
                raise bad(
                    f"{name} is a {a.dtype} array of shape {a.shape}, not ({n1}, {n1}) numbers"
                )
            if not np.isfinite(a).all():
                raise bad(f"{name} holds NaN or infinite values")
        if count.shape != () or count.dtype.kind not in "iu" or int(count) < 0:
            shown = count.tolist() if count.size == 1 else f"of shape {count.shape}"
            raise bad(f"its sample count {shown} is not a whole number >= 0")
        if arrays["metric"].shape != () or arrays["metric"].dtype.kind != "U":
            raise bad("its metric is not a name")
        metric = str(arrays["metric"])
        # squares are never negative, nor are the built-in metrics' costs (a custom metric may be)
        if (sq < 0).any() or (metric in METRICS and (s < 0).any()):
            raise bad("it holds negative cost sums")
        if int(count) == 0 and (s.any() or sq.any()):
            raise bad("it counts 0 samples but holds non-zero sums")
        parsed = {}
        for key in ("meta", "identity"):
            try:
                parsed[key] = json.loads(str(arrays[key])) if key in arrays else {}
            except ValueError:
                parsed[key] = None
            if not isinstance(parsed[key], dict):
                raise bad(f"its {key} is not a JSON object")
        return cls(
            fine,
            s.astype(np.float64),
            sq.astype(np.float64),
            int(count),
            metric,
            parsed["meta"],
            parsed["identity"],
        )


# How the settings a cache records are named in the message refusing it.
_IDENTITY_LABELS = {
    "model_fingerprint": "model (fingerprint of its weights and how it is called)",
    "noise_fingerprint": "noise (fingerprint of sample 0)",
    "noise_dtype": "noise dtype",
    "sample_shape": "sample shape",
    "seed": "seed",
    "cond_fingerprint": "conditioning (first rows)",
    "guidance": "guidance (scale, unconditional inputs)",
}


def _check_cache(
    cache: str | os.PathLike,
    acc: CostMatrix,
    fine: Schedule,
    metric: str,
    identity: dict,
    take_cond: Callable,
    total: int,
) -> None:
    """Refuse a cache measured on another grid, metric, model, noise or seed."""
    redo = f"delete {cache} to recompute, or use another --out (another cache path)"
    if not np.array_equal(acc.grid.times, fine.times):
        raise CheckpointError(
            f"cache {cache} was made with another grid ({acc.n} fine intervals there, "
            f"{len(fine.times) - 1} now, or other times); {redo}"
        )
    if acc.metric != metric:
        raise CheckpointError(
            f"cache {cache} was made with another metric ({acc.metric!r} there, {metric!r} now); "
            f"{redo}"
        )
    if not acc.identity:
        raise CheckpointError(
            f"cache {cache} does not record which model and noise it was made with (an older "
            f"bossflow wrote it), so it cannot be checked; {redo}"
        )
    key = "cond_fingerprint"  # the same first rows: a cache grown to more samples
    differ = [
        f"{_IDENTITY_LABELS.get(k, k)}: {acc.identity.get(k)!r} there, {v!r} now"
        for k, v in identity.items()
        if acc.identity.get(k) != v
        and not (k == key and v is not None and same_cond(acc.identity.get(k), take_cond, total))
    ]
    if differ:
        raise CheckpointError(
            f"cache {cache} was made with another model, noise or seed ({'; '.join(differ)}); "
            f"{redo}"
        )


def cost_matrix(
    field: VelocityField,
    noise: NoiseLike,
    grid: Schedule | int | Sequence[float] | None = None,
    batch_size: int = 64,
    metric: str | Metric = "sq_l2",
    samples: int | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
    cond: CondLike | None = None,
) -> CostMatrix:
    """Measure the one-step cost matrix of ``field`` (paper eq. 5) on fine Euler trajectories.

    Args:
        field: velocity field ``v(x, t)``.
        noise: an (M, ...) tensor of noises, or a callable ``noise(range(a, b)) -> (b - a, ...)``
            (e.g. :class:`~bossflow.noise.NoiseSource`), then ``samples`` gives M.
        grid: the fine grid: a Schedule, an int N for the uniform grid (default 100), or a list.
        batch_size: trajectories integrated at once (memory O(batch_size * N * D)).
        metric: ``"sq_l2"`` (the paper's, fast path), another name in :data:`METRICS`, or a callable
            ``metric(pred, target) -> (n,)`` on (n, ...) tensors (direct path).
        samples: M when ``noise`` is a callable (ignored for a tensor, whose length is M).
        cache: optional ``.npz`` path. Progress is saved there atomically after every batch and a
            run finding a compatible cache resumes from it (samples already counted are skipped).
            The cache records the grid, the metric, a fingerprint of the field's weights and of
            noise sample 0, the noise dtype, the sample shape and the seed.
        progress: show a tqdm progress bar.
        meta: facts stored with the result (model id, seed, ...).
        cond: per-sample conditioning for a conditional field: a dict of (M, ...) tensors (row m
            goes with noise m) or ``cond(range) -> dict``; sliced with the noise batches, so the
            result does not depend on ``batch_size``. A guided field is a
            :class:`~bossflow.field.Guided`.

    Returns:
        A :class:`CostMatrix`; ``.values`` is the (N + 1, N + 1) float64 matrix ``c``.

    Raises:
        CheckpointError: ``cache`` is not a valid cost matrix, or was made with another grid,
            metric, model, noise, seed or meta value, or holds more samples than asked.
    """
    fine = resolve_grid(grid)
    name, _ = _metric(metric)
    if cache is not None and name == "<lambda>":
        raise ConfigError(
            "a cached cost matrix records its metric by name; pass a named function (def ...) "
            "instead of a lambda so a resumed run can check it uses the same metric"
        )
    total, take = noise_reader(noise, samples, "the cost matrix")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")

    take_cond = cond_reader(cond, total, "the cost matrix")
    first = take(range(0, 1))
    identity = {
        "model_fingerprint": module_fingerprint(field),
        "noise_fingerprint": noise_fingerprint(first[0]),
        "noise_dtype": str(first.dtype).removeprefix("torch."),
        "sample_shape": list(first.shape[1:]),
        "seed": (meta or {}).get("seed", getattr(noise, "seed", None)),
        "cond_fingerprint": cond_fingerprint(take_cond, total),
        "guidance": guidance_identity(field),
    }
    identity = json.loads(json.dumps(identity, default=str))  # as a cache holds it
    acc = CostMatrix.empty(fine, name, meta)
    acc.identity = identity
    # several processes: rank 0 reads and checks the cache, the others get what it found
    if cache is not None and dist.is_rank_zero() and Path(cache).exists():
        with dist.fail_together():
            acc = _resume(cache, acc, fine, name, identity, total, meta, take_cond)
    acc = dist.broadcast_object(acc)

    bar = None
    if progress and dist.is_rank_zero():
        from ..progress import progress_bar

        bar = progress_bar(total=total, initial=acc.count, desc="cost matrix", unit="traj")
    try:
        while acc.count < total:
            if dist.is_distributed():
                rows = _distributed_round(
                    acc, field, take, take_cond, fine, metric, batch_size, total
                )
            else:
                rows = range(acc.count, min(acc.count + batch_size, total))
                z = take(rows)
                states, vels = fine_trajectories(field, z, fine, take_cond(rows))
                acc.update(batch_costs(states, vels, fine.times, metric))
            if cache is not None:
                acc.save(cache)  # rank 0 only (atomic_write; a failure reaches the others)
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    return acc


def _resume(
    cache: str | os.PathLike,
    acc: CostMatrix,
    fine: Schedule,
    name: str,
    identity: dict,
    total: int,
    meta: dict[str, Any] | None,
    take_cond: Callable,
) -> CostMatrix:
    """The accumulator stored in ``cache``, checked against this run (grid, metric, identity,
    sample count, meta)."""
    acc = CostMatrix.load(cache)
    _check_cache(cache, acc, fine, name, identity, take_cond, total)
    if acc.count > total:
        raise CheckpointError(
            f"cache {cache} already holds {acc.count} samples, more than the {total} asked"
        )
    stored = json.loads(json.dumps(meta or {}))  # compare as the cache holds it (tuples -> lists)
    clash = {k for k, v in stored.items() if k in acc.meta and acc.meta[k] != v}
    if clash:
        raise CheckpointError(
            f"cache {cache} was made with other settings ({', '.join(sorted(clash))} differ); "
            "delete it or pass another path"
        )
    acc.meta.update(meta or {})
    acc.identity = dict(identity)  # the conditioning's fingerprint now covers `total` samples
    return acc


def _distributed_round(
    acc: CostMatrix,
    field: VelocityField,
    take: Callable,
    take_cond: Callable,
    fine: Schedule,
    metric: str | Metric,
    batch_size: int,
    total: int,
) -> range:
    """One round of a multi-process run: each rank integrates its batch of the next
    ``world_size * batch_size`` samples; sums, squares and counts are all-reduced in float64 and
    added to ``acc`` on every rank. Returns the samples the round covered."""
    rows, end = dist.round_rows(acc.count, total, batch_size)
    n1 = len(fine.times)
    part = torch.zeros(2 * n1 * n1 + 1, dtype=torch.float64)
    with dist.fail_together():  # a rank that fails here tells the others, waiting below
        if len(rows):
            states, vels = fine_trajectories(field, take(rows), fine, take_cond(rows))
            c = batch_costs(states, vels, fine.times, metric).detach().to("cpu", torch.float64)
            part[: n1 * n1] = c.sum(0).flatten()
            part[n1 * n1 : -1] = c.pow(2).sum(0).flatten()
            part[-1] = len(rows)
    part = dist.all_reduce_sum_float64(part)
    covered = range(acc.count, end)
    if int(part[-1]) != len(covered):  # every rank must have taken the same rows
        raise CostMatrixError(
            f"the processes counted {int(part[-1])} samples in a round of {len(covered)}; every "
            "rank must be given the same noise, samples and batch_size"
        )
    acc.sum += part[: n1 * n1].view(n1, n1).numpy()
    acc.sumsq += part[n1 * n1 : -1].view(n1, n1).numpy()
    acc.count = end
    return covered
