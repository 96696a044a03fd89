"""Evaluating samplers: each method's samples from the same noises, scored against a reference.

A method is an :class:`EvalEntry`: a label (any text, see :func:`bossflow.metrics.method_rank`), a
velocity field, a schedule (or a :class:`~bossflow.sampler.Sampler`, which brings its solver and
per-step scales) and a solver. :func:`evaluate_methods` samples every entry from the
same noises, counts its function evaluations with :class:`~bossflow.field.NFECounter` (the NFE
reported is counted, and must equal what the solver promises on that schedule) and scores the
samples with :func:`~bossflow.metrics.evaluate_samples`. New samplers plug in as new entries; no
list of method names needs editing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import distributed as dist
from .errors import BossflowError
from .field import NFECounter, VelocityField
from .metrics import EvalRecord, _check_method, evaluate_samples
from .noise import cond_reader
from .sampler import Sampler
from .schedule import Schedule
from .solvers import nfe_for, sample

__all__ = ["EvalEntry", "evaluate_methods"]


@dataclass(frozen=True)
class EvalEntry:
    """One method to evaluate.

    Attributes:
        label: the method's label in reports (e.g. ``"bellman"``, ``"boss"``, ``"learned"``).
        field: its velocity field ``v(x, t)``.
        schedule: the time grid it samples on, or a sampler.
        solver: the solver name (:data:`bossflow.solvers.SOLVERS`); default: the sampler's, else
            Euler. A solver other than a sampler's own is refused.
        iterations: fine-tuning iterations behind the field, if it was fine-tuned.
    """

    label: str
    field: VelocityField
    schedule: Schedule | Sampler
    solver: str | None = None
    iterations: int | None = None

    def __post_init__(self) -> None:
        _check_method(self.label)
        own = getattr(self.schedule, "solver", None)
        if own is not None and self.solver not in (None, own):
            raise BossflowError(
                f"{self.label}: the sampler was made for the {own} solver, not {self.solver}"
            )
        object.__setattr__(self, "solver", self.solver or own or "euler")
        nfe_for(self.solver, 1)  # an unknown solver fails here, naming the valid ones

    @property
    def nfe(self) -> int:
        """Function evaluations per sample: what the solver takes on this schedule."""
        return nfe_for(self.solver, self.schedule.steps)


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_methods(
    entries: Sequence[EvalEntry],
    noise: Tensor,
    reference: Tensor,
    data: Tensor | None,
    features: Callable[[Tensor], Tensor] | None,
    log: Callable[[str], None] | None = None,
    cond: dict[str, Tensor] | None = None,
    data_range: float = 2.0,
) -> tuple[list[EvalRecord], dict[tuple[str, int], Tensor]]:
    """Sample every entry from ``noise`` and score it against ``reference``.

    Args:
        entries: the methods; two entries may not share a ``(label, nfe)``.
        noise: (B, ...) noises, the same for every method.
        reference: (B, ...) fine-solve samples from the same noises.
        data: held-out real data for the Fréchet distance, or ``None`` to skip it.
        features: feature extractor for the Fréchet distance (``None``: raw values).
        log: called with one line per method after it is scored (e.g. ``print``).
        cond: conditioning of the B noises for conditional fields (first dimension B or 1);
            every method gets the same.
        data_range: the data's value range, for PSNR (2 for data in [-1, 1], 1 for [0, 1]).

    Returns:
        ``(records, samples)``: one :class:`~bossflow.metrics.EvalRecord` per entry, and the
        samples keyed by ``(label, nfe)``.
    """
    keys = [(e.label, e.nfe) for e in entries]
    clash = sorted({k for k in keys if keys.count(k) > 1})
    if clash:
        label, nfe = clash[0]
        raise BossflowError(
            f"two methods would both be reported as {label} at {nfe} NFE; give them different "
            "labels or evaluate them in separate runs"
        )
    records, outs = [], {}
    take_cond = cond_reader(cond, noise.shape[0], "evaluation")
    for entry in entries:
        counter = NFECounter(entry.field)
        synchronize(noise.device)  # on a GPU the clock must see the work done, not queued
        start = time.perf_counter()
        if dist.is_distributed():  # each process samples its block of noises; all get all

            def block(r: range, e: EvalEntry = entry, c: NFECounter = counter) -> Tensor:
                rows = take_cond(r)
                return sample(c, noise[r.start : r.stop], e.schedule, solver=e.solver, cond=rows)

            x = dist.map_rows(block, noise.shape[0], noise.device)
            counter.nfe = max(dist.all_gather_object(counter.nfe))  # 0 where a rank had no rows
        else:
            x = sample(counter, noise, entry.schedule, solver=entry.solver, cond=cond)
        synchronize(noise.device)
        wall = time.perf_counter() - start
        if counter.nfe != entry.nfe:  # a field that calls itself, or a solver that lies
            raise BossflowError(
                f"{entry.label}: counted {counter.nfe} evaluations, expected {entry.nfe} for "
                f"{entry.solver} on {entry.schedule.steps} steps"
            )
        record = evaluate_samples(
            x, reference, data, features, entry.label, counter.nfe, wall, entry.iterations,
            data_range=data_range,
        )  # fmt: skip
        records.append(record)
        outs[(entry.label, entry.nfe)] = x
        if log is not None:
            log(f"  {entry.label:>10} NFE {entry.nfe}: MSE {record.mse_to_reference:.4g}")
    return records, outs
