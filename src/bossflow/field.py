"""Velocity fields: one calling convention, adapters for the others, and analytic fields for tests.

Convention used everywhere in bossflow: time ``t`` runs in [0, 1], noise at ``t = 0`` and data at
``t = 1``; the interpolant is ``x_t = t * x_data + (1 - t) * noise`` and sampling integrates the
ODE ``dx/dt = v(x, t)`` from 0 to 1.

A *velocity field* is any callable ``v(x, t) -> Tensor`` with ``x: (B, ...)`` and ``t: (B,)`` whose
output has the shape of ``x``. A conditional field also takes conditioning tensors as keywords,
``v(x, t, **cond)``, each with first dimension B (row b goes with sample b): class labels, text
embeddings, a distilled guidance value. Models trained with another convention are wrapped by the
small adapters below; each states its mapping, so no hidden constant lives anywhere else.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
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
    "Guided",
    "time_batch",
    "eval_mode",
    "check_velocity",
    "call_field",
    "bind_cond",
    "check_cond",
    "guidance_identity",
    "strip_uncond",
    "Unguided",
    "Precision",
]


@runtime_checkable
class VelocityField(Protocol):
    """``v(x, t)``: ``x`` of shape (B, ...), ``t`` of shape (B,) in [0, 1]; returns dx/dt like ``x``."""

    def __call__(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor: ...


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


@contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    """Eval mode (dropout off) for the block, then every submodule's own mode back (a module
    in training mode may hold submodules its owner keeps in eval mode). Not a module: no-op."""
    modes = [(m, m.training) for m in module.modules()] if isinstance(module, nn.Module) else []
    if modes:
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """``field(x, t, **cond)``, checked by :func:`check_velocity`; a model that raises becomes one error.

    ``check=False`` skips :func:`check_velocity` (a training loop checks its own outputs).
    ``cond``: conditioning tensors with first dimension ``x.shape[0]`` (none: ``field(x, t)``).

    An exception from inside the model (a layer refusing the input's shape or dtype, a bug in a
    user's module) is re-raised as :class:`~bossflow.errors.ModelCallError` naming the call, the
    input shapes and the original error, so the CLI can print one line instead of a traceback
    from deep inside the network. bossflow's own errors and ``KeyboardInterrupt`` pass unchanged.
    """
    from .errors import BossflowError, ModelCallError

    try:
        out = field(x, t, **cond) if cond else field(x, t)
    except BossflowError:
        raise
    except Exception as err:
        from .distributed import lost_peer

        if (lost := lost_peer(err, f"{where}'s forward pass")) is not None:
            raise lost from None  # a sharded model's gather: another process died, not the model
        message = " ".join(str(err).split())
        if len(message) > 300:
            message = message[:300] + " ..."
        given = "".join(f", {k} of shape {tuple(v.shape)}" for k, v in (cond or {}).items())
        raise ModelCallError(
            f"{where} raised {type(err).__name__} when called with x of shape {tuple(x.shape)} "
            f"({x.dtype}, {x.device}) and t of shape {tuple(t.shape)}{given}: {message}. Check "
            "that the sample shape (--shape), the conditioning (--cond) and the calling convention "
            "(--convention) match the model."
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

    The original Euler sampler (``sampling.py``, ``sde_lib.euler_ode``) starts from the noise, takes
    steps ``dt = 1 / N`` and calls the network at upstream time ``s_i = eps + (1 - eps) i / N``
    (never at 0, where it was not trained). bossflow time ``t`` in [0, 1] is ``i / N`` there, so

        v(x, t) = network(x, time_scale * (eps + (1 - eps) * t))

    and K uniform Euler steps in bossflow time are exactly the original K-step Euler sampler (a
    2-rectified flow's one step lands where the original's does). The original RK45 sampler
    integrates ``s`` from ``eps`` to 1 instead, a path 0.1 % shorter. ``network`` is kept as
    ``.network`` and called exactly as the original code does.

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

    def extra_repr(self) -> str:
        return f"eps={self.eps}, time_scale={self.time_scale}"

    def fingerprint_config(self) -> str:
        """What, beside the weights, makes this field another field (see module_fingerprint)."""
        # "euler-step": the velocity of the original Euler sampler, without the (1 - eps) factor
        # earlier development builds applied (caches made with that factor are another field's)
        return f"rectified-flow: {self.extra_repr()}, euler-step"

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = time_batch(t, x)
        s = self.eps + (1.0 - self.eps) * t
        return _unwrap_output(self.network(x, self.time_scale * s, **cond))


#: diffusers models whose ``forward`` multiplies the timestep by 1000 itself (the FLUX family,
#: Qwen-Image): their pipelines pass ``timestep / 1000`` (and FLUX's distilled ``guidance``, also
#: scaled inside).
SIGMA_TIMESTEP_MODELS = frozenset(
    {
        "FluxTransformer2DModel",
        "FluxControlNetModel",
        "FluxMultiControlNetModel",
        "Flux2Transformer2DModel",
        "Flux3Transformer2DModel",
        "ChromaTransformer2DModel",
        "LongCatImageTransformer2DModel",
        "OvisImageTransformer2DModel",
        "QwenImageTransformer2DModel",  # Qwen-Image: Timesteps(scale=1000) inside
        "QwenImage21Transformer2DModel",
        "QwenImageControlNetModel",
        "QwenImageMultiControlNetModel",
    }
)
_DETECT = "auto"


def _diffusers_convention(model: Any) -> tuple[bool, str | None]:
    """(takes ``sigma`` rather than ``1000 sigma``, keyword of the sample) from the model itself.

    The class (and its bases) tell the FLUX family apart; the name of ``forward``'s first
    parameter tells transformers (``hidden_states=``) from UNets (positional ``sample``).
    """
    import inspect

    inner = getattr(model, "_orig_mod", model)  # torch.compile keeps the module here
    names = {cls.__name__ for cls in type(inner).__mro__}
    try:
        params = list(inspect.signature(inner.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        params = []
    first = params[0].name if params and params[0].kind != params[0].VAR_POSITIONAL else None
    keyword = "hidden_states" if first == "hidden_states" else None
    return bool(names & SIGMA_TIMESTEP_MODELS), keyword


class DiffusersField(nn.Module):
    """Adapter for diffusers flow-match models: SD3- and FLUX-style transformers, ``UNet2DModel``.

    diffusers uses ``sigma = 1 - t`` (noise at sigma = 1) and the model predicts ``noise - data``,
    which is ``-v`` in bossflow's convention. What the model is fed as its timestep depends on the
    model, and is found from it:

    - SD3-style transformers (``SD3Transformer2DModel`` and other ``hidden_states=`` models) and
      ``UNet2DModel`` (positional sample): ``timestep = 1000 sigma``, as their schedulers'
      ``timesteps`` (``num_train_timesteps = 1000``);
    - the FLUX family (:data:`SIGMA_TIMESTEP_MODELS`), which multiplies by 1000 inside:
      ``timestep = (1000 sigma) / 1000``, rounded the way FLUX pipelines compute it from the
      scheduler's timesteps, so samples match theirs to float32 rounding of the model.

    So ``v(x, t) = -model(x, timestep(1 - t), **model_kwargs, **cond)``. FLUX's static
    ``img_ids`` / ``txt_ids`` go in ``model_kwargs``; per-sample inputs (``encoder_hidden_states``,
    ``pooled_projections``, FLUX's distilled ``guidance`` as a (B,) tensor) in ``cond``. Classifier-
    free guidance (SD3) is :class:`Guided` around this field.

    Args:
        model: a diffusers model; its output may be a tensor, a tuple or an object with ``.sample``.
        model_kwargs: extra keyword arguments passed on every call (e.g. ``img_ids``).
        num_train_timesteps: override: feed exactly ``timestep = num_train_timesteps * sigma``
            (e.g. 1 for a FLUX-like model the detection does not know). Default: detected.
        sample_keyword: override: pass ``x`` under this keyword (``"hidden_states"``), or
            positionally with ``None``. Default: detected from the model's ``forward``.
    """

    def __init__(
        self,
        model: nn.Module,
        model_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int | float | None = None,
        sample_keyword: str | None = _DETECT,
    ):
        super().__init__()
        takes_sigma, keyword = _diffusers_convention(model)
        self.network = model
        self.model_kwargs = dict(model_kwargs or {})
        if num_train_timesteps is None:
            # FLUX pipelines feed float32(1000 sigma) / 1000: the same rounding, so samples agree
            self.num_train_timesteps, self.timestep_divisor = 1000, 1000 if takes_sigma else 1
        else:
            if not isinstance(num_train_timesteps, (int, float)) or not num_train_timesteps > 0:
                raise ConfigError(
                    f"num_train_timesteps must be a positive number, got {num_train_timesteps!r}; "
                    "leave it unset to detect the model's convention"
                )
            if takes_sigma and num_train_timesteps != 1:
                import warnings

                warnings.warn(
                    f"{type(model).__name__} multiplies its timestep by 1000 itself, so "
                    f"num_train_timesteps={num_train_timesteps} feeds it {num_train_timesteps} "
                    "times what its pipeline does; leave num_train_timesteps unset",
                    stacklevel=2,
                )
            self.num_train_timesteps, self.timestep_divisor = num_train_timesteps, 1
        self.sample_keyword = keyword if sample_keyword == _DETECT else sample_keyword

    def extra_repr(self) -> str:
        scale = f"{self.num_train_timesteps} * sigma"
        if self.timestep_divisor != 1:
            scale = f"({scale}) / {self.timestep_divisor}"
        return f"timestep={scale}, sample_keyword={self.sample_keyword!r}"

    def fingerprint_config(self) -> str:
        """What, beside the weights, makes this field another field (see module_fingerprint)."""
        return f"diffusers: {self.extra_repr()}, model_kwargs={sorted(self.model_kwargs)}"

    def timestep(self, t: Tensor) -> Tensor:
        """The timestep the model is fed at bossflow times ``t`` (B,): from ``sigma = 1 - t``."""
        timestep = self.num_train_timesteps * (1.0 - t)
        return timestep / self.timestep_divisor if self.timestep_divisor != 1 else timestep

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = time_batch(t, x)
        timestep = self.timestep(t)
        kwargs = {**self.model_kwargs, **cond}
        if self.sample_keyword is None:
            out = self.network(x, timestep, **kwargs)
        else:
            out = self.network(**{self.sample_keyword: x}, timestep=timestep, **kwargs)
        return -_unwrap_output(out)


class FlowMatchingField(nn.Module):
    """Adapter for Meta's ``flow_matching`` models, called as ``model(x=x, t=t, **extras)``.

    ``flow_matching`` uses bossflow's time convention; its ``ODESolver`` passes a 0-dim ``t``.
    When all times of a batch are equal (sampling), the model gets that 0-dim ``t``. When they
    differ (straightening), a model that accepts a (B,) ``t`` is called once with it; one that
    does not is called once per distinct time. ``batched_time=None`` finds out on the first
    mixed batch: both ways are computed once and compared (1e-5 relative), then the faster one is
    kept.

    Args:
        model: the ``flow_matching`` model (a ``ModelWrapper`` or any ``model(x=, t=, **extras)``).
        batched_time: True: the model takes a (B,) ``t``; False: it needs a 0-dim ``t``;
            None: detect.
        **extras: static keyword arguments for every call (per-sample ones go in ``cond``).
    """

    def __init__(self, model: nn.Module, batched_time: bool | None = None, **extras: Any):
        super().__init__()
        self.network = model
        self.batched_time = batched_time
        self.extras = extras

    def fingerprint_config(self) -> str:
        """What, beside the weights, makes this field another field (see module_fingerprint)."""
        return f"flow_matching: extras={sorted(self.extras)}"

    def _call(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return _unwrap_output(self.network(x=x, t=t, **self.extras, **cond))

    def _per_time(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        out = torch.empty_like(x)
        for value in torch.unique(t):
            rows = t == value
            out[rows] = self._call(x[rows], value, {k: v[rows] for k, v in cond.items()})
        return out

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = time_batch(t, x)
        if bool((t == t[0]).all()):
            return self._call(x, t[0], cond)
        if self.batched_time is False:
            return self._per_time(x, t, cond)
        if self.batched_time:
            return self._call(x, t, cond)
        training = getattr(self.network, "training", False)  # a plain callable: no dropout
        reference = self._per_time(x, t, cond)
        try:
            # compared without dropout: in training mode the two ways would draw other masks
            with torch.no_grad(), eval_mode(self.network):
                ref = self._per_time(x, t, cond) if training else reference.detach()
                batched = self._call(x, t, cond)
            same = batched.shape == ref.shape and bool(
                torch.allclose(batched, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
            )
        except Exception:  # the model cannot take a (B,) time: that is the answer
            same = False
        self.batched_time = same
        return reference


class TorchCFMField(nn.Module):
    """Adapter for ``torchcfm`` / torchdyn models, called as ``model(t, x, **cond)``, ``t``: (B,).

    torchcfm uses bossflow's time convention (noise at 0). Class-conditional torchcfm UNets take
    the labels as ``y``: pass ``cond={"y": labels}``. ``scalar_time=True`` passes a 0-dim ``t``
    instead, for models that broadcast a scalar time themselves (requires equal times in a batch).

    torchcfm's ``torch_wrapper`` (``model(cat([x, t.repeat(B)[:, None]], 1))``, for torchdyn) is
    recognised and unwrapped: its inner network gets ``cat([x, t[:, None]], 1)`` with each row's
    own time, which is what the wrapper computes when all times are equal. A bare network of that
    kind (an MLP on ``[x, t]``) is adapted with ``concat_time=True``.
    """

    def __init__(self, model: nn.Module, scalar_time: bool = False, concat_time: bool = False):
        super().__init__()
        if type(model).__name__ == "torch_wrapper" and isinstance(
            getattr(model, "model", None), nn.Module
        ):
            model, concat_time = model.model, True
        self.network = model
        self.scalar_time = scalar_time
        self.concat_time = concat_time

    def extra_repr(self) -> str:
        return f"scalar_time={self.scalar_time}, concat_time={self.concat_time}"

    def fingerprint_config(self) -> str:
        """What, beside the weights, makes this field another field (see module_fingerprint)."""
        return f"torchcfm: {self.extra_repr()}"

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = time_batch(t, x)
        if self.concat_time:
            if x.ndim != 2:
                raise ConfigError(
                    f"concat_time models take flat (B, D) samples, got x of shape {tuple(x.shape)}"
                )
            return _unwrap_output(self.network(torch.cat([x, t[:, None].to(x.dtype)], 1), **cond))
        if self.scalar_time:
            if not bool((t == t[0]).all()):
                raise ConfigError(
                    "TorchCFMField(scalar_time=True) needs one time per batch; straightening "
                    "mixes times, so use scalar_time=False for it"
                )
            t = t[0]
        return _unwrap_output(self.network(t, x, **cond))


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

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        self.nfe += 1
        self.samples += x.shape[0]
        return self.field(x, t, **cond)


def _rows_for(value: Tensor, batch: int, name: str, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ConfigError(f"{where}: {name} must be a tensor, got {type(value).__name__}")
    if value.ndim == 0 or value.shape[0] not in (1, batch):
        raise ConfigError(
            f"{where}: {name} has shape {tuple(value.shape)}; its first dimension must be the "
            f"batch ({batch}) or 1 (the same for every sample)"
        )
    return value.expand(batch, *value.shape[1:]) if value.shape[0] == 1 and batch != 1 else value


class Guided(nn.Module):
    """Classifier-free guidance: ``v = v_u + scale * (v_c - v_u)`` in one call of 2B rows.

    ``v_c = field(x, t, **cond)`` and ``v_u = field(x, t, **uncond)``; the two are stacked into a
    single batch (unconditional rows first), as diffusers pipelines do, so a guided NFE costs one
    model call. ``scale = 1`` is the conditional field, ``scale = 0`` the unconditional one.

    The unconditional inputs come from ``uncond`` (tensors with first dimension 1, the same for
    every sample: a null label, an empty prompt's embedding) or per sample through the
    conditioning itself, under the key ``"uncond." + name`` (rows sliced with the noise like any
    conditioning). Every conditioning key needs an unconditional value from one of the two.
    Guidance-distilled models (FLUX ``guidance``) take their guidance as plain conditioning and
    need no ``Guided``.

    Args:
        field: a conditional velocity field ``field(x, t, **cond)``.
        scale: the guidance scale ``w``.
        uncond: unconditional inputs by conditioning key, one row each (shared by every
            sample); per-sample ones go in the conditioning under ``"uncond." + name``, where
            they are sliced with the noise.
    """

    PREFIX = "uncond."

    def __init__(self, field: nn.Module, scale: float, uncond: dict[str, Tensor] | None = None):
        super().__init__()
        if not isinstance(scale, (int, float)) or scale != scale:
            raise ConfigError(f"the guidance scale must be a number, got {scale!r}")
        self.field = field
        self.scale = float(scale)
        self.uncond = dict(uncond or {})
        for name, value in self.uncond.items():
            if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ConfigError(
                    f"uncond[{name!r}] must be one row shared by every sample (first dimension "
                    f"1), got {shape}; give per-sample unconditional inputs in the conditioning "
                    f"as {self.PREFIX + name!r}, so row m goes with noise m"
                )

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = time_batch(t, x)
        batch = x.shape[0]
        per_sample = {
            k[len(self.PREFIX) :]: v for k, v in cond.items() if k.startswith(self.PREFIX)
        }
        cond = {k: v for k, v in cond.items() if not k.startswith(self.PREFIX)}
        if not cond:
            raise ConfigError(
                "guidance needs conditioning: pass cond= (e.g. labels or prompt embeddings)"
            )
        both = {}
        for name, value in cond.items():
            null = per_sample.get(name, self.uncond.get(name))
            if null is None:
                raise ConfigError(
                    f"guidance has no unconditional value for {name!r}: give uncond={{{name!r}: "
                    f"...}} or per-sample {self.PREFIX + name!r} in the conditioning"
                )
            if null.device != x.device:  # moved once, not on every evaluation
                null = null.to(x.device)
                if name not in per_sample:
                    self.uncond[name] = null
            c = _rows_for(value.to(x.device), batch, name, "guidance")
            u = _rows_for(null, batch, f"the unconditional {name}", "guidance")
            both[name] = torch.cat([u.to(c.dtype), c])
        v = self.field(torch.cat([x, x]), torch.cat([t, t]), **both)
        v_u, v_c = v.chunk(2)
        return v_u + self.scale * (v_c - v_u)


def check_cond(
    cond: dict[str, Tensor] | None, batch: int, where: str, device: Any = None
) -> dict[str, Tensor] | None:
    """Validate conditioning for a batch of ``batch`` samples; (1, ...) tensors are broadcast.

    ``device``: move the tensors there (the states' device), so CPU labels serve a CUDA model.

    Raises:
        ConfigError: not a mapping of names to tensors, or a first dimension other than 1 or B.
    """
    if cond is None:
        return None
    if not isinstance(cond, dict) or not all(isinstance(k, str) for k in cond):
        raise ConfigError(
            f"{where}: cond must be a dict of conditioning tensors by keyword, got "
            f"{type(cond).__name__}"
        )
    out = {k: _rows_for(v, batch, f"cond[{k!r}]", where) for k, v in cond.items()}
    if device is not None:
        out = {k: v.to(device) for k, v in out.items()}
    return out or None


class Precision(nn.Module):
    """A field run cheaper: ``autocast`` (e.g. float16), TF32, channels-last and/or compiled.

    The forward pass runs under ``torch.autocast(device, dtype=autocast)``; the velocity comes back
    in the states' dtype, so sampling steps, states and the cost matrix's float64 accumulation are
    unchanged: only the network's arithmetic is cheaper. ``tf32=True`` lets CUDA float32 matmuls
    and convolutions use TF32 during this field's calls only (the process's settings are restored
    after each call; TF32 does nothing on a CPU). ``channels_last=True`` converts the field's 4-D
    weights to channels-last in place and hands it channels-last images (a layout change, same
    values). ``compile=True`` runs the field through ``torch.compile`` (the first call, and the
    first of another batch size, compiles: seconds to minutes; the module's weights and
    ``state_dict`` are the field's own). Measure what it costs in accuracy before using it for a
    schedule:
    ``benchmarks/bench_cost_precision.py`` prints the cost matrix's relative error and whether the
    Bellman schedules change; the CLI's ``--precision``/``--channels-last`` build this wrapper.

    Args:
        field: the velocity field (an ``nn.Module``).
        autocast: the autocast dtype (``torch.bfloat16``, ``torch.float16``), or ``None``.
        channels_last: run image models (4-D inputs) in channels-last layout.
        tf32: allow TF32 for float32 matmuls and convolutions on CUDA.
        compile: call the field through ``torch.compile(field)``.
    """

    def __init__(
        self,
        field: nn.Module,
        autocast: torch.dtype | None = torch.bfloat16,
        channels_last: bool = False,
        tf32: bool = False,
        compile: bool = False,
    ):
        super().__init__()
        if autocast not in (None, torch.float16, torch.bfloat16):
            raise ConfigError(
                f"Precision autocast must be torch.float16, torch.bfloat16 or None, got {autocast}"
            )
        self.field = field
        self.autocast = autocast
        self.channels_last = channels_last
        self.tf32 = tf32
        self.compile = compile
        if channels_last:
            field.to(memory_format=torch.channels_last)
        # kept outside the module's children: the state dict stays the field's (no _orig_mod.)
        self.__dict__["_compiled"] = torch.compile(field) if compile else None

    def extra_repr(self) -> str:
        text = f"autocast={self.autocast}, channels_last={self.channels_last}"
        text += ", tf32=True" if self.tf32 else ""  # (fingerprints of older caches hold)
        return text + (", compile=True" if self.compile else "")

    def fingerprint_config(self) -> str:
        """Another precision is another field: caches made in bf16 are not resumed in fp16."""
        return f"precision: {self.extra_repr()}"

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        x_in = x
        if self.channels_last and x.ndim == 4:
            x_in = x.contiguous(memory_format=torch.channels_last)
        run = self.field if self.__dict__["_compiled"] is None else self.__dict__["_compiled"]
        with _tf32(self.tf32):
            if self.autocast is None:
                v = run(x_in, t, **cond)
            else:
                with torch.autocast(x.device.type, dtype=self.autocast):
                    v = run(x_in, t, **cond)
        return v.to(x.dtype).contiguous()


class _tf32:
    """Within the block, CUDA float32 matmuls and convolutions may use TF32 (``enabled``), then the
    process's own settings come back; ``enabled=False`` changes nothing.

    Uses the ``fp32_precision`` settings where this torch has them (2.9 on): reading the legacy
    ``allow_tf32`` flags raises once a program has set the new ones.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.saved: tuple[Any, Any, Any] | None = None

    @staticmethod
    def _settings() -> tuple[Any, str]:
        matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        if hasattr(matmul, "fp32_precision") and hasattr(
            getattr(cudnn, "conv", None), "fp32_precision"
        ):
            return (matmul, cudnn.conv), "fp32_precision"
        return (matmul, cudnn), "allow_tf32"

    def __enter__(self) -> None:
        if self.enabled:
            objects, name = self._settings()
            on = "tf32" if name == "fp32_precision" else True
            self.saved = (objects, name, [getattr(o, name) for o in objects])
            for o in objects:
                setattr(o, name, on)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            objects, name, values = self.saved
            for o, value in zip(objects, values):
                setattr(o, name, value)
            self.saved = None


def strip_uncond(cond: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """``cond`` without the per-sample unconditional inputs (``Guided.PREFIX`` keys)."""
    if not cond:
        return cond
    return {k: v for k, v in cond.items() if not k.startswith(Guided.PREFIX)} or None


class Unguided(nn.Module):
    """A conditional field run without guidance on conditioning made for a guided run.

    Drops the per-sample unconditional inputs (``uncond.<name>``) that only :class:`Guided`
    uses, so the same ``cond`` serves a guided teacher and a student that learned the guided
    velocity in one pass (``StraightenConfig(guidance="distill")``).
    """

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        return self.field(x, t, **(strip_uncond(cond) or {}))


def guidance_identity(field: Any) -> dict[str, Any] | None:
    """What a cache must record about guidance: the scale and the unconditional inputs, or None.

    Weights fingerprints do not see a :class:`Guided` wrapper's scale, so caches and pair stores
    add this to their identity (another scale or null input is another field).
    """
    from .checkpoint import noise_fingerprint

    if not isinstance(field, Guided):
        return None
    return {
        "scale": field.scale,
        "uncond": {k: noise_fingerprint(v[0]) for k, v in sorted(field.uncond.items())},
    }


def bind_cond(field: VelocityField, cond: dict[str, Tensor] | None) -> VelocityField:
    """``field`` with conditioning fixed: ``bind_cond(f, c)(x, t) = f(x, t, **c)`` (None: ``f``)."""
    return functools.partial(field, **cond) if cond else field


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

    def fingerprint_config(self) -> str:
        """No weights: the constants are the field (see module_fingerprint)."""
        return f"affine: scale={self.scale!r}"  # the shift is a buffer, hashed with the buffers

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

    def fingerprint_config(self) -> str:
        """No weights: the constants are the field (see module_fingerprint)."""
        return f"spiral: mu={self.mu!r}"

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
