"""Evaluation metrics: error against a reference solve, PSNR, Fréchet distance, straightness.

Conventions: images are ``(B, C, H, W)`` tensors in [-1, 1] (any ``(B, ...)`` shape works for the
error metrics); ``samples[b]`` and ``reference[b]`` come from the same noise, the reference through a
fine solve (1000-step Euler or dopri5). Every statistic is computed in float64 and returned as a
Python ``float``, whatever the dtype and device of the inputs.

The Fréchet distance goes through ``torchmetrics``' ``FrechetInceptionDistance`` with a custom
feature module where torchmetrics imports, else through the float64 :func:`frechet_from_stats` (a
symmetric eigendecomposition, no SciPy); see :func:`frechet_distance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import ConfigError, ModelOutputError
from .field import VelocityField
from .schedule import Schedule, uniform
from .solvers import sample

__all__ = [
    "METHODS",
    "method_rank",
    "FRECHET_BACKENDS",
    "frechet_backend",
    "EvalRecord",
    "mse_to_reference",
    "psnr",
    "feature_stats",
    "frechet_from_stats",
    "frechet_distance",
    "straightness",
    "evaluate_samples",
]

#: The methods bossflow itself evaluates, in the order reports list them. Labels are open: a record
#: may carry any other label (a new sampler, a user's own method), listed after these
#: (alphabetically) and before ``"reference"``; see :func:`method_rank`.
METHODS: tuple[str, ...] = (
    "uniform",
    "edm",
    "bellman",
    "learned",
    "boss",
    "boss-lora",
    "boss-learned",
    "reflow",
    "reference",
)


def method_rank(label: str) -> tuple[int, str]:
    """Sort key of a method label in reports: :data:`METHODS` order, other labels after them
    alphabetically, ``"reference"`` (the fine solve) last."""
    if label == "reference":
        return (len(METHODS) + 1, label)
    if label in METHODS:
        return (METHODS.index(label), label)
    return (len(METHODS), label)


#: Fréchet backends accepted by :func:`frechet_distance`.
FRECHET_BACKENDS: tuple[str, ...] = ("auto", "torchmetrics", "float64")


def frechet_backend(backend: str = "auto") -> str:
    """The backend ``backend`` stands for: ``"auto"`` is torchmetrics where it imports, else float64."""
    if backend not in FRECHET_BACKENDS:
        raise ConfigError(f"unknown Fréchet backend {backend!r}; choose one of {FRECHET_BACKENDS}")
    if backend != "auto":
        return backend
    try:
        import torchmetrics.image.fid  # noqa: F401
    except ImportError:
        return "float64"
    return "torchmetrics"


Features = nn.Module | Callable[[Tensor], Tensor]


# -- error against the reference ----------------------------------------------------------------
def _per_sample_mse(samples: Tensor, reference: Tensor) -> Tensor:
    """(B,) float64: ``mean_d (samples[b, d] - reference[b, d])^2`` over all non-batch dims."""
    if not isinstance(samples, Tensor) or not isinstance(reference, Tensor):
        raise ConfigError(
            f"samples and reference must be tensors, got {type(samples).__name__} and "
            f"{type(reference).__name__}"
        )
    if samples.shape != reference.shape:
        raise ConfigError(
            f"samples {tuple(samples.shape)} and reference {tuple(reference.shape)} must have the "
            "same shape: reference[b] is the fine solve from the noise that gave samples[b]"
        )
    if samples.ndim < 2 or samples.shape[0] == 0:
        raise ConfigError(
            f"expected a non-empty batch shaped (B, ...), got shape {tuple(samples.shape)}"
        )
    diff = samples.detach().double() - reference.detach().to(samples.device).double()
    return diff.flatten(1).square().mean(dim=1).cpu()


def mse_to_reference(samples: Tensor, reference: Tensor) -> tuple[float, float]:
    """Mean squared error per dimension against the reference sample from the same noise.

    ``e_b = (1/D) sum_d (samples[b, d] - reference[b, d])^2``; returns ``mean_b e_b`` and its
    standard error over samples, ``std_b(e_b, ddof=1) / sqrt(B)``.

    Args:
        samples: (B, ...) few-step samples.
        reference: (B, ...) fine-solve samples from the same noises.

    Returns:
        ``(mean, stderr)`` as floats (float64 arithmetic). ``stderr`` is NaN when B = 1.

    Raises:
        ConfigError: shapes differ or the batch is empty.
    """
    per_sample = _per_sample_mse(samples, reference)
    mean = float(per_sample.mean())
    n = per_sample.numel()
    stderr = float(per_sample.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return mean, stderr


def psnr(samples: Tensor, reference: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, from the mean MSE: ``10 log10(range^2 / mean_b e_b)``.

    Computed from the *mean* per-sample MSE (the number :func:`mse_to_reference` reports), not as a
    mean of per-sample PSNRs: so it is a monotone function of the MSE column of a report and one
    sample that matches its reference exactly does not make it infinite.

    Args:
        samples: (B, ...) few-step samples.
        reference: (B, ...) fine-solve samples from the same noises.
        data_range: max - min of the data (2 for images in [-1, 1]).

    Returns:
        PSNR in dB; ``inf`` when the MSE is 0.
    """
    return psnr_from_mse(float(_per_sample_mse(samples, reference).mean()), data_range)


