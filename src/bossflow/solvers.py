"""ODE solvers on any schedule: Euler, Heun, midpoint, variable-step Adams-Bashforth 2/3, and
reference solves.

All solvers integrate ``dx/dt = v(x, t)`` from ``t = 0`` (noise) to ``t = 1`` (data) on the times of a
:class:`~bossflow.schedule.Schedule` (or any strictly increasing 0..1 grid), return the final state
(a tensor shaped like the noise, same dtype and device) and report intermediate states through an
optional ``callback(info: dict)``; the return type never depends on an option.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError
from .field import VelocityField, bind_cond, call_field, check_cond, eval_mode, time_dtype
from .schedule import Schedule, uniform

__all__ = [
    "sample",
    "euler",
    "heun",
    "midpoint",
    "reference_solve",
    "SOLVERS",
    "Solver",
    "nfe_for",
    "adams_bashforth_weights",
]

Callback = Callable[[dict[str, Any]], None]


def _times(schedule: Schedule | Sequence[float] | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(schedule, Schedule) or hasattr(schedule, "solver"):
        return schedule.times
    if isinstance(schedule, Tensor):
        schedule = schedule.detach().cpu().double().numpy()
    return Schedule(np.asarray(schedule, dtype=np.float64)).times


Time = Any  # a Python float, or a 0-dim tensor when the times themselves are being learned


def _eval(field: VelocityField, x: Tensor, t: Time) -> Tensor:
    if isinstance(t, Tensor):  # learned times: keep the graph from t to the model's input
        tt = t.to(device=x.device, dtype=time_dtype(x)).expand(x.shape[0])
    else:
        tt = torch.full((x.shape[0],), t, dtype=time_dtype(x), device=x.device)
    # in the states' dtype: a field returning float32 for bf16 states would otherwise promote
    # the whole solve to float32
    return call_field(field, x, tt).to(x.dtype)


# A step returns the increment ``x_{k+1} - x_k`` (before any per-step scale) and ``v(x_k, t_k)``.
# ``past`` is the solve's list of earlier ``(t_j, v_j)``; only multistep solvers use it.


def _step_euler(field, x, t, t_next, past):
    v = _eval(field, x, t)
    return (t_next - t) * v, v


def _step_heun(field, x, t, t_next, past):
    h = t_next - t
    v = _eval(field, x, t)
    x_pred = x + h * v
    v_next = _eval(field, x_pred, t_next)
    return 0.5 * h * (v + v_next), v


def _step_midpoint(field, x, t, t_next, past):
    h = t_next - t
    v = _eval(field, x, t)
    v_mid = _eval(field, x + 0.5 * h * v, t + 0.5 * h)
    return h * v_mid, v


def adams_bashforth_weights(nodes: Sequence[Time], t_next: Time) -> list[Time]:
    """Weights ``w_j`` of the variable-step Adams–Bashforth step ``x' = x + sum_j w_j f_j``.

    The velocities ``f_j`` at the past times ``nodes`` (oldest first, the last one the current
    time ``t``) are interpolated by the polynomial through them, and that polynomial is integrated
    from ``t`` to ``t_next``: ``w_j = int_t^{t_next} L_j(s) ds`` with ``L_j`` the Lagrange basis.
    With one node this is Euler (``w = h``); with two, the variable-step AB2
    ``w = (-h^2 / (2 h'), h + h^2 / (2 h'))`` for the previous step ``h'``. Works on Python floats
    and on (differentiable) 0-dim tensors alike; up to three nodes (order 3).
    """
    t = nodes[-1]
    h = t_next - t
    tau = [n - t for n in nodes]  # <= 0; the last is 0
    if len(tau) == 1:
        return [h]
    if len(tau) == 2:
        a = tau[0]  # the other node of each basis polynomial: L_0 ~ (u - 0), L_1 ~ (u - a)
        return [h * h / (2 * a), (h * h / 2 - a * h) / (-a)]
    if len(tau) == 3:
        out = []
        for j in range(3):
            a, b = (tau[m] for m in range(3) if m != j)
            integral = h * h * h / 3 - (a + b) * h * h / 2 + a * b * h  # int_0^h (u-a)(u-b) du
            out.append(integral / ((tau[j] - a) * (tau[j] - b)))
        return out
    raise ConfigError(f"Adams-Bashforth is implemented up to order 3, got {len(tau)} nodes")


def _adams_bashforth(order: int) -> Callable:
    def step(field, x, t, t_next, past):
        v = _eval(field, x, t)
        past.append((t, v))
        del past[:-order]  # the last `order` velocities; fewer at the start (first step Euler)
        weights = adams_bashforth_weights([s for s, _ in past], t_next)
        increment = weights[0] * past[0][1]
        for w, (_, f) in zip(weights[1:], past[1:]):
            increment = increment + w * f
        return increment, v

    return step


@dataclass(frozen=True)
class Solver:
    """A solver in the registry: its step function, evaluations per step and order."""

    name: str
    step: Callable
    evals_per_step: int
    order: int
    description: str


#: name -> :class:`Solver`. Multistep solvers (``ab2``, ``ab3``) reuse the velocities of earlier
#: steps: one evaluation per step, the first steps with the lower orders (the first is Euler).
#: ``order`` is the method's once started: the Euler start's O(h^2) error stays in the solve, so
#: AB3's global error is second order like AB2's (and at 4-8 steps usually larger).
SOLVERS: dict[str, Solver] = {
    "euler": Solver("euler", _step_euler, 1, 1, "Euler, 1 evaluation per step"),
    "heun": Solver("heun", _step_heun, 2, 2, "Heun (trapezoidal), 2 evaluations per step"),
    "midpoint": Solver("midpoint", _step_midpoint, 2, 2, "midpoint, 2 evaluations per step"),
    "ab2": Solver(
        "ab2", _adams_bashforth(2), 1, 2, "Adams-Bashforth 2 on variable steps, 1 per step"
    ),
    "ab3": Solver(
        "ab3", _adams_bashforth(3), 1, 3, "Adams-Bashforth 3 on variable steps, 1 per step"
    ),
}


def _solver(name: str) -> Solver:
    try:
        return SOLVERS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def nfe_for(solver: str, steps: int) -> int:
    """Function evaluations of ``solver`` over ``steps`` intervals (Euler/AB K, Heun/midpoint 2K)."""
    return _solver(solver).evals_per_step * steps


def sample(
    field: VelocityField,
    noise: Tensor,
    schedule: Any,
    solver: str | None = None,
    callback: Callback | None = None,
    grad: bool = False,
    scales: Sequence[float] | np.ndarray | Tensor | None = None,
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """Integrate from ``noise`` at t = 0 to t = 1 on the schedule's times.

    Step ``k`` is ``x_{k+1} = x_k + s_k * D_k`` with ``D_k`` the solver's increment over
    ``[t_k, t_{k+1}]`` and ``s_k`` an optional per-step scale (1 when absent). Euler:
    ``D_k = (t_{k+1} - t_k) v(x_k, t_k)`` (one evaluation per step); Heun adds a trapezoidal
    correction with ``v(x_pred, t_{k+1})``; midpoint evaluates at ``t_k + h/2``; ``ab2`` / ``ab3``
    integrate the polynomial through the last 2 / 3 velocities (variable steps, one evaluation
    per step, first step Euler), see :func:`adams_bashforth_weights`.

    Args:
        field: velocity field ``v(x, t)``, ``x: (B, ...)``, ``t: (B,)``.
        noise: (B, ...) starting states; the result has its dtype and device.
        schedule: a :class:`Schedule`, a :class:`~bossflow.sampler.Sampler` (which brings its
            solver and scales), or a strictly increasing grid from 0 to 1. A 1-D tensor of times
            that requires grad is used as is, so the result is differentiable in the times
            (learned samplers).
        solver: a name in :data:`SOLVERS`; default: the sampler's, else ``"euler"``.
        callback: called after every step with ``{"i", "t", "t_next", "x", "v", "x_next"}``
            (``v`` is the velocity at ``(x, t)``).
        grad: keep the autograd graph (off by default: sampling runs under ``torch.no_grad``).
        scales: (K,) per-step scales ``s_k``; default: the sampler's, else none.
        cond: conditioning tensors for a conditional field, ``field(x, t, **cond)``: each with
            first dimension B (row b goes with ``noise[b]``) or 1 (shared).

    The field runs in eval mode (dropout off, normalisation statistics frozen; a freshly built
    ``nn.Module`` is in training mode) and gets its own modes back afterwards; so threads
    sampling one module at the same time must leave it in eval mode themselves.

    Returns:
        (B, ...) the states at t = 1.
    """
    if not isinstance(noise, Tensor):
        raise ConfigError(
            f"noise must be a (B, ...) tensor, got {type(noise).__name__}; for a NoiseSource "
            "pass noise.take(B)"
        )
    own_solver = getattr(schedule, "solver", None)
    if own_solver is not None and solver is not None and solver != own_solver:
        raise ConfigError(
            f"the sampler was made for the {own_solver} solver, not {solver}: drop the solver "
            "(solver= / --solver; a sampler brings its own), or sample its times alone "
            "(Schedule(sampler.times))"
        )
    solver = solver or own_solver or "euler"
    if scales is None:
        scales = getattr(schedule, "scales", None)
    step = _solver(solver).step
    if isinstance(schedule, Tensor) and schedule.requires_grad:
        times = list(schedule.unbind(0))
    else:
        times = [float(t) for t in _times(schedule)]
    if scales is not None:
        scales = (
            list(scales.unbind(0)) if isinstance(scales, Tensor) else [float(s) for s in scales]
        )
        if len(scales) != len(times) - 1:
            raise ConfigError(
                f"give one scale per step: {len(times) - 1} steps, {len(scales)} scales"
            )
        bad = [s for s in scales if not isinstance(s, Tensor) and not np.isfinite(s)]
        if bad:
            raise ConfigError(f"the per-step scales must be finite numbers, got {bad[0]}")
    modes = eval_mode(field)  # sampling is inference, whatever mode the module was left in
    field = bind_cond(field, check_cond(cond, noise.shape[0], "sample", noise.device))
    x, past = noise, []
    with nullcontext() if grad else torch.no_grad(), modes:
        for i in range(len(times) - 1):
            t, t_next = times[i], times[i + 1]
            increment, v = step(field, x, t, t_next, past)
            x_next = x + (increment if scales is None else scales[i] * increment)
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
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """A fine solve used as ground truth: ``steps``-step Euler/Heun, or adaptive ``"dopri5"``.

    ``"dopri5"`` uses ``torchdiffeq`` (extra ``ode``) at the given tolerances; the others are
    :func:`sample` on the uniform grid of ``steps`` intervals. ``cond`` as in :func:`sample`.

    In a multi-process run (torchrun) the B noises are split over the processes and the
    endpoints gathered: every process gets all B. The fixed-step methods give the one-process
    endpoints (to rounding); dopri5 controls its steps on the error of the block it solves, so
    its endpoints depend on how the noises are split (batches, processes) within its tolerances.

    Returns:
        (B, ...) states at t = 1, dtype and device of ``noise``.
    """
    from .distributed import is_distributed, map_rows
    from .noise import cond_reader

    if is_distributed():
        b = noise.shape[0]
        take_cond = cond_reader(cond, b, "reference_solve")
        return map_rows(
            lambda r: _reference_solve(
                field, noise[r.start : r.stop], method, steps, rtol, atol, take_cond(r)
            ),
            b,
            noise.device,
        )
    return _reference_solve(field, noise, method, steps, rtol, atol, cond)


def _reference_solve(field, noise, method, steps, rtol, atol, cond) -> Tensor:
    """:func:`reference_solve` in this process."""
    if method == "dopri5":
        from .errors import require

        torchdiffeq = require("torchdiffeq", "ode", "the dopri5 reference solver")

        bound = check_cond(cond, noise.shape[0], "reference_solve", noise.device)

        def rhs(t: Tensor, x: Tensor) -> Tensor:
            v = call_field(field, x, t.expand(x.shape[0]).to(time_dtype(x)), cond=bound)
            return v.to(x.dtype)

        grid = torch.tensor([0.0, 1.0], dtype=noise.dtype, device=noise.device)
        with torch.no_grad(), eval_mode(field):
            return torchdiffeq.odeint(rhs, noise, grid, method="dopri5", rtol=rtol, atol=atol)[-1]
    return sample(field, noise, uniform(steps), solver=method, cond=cond)
