"""Velocity fields: one calling convention, adapters for the others, and analytic fields for tests.

Convention used everywhere in bossflow: time ``t`` runs in [0, 1], noise at ``t = 0`` and data at
``t = 1``; the interpolant is ``x_t = t * x_data + (1 - t) * noise`` and sampling integrates the
ODE ``dx/dt = v(x, t)`` from 0 to 1.

A *velocity field* is any callable ``v(x, t) -> Tensor`` with ``x: (B, ...)`` and ``t: (B,)`` whose
output has the shape of ``x``. Models trained with another convention are wrapped by the small
adapters below; each states its mapping, so no hidden constant lives anywhere else.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelOutputError

__all__ = [
    "VelocityField",
    "RectifiedFlowField",
    "DiffusersField",
    "FlowMatchingField",
    "TorchCFMField",
    "NFECounter",
    "AffineGaussianField",
    "SpiralField",
    "time_batch",
    "check_velocity",
    "call_field",
]


@runtime_checkable
class VelocityField(Protocol):
    """``v(x, t)``: ``x`` of shape (B, ...), ``t`` of shape (B,) in [0, 1]; returns dx/dt like ``x``."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


def time_dtype(x: Tensor) -> torch.dtype:
    """dtype for times next to states ``x``: at least float32.

    bfloat16 has 8 bits of mantissa: a 500-step grid would collapse to about 250 distinct times,
    so times stay in float32 (or float64 with float64 states) even for low-precision models.
    """
    return torch.promote_types(x.dtype, torch.float32)


def time_batch(t: float | Tensor, x: Tensor) -> Tensor:
    """Return ``t`` as a (B,) tensor on ``x``'s device (B = ``x.shape[0]``), dtype :func:`time_dtype`."""
    t = torch.as_tensor(t, device=x.device).to(time_dtype(x))
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ConfigError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
    return t


def check_velocity(v: Any, x: Tensor, where: str = "the velocity field") -> Tensor:
    """Check a field's output: a tensor shaped like ``x`` with finite values.

    Raises:
        ModelOutputError: with a message that says what was returned and what was expected.
    """
    if not isinstance(v, Tensor):
        raise ModelOutputError(
            f"{where} returned {type(v).__name__}, expected a tensor shaped like x "
            f"{tuple(x.shape)}. If your model returns a tuple or an output object, wrap it with an "
            "adapter (bossflow.field) or a lambda that picks the tensor."
        )
    if v.shape != x.shape:
        raise ModelOutputError(
            f"{where} returned shape {tuple(v.shape)} for input shape {tuple(x.shape)}; a velocity "
            "must have the shape of x. Check --convention and that the model's channels and image "
            "size match the noise shape."
        )
    if not bool(torch.isfinite(v).all()):
        raise ModelOutputError(
            f"{where} returned NaN or infinite values (input shape {tuple(x.shape)}). Check the "
            "checkpoint, the input scaling and the time convention (--convention)."
        )
    return v


def call_field(
    field: VelocityField,
    x: Tensor,
    t: Tensor,
    where: str = "the velocity field",
    check: bool = True,
) -> Tensor:
    """``field(x, t)``, checked by :func:`check_velocity`; a model that raises becomes one error.

    ``check=False`` skips :func:`check_velocity` (a training loop checks its own outputs).

    An exception from inside the model (a layer refusing the input's shape or dtype, a bug in a
    user's module) is re-raised as :class:`~bossflow.errors.ModelCallError` naming the call, the
    input shapes and the original error, so the CLI can print one line instead of a traceback
    from deep inside the network. bossflow's own errors and ``KeyboardInterrupt`` pass unchanged.
    """
    from .errors import BossflowError, ModelCallError

    try:
        out = field(x, t)
    except BossflowError:
        raise
    except Exception as err:
        message = " ".join(str(err).split())
        if len(message) > 300:
            message = message[:300] + " ..."
        raise ModelCallError(
            f"{where} raised {type(err).__name__} when called with x of shape {tuple(x.shape)} "
            f"({x.dtype}, {x.device}) and t of shape {tuple(t.shape)}: {message}. Check that the "
            "sample shape (--shape) and the calling convention (--convention) match the model."
        ) from err
    return check_velocity(out, x, where) if check else out


