"""Samplers: a schedule, per-step velocity scales and a solver, as one small value object.

A :class:`Sampler` generalises :class:`~bossflow.schedule.Schedule`: times
``0 = t_0 < ... < t_K = 1``, optional per-step scales ``s_k`` (step
``x_{k+1} = x_k + s_k D_k`` with ``D_k`` the solver's increment, e.g. ``(t_{k+1} - t_k) v`` for
Euler) and a solver name from :data:`bossflow.solvers.SOLVERS` (``euler``, ``heun``,
``midpoint``, ``ab2``, ``ab3``). ``bossflow.sample(field, noise, sampler)`` runs it with exactly
:attr:`Sampler.nfe` evaluations. Learned samplers (:mod:`bossflow.learn`) are Samplers.

On disk a sampler is JSON with ``"format": "bossflow.sampler/1"``; :func:`load_schedule` reads
that and every schedule file bossflow writes (``bossflow.schedule/1``, or a plain list of times)
and refuses, with one clear line, a file from a newer format version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ScheduleError
from .schedule import _FORMAT as _SCHEDULE_FORMAT
from .schedule import (
    Schedule,
    _format_version,
    _validated_times,
    read_schedule_json,
    times_from_list,
)
from .solvers import SOLVERS, nfe_for

__all__ = ["Sampler", "load_schedule", "SAMPLER_FORMAT"]

SAMPLER_FORMAT = "bossflow.sampler/1"


def _validated_scales(scales: Any, steps: int) -> np.ndarray | None:
    if scales is None:
        return None
    try:
        arr = np.asarray(scales, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ScheduleError(f"sampler scales must be a list of numbers: {err}") from None
    if arr.shape != (steps,):
        raise ScheduleError(f"a {steps}-step sampler needs {steps} scales, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ScheduleError(
            f"sampler scales must be finite and positive, got {arr.tolist()}; the file is damaged "
            "or was not written by bossflow"
        )
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class Sampler:
    """Times, optional per-step velocity scales and a solver, with provenance.

    Attributes:
        times: (K + 1,) float64, strictly increasing from 0 to 1, read-only.
        solver: a name in :data:`bossflow.solvers.SOLVERS`.
        scales: (K,) positive float64 per-step scales, or ``None`` (all 1).
        method: how it was made (``"learned"``, ``"bellman"`` ...).
        provenance: free-form JSON-serialisable facts (model, teacher, held-out error ...).
    """

    times: np.ndarray
    solver: str = "euler"
    scales: np.ndarray | None = None
    method: str = "custom"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "times", _validated_times(self.times))
        if self.solver not in SOLVERS:
            raise ScheduleError(f"unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        object.__setattr__(self, "scales", _validated_scales(self.scales, len(self.times) - 1))
        object.__setattr__(self, "provenance", dict(self.provenance))

    @classmethod
    def from_schedule(
        cls, schedule: Schedule, solver: str = "euler", scales: Any = None, **kwargs: Any
    ) -> Sampler:
        """A sampler on a schedule's times (its method and provenance unless given)."""
        kwargs.setdefault("method", schedule.method)
        kwargs.setdefault("provenance", schedule.provenance)
        return cls(schedule.times, solver, scales, **kwargs)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of intervals K."""
        return len(self.times) - 1

    @property
    def nfe(self) -> int:
        """Function evaluations per sample: K for Euler and Adams-Bashforth, 2K for Heun/midpoint."""
        return nfe_for(self.solver, self.steps)

    @property
    def schedule(self) -> Schedule:
        """The times as a :class:`Schedule` (method and provenance kept; solver and scales not)."""
        return Schedule(self.times, method=self.method, provenance=self.provenance)

    @property
    def is_plain_euler(self) -> bool:
        """Euler with no scales other than 1: what a plain time-grid exporter can express."""
        return self.solver == "euler" and (self.scales is None or bool((self.scales == 1).all()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sampler):
            return NotImplemented

        def same(a, b):
            return (a is None and b is None) or (
                a is not None and b is not None and np.array_equal(a, b)
            )

        return (
            np.array_equal(self.times, other.times)
            and self.solver == other.solver
            and same(self.scales, other.scales)
            and self.method == other.method
            and dict(self.provenance) == dict(other.provenance)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        times = ", ".join(f"{t:.4f}" for t in self.times)
        scales = (
            ""
            if self.scales is None
            else ", scales=[" + ", ".join(f"{s:.3f}" for s in self.scales) + "]"
        )
        return f"Sampler({self.solver}, NFE={self.nfe}, times=[{times}]{scales})"

    # -- exporters -----------------------------------------------------------------------------
    def _plain(self, target: str) -> Schedule:
        if not self.is_plain_euler:
            what = f"the {self.solver} solver" + (
                " with per-step scales" if self.scales is not None else ""
            )
            raise ConfigError(
                f"this sampler uses {what}, which {target} cannot express (it takes a time grid "
                "for plain Euler steps); sample it with bossflow.sample(field, noise, sampler), "
                "or learn a plain Euler sampler (solver='euler', scales=False) to export"
            )
        return self.schedule

    def to_diffusers_sigmas(self, scheduler: Any = None) -> list[float]:
        """diffusers ``sigmas`` of a plain Euler sampler (see :meth:`Schedule.to_diffusers_sigmas`).

        Only for a scheduler that keeps the sigmas it is given (``shift=1``, no dynamic
        shifting); a stock SD3 or FLUX pipeline re-shifts them. For those, and for any solver or
        scales, use ``pipe.scheduler = bossflow.diffusers.scheduler_for(sampler, pipe.scheduler)``.

        Args:
            scheduler: optional: the diffusers scheduler the sigmas are meant for, checked.

        Raises:
            ConfigError: not plain Euler, or ``scheduler`` would re-shift or replace the sigmas.
        """
        if not self.is_plain_euler:
            raise ConfigError(
                f"this sampler uses the {self.solver} solver"
                + (" with per-step scales" if self.scales is not None else "")
                + ", which plain diffusers sigmas cannot express; in a diffusers pipeline set "
                "pipe.scheduler = bossflow.diffusers.scheduler_for(sampler, pipe.scheduler) "
                "(it takes the sampler's steps, solver and scales), or sample it with "
                "bossflow.sample(field, noise, sampler)"
            )
        return self.schedule.to_diffusers_sigmas(scheduler)

    def to_time_grid(self, like: Any = None):
        """flow_matching ``time_grid`` of a plain Euler sampler (see :meth:`Schedule.to_time_grid`)."""
        return self._plain("flow_matching's ODESolver").to_time_grid(like)

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SAMPLER_FORMAT,
            "method": self.method,
            "solver": self.solver,
            "steps": self.steps,
            "nfe": self.nfe,
            "times": [float(t) for t in self.times],
            "scales": None if self.scales is None else [float(s) for s in self.scales],
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "sampler") -> Sampler:
        if not isinstance(data, Mapping) or "times" not in data:
            raise ScheduleError(f"{where}: not a bossflow sampler (a JSON object with 'times')")
        _format_version(data.get("format", SAMPLER_FORMAT), "sampler", where)
        provenance = data.get("provenance") or {}
        if not isinstance(provenance, Mapping):
            raise ScheduleError(f"{where}: 'provenance' must be a JSON object")
        return cls(
            times=data["times"],
            solver=str(data.get("solver", "euler")),
            scales=data.get("scales"),
            method=str(data.get("method", "custom")),
            provenance=provenance,
        )

    def save(self, path: str | os.PathLike) -> Path:
        """Write the sampler as JSON, atomically. Floats round-trip exactly."""
        from .io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sampler:
        """Read a sampler file; a plain schedule file becomes an Euler sampler."""
        loaded = load_schedule(path)
        return loaded if isinstance(loaded, Sampler) else cls.from_schedule(loaded)


def load_schedule(path: str | os.PathLike) -> Schedule | Sampler:
    """Read any schedule file bossflow writes: a :class:`Schedule` or a :class:`Sampler`.

    ``bossflow.schedule/1`` files (Bellman, uniform ...) and plain JSON lists of times give a
    Schedule; ``bossflow.sampler/1`` files (learned samplers) a Sampler. Both run with
    ``bossflow.sample(field, noise, obj)``.

    Raises:
        ScheduleError: missing or unreadable file, not JSON, not a schedule, or a format version
            newer than this bossflow reads (one line saying so).
    """
    path = Path(path)
    data = read_schedule_json(path)
    if isinstance(data, list):
        return times_from_list(data, path)
    if not isinstance(data, Mapping):
        raise ScheduleError(f"{path} is not a bossflow schedule (a JSON object or list of times)")
    # no format but a solver or scales: a sampler written by hand (as a schedule, they were lost)
    sampler_like = "format" not in data and ("solver" in data or "scales" in data)
    fmt = str(data.get("format", SAMPLER_FORMAT if sampler_like else _SCHEDULE_FORMAT))
    if fmt.startswith("bossflow.sampler/"):
        return Sampler.from_dict(data, str(path))
    if fmt.startswith("bossflow.schedule/"):
        _format_version(fmt, "schedule", str(path))
        return Schedule.from_dict(data)
    raise ScheduleError(f"{path}: unknown format {fmt!r}; expected a bossflow schedule or sampler")
