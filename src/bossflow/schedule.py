"""Schedules: strictly increasing time grids from 0 (noise) to 1 (data), as small value objects.

A schedule with ``K + 1`` points drives ``K`` steps of a solver (Euler: NFE = K; Heun and midpoint
use two evaluations per step, see :func:`bossflow.solvers.nfe_for`). It carries its provenance (how it was made) so a
JSON file on disk says where it came from.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ScheduleError

__all__ = [
    "Schedule",
    "uniform",
    "edm",
    "quadratic",
    "SCHEDULES",
    "make_schedule",
    "resolve_grid",
]

_FORMAT = "bossflow.schedule/1"


def _format_version(fmt: Any, family: str, where: str) -> int:
    """The version N of a ``bossflow.<family>/N`` format; one clear line for a newer one."""
    name, _, number = str(fmt).partition("/")
    if name != f"bossflow.{family}":
        raise ScheduleError(f"{where}: unknown format {fmt!r} (expected bossflow.{family}/N)")
    try:
        version = int(number)
    except ValueError:
        raise ScheduleError(f"{where}: unknown format {fmt!r}") from None
    if version < 1:
        raise ScheduleError(f"{where}: unknown format {fmt!r} (versions start at 1)")
    if version > 1:
        raise ScheduleError(
            f"{where} is a {family} file of format version {version}, written by a newer bossflow; "
            "this one reads version 1. Upgrade bossflow (pip install -U bossflow)."
        )
    return version


def read_schedule_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of a schedule or sampler file; one clear error if it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScheduleError(f"schedule file {path} does not exist") from None
    except OSError as err:
        raise ScheduleError(f"cannot read schedule file {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ScheduleError(f"schedule file {path} is not valid JSON: {err}") from None


def _validated_times(times: Any) -> np.ndarray:
    try:
        arr = np.asarray(times, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ScheduleError(f"schedule times must be a list of numbers: {err}") from None
    if arr.ndim != 1:
        raise ScheduleError(f"schedule times must be one-dimensional, got shape {arr.shape}")
    if arr.size < 2:
        raise ScheduleError(
            f"a schedule needs at least 2 times (0 and 1), got {arr.size}; a K-step schedule has "
            "K + 1 times"
        )
    if not np.isfinite(arr).all():
        raise ScheduleError(f"schedule times contain NaN or infinity: {arr.tolist()}")
    if arr[0] != 0.0 or arr[-1] != 1.0:
        raise ScheduleError(
            f"a schedule runs from 0 (noise) to 1 (data); got first {float(arr[0])!r} and last "
            f"{float(arr[-1])!r}. If your times run from 1 to 0 (diffusers sigmas), use "
            "Schedule.from_diffusers_sigmas."
        )
    steps = np.diff(arr)
    if (steps <= 0).any():
        bad = int(np.argmax(steps <= 0))
        raise ScheduleError(
            f"schedule times must be strictly increasing; times[{bad}] = {float(arr[bad])!r} >= "
            f"times[{bad + 1}] = {float(arr[bad + 1])!r}"
        )
    arr.setflags(write=False)
    return arr


def is_flow_match(scheduler: Any) -> bool:
    """Whether a diffusers scheduler is a flow-matching one (sigma = 1 - t, noise - data output)."""
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def check_sigmas_kept(scheduler: Any, steps: int) -> None:
    """Refuse a diffusers scheduler that would not take ``sigmas`` as given (re-shift, replace).

    Raises:
        ConfigError: naming what the scheduler would do and ``scheduler_for``, which takes
            exactly bossflow's steps whatever the scheduler's config.
    """
    config = getattr(scheduler, "config", None) or {}
    get = config.get if hasattr(config, "get") else lambda key, default=None: default
    name = type(scheduler).__name__
    if getattr(scheduler, "bossflow_sampler", None) is not None:
        raise ConfigError(
            f"{name} from bossflow.diffusers.scheduler_for already takes bossflow's steps and "
            f"ignores sigmas; call the pipeline with num_inference_steps={steps} and no sigmas="
        )
    if not is_flow_match(scheduler):
        raise ConfigError(
            f"{name} is not a flow-matching scheduler: it would read these sigmas (1 - t) as its "
            "own kind of noise levels; use them with a FlowMatch...Scheduler (shift 1)"
        )
    shift = getattr(scheduler, "shift", None)
    shift = get("shift", 1.0) if not isinstance(shift, (int, float)) else shift
    reasons = []
    if get("use_dynamic_shifting", False):
        reasons.append("use_dynamic_shifting: every pipeline call shifts them by its mu")
    if shift is not None and float(shift) != 1.0:
        reasons.append(f"shift={float(shift):g}")
    if get("use_flow_sigmas", False) and float(get("flow_shift", 1.0) or 1.0) != 1.0:
        reasons.append(f"flow_shift={get('flow_shift'):g}")
    if get("shift_terminal", None):
        reasons.append(f"shift_terminal={get('shift_terminal'):g}")
    keys = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
    for key in (*keys, "stochastic_sampling"):  # the last: steps re-noised, not Euler
        if get(key, False):
            reasons.append(f"{key}=True")
    if reasons:
        raise ConfigError(
            f"{name} would not take these sigmas as they are ({'; '.join(reasons)}), so the "
            "pipeline would take other steps than the schedule's. Use pipe.scheduler = "
            "bossflow.diffusers.scheduler_for(schedule, pipe.scheduler) and call the pipeline "
            f"with num_inference_steps={steps} and no sigmas="
        )


@dataclass(frozen=True)
class Schedule:
    """A time grid ``0 = t_0 < t_1 < ... < t_K = 1`` (float64) with its provenance.

    Attributes:
        times: (K + 1,) float64 array, read-only.
        method: how it was made (``"uniform"``, ``"edm"``, ``"bellman"``, ...).
        indices: for Bellman schedules, the positions of ``times`` in the fine grid, else ``None``.
        cost: for Bellman schedules, the total cost of the path (sum of c[i, j] along it).
        provenance: free-form facts (K_max, samples, metric, model id, seed, ...), JSON-serialisable.
    """

    times: np.ndarray
    method: str = "custom"
    indices: tuple[int, ...] | None = None
    cost: float | None = None
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "times", _validated_times(self.times))
        if self.indices is not None:
            idx = tuple(int(i) for i in self.indices)
            if len(idx) != len(self.times):
                raise ScheduleError(
                    f"indices has {len(idx)} entries but the schedule has {len(self.times)} times"
                )
            object.__setattr__(self, "indices", idx)
        if self.cost is not None:
            object.__setattr__(self, "cost", float(self.cost))
        object.__setattr__(self, "provenance", dict(self.provenance))

    # -- basic facts -------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of intervals K (= NFE for Euler)."""
        return len(self.times) - 1

    def __len__(self) -> int:
        return len(self.times)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (
            np.array_equal(self.times, other.times)
            and self.method == other.method
            and self.indices == other.indices
            and self.cost == other.cost
            and dict(self.provenance) == dict(other.provenance)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        times = ", ".join(f"{t:.4f}" for t in self.times)
        extra = f", cost={self.cost:.6g}" if self.cost is not None else ""
        return f"Schedule(method={self.method!r}, K={self.steps}, times=[{times}]{extra})"

    # -- exporters ---------------------------------------------------------------------------
    def to_time_grid(self, like: Any = None):
        """The times as a ``flow_matching`` ``time_grid``: a tensor on ``like``'s device, in its
        dtype but at least float32 (bf16 would round 0.996 and 0.998 to one time).

        Use with ``ODESolver.sample(time_grid=..., step_size=None, method="euler")``.
        """
        import torch

        if like is None:
            return torch.tensor(self.times, dtype=torch.float32)
        dtype = torch.promote_types(like.dtype, torch.float32)
        return torch.tensor(np.array(self.times), dtype=dtype, device=like.device)

    def to_diffusers_sigmas(self, scheduler: Any = None) -> list[float]:
        """diffusers ``sigmas`` (``1 - t``), decreasing from 1, without the final 0 diffusers appends.

        Only for a scheduler that uses the sigmas it is given as they are:
        ``FlowMatchEulerDiscreteScheduler(shift=1.0).set_timesteps(sigmas=...)``. The stock SD3
        (``shift=3``) and FLUX (``use_dynamic_shifting``) configs re-shift them, so
        ``pipe(sigmas=...)`` would silently take other steps; for a stock pipeline use
        ``pipe.scheduler = bossflow.diffusers.scheduler_for(schedule, pipe.scheduler)`` instead.

        Args:
            scheduler: optional: the diffusers scheduler the sigmas are meant for, checked.

        Raises:
            ConfigError: ``scheduler`` would re-shift or replace the sigmas.
        """
        if scheduler is not None:
            check_sigmas_kept(scheduler, self.steps)
        return [float(1.0 - t) for t in self.times[:-1]]

    @classmethod
    def from_diffusers_sigmas(cls, sigmas: Sequence[float], **kwargs: Any) -> Schedule:
        """Inverse of :meth:`to_diffusers_sigmas` (a trailing 0 is accepted)."""
        s = [float(v) for v in sigmas]
        if s and s[-1] != 0.0:
            s.append(0.0)
        return cls(np.asarray([1.0 - v for v in s]), **kwargs)

    def tolist(self) -> list[float]:
        return [float(t) for t in self.times]

    # -- JSON --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "method": self.method,
            "steps": self.steps,
            "times": self.tolist(),
            "indices": list(self.indices) if self.indices is not None else None,
            "cost": self.cost,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        if not isinstance(data, Mapping) or "times" not in data:
            raise ScheduleError("not a bossflow schedule: expected a JSON object with 'times'")
        fmt = str(data.get("format", _FORMAT))
        if fmt.startswith("bossflow.sampler/"):
            raise ScheduleError(
                "this is a sampler file (times, scales and a solver), not a plain schedule; read "
                "it with bossflow.load_schedule(path) or bossflow.sampler.Sampler.load(path)"
            )
        _format_version(fmt, "schedule", "the schedule")
        if data.get("scales") is not None or data.get("solver", "euler") != "euler":
            raise ScheduleError(
                "this holds a solver or per-step scales: a sampler, not a plain schedule; read it "
                "with bossflow.load_schedule(path) or bossflow.sampler.Sampler.from_dict"
            )
        try:
            return cls(
                times=data["times"],
                method=str(data.get("method", "custom")),
                indices=data.get("indices"),
                cost=data.get("cost"),
                provenance=data.get("provenance") or {},
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, ScheduleError):
                raise
            raise ScheduleError(f"not a valid bossflow schedule: {err}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the schedule as JSON (atomically: a temporary file, then a rename)."""
        from .io import atomic_write_text

        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a schedule written by :meth:`save` (or a JSON list of times)."""
        data = read_schedule_json(path)
        if isinstance(data, list):
            return times_from_list(data, path)
        return cls.from_dict(data)


def times_from_list(data: list, path: str | os.PathLike) -> Schedule:
    """The schedule of a JSON list of times read from ``path`` (errors name the file)."""
    try:
        return Schedule(data)
    except ScheduleError as err:
        raise ScheduleError(f"{path}: {err}") from None


def uniform(steps: int) -> Schedule:
    """``t_k = k / K``."""
    _check_steps(steps)
    return Schedule(np.linspace(0.0, 1.0, steps + 1), method="uniform")


def edm(
    steps: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0
) -> Schedule:
    """Karras et al. (EDM) spacing with exponent ``rho``, mapped to flow time.

    Noise levels ``sigma_k = (sigma_max^(1/rho) + k/K (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``k = 0..K`` become flow times by the signal-to-noise match ``t = 1 / (1 + sigma)`` (for
    ``x_t = t x + (1 - t) z``, ``x_t / t`` has noise level ``(1 - t) / t``); the end points are then
    pinned to 0 (pure noise) and 1 (data). Steps are small at both ends (the pinned first one
    included) and largest at mid-to-late times.
    """
    _check_steps(steps)
    if not (rho > 0 and 0 < sigma_min < sigma_max < math.inf):
        raise ScheduleError(
            f"edm needs rho > 0 and 0 < sigma_min < sigma_max, got rho={rho}, "
            f"sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    k = np.arange(steps + 1, dtype=np.float64) / steps
    inv = 1.0 / rho
    sigmas = (sigma_max**inv + k * (sigma_min**inv - sigma_max**inv)) ** rho
    times = 1.0 / (1.0 + sigmas)
    times[0], times[-1] = 0.0, 1.0
    return Schedule(
        times,
        method="edm",
        provenance={"rho": rho, "sigma_min": sigma_min, "sigma_max": sigma_max},
    )


def quadratic(steps: int) -> Schedule:
    """``t_k = 1 - (1 - k/K)^2``: small steps near the data."""
    _check_steps(steps)
    u = np.linspace(0.0, 1.0, steps + 1)
    return Schedule(1.0 - (1.0 - u) ** 2, method="quadratic")


def _check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ScheduleError(f"the number of steps must be a positive integer, got {steps!r}")


SCHEDULES = {"uniform": uniform, "edm": edm, "quadratic": quadratic}


def make_schedule(name: str, steps: int, **kwargs: Any) -> Schedule:
    """Build a named schedule; an unknown name lists the valid ones."""
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(
            f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)} or load a JSON file"
        ) from None
    return fn(steps, **kwargs)


def resolve_grid(grid: Schedule | int | Sequence[float] | None) -> Schedule:
    """A fine grid from a Schedule, a number of uniform intervals N (default 100) or a list of times."""
    if grid is None:
        return uniform(100)
    if isinstance(grid, Schedule):
        return grid
    if isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        return uniform(int(grid))
    return Schedule(np.asarray(grid, dtype=np.float64), method="custom")
