"""ODE solvers on any schedule: Euler, Heun, midpoint, and reference solves.

All solvers integrate ``dx/dt = v(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data) on the times of a
:class:`~bossflow.schedule.Schedule` (or any strictly increasing 0..1 grid), return the final state
(a tensor shaped like the noise, same dtype and device) and report intermediate states through an
optional ``callback(info: dict)``; the return type never depends on an option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .field import VelocityField, call_field, time_dtype
from .schedule import Schedule, uniform

__all__ = ["sample", "euler", "heun", "midpoint", "reference_solve", "SOLVERS", "nfe_for"]

Callback = Callable[[dict[str, Any]], None]


def _times(schedule: Schedule | Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(schedule, Schedule):
        return schedule.times
    if isinstance(schedule, Tensor):
        schedule = schedule.detach().cpu().double().numpy()
    return Schedule(np.asarray(schedule, dtype=np.float64)).times


def _eval(field: VelocityField, x: Tensor, t: float) -> Tensor:
    tt = torch.full((x.shape[0],), t, dtype=time_dtype(x), device=x.device)
    return call_field(field, x, tt)


def _step_euler(field, x, t, t_next):
    v = _eval(field, x, t)
    return x + (t_next - t) * v, v


def _step_heun(field, x, t, t_next):
    h = t_next - t
    v = _eval(field, x, t)
    x_pred = x + h * v
    v_next = _eval(field, x_pred, t_next)
    return x + 0.5 * h * (v + v_next), v


def _step_midpoint(field, x, t, t_next):
    h = t_next - t
    v = _eval(field, x, t)
    v_mid = _eval(field, x + 0.5 * h * v, t + 0.5 * h)
    return x + h * v_mid, v


# name -> (step function, evaluations per step)
SOLVERS: dict[str, tuple[Callable, int]] = {
    "euler": (_step_euler, 1),
    "heun": (_step_heun, 2),
    "midpoint": (_step_midpoint, 2),
}


def _solver(name: str) -> tuple[Callable, int]:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ConfigError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def nfe_for(solver: str, steps: int) -> int:
    """Function evaluations of ``solver`` over ``steps`` intervals (Euler K, Heun/midpoint 2K)."""
    return _solver(solver)[1] * steps


def sample(
    field: VelocityField,
    noise: Tensor,
    schedule: Schedule | Sequence[float] | np.ndarray | Tensor,
    solver: str = "euler",
    callback: Callback | None = None,
    grad: bool = False,
) -> Tensor:
    """Integrate from ``noise`` at t = 0 to t = 1 on the schedule's times.

    Euler: ``x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k)`` (one evaluation per step). Heun adds a
    trapezoidal correction with ``v(x_pred, t_{k+1})``; midpoint evaluates at ``t_k + h/2``.

    Args:
        field: velocity field ``v(x, t)``, ``x: (B, ...)``, ``t: (B,)``.
        noise: (B, ...) starting states; the result has its dtype and device.
        schedule: a :class:`Schedule` or a strictly increasing grid from 0 to 1.
        solver: ``"euler"``, ``"heun"`` or ``"midpoint"``.
        callback: called after every step with ``{"i", "t", "t_next", "x", "v", "x_next"}``
            (``v`` is the velocity at ``(x, t)``).
        grad: keep the autograd graph (off by default: sampling runs under ``torch.no_grad``).

    Returns:
        (B, ...) the states at t = 1.
    """
    step, _ = _solver(solver)
    times = _times(schedule)
    x = noise
    with nullcontext() if grad else torch.no_grad():
        for i in range(len(times) - 1):
            t, t_next = float(times[i]), float(times[i + 1])
            x_next, v = step(field, x, t, t_next)
            if callback is not None:
                callback({"i": i, "t": t, "t_next": t_next, "x": x, "v": v, "x_next": x_next})
            x = x_next
    return x


def euler(field: VelocityField, noise: Tensor, schedule, **kwargs: Any) -> Tensor:
    """:func:`sample` with ``solver="euler"``."""
    return sample(field, noise, schedule, solver="euler", **kwargs)


def heun(field: VelocityField, noise: Tensor, schedule, **kwargs: Any) -> Tensor:
    """:func:`sample` with ``solver="heun"``."""
    return sample(field, noise, schedule, solver="heun", **kwargs)


def midpoint(field: VelocityField, noise: Tensor, schedule, **kwargs: Any) -> Tensor:
    """:func:`sample` with ``solver="midpoint"``."""
    return sample(field, noise, schedule, solver="midpoint", **kwargs)


def reference_solve(
    field: VelocityField,
    noise: Tensor,
    method: str = "euler",
    steps: int = 1000,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Tensor:
    """A fine solve used as ground truth: ``steps``-step Euler/Heun, or adaptive ``"dopri5"``.

    ``"dopri5"`` uses ``torchdiffeq`` (extra ``ode``) at the given tolerances; the others are
    :func:`sample` on the uniform grid of ``steps`` intervals.

    Returns:
        (B, ...) states at t = 1, dtype and device of ``noise``.
    """
    if method == "dopri5":
        from .errors import require

        torchdiffeq = require("torchdiffeq", "ode", "the dopri5 reference solver")

        def rhs(t: Tensor, x: Tensor) -> Tensor:
            return call_field(field, x, t.expand(x.shape[0]).to(time_dtype(x)))

        grid = torch.tensor([0.0, 1.0], dtype=noise.dtype, device=noise.device)
        with torch.no_grad():
            return torchdiffeq.odeint(rhs, noise, grid, method="dopri5", rtol=rtol, atol=atol)[-1]
    return sample(field, noise, uniform(steps), solver=method)