def _unwrap_output(out: Any) -> Tensor:
    """Take the tensor out of a model's return value (tensor, tuple, or object with ``.sample``)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return out


class RectifiedFlowField(nn.Module):
    """Adapter for Rectified Flow networks (gnobitab/RectifiedFlow), called as ``network(x, 999 * s)``.

    The original samplers integrate upstream time ``s`` from ``eps`` to 1. bossflow time ``t`` in
    [0, 1] maps to ``s = eps + (1 - eps) * t``, so by the chain rule

        v(x, t) = (1 - eps) * network(x, time_scale * (eps + (1 - eps) * t)).

    With that factor, K uniform Euler steps in bossflow time are exactly the original K-step Euler
    sampler. ``network`` is kept as ``.network`` and called exactly as the original code does.

    Args:
        network: the raw network ``network(x, time_cond) -> velocity``.
        eps: the original sampler's start time (1e-3 in all released configs).
        time_scale: the factor from upstream time to the network's time input (999).
    """

    def __init__(self, network: nn.Module, eps: float = 1e-3, time_scale: float = 999.0):
        super().__init__()
        self.network = network
        self.eps = float(eps)
        self.time_scale = float(time_scale)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = time_batch(t, x)
        s = self.eps + (1.0 - self.eps) * t
        return (1.0 - self.eps) * _unwrap_output(self.network(x, self.time_scale * s))


class DiffusersField(nn.Module):
    """Adapter for diffusers flow-match models (SD3/FLUX-style schedulers, or a ``UNet2DModel``).

    diffusers uses ``sigma = 1 - t`` (noise at sigma = 1), feeds ``timestep = 1000 * sigma`` and the
    model predicts ``noise - data``, which is ``-v`` in bossflow's convention:

        v(x, t) = -model(x, 1000 * (1 - t), **model_kwargs)

    Args:
        model: a diffusers model; its output may be a tensor, a tuple or an object with ``.sample``.
        model_kwargs: extra keyword arguments passed on every call (e.g. ``encoder_hidden_states``).
        num_train_timesteps: the scheduler's ``num_train_timesteps`` (1000).
        sample_keyword: pass ``x`` under this keyword (transformers use ``"hidden_states"``);
            ``None`` passes it positionally.
    """

    def __init__(
        self,
        model: nn.Module,
        model_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        sample_keyword: str | None = None,
    ):
        super().__init__()
        self.network = model
        self.model_kwargs = dict(model_kwargs or {})
        self.num_train_timesteps = num_train_timesteps
        self.sample_keyword = sample_keyword

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = time_batch(t, x)
        timestep = self.num_train_timesteps * (1.0 - t)
        if self.sample_keyword is None:
            out = self.network(x, timestep, **self.model_kwargs)
        else:
            out = self.network(**{self.sample_keyword: x}, timestep=timestep, **self.model_kwargs)
        return -_unwrap_output(out)


class FlowMatchingField(nn.Module):
    """Adapter for Meta's ``flow_matching`` models, called as ``model(x=x, t=t0, **extras)``.

    ``flow_matching`` uses bossflow's time convention but passes a 0-dim ``t``. When the batch's
    times differ (rare: only straightening does that), the model is called once per distinct time.
    """

    def __init__(self, model: nn.Module, **extras: Any):
        super().__init__()
        self.network = model
        self.extras = extras

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = time_batch(t, x)
        if bool((t == t[0]).all()):
            return _unwrap_output(self.network(x=x, t=t[0], **self.extras))
        out = torch.empty_like(x)
        for value in torch.unique(t):
            rows = t == value
            out[rows] = _unwrap_output(self.network(x=x[rows], t=value, **self.extras))
        return out


class TorchCFMField(nn.Module):
    """Adapter for ``torchcfm`` / torchdyn models, called as ``model(t, x)`` with ``t`` of shape (B,).

    torchcfm uses bossflow's time convention (noise at 0). ``scalar_time=True`` passes a 0-dim ``t``
    instead, for models that broadcast a scalar time themselves (requires equal times in a batch).
    """

    def __init__(self, model: nn.Module, scalar_time: bool = False):
        super().__init__()
        self.network = model
        self.scalar_time = scalar_time

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = time_batch(t, x)
        if self.scalar_time:
            if not bool((t == t[0]).all()):
                raise ConfigError(
                    "TorchCFMField(scalar_time=True) needs one time per batch; straightening "
                    "mixes times, so use scalar_time=False for it"
                )
            t = t[0]
        return _unwrap_output(self.network(t, x))


class NFECounter(nn.Module):
    """Wrap a field and count its evaluations exactly.

    Attributes:
        nfe: number of calls (one call evaluates the whole batch: the usual "NFE").
        samples: number of per-sample evaluations (sum of batch sizes over calls).
    """

    def __init__(self, field: VelocityField):
        super().__init__()
        self.field = field
        self.nfe = 0
        self.samples = 0

    def reset(self) -> None:
        self.nfe = 0
        self.samples = 0

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        self.samples += x.shape[0]
        return self.field(x, t)


class AffineGaussianField(nn.Module):
    """Exact rectified flow from N(0, I) noise to data ``x1 = scale * z + shift``: straight paths.

    Every trajectory is the straight line ``x_t = (1 - t) z + t (scale z + shift)`` traversed at
    constant speed, so Euler is exact on any schedule and every one-step cost is zero. As a field:

        v(x, t) = (scale - 1) (x - t shift) / (1 - t + t scale) + shift.

    Args:
        scale: positive scalar, the data's standard deviation.
        shift: scalar or tensor broadcastable to one sample, the data's mean.
    """

    def __init__(self, scale: float = 0.5, shift: float | Tensor = 1.0):
        super().__init__()
        if scale <= 0:
            raise ConfigError("scale must be positive")
        self.scale = float(scale)
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float64), persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = time_batch(t, x).view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        shift = self.shift.to(dtype=x.dtype, device=x.device)
        return (self.scale - 1.0) * (x - t * shift) / (1.0 - t + t * self.scale) + shift

    def exact(self, z: Tensor, t: float) -> Tensor:
        """The exact solution at time ``t`` from noise ``z``."""
        shift = self.shift.to(dtype=z.dtype, device=z.device)
        return (1.0 - t) * z + t * (self.scale * z + shift)


class SpiralField(nn.Module):
    """Linear spiral ``dx/dt = mu x`` with complex ``mu = rate + i * omega`` on coordinate pairs.

    Consecutive coordinates of the flattened sample form complex numbers ``w``; the field is
    ``dw/dt = mu w``. Trajectories are curved (spirals), and both the exact solution
    ``w(t) = exp(mu t) w(0)`` and the Euler states are closed-form, so the cost matrix is known exactly:
    with fine Euler states ``w_i = prod_{k<i} (1 + mu h_k) w_0``,

        c[i, j] = |w_i / w_0 * (1 + mu (tau_j - tau_i)) - w_j / w_0|^2 * mean_m ||z_m||^2.
    """

    def __init__(self, rate: float = 0.5, omega: float = 3.0):
        super().__init__()
        self.mu = complex(rate, omega)

    @staticmethod
    def _pairs(x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] % 2:
            raise ConfigError("SpiralField needs an even number of values per sample")
        return flat.view(x.shape[0], -1, 2)

    def _times_mu(self, x: Tensor, factor: complex) -> Tensor:
        p = self._pairs(x)
        re, im = p[..., 0], p[..., 1]
        out = torch.stack(
            (factor.real * re - factor.imag * im, factor.real * im + factor.imag * re), -1
        )
        return out.view_as(x)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        time_batch(t, x)  # validates the shape; the field does not depend on t
        return self._times_mu(x, self.mu)

    def exact(self, z: Tensor, t: float) -> Tensor:
        """The exact solution at time ``t`` from ``z``: ``exp(mu t) z`` on coordinate pairs."""
        import cmath

        return self._times_mu(z, cmath.exp(self.mu * t))

    def euler_cost_matrix(self, noise: Tensor, grid: Tensor) -> Tensor:
        """Closed-form cost matrix (float64, (N+1, N+1)) for the fine Euler trajectories on ``grid``."""
        tau = [float(v) for v in grid]
        n = len(tau) - 1
        gains = [complex(1.0)]
        for k in range(n):
            gains.append(gains[-1] * (1 + self.mu * (tau[k + 1] - tau[k])))
        norm2 = float(noise.double().reshape(noise.shape[0], -1).pow(2).sum(1).mean())
        c = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                c[i, j] = abs(gains[i] * (1 + self.mu * (tau[j] - tau[i])) - gains[j]) ** 2 * norm2
        return c
