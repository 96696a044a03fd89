"""bossflow schedules and samplers inside stock diffusers pipelines.

``scheduler_for(schedule, pipe.scheduler)`` returns a diffusers scheduler that makes a stock
flow-matching pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline`` ...) take exactly bossflow's
steps: with ``pipe.scheduler = scheduler_for(...)`` and ``pipe(..., num_inference_steps=K)`` the
latents are those of ``bossflow.sample(DiffusersField(pipe.transformer), latents, schedule)`` on
the same noise and conditioning (to float32 rounding).

Why not ``pipe(sigmas=schedule.to_diffusers_sigmas())``: ``FlowMatchEulerDiscreteScheduler``
re-shifts the sigmas it is given (SD3: ``shift=3``; FLUX: ``use_dynamic_shifting`` with the ``mu``
the pipeline computes from the image size), and it can only take plain Euler steps.
The scheduler here ignores both: its timesteps are bossflow's times, ``timestep = N (1 - t)``
with the base config's ``num_train_timesteps`` N, whatever ``shift``, ``mu`` or ``sigmas`` the
pipeline passes (only their count is checked against K), and its ``step`` is bossflow's solver step,
with the per-step scales of a learned :class:`~bossflow.sampler.Sampler`.

Solvers with two evaluations per step (``heun``, ``midpoint``) list two timesteps per step (2K
in all, ``scheduler.order == 2``, as diffusers' own Heun scheduler does): the first call returns
the predictor state the pipeline evaluates next, the second completes the step. Multistep solvers
(``ab2``, ``ab3``) keep the velocities of earlier steps in the scheduler.

The rest of the base scheduler's config is kept, since pipelines read it (``base_image_seq_len``,
``max_shift``, ``use_dynamic_shifting`` ...); ``shift``, dynamic shifting, ``shift_terminal``,
Karras/exponential/beta sigmas and stochastic sampling in it have no effect.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, require
from .sampler import Sampler
from .schedule import Schedule, is_flow_match
from .solvers import SOLVERS

__all__ = ["scheduler_for"]  # and BossflowScheduler, made on first access (module __getattr__)


@dataclass(frozen=True)
class _Plan:
    """What the scheduler runs: times, solver, scales, and the times each step evaluates at."""

    times: tuple[float, ...]
    solver: str
    scales: tuple[float, ...] | None
    evaluations: tuple[tuple[float, ...], ...]  # per step, the times the solver evaluates at

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    @property
    def evals_per_step(self) -> int:
        return len(self.evaluations[0])


def _plan(sampler: Sampler) -> _Plan:
    """Find the times each step of the solver evaluates at, by running it on a recording field.

    The evaluation times of every solver in the registry depend on the times alone, not on the
    state, so a dry run on a zero state finds them (in float64, exactly as the solver forms them).
    """
    step = SOLVERS[sampler.solver].step
    times = [float(t) for t in sampler.times]
    x, past, evaluations = torch.zeros(1, dtype=torch.float64), [], []
    for t, t_next in zip(times[:-1], times[1:]):
        seen: list[float] = []

        def probe(x: Tensor, tt: Tensor, seen=seen) -> Tensor:
            seen.append(float(tt[0]))
            return torch.zeros_like(x)

        step(probe, x, t, t_next, past)
        evaluations.append(tuple(seen))
    if len({len(e) for e in evaluations}) != 1 or not evaluations[0]:
        raise ConfigError(
            f"the {sampler.solver} solver evaluates a varying number of times per step, which a "
            "diffusers scheduler (a fixed list of timesteps) cannot express; sample it with "
            "bossflow.sample(field, noise, sampler)"
        )
    scales = None if sampler.scales is None else tuple(float(s) for s in sampler.scales)
    return _Plan(tuple(times), sampler.solver, scales, tuple(evaluations))


def _as_sampler(schedule: Any) -> Sampler:
    if isinstance(schedule, Sampler):
        return schedule
    if isinstance(schedule, Schedule):
        return Sampler.from_schedule(schedule)
    if isinstance(schedule, (Sequence, np.ndarray, Tensor)) and not isinstance(schedule, str):
        times = (
            schedule.detach().cpu().double().numpy() if isinstance(schedule, Tensor) else schedule
        )
        return Sampler(times)
    raise ConfigError(
        "scheduler_for takes a bossflow Schedule, a Sampler or a list of times from 0 to 1, got "
        f"{type(schedule).__name__}"
    )


def scheduler_for(schedule: Schedule | Sampler | Sequence[float], base_scheduler: Any):
    """A diffusers scheduler that makes a pipeline take exactly bossflow's steps.

    Use as ``pipe.scheduler = scheduler_for(schedule, pipe.scheduler)``, then
    ``pipe(..., num_inference_steps=schedule.steps)``. The pipeline's model is then evaluated at
    bossflow's times and its state advanced by bossflow's solver step, so with the same noise
    (``latents=``) and conditioning the result is ``bossflow.sample(field, latents, schedule)``
    with ``field = DiffusersField(pipe.transformer)`` (``Guided`` around it for classifier-free
    guidance), up to float32 rounding.

    Args:
        schedule: a :class:`~bossflow.schedule.Schedule` (Euler steps), a
            :class:`~bossflow.sampler.Sampler` (its solver, any in
            :data:`bossflow.solvers.SOLVERS`, and its per-step scales) or a list of times.
        base_scheduler: the pipeline's flow-matching scheduler (``pipe.scheduler``); its config is
            kept, since pipelines read it, but its shifting does not apply.

    Returns:
        A :class:`BossflowScheduler` (a ``FlowMatchEulerDiscreteScheduler`` subclass); its
        ``bossflow_sampler`` attribute is the sampler it runs.

    Raises:
        ConfigError: ``base_scheduler`` is not a flow-matching scheduler (the model would not
            predict ``noise - data``), or uses inverted sigmas.
        MissingExtraError: diffusers is not installed.
    """
    sampler = _as_sampler(schedule)
    cls = _scheduler_class()
    config = getattr(base_scheduler, "config", None)
    if config is None or not is_flow_match(base_scheduler):
        raise ConfigError(
            "scheduler_for needs the pipeline's flow-matching scheduler (pipe.scheduler, a "
            f"FlowMatch...Scheduler: the model predicts noise - data), got "
            f"{type(base_scheduler).__name__}; for other models sample with "
            "bossflow.sample(DiffusersField(model), noise, schedule)"
        )
    if config.get("invert_sigmas", False):
        raise ConfigError(
            f"{type(base_scheduler).__name__} uses invert_sigmas=True (time running the other "
            "way), which scheduler_for does not support; sample with bossflow.sample(field, "
            "noise, schedule) and an adapter for that model's convention"
        )
    scheduler = cls.from_config(config)
    extra = {k: v for k, v in config.items() if k not in scheduler.config}
    if extra:  # a FlowMatch scheduler with other config keys: keep them for the pipeline
        scheduler.register_to_config(**extra)
    scheduler.bossflow_sampler = sampler
    scheduler._bossflow_plan = _plan(sampler)
    scheduler.order = scheduler._bossflow_plan.evals_per_step
    return scheduler


@functools.cache
def _scheduler_class() -> type:
    """The scheduler class, made on first use so importing bossflow does not import diffusers."""
    flow_match = require(
        "diffusers.schedulers.scheduling_flow_match_euler_discrete",
        "diffusers",
        "bossflow.diffusers.scheduler_for",
    )
    base, Output = (
        flow_match.FlowMatchEulerDiscreteScheduler,
        flow_match.FlowMatchEulerDiscreteSchedulerOutput,
    )

    class BossflowScheduler(base):
        """A ``FlowMatchEulerDiscreteScheduler`` that takes bossflow's steps (see the module).

        Made by :func:`scheduler_for`; constructed otherwise (``from_config``) it has no steps to
        take and ``set_timesteps`` says so.
        """

        bossflow_sampler: Sampler | None = None
        _bossflow_plan: _Plan | None = None

        def set_timesteps(
            self,
            num_inference_steps: int | None = None,
            device: str | torch.device | None = None,
            sigmas: Sequence[float] | None = None,
            mu: float | None = None,
            timesteps: Sequence[float] | None = None,
        ) -> None:
            """Set bossflow's timesteps; ``sigmas``, ``mu`` and ``timesteps`` only give a count.

            Raises:
                ConfigError: the count asked for is not the sampler's number of steps K.
            """
            plan = self._bossflow_plan
            if plan is None:
                raise ConfigError(
                    "this BossflowScheduler has no schedule; make it with "
                    "bossflow.diffusers.scheduler_for(schedule, pipe.scheduler)"
                )
            asked = [
                n
                for n in (
                    num_inference_steps,
                    None if sigmas is None else len(sigmas),
                    None if timesteps is None else len(timesteps),
                )
                if n is not None
            ]
            if any(n != plan.steps for n in asked):
                raise ConfigError(
                    f"this scheduler takes bossflow's {plan.steps} steps ({self.bossflow_sampler!r})"
                    f", but the pipeline asked for {asked[0]}; call the pipeline with "
                    f"num_inference_steps={plan.steps} (and no sigmas= or timesteps=)"
                )
            flat = [t for step in plan.evaluations for t in step]
            # the timesteps DiffusersField feeds at these times: N (1 - t) from float32 t
            t32 = torch.tensor(flat, dtype=torch.float32)
            timestep = self.config.num_train_timesteps * (1.0 - t32)
            sigma = torch.tensor([1.0 - t for t in flat], dtype=torch.float32)
            self.num_inference_steps = plan.steps
            self.timesteps = timestep.to(device=device)
            self.sigmas = torch.cat([sigma, torch.zeros(1)])
            self._step_index = None
            self._begin_index = None
            self._x: Tensor | None = None
            self._past: list = []
            self._velocities: list[Tensor] = []

        def _start_index(self, timestep: Any) -> int:
            if self.begin_index is not None:
                return self.begin_index
            matches = (self.timesteps == torch.as_tensor(timestep).to(self.timesteps)).nonzero()
            if len(matches) == 0:
                raise ConfigError(
                    f"the pipeline stepped at timestep {float(timestep):g}, which is not one of "
                    "this scheduler's; call set_timesteps first and step with its timesteps"
                )
            return int(matches[0])

        def step(
            self,
            model_output: Tensor,
            timestep: float | Tensor,
            sample: Tensor,
            *args: Any,
            return_dict: bool = True,
            **kwargs: Any,
        ):
            """Feed one model output (``noise - data`` at this timestep) into bossflow's step.

            Returns the next state the pipeline evaluates at: the end of the step, or for a
            two-evaluation solver after the step's first call, its predictor state. The state is
            kept in (at least) float32 and returned in ``model_output``'s dtype, as diffusers does.
            """
            plan = self._bossflow_plan
            if plan is None or not hasattr(self, "_x"):
                raise ConfigError(
                    "call set_timesteps before step (a pipeline does); make this scheduler with "
                    "bossflow.diffusers.scheduler_for(schedule, pipe.scheduler)"
                )
            if self.step_index is None:
                self._step_index = self._start_index(timestep)
            index = self._step_index
            if index >= len(self.timesteps):
                raise ConfigError(
                    f"the pipeline stepped {index + 1} times, but bossflow's schedule has "
                    f"{len(self.timesteps)} model calls; call set_timesteps again for a new run"
                )
            expected = float(self.timesteps[index])
            if abs(float(timestep) - expected) > 1e-4 * max(1.0, abs(expected)):
                raise ConfigError(
                    f"the pipeline stepped at timestep {float(timestep):g}, but bossflow's call "
                    f"{index} is at {expected:g}; the pipeline must step through "
                    "scheduler.timesteps in order"
                )
            k, j = divmod(index, plan.evals_per_step)
            if j == 0:
                self._x = sample.to(torch.promote_types(sample.dtype, torch.float32))
                self._velocities = []
            elif self._x is None:
                raise ConfigError(
                    f"the pipeline started at call {index}, inside a {plan.solver} step; start "
                    "at a step boundary (set_begin_index with a multiple of scheduler.order)"
                )
            self._velocities.append(-model_output.to(self._x.dtype))  # v = -(noise - data)
            x_next = self._advance(plan, k)
            self._step_index += 1
            out = x_next.to(model_output.dtype)
            return Output(prev_sample=out) if return_dict else (out,)

        def _advance(self, plan: _Plan, k: int) -> Tensor:
            """Replay step k of the solver with the velocities known so far.

            While the step still needs evaluations, the state its next evaluation is at comes
            back; once all are known, the step's end ``x_k + s_k D_k`` (bossflow's arithmetic).
            """
            known, requested = self._velocities, []

            def replay(x: Tensor, t: Tensor) -> Tensor:
                n = len(requested)
                requested.append(x)
                return known[n] if n < len(known) else torch.zeros_like(x)

            past = list(self._past)
            t, t_next = plan.times[k], plan.times[k + 1]
            increment, _ = SOLVERS[plan.solver].step(replay, self._x, t, t_next, past)
            if len(known) < plan.evals_per_step:
                return requested[len(known)]
            self._past = past
            scale = None if plan.scales is None else plan.scales[k]
            return self._x + (increment if scale is None else scale * increment)

    BossflowScheduler.__module__ = __name__
    BossflowScheduler.__qualname__ = "BossflowScheduler"
    return BossflowScheduler


def __getattr__(name: str) -> Any:
    # ``bossflow.diffusers.BossflowScheduler`` imports diffusers only when asked for
    if name == "BossflowScheduler":
        return _scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