def psnr_from_mse(mse: float, data_range: float = 2.0) -> float:
    """``10 log10(data_range^2 / mse)`` in dB; ``inf`` when ``mse`` is 0."""
    if not data_range > 0:
        raise ConfigError(f"data_range must be positive, got {data_range!r}")
    if mse == 0.0:
        return math.inf
    if math.isinf(mse):  # diverged samples: a record, not a math domain error
        return -math.inf
    return 10.0 * math.log10(data_range**2 / mse)


# -- Fréchet distance ---------------------------------------------------------------------------
def _as_matrix(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_stats(feats: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features, in float64.

    Args:
        feats: (N, d) features, N >= 2.

    Returns:
        ``mu`` (d,) and ``sigma`` (d, d) with ``sigma = (F - mu)^T (F - mu) / (N - 1)`` (centred
        before the product, so there is no cancellation).
    """
    f = _as_matrix(feats)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ConfigError(
            f"features must be shaped (N, d) with N >= 2 samples, got shape {f.shape}; the "
            "Fréchet distance needs a covariance"
        )
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (f.shape[0] - 1)
    return mu, sigma


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues -> 0)."""
    w, q = np.linalg.eigh(0.5 * (sigma + sigma.T))
    return (q * np.sqrt(np.clip(w, 0.0, None))) @ q.T


def frechet_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``, in float64.

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``
    (Dowson & Landau 1982; the FID of Heusel et al. 2017 in a given feature space).

    The trace of the square root is computed as ``sum_i sqrt(lambda_i(R sigma2 R))`` with
    ``R = sigma1^(1/2)``: ``R sigma2 R`` is similar to ``sigma1 sigma2`` but symmetric PSD, so a
    symmetric eigendecomposition applies and no complex arithmetic or ``sqrtm`` is needed. Rounding
    can make the result a hair below zero; it is clipped at 0.

    Args:
        mu1: (d,) mean of the first set (array or tensor).
        sigma1: (d, d) covariance of the first set.
        mu2: (d,) mean of the second set.
        sigma2: (d, d) covariance of the second set.

    Returns:
        The squared Fréchet distance ``d^2`` (the number FID reports), as a float.
    """
    m1, m2 = _as_matrix(mu1).reshape(-1), _as_matrix(mu2).reshape(-1)
    s1, s2 = _as_matrix(sigma1), _as_matrix(sigma2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ConfigError(
            f"inconsistent Gaussian statistics: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, "
            f"sigma2 {s2.shape}; expected (d,), (d, d), (d,), (d, d)"
        )
    if not all(np.isfinite(a).all() for a in (m1, m2, s1, s2)):
        raise ConfigError("Fréchet statistics contain NaN or infinite values")
    root = _psd_sqrt(s1)
    inner = root @ s2 @ root
    eig = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(np.square(m1 - m2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def _extract(features: Features | None, images: Tensor, batch_size: int) -> Tensor:
    """(N, d) float64 CPU features of ``images`` (N, ...), computed ``batch_size`` at a time."""
    if not isinstance(images, Tensor) or images.ndim < 2:
        raise ConfigError("images for the Fréchet distance must be a tensor shaped (N, ...)")
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size]
            f = batch if features is None else features(batch)
            if not isinstance(f, Tensor) or f.ndim < 1 or f.shape[0] != batch.shape[0]:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ModelOutputError(
                    f"the feature extractor returned {got} for a batch of {batch.shape[0]} images; "
                    "it must return a tensor shaped (B, d)"
                )
            out.append(f.detach().reshape(batch.shape[0], -1).double().cpu())
    feats = torch.cat(out)
    if not bool(torch.isfinite(feats).all()):
        raise ModelOutputError(
            "the features contain NaN or infinite values; check the samples (a diverged solve?) "
            "and the feature extractor's expected input range"
        )
    return feats


class _Passthrough(nn.Module):
    """Identity on precomputed (B, d) float64 features, in torchmetrics' custom-feature contract.

    torchmetrics reads ``num_features`` when present (otherwise it probes the module with a random
    299x299 uint8 image, which an 8x8 model cannot take) and casts its result to the features'
    dtype, so float64 in gives float64 out.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _frechet_torchmetrics(feats_s: Tensor, feats_r: Tensor, batch_size: int) -> float:
    from .errors import require

    fid_mod = require("torchmetrics.image.fid", "metrics", "the torchmetrics Fréchet backend")
    # Every process holds the whole sets here (evaluation gathers the samples), so no syncing:
    # under torchrun torchmetrics would otherwise concatenate every rank's copy, and the
    # duplicated rows change the covariances.
    metric = fid_mod.FrechetInceptionDistance(
        feature=_Passthrough(int(feats_s.shape[1])), sync_on_compute=False
    )
    for feats, real in ((feats_r, True), (feats_s, False)):
        for start in range(0, feats.shape[0], batch_size):
            metric.update(feats[start : start + batch_size], real=real)
    return max(float(metric.compute()), 0.0)


def frechet_distance(
    samples: Tensor,
    reference_data: Tensor,
    features: Features | None = None,
    *,
    batch_size: int = 256,
    backend: str = "auto",
) -> float:
    """Fréchet distance between generated samples and held-out data in a feature space.

    Both sets go through ``features`` (in batches, under ``torch.no_grad``); their feature means and
    covariances give ``d^2 = ||mu_s - mu_r||^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))``. With
    Inception-v3 features this is FID; no Inception weights are available offline, so pass any
    feature module (e.g. a small classifier's penultimate layer) or ``None`` for raw pixels.
    Values are comparable only within one feature space and similar set sizes (the estimate is
    biased upwards for small sets).

    Backends (both are tested to agree to 1e-6 relative):

    - ``"torchmetrics"``: ``torchmetrics.image.fid.FrechetInceptionDistance(feature=<module>)``, the
      maintained implementation (extra ``metrics``), fed the extracted features through an identity
      module that carries ``num_features`` (so torchmetrics does not probe it with a 299x299
      image; torch-fidelity is not needed).
    - ``"float64"``: :func:`feature_stats` and :func:`frechet_from_stats`, centred covariances and a
      symmetric eigendecomposition in float64, numpy only: the fallback where torchmetrics is not
      installed, and slightly more robust on rank-deficient covariances (torchmetrics takes the
      square root of the complex eigenvalues of the non-symmetric ``S_s S_r``).
    - ``"auto"`` (default): torchmetrics where it imports, else float64 (:func:`frechet_backend`).

    Args:
        samples: (N, C, H, W) generated images in [-1, 1] (any (N, ...) the features accept), N >= 2.
        reference_data: (M, C, H, W) real held-out images, M >= 2.
        features: ``nn.Module`` or callable mapping (B, ...) images to (B, d) features (larger
            outputs are flattened); ``None`` uses the flattened pixels. Put modules in eval mode.
        batch_size: images per call to ``features``.
        backend: ``"auto"``, ``"torchmetrics"`` or ``"float64"``.

    Returns:
        The squared Fréchet distance (the number FID reports), as a float.
    """
    backend = frechet_backend(backend)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    feats_s = _extract(features, samples, batch_size)
    feats_r = _extract(features, reference_data, batch_size)
    if feats_s.shape[1] != feats_r.shape[1]:
        raise ModelOutputError(
            f"features of samples ({feats_s.shape[1]}) and data ({feats_r.shape[1]}) differ in size; "
            "samples and reference data must have the same image shape"
        )
    stats_s, stats_r = feature_stats(feats_s), feature_stats(feats_r)  # also checks N >= 2
    if backend == "torchmetrics":
        return _frechet_torchmetrics(feats_s, feats_r, batch_size)
    return frechet_from_stats(*stats_s, *stats_r)


# -- straightness -------------------------------------------------------------------------------
def straightness(
    field: VelocityField,
    noise: Tensor,
    schedule_or_steps: Schedule | int | Sequence[float] = 100,
) -> float:
    """Straightness of the flow (Liu et al. 2023, "Flow straight and fast", eq. of S(Z)).

    ``S = E_b int_0^1 (1/D) ||(X_1 - X_0) - v(X_t, t)||^2 dt`` along Euler trajectories on the
    given grid, the integral taken as ``sum_k (t_{k+1} - t_k) (...)`` at the left end of each step.
    0 means every trajectory is a straight line traversed at constant speed (then one Euler step is
    exact). Per dimension, like :func:`mse_to_reference`. Accumulated in float64 through
    ``||D - v_k||^2 = ||D||^2 - 2 D.v_k + ||v_k||^2`` so no velocity history is stored.

    Args:
        field: velocity field ``v(x, t)``.
        noise: (B, ...) starting states at t = 0.
        schedule_or_steps: a :class:`Schedule`, a grid of times, or a number of uniform steps.

    Returns:
        The straightness as a float (>= 0).
    """
    schedule = (
        uniform(schedule_or_steps) if isinstance(schedule_or_steps, int) else schedule_or_steps
    )
    batch = noise.shape[0]
    sum_hv = torch.zeros(batch, noise[0].numel(), dtype=torch.float64, device=noise.device)
    sum_hvv = torch.zeros(batch, dtype=torch.float64, device=noise.device)
    total_h = 0.0

    def record(info: dict[str, Any]) -> None:
        nonlocal sum_hv, sum_hvv, total_h
        h = info["t_next"] - info["t"]
        v = info["v"].detach().double().reshape(batch, -1)
        sum_hv += h * v
        sum_hvv += h * v.square().sum(dim=1)
        total_h += h

    x1 = sample(field, noise, schedule, solver="euler", callback=record)
    disp = (x1.double() - noise.double()).reshape(batch, -1)
    per_sample = (
        total_h * disp.square().sum(dim=1) - 2.0 * (disp * sum_hv).sum(dim=1) + sum_hvv
    ) / disp.shape[1]
    return max(float(per_sample.mean()), 0.0)


# -- records ------------------------------------------------------------------------------------
def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum


def _check_method(method: Any) -> str:
    """A method label: any short text that fits a table cell and a file name."""
    if (
        not isinstance(method, str)
        or not method.strip()
        or len(method) > 64
        or any(c in method for c in "|\n\r\t/\\")
    ):
        raise ConfigError(
            f"a method label must be a non-empty string of at most 64 characters without "
            f"'|', '/', '\\' or line breaks (e.g. 'bellman', 'learned'), got {method!r}"
        )
    return method


def _float_or_none(value: Any, name: str, optional: bool) -> float | None:
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} is required, got None")
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    # JSON files store non-finite values as these strings (see bossflow.report.write_results).
    if isinstance(value, str) and value.lower() not in ("inf", "-inf", "nan"):
        raise ConfigError(f"{name} must be a number, got the string {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


@dataclass(frozen=True)
class EvalRecord:
    """One row of a report: a method evaluated at one NFE.

    Attributes:
        method: the method's label (:data:`METHODS` or any other, see :func:`method_rank`).
        nfe: function evaluations per sample (exact count).
        mse_to_reference: mean per-dimension squared error to the reference sample, see
            :func:`mse_to_reference`.
        mse_stderr: its standard error over samples (NaN if one sample).
        psnr: dB, from the mean MSE (``inf`` for a perfect match), see :func:`psnr`.
        frechet: Fréchet distance to held-out data, or ``None`` if not measured.
        wall_s: wall-clock seconds spent sampling.
        iterations: fine-tuning iterations (``boss``, ``boss-lora``, ``reflow``), else ``None``.
    """

    method: str
    nfe: int
    mse_to_reference: float
    mse_stderr: float
    psnr: float
    frechet: float | None
    wall_s: float
    iterations: int | None = None

    def __post_init__(self) -> None:
        _check_method(self.method)
        if (
            isinstance(self.nfe, bool)
            or not isinstance(self.nfe, (int, np.integer))
            or self.nfe < 1
        ):
            raise ConfigError(f"nfe must be a positive integer, got {self.nfe!r}")
        object.__setattr__(self, "nfe", int(self.nfe))
        for name in ("mse_to_reference", "mse_stderr", "psnr", "wall_s"):
            object.__setattr__(self, name, _float_or_none(getattr(self, name), name, False))
        object.__setattr__(self, "frechet", _float_or_none(self.frechet, "frechet", True))
        it = self.iterations
        if it is not None:
            if not _is_count(it, 0):
                raise ConfigError(f"iterations must be a non-negative integer or None, got {it!r}")
            object.__setattr__(self, "iterations", int(it))

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (floats may be non-finite; JSON writers must map them)."""
        return {
            "method": self.method,
            "nfe": self.nfe,
            "mse_to_reference": self.mse_to_reference,
            "mse_stderr": self.mse_stderr,
            "psnr": self.psnr,
            "frechet": self.frechet,
            "wall_s": self.wall_s,
            "iterations": self.iterations,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecord:
        """Inverse of :meth:`to_dict`; also accepts ``"inf"``/``"-inf"``/``"nan"`` strings and a
        missing ``mse_stderr`` (NaN)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a record must be a mapping, got {type(data).__name__}")
        required = ("method", "nfe", "mse_to_reference", "psnr", "frechet", "wall_s", "iterations")
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"record {dict(data)!r} lacks the keys {missing}")
        return cls(
            method=data["method"],
            nfe=data["nfe"],
            mse_to_reference=data["mse_to_reference"],
            mse_stderr=data.get("mse_stderr", math.nan),
            psnr=data["psnr"],
            frechet=data["frechet"],
            wall_s=data["wall_s"],
            iterations=data["iterations"],
        )


def evaluate_samples(
    samples: Tensor,
    reference: Tensor,
    data: Tensor | None,
    features: Features | None,
    method: str,
    nfe: int,
    wall_s: float,
    iterations: int | None = None,
    *,
    data_range: float = 2.0,
) -> EvalRecord:
    """Measure one method at one NFE and return its :class:`EvalRecord`.

    Args:
        samples: (B, C, H, W) samples of the method, in [-1, 1].
        reference: (B, C, H, W) fine-solve samples from the same noises.
        data: (M, C, H, W) held-out real images for the Fréchet distance, or ``None`` to skip it.
        features: feature extractor for :func:`frechet_distance` (``None``: raw pixels).
        method: the method's label (:data:`METHODS` or any other).
        nfe: function evaluations per sample.
        wall_s: wall-clock seconds spent sampling.
        iterations: fine-tuning iterations, if the method was fine-tuned.
        data_range: value range of the images, for PSNR.

    Returns:
        The record.
    """
    _check_method(method)
    mse, stderr = mse_to_reference(samples, reference)
    frechet = None
    if data is not None:  # a diverged method is a row (NaN), not the end of the evaluation
        finite = bool(torch.isfinite(samples).all())
        frechet = frechet_distance(samples, data, features) if finite else math.nan
    return EvalRecord(
        method=method,
        nfe=nfe,
        mse_to_reference=mse,
        mse_stderr=stderr,
        psnr=psnr_from_mse(mse, data_range),
        frechet=frechet,
        wall_s=wall_s,
        iterations=iterations,
    )
