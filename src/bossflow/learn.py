"""Learned samplers: fit a few sampler parameters to the *final* error, the network frozen.

The Bellman DP (paper eq. 8) minimises a sum of local one-step costs measured on teacher states;
a user sees the error at t = 1. Here the parameters of a :class:`~bossflow.sampler.Sampler` with
K steps are fitted by backpropagating through the K steps themselves:

    min_{theta, phi}  E_m  d( S_{theta, phi}(z^m),  x^m_teacher )

where ``S`` integrates from noise ``z^m`` with the sampler's solver, times
``t_k = sum_{j<k} softmax(theta)_j`` (increments positive and summing to 1 by construction, so
``0 = t_0 < ... < t_K = 1`` always) and per-step velocity scales ``s_k = exp(phi_k)``;
``x^m_teacher`` is a fine solve from the same noise and ``d`` the mean squared error per
dimension (or any per-sample metric). Adam on ``(theta, phi)``; the times start from a given
schedule (the Bellman one), the scales from 1. A slice of the noises is held out: the held-out
error is measured every ``eval_every`` iterations and the best parameters are returned (early
stopping after ``patience`` evaluations without improvement). Related: Bespoke solvers (Shaul et
al. 2024), LD3 (2025).

Every random draw comes from one generator seeded by ``seed``; with ``out_dir`` the state is
checkpointed atomically and a rerun resumes to the same result.

Under torchrun the learning is data parallel: each rank integrates its block of every training
batch and of the held-out noises, losses and gradients are summed over the ranks in float64, and
every rank holds the parameters one process would have (to float rounding).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import distributed as dist
from .checkpoint import module_fingerprint
from .errors import CheckpointError, ConfigError
from .field import VelocityField, guidance_identity
from .io import ensure_dir
from .noise import CondLike, cond_fingerprint, cond_reader, same_cond, same_identity
from .sampler import Sampler
from .schedule import Schedule, uniform
from .solvers import SOLVERS, sample
from .training import load_state, random_rows, save_state

__all__ = [
    "teacher_endpoints",
    "LearnConfig",
    "LearnResult",
    "learn_sampler",
    "learn_best_sampler",
    "sampler_error",
    "steps_for",
]

CHECKPOINT_FORMAT = "bossflow.learn/1"
Metric = Callable[[Tensor, Tensor], Tensor]


@dataclass
class LearnConfig:
    """Settings of :func:`learn_sampler`.

    Attributes:
        solver: the sampler's solver (``euler``, ``heun``, ``midpoint``, ``ab2``, ``ab3``).
        scales: learn one velocity scale per step (else all 1).
        learn_times: learn the times (else keep the initial ones and learn scales only).
        iterations: Adam steps at most.
        batch_size: training noises per step.
        lr: Adam's learning rate on the time logits and log-scales.
        holdout: noises held out for early stopping: a fraction in (0, 1) or a count (>= 1).
        eval_every: measure the held-out error every this many iterations.
        patience: stop after this many held-out measurements without improvement (0: never).
        seed: seeds the batches.
        eval_batch_size: noises per forward pass when measuring the held-out error.
        margin: a learned sampler replaces its start only if its gain (the per-noise error
            difference, paired) is at least ``margin`` standard errors on the training noises
            *and* on the held-out noises; otherwise the start is returned. The held-out error
            also chose the iteration (an optimistic pick), and per-noise errors are
            heavy-tailed, so one set alone can show a gain that new noises do not (measured:
            a 30 % held-out gain on a straightened model that was 5 % worse on new noises). 0
            disables the test.
    """

    solver: str = "euler"
    scales: bool = True
    learn_times: bool = True
    iterations: int = 200
    batch_size: int = 64
    lr: float = 0.05
    holdout: float | int = 0.25
    eval_every: int = 10
    patience: int = 5
    seed: int = 0
    eval_batch_size: int = 256
    margin: float = 2.0

    def check(self) -> None:
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {sorted(SOLVERS)}")
        for name in ("iterations", "batch_size", "eval_every", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.patience < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")
        if not self.margin >= 0:
            raise ConfigError(f"margin must be >= 0 (standard errors), got {self.margin}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not (self.scales or self.learn_times):
            raise ConfigError("nothing to learn: set scales=True or learn_times=True")
        if self.holdout <= 0 or (isinstance(self.holdout, float) and self.holdout >= 1):
            raise ConfigError(
                f"holdout must be a fraction in (0, 1) or a count >= 1, got {self.holdout}"
            )


@dataclass
class LearnResult:
    """What :func:`learn_sampler` returns.

    Attributes:
        sampler: the learned sampler (the parameters with the lowest held-out error).
        heldout_error: its held-out error (mean per-sample metric; MSE per dimension by default).
        initial_heldout_error: the held-out error of the initial sampler (same solver, scales 1).
        best_iteration: the iteration of ``sampler`` (0: the initial one was kept).
        kept_start: the best learned parameters did not pass the significance test
            (:attr:`LearnConfig.margin`), so ``sampler`` is the start.
        history: ``{"iteration", "train_loss", "heldout_loss"}`` per measurement.
        iterations: iterations run (fewer than asked after early stopping).
        wall_s: seconds spent, summed over resumed runs.
        config: the settings.
    """

    sampler: Sampler
    heldout_error: float
    initial_heldout_error: float
    best_iteration: int
    history: list[dict[str, Any]]
    iterations: int
    wall_s: float
    config: LearnConfig = field(default_factory=LearnConfig)
    kept_start: bool = False


def steps_for(solver: str, nfe: int) -> int:
    """Steps K that spend exactly ``nfe`` evaluations with ``solver`` (an error if none)."""
    per = SOLVERS[solver].evals_per_step if solver in SOLVERS else None
    if per is None:
        raise ConfigError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)}")
    if nfe < per or nfe % per:
        raise ConfigError(f"{solver} takes {per} evaluations per step: NFE {nfe} is not possible")
    return nfe // per


def start_steps(solvers: Sequence[str], nfe: int) -> dict[str, int]:
    """The steps K in which each of ``solvers`` spends exactly ``nfe`` evaluations, by solver;
    a family that cannot (Heun at an odd NFE, an unknown name) is left out."""
    steps = {}
    for solver in solvers:
        with contextlib.suppress(ConfigError):
            steps[solver] = steps_for(solver, nfe)
    return steps


TEACHER_FORMAT = "bossflow.teacher/1"

# How the settings a teacher cache records are named in the message refusing it.
_TEACHER_LABELS = {
    "model": "model (weights or how it is called)",
    "noise": "noise",
    "count": "noise count",
    "solver": "solver",
    "steps": "step count",
    "cond": "conditioning",
    "guidance": "guidance",
}


def _cached_teacher(
    state: dict[str, Any], identity: dict[str, Any], noise: Tensor, take_cond: Callable
) -> Tensor | str:
    """A teacher cache's endpoints usable for ``noise``: all of them, or those of its first
    noises when the cache holds fewer of the same noises; else what differs, in words."""
    from .checkpoint import noise_fingerprint

    recorded, count = state.get("identity"), int(noise.shape[0])
    if not isinstance(recorded, dict):
        return "kind (it records no identity)"
    if same_identity(recorded, identity, take_cond, count, "cond"):
        return state["endpoints"]
    old = recorded.get("count")
    if isinstance(old, int) and 0 < old < count:  # grown: the same first noises?
        prefix = {**identity, "count": old, "noise": noise_fingerprint(noise[:old])}
        if same_identity(recorded, prefix, take_cond, old, "cond"):
            return state["endpoints"]
    shown = ("count", "solver", "steps")  # values worth printing (the others are fingerprints)
    differ = [
        _TEACHER_LABELS.get(k, k) + (f" ({recorded.get(k)} there, {v} now)" if k in shown else "")
        for k, v in identity.items()
        if k != "cond" and recorded.get(k) != v
    ]
    if "cond" in identity and not same_cond(recorded.get("cond"), take_cond, count):
        differ.append("conditioning")
    return ", ".join(differ) or "run"


def teacher_endpoints(
    field: VelocityField,
    noise: Tensor,
    steps: int = 200,
    solver: str = "heun",
    batch_size: int = 256,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
    cond: CondLike | None = None,
) -> Tensor:
    """Fine-solve endpoints from ``noise``: the targets a sampler is learned against.

    ``steps`` uniform steps of ``solver`` (default: 200 Heun steps, 400 evaluations, second order).
    On the shipped digits model, against 400 Heun steps, 200 Heun steps are off by an MSE of
    1.0e-7 per dimension, 100 Heun steps by 3.9e-6, and the 1000-step Euler reference of the
    evaluation by 1.7e-6 (100 Euler steps: 1.6e-4). With ``cache`` the result is saved
    atomically, with the fingerprints of the model and the noise, and reused by a rerun with the
    same model, noise, solver and steps; a rerun with more noises whose first ones are the cached
    ones solves only the new ones (another model, noise, solver or step count is refused, named,
    not mixed). ``cond``: per-sample conditioning of the M noises (a dict of (M, ...)
    tensors or ``cond(rows) -> dict``), as everywhere in bossflow.

    Returns:
        (M, ...) endpoints, dtype and device of ``noise``.
    """
    from .checkpoint import module_fingerprint, noise_fingerprint
    from .progress import progress_bar

    identity = {
        "model": module_fingerprint(field),
        "noise": noise_fingerprint(noise) if noise.shape[0] else None,  # every noise, not one
        "count": int(noise.shape[0]),
        "solver": solver,
        "steps": int(steps),
    }
    take_cond = cond_reader(cond, int(noise.shape[0]), "teacher_endpoints")
    if cond is not None:
        identity["cond"] = cond_fingerprint(take_cond, int(noise.shape[0]))
    if (guidance := guidance_identity(field)) is not None:  # another scale: another field
        identity["guidance"] = guidance
    # several processes: rank 0 reads and checks the cache, the others get what it found
    count, found = int(noise.shape[0]), None
    if cache is not None and dist.is_rank_zero() and Path(cache).exists():
        with dist.fail_together():
            found = _cached_teacher(load_state(cache, TEACHER_FORMAT), identity, noise, take_cond)
            if isinstance(found, str):
                raise CheckpointError(
                    f"{cache} holds teacher endpoints of another {found}; delete it to recompute, "
                    "or use another folder"
                )
    found = dist.broadcast_object(found)
    done = 0 if found is None else int(found.shape[0])
    if done == count:
        return found.to(device=noise.device, dtype=noise.dtype)

    def solve(block: range) -> Tensor:  # the endpoints of noises `block`, in batches
        part = torch.empty_like(noise[block.start : block.stop])
        bar = progress_bar(
            total=len(block), desc="teacher", unit="traj", enabled=progress and dist.is_rank_zero()
        )
        try:
            for a in range(block.start, block.stop, batch_size):
                rows = range(a, min(a + batch_size, block.stop))
                c = take_cond(rows)
                x = sample(field, noise[a : rows.stop], uniform(steps), solver=solver, cond=c)
                part[a - block.start : rows.stop - block.start] = x
                bar.update(len(rows))
        finally:
            bar.close()
        return part

    # split over the processes of a multi-process run, gathered in sample order
    out = dist.map_rows(
        lambda r: solve(range(done + r.start, done + r.stop)), count - done, noise.device
    )
    if found is not None:  # the cached first noises' endpoints, then the new ones'
        out = torch.cat([found.to(device=out.device, dtype=out.dtype), out])
    if cache is not None:  # rank 0 writes (a failure reaches the others: atomic_write)
        save_state(cache, {"format": TEACHER_FORMAT, "identity": identity, "endpoints": out.cpu()})
    return out


def _mse(x: Tensor, target: Tensor) -> Tensor:
    return (x - target).flatten(1).pow(2).mean(1)


def _params_to_sampler(theta: Tensor, phi: Tensor | None, config: LearnConfig, **kw) -> Sampler:
    times = _times_of(theta.detach().double())
    scales = None if phi is None else phi.detach().double().exp().numpy()
    return Sampler(times.numpy(), config.solver, scales, **kw)


def _times_of(theta: Tensor) -> Tensor:
    """``[0, cumsum(softmax(theta))[:-1], 1]``: increasing, exactly 0 and 1 at the ends."""
    inc = torch.softmax(theta, 0)
    inner = torch.cumsum(inc, 0)[:-1]
    return torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])


def significant_gain(start: Tensor, new: Tensor, margin: float) -> bool:
    """Whether ``new`` per-noise errors beat ``start`` ones by ``margin`` paired standard errors.

    ``d = start - new`` per noise; the gain counts if ``mean(d) > margin * std(d) / sqrt(n)``
    (and ``mean(d) > 0``). With one noise only the sign is tested.
    """
    d = (start.double() - new.double()).flatten()
    mean = float(d.mean())
    if d.numel() < 2:
        return mean > 0
    return mean > 0 and mean > margin * float(d.std()) / math.sqrt(d.numel())


def sampler_errors(
    field: VelocityField,
    noise: Tensor,
    teacher: Tensor,
    sampler: Sampler | Schedule,
    metric: Metric | None = None,
    batch_size: int = 256,
    cond: CondLike | None = None,
) -> Tensor:
    """Per-noise errors (M,) float64 of ``sampler`` from ``noise`` against ``teacher``."""
    metric = metric or _mse
    take_cond = cond_reader(cond, int(noise.shape[0]), "sampler_errors")

    def errors(block: range) -> Tensor:
        out = []
        with torch.no_grad():
            for a in range(block.start, block.stop, batch_size):
                rows = range(a, min(a + batch_size, block.stop))
                x = sample(field, noise[rows.start : rows.stop], sampler, cond=take_cond(rows))
                out.append(metric(x, teacher[rows.start : rows.stop]).double().cpu())
        return torch.cat(out)

    # several processes: each takes a block of the noises, every rank gets all M errors
    return dist.map_rows(errors, int(noise.shape[0]), "cpu")


def _beats(field, noise, teacher, new, start, split, metric, config, cond) -> bool:
    """The significance test of :attr:`LearnConfig.margin` on the training and held-out noises."""
    errors = {
        name: sampler_errors(field, noise, teacher, s, metric, config.eval_batch_size, cond)
        for name, s in (("new", new), ("start", start))
    }
    return all(
        significant_gain(errors["start"][idx], errors["new"][idx], config.margin)
        for idx in split
        if len(idx)
    )


def sampler_error(
    field: VelocityField,
    noise: Tensor,
    teacher: Tensor,
    sampler: Sampler | Schedule,
    metric: Metric | None = None,
    batch_size: int = 256,
    cond: CondLike | None = None,
) -> float:
    """Mean per-sample error of ``sampler`` from ``noise`` against ``teacher`` (float64 sum).

    ``cond``: per-sample conditioning of the noises (dict of (M, ...) tensors or callable).
    """
    errors = sampler_errors(field, noise, teacher, sampler, metric, batch_size, cond)
    # summed batch by batch, as the per-batch values are produced
    total = sum(float(errors[a : a + batch_size].sum()) for a in range(0, len(errors), batch_size))
    return total / noise.shape[0]


def _batch_backward(
    field: VelocityField,
    noise: Tensor,
    teacher: Tensor,
    rows: np.ndarray,
    theta: Tensor,
    phi: Tensor | None,
    solver: str,
    metric: Metric,
    take_cond: Callable[[Any], Any],
) -> float:
    """The batch's mean loss; its gradient accumulated into ``theta.grad`` (and ``phi.grad``).

    Several processes: every rank drew the same ``rows`` (one seeded generator); each integrates
    its :func:`~bossflow.distributed.split_range` block of them and the loss sums and gradients
    are summed over the ranks in float64, so every rank takes the step one process takes with
    the whole batch (data parallel: the sampler's parameters stay identical on every rank).
    """
    params = [p for p in (theta, phi) if p is not None]
    for p in params:  # this batch's gradient only (times kept fixed are not the optimizer's)
        p.grad = None
    part = rows[dist.split_range(len(rows))] if dist.is_distributed() else rows
    loss = torch.zeros((), dtype=torch.float64)
    with dist.fail_together():  # the other ranks wait in the sum below
        if len(part):
            z, target = noise[part], teacher[part]
            times = _times_of(theta)
            scales = None if phi is None else phi.exp()
            x = sample(
                field, z, times.to(z.device), solver, grad=True, scales=scales,
                cond=take_cond(part.tolist()),
            )  # fmt: skip
            local = metric(x, target).double().sum() / len(rows)
            local.backward()
            loss = local.detach().cpu()
    if not dist.is_distributed():
        return float(loss)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = dist.all_reduce_sum_float64(torch.cat([loss.reshape(1)] + [g.flatten() for g in grads]))
    offset = 1
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype).clone()
        offset += p.numel()
    return float(flat[0])


def _same_run(saved: dict | None, mine: dict, teacher: Tensor, take_cond: Callable) -> bool:
    """Whether a checkpoint's identity is this run's: equal, the teacher's norm to 1e-5
    (checkpoints of bossflow 0.1.0 before it recorded the norm: the teacher's exact sum), the
    conditioning by :func:`~bossflow.noise.same_cond`."""
    if not isinstance(saved, dict):
        return False
    a, b = dict(saved), dict(mine)
    if "teacher" not in a:  # checkpoints from before the teacher's solver was recorded
        b.pop("teacher", None)
    norm = b.pop("teacher_norm")
    if "teacher_norm" in a:
        same_teacher = math.isclose(a.pop("teacher_norm"), norm, rel_tol=1e-5)
    else:
        same_teacher = a.pop("teacher_sum", None) == float(teacher.double().sum())
    return same_teacher and same_identity(a, b, take_cond, int(teacher.shape[0]), "cond")


def _run_differences(saved: Any, mine: dict) -> str:
    """What differs between a checkpoint's identity and this run's, in words (for a message)."""
    if not isinstance(saved, dict):
        return "kind: it records no identity"
    out = []
    settings = [k for k, v in mine["config"].items() if (saved.get("config") or {}).get(k) != v]
    if settings:
        out.append(f"settings: {', '.join(settings)}")
    if saved.get("noise_shape") != mine["noise_shape"]:
        count = (saved.get("noise_shape") or [None])[0]
        out.append(f"teacher noises: {count} there, {mine['noise_shape'][0]} now")
    elif "teacher_norm" in saved and not math.isclose(
        saved["teacher_norm"], mine["teacher_norm"], rel_tol=1e-5
    ):  # (older checkpoints recorded the teacher's sum)
        out.append("teacher endpoints")
    labels = {"nfe": "budget", "init": "initial times", "model": "model"}
    labels |= {"cond": "conditioning", "guidance": "guidance"}
    out += [
        label
        for k, label in labels.items()
        if (k in mine or k in saved) and saved.get(k) != mine.get(k)
    ]
    if "teacher" in saved and saved["teacher"] != mine.get("teacher"):  # older: not recorded
        out.append("teacher solver")
    return "; ".join(out) or "settings"


def _rank(error: float) -> float:
    """An error for ordering: NaN (a diverged or undefined error) after every number."""
    return math.inf if math.isnan(error) else error


def _holdout(n: int, holdout: float | int) -> tuple[np.ndarray, np.ndarray]:
    count = max(1, int(round(holdout * n))) if isinstance(holdout, float) else int(holdout)
    if count >= n:
        raise ConfigError(
            f"holdout {holdout} leaves no training noise among {n}; give more teacher noises"
        )
    return np.arange(n - count), np.arange(n - count, n)


@dataclass
class _Frozen:
    """Freeze a module's parameters for the block (the sampler's parameters train, not these)."""

    module: Any

    def __enter__(self) -> None:
        self.saved = []
        if isinstance(self.module, nn.Module):
            self.saved = [(p, p.requires_grad) for p in self.module.parameters()]
            for p, _ in self.saved:
                p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)


def learn_sampler(
    field: VelocityField,
    noise: Tensor,
    teacher: Tensor,
    nfe: int,
    config: LearnConfig | None = None,
    init: Schedule | Sampler | None = None,
    metric: Metric | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    cond: CondLike | None = None,
) -> LearnResult:
    """Learn a sampler's times (and per-step scales) against teacher endpoints.

    Args:
        field: the velocity field (frozen; an ``nn.Module``'s parameters are not trained).
        noise: (M, ...) noises; the last ``config.holdout`` of them are held out.
        teacher: (M, ...) fine-solve endpoints from the same noises (e.g.
            :func:`bossflow.reference_solve`, or the final column of a pair store).
        nfe: the budget; the sampler has ``nfe / evals_per_step`` steps.
        config: settings (:class:`LearnConfig`).
        init: initial times (a K + 1-point schedule, e.g. the Bellman one; scales start at 1).
            Default: uniform. A schedule of another length is refused.
        metric: per-sample error ``metric(x, teacher) -> (B,)``; default MSE per dimension.
            Any differentiable callable works, e.g. a distance in classifier features.
        out_dir: folder for ``checkpoint.pt``; a rerun with the same settings resumes.
        progress: show a progress bar (on a terminal only).
        provenance: facts stored in the sampler (model id, teacher ...).
        cond: per-sample conditioning of the M noises (dict of (M, ...) tensors or
            ``cond(rows) -> dict``); each batch takes its rows.

    Returns:
        A :class:`LearnResult` whose sampler has the lowest held-out error seen.
    """
    from .progress import progress_bar

    config = config or LearnConfig()
    config.check()
    steps = steps_for(config.solver, nfe)
    if not isinstance(noise, Tensor) or not isinstance(teacher, Tensor):
        raise ConfigError("noise and teacher must be tensors shaped (M, ...)")
    if noise.shape != teacher.shape:
        raise ConfigError(
            f"noise {tuple(noise.shape)} and teacher {tuple(teacher.shape)} must have the same "
            "shape: teacher[m] is the fine solve from noise[m]"
        )
    init_times = uniform(steps).times if init is None else np.asarray(init.times)
    if len(init_times) != steps + 1:
        raise ConfigError(
            f"the initial schedule has {len(init_times) - 1} steps; {config.solver} at NFE {nfe} "
            f"needs {steps}"
        )
    metric = metric or _mse
    train_idx, held_idx = _holdout(noise.shape[0], config.holdout)
    held_noise, held_teacher = noise[held_idx], teacher[held_idx]
    take_cond = cond_reader(cond, int(noise.shape[0]), "learn_sampler")
    held_cond = take_cond(held_idx.tolist())
    generator = torch.Generator().manual_seed(config.seed)
    theta = torch.tensor(np.log(np.diff(init_times)), dtype=torch.float64, requires_grad=True)
    phi = torch.zeros(steps, dtype=torch.float64, requires_grad=True) if config.scales else None
    trained = [p for p, on in ((theta, config.learn_times), (phi, config.scales)) if on]
    optimizer = torch.optim.Adam(trained, lr=config.lr)
    identity = {
        "config": asdict(config),
        "nfe": nfe,
        "init": [float(t) for t in init_times],
        "noise_shape": list(noise.shape),
        # to 1e-5 (see _same_run): solves batched otherwise (another number of processes)
        # round differently in the last bits
        "teacher_norm": float(teacher.double().norm()),
        # the field itself: a sampler learned for one model is not resumed for another
        "model": module_fingerprint(field) if isinstance(field, nn.Module) else None,
    }
    if cond is not None:
        identity["cond"] = cond_fingerprint(take_cond, int(noise.shape[0]))
    if (guidance := guidance_identity(field)) is not None:  # another scale: another field
        identity["guidance"] = guidance
    if (provenance or {}).get("teacher") is not None:  # e.g. "heun 200": the norm alone is close
        identity["teacher"] = provenance["teacher"]  # for another number of teacher steps
    meta = {
        "method": "learned",
        "provenance": {
            **(provenance or {}),
            "objective": "final-state error to teacher endpoints",
            "solver": config.solver,
            "teacher_noises": int(noise.shape[0]),
            "heldout_noises": int(held_idx.size),
        },
    }

    def heldout_error(th: Tensor, ph: Tensor | None) -> float:
        s = _params_to_sampler(th, ph, config)
        return sampler_error(
            field, held_noise, held_teacher, s, metric, config.eval_batch_size, held_cond
        )

    ckpt_path = None if out_dir is None else ensure_dir(out_dir) / "checkpoint.pt"
    iteration, history, wall_s, stale = 0, [], 0.0, 0
    best = None
    # several processes: rank 0 reads and checks the checkpoint, the others get what it read
    ckpt = None
    if ckpt_path is not None and dist.is_rank_zero() and ckpt_path.exists():
        with dist.fail_together():
            ckpt = load_state(ckpt_path, CHECKPOINT_FORMAT)
            if not _same_run(ckpt.get("identity"), identity, teacher, take_cond):
                raise CheckpointError(
                    f"{ckpt_path} was made by another sampler-learning run (other "
                    f"{_run_differences(ckpt.get('identity'), identity)}); delete it or use "
                    "another folder"
                )
    ckpt = dist.broadcast_object(ckpt)
    if ckpt is not None:
        with torch.no_grad():
            theta.copy_(ckpt["theta"])
            if phi is not None:
                phi.copy_(ckpt["phi"])
        optimizer.load_state_dict(ckpt["optimizer"])
        generator.set_state(ckpt["generator"])
        iteration, history, wall_s = ckpt["iteration"], ckpt["history"], ckpt["wall_s"]
        stale, best = ckpt["stale"], ckpt["best"]

    def save() -> None:
        if ckpt_path is None:
            return
        save_state(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "identity": identity,
                "theta": theta.detach(),
                "phi": None if phi is None else phi.detach(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "iteration": iteration,
                "history": history,
                "wall_s": wall_s,
                "stale": stale,
                "best": best,
            },
        )

    start = time.perf_counter()
    with _Frozen(field):
        if best is None:
            initial = heldout_error(theta, None)
            history.append({"iteration": 0, "train_loss": None, "heldout_loss": initial})
            best = {
                "iteration": 0,
                "loss": initial,
                "theta": theta.detach().clone(),
                "phi": None if phi is None else phi.detach().clone(),
            }
        bar = progress_bar(
            total=config.iterations, initial=iteration, desc=f"learn {config.solver} NFE {nfe}",
            enabled=progress and dist.is_rank_zero(),
        )  # fmt: skip
        running, count = 0.0, 0
        try:
            while iteration < config.iterations and not (
                config.patience and stale >= config.patience
            ):
                rows = random_rows(train_idx, config.batch_size, generator)
                optimizer.zero_grad(set_to_none=True)
                loss = _batch_backward(
                    field, noise, teacher, rows, theta, phi, config.solver, metric, take_cond
                )
                if not math.isfinite(loss):
                    raise ConfigError(
                        f"the sampler's loss became {loss} at iteration {iteration}; lower lr"
                    )
                optimizer.step()
                iteration += 1
                running, count = running + loss, count + 1
                bar.update(1)
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    held = heldout_error(theta, phi)
                    history.append(
                        {
                            "iteration": iteration,
                            "train_loss": running / count,
                            "heldout_loss": held,
                        }
                    )
                    running, count = 0.0, 0
                    bar.set_postfix(heldout=f"{held:.4g}", refresh=False)
                    if _rank(held) < _rank(best["loss"]):  # a NaN start is beaten by any number
                        best = {
                            "iteration": iteration,
                            "loss": held,
                            "theta": theta.detach().clone(),
                            "phi": None if phi is None else phi.detach().clone(),
                        }
                        stale = 0
                    else:
                        stale += 1
                    wall_s += time.perf_counter() - start
                    start = time.perf_counter()
                    with dist.fail_together():  # rank 0 writes; the others wait in a sum
                        save()
        finally:
            bar.close()
    kept_start = False
    if best["iteration"] != 0 and config.margin > 0:
        theta0 = torch.tensor(np.log(np.diff(init_times)), dtype=torch.float64)
        phi0 = None if phi is None else torch.zeros(steps, dtype=torch.float64)
        start_sampler = _params_to_sampler(theta0, phi0, config)
        new_sampler = _params_to_sampler(best["theta"], best["phi"], config)
        split = (train_idx, held_idx)
        if not _beats(
            field, noise, teacher, new_sampler, start_sampler, split, metric, config, cond
        ):
            kept_start = True
            best = {"iteration": 0, "loss": history[0]["heldout_loss"], "theta": theta0}
            best["phi"] = phi0
    wall_s += time.perf_counter() - start
    meta["provenance"] |= {
        "nfe": nfe,
        "heldout_error": best["loss"],
        "initial_heldout_error": history[0]["heldout_loss"],
        "best_iteration": best["iteration"],
        "iterations": iteration,
        "kept_start": kept_start,
    }
    sampler = _params_to_sampler(best["theta"], best["phi"], config, **meta)
    if best["iteration"] == 0:  # the start itself: its times exactly (softmax-cumsum rounds them)
        sampler = Sampler(
            np.asarray(init_times, dtype=np.float64), config.solver, sampler.scales, **meta
        )
    return LearnResult(
        sampler=sampler,
        heldout_error=best["loss"],
        initial_heldout_error=history[0]["heldout_loss"],
        best_iteration=best["iteration"],
        history=history,
        iterations=iteration,
        wall_s=wall_s,
        config=config,
        kept_start=kept_start,
    )


def learn_best_sampler(
    field: VelocityField,
    noise: Tensor,
    teacher: Tensor,
    nfe: int,
    solvers: Sequence[str] = ("euler", "ab2"),
    config: LearnConfig | None = None,
    inits: dict[int, Schedule] | None = None,
    metric: Metric | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    cond: CondLike | None = None,
) -> tuple[LearnResult, dict[str, LearnResult]]:
    """Learn one sampler per solver family at ``nfe`` and keep the best on the held-out noises.

    Solvers that cannot spend exactly ``nfe`` evaluations (Heun at an odd NFE) are skipped.
    ``inits`` maps a step count K to initial times (e.g. the Bellman schedules by K).

    The families are in order of preference: another family replaces the first one's result
    only if it has the lower held-out error *and* passes the paired significance test of
    :attr:`LearnConfig.margin` against it. With ``("euler", "ab2")`` and Bellman initial times
    the result is therefore never a sampler that merely looked better than plain Euler on the
    Bellman grid (for a straightened model: than BOSS as trained).

    Returns:
        ``(best, all)``: the chosen result and every result by solver.
    """
    from dataclasses import replace

    config = config or LearnConfig()
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:  # a misspelt family is an error, not a family that cannot spend the budget
        raise ConfigError(f"unknown solver {unknown[0]!r}; choose from {', '.join(SOLVERS)}")
    results: dict[str, LearnResult] = {}
    for solver, steps in start_steps(solvers, nfe).items():
        init = (inits or {}).get(steps)
        sub = None if out_dir is None else Path(out_dir) / f"{solver}-nfe{nfe}"
        results[solver] = learn_sampler(
            field, noise, teacher, nfe, replace(config, solver=solver), init, metric, sub,
            progress, provenance, cond,
        )  # fmt: skip
    if not results:
        raise ConfigError(
            f"none of the solvers {list(solvers)} can spend exactly {nfe} evaluations"
        )
    # ties: the earlier family; a NaN error ranks last, wherever its family is listed
    best = min(results.values(), key=lambda r: _rank(r.heldout_error))
    if not math.isfinite(best.heldout_error):
        raise ConfigError("every learned sampler diverged; lower lr")
    first = next(iter(results.values()))
    if best is not first and config.margin > 0 and math.isfinite(first.heldout_error):
        split = _holdout(noise.shape[0], config.holdout)
        if not _beats(
            field, noise, teacher, best.sampler, first.sampler, split, metric, config, cond
        ):
            best = first
    return best, results
