"""The recipe of the embedded default models: the rectified-flow UNet and the digit classifier.

Rectified flow / conditional flow matching (Liu et al. 2023; Lipman et al. 2023) in the bossflow
convention: for data ``x``, noise ``z ~ N(0, I)`` and ``t ~ U[0, 1]``,

    x_t = t * x + (1 - t) * z,        loss = mean || v_theta(x_t, t) - (x - z) ||^2,

so ``v_theta`` is a velocity field with noise at ``t = 0`` and data at ``t = 1``. Adam, linear
warmup then cosine (or constant) learning rate, gradient clipping, and an exponential moving
average (EMA) of the weights, which is what :func:`train_base` returns.

Every random draw (initial weights, batches, noise, times, augmentation) comes from generators
seeded by ``seed``: on CPU the same call gives bitwise the same weights on the same machine and
thread count (GPU convolution kernels are not bitwise reproducible run to run).

:func:`train_and_save` is the whole recipe behind the shipped ``digits`` and ``digits-classifier``
models: train both, measure them on the held-out split, and save them with their provenance. It
sits above the core (it uses the data, models, metrics, solvers and the training toolkit
:mod:`bossflow.training`); nothing in the core imports it. ``bossflow.train_base`` is an alias
kept so the provenance of the shipped weights still names an importable function.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_dataset
from ..errors import ConfigError
from ..metrics import feature_stats, frechet_from_stats
from ..models.unet import DigitClassifier, DigitUNet
from ..pretrained import save_pretrained
from ..progress import progress_bar
from ..schedule import uniform
from ..solvers import sample
from ..training import EMA, LR_SCHEDULES, epoch_batches, interpolate, learning_rate

__all__ = [
    "TrainLog",
    "LR_SCHEDULES",
    "learning_rate",
    "train_base",
    "train_classifier",
    "flow_validation_loss",
    "classifier_accuracy",
    "sample_check",
    "train_and_save",
]


@dataclass
class TrainLog:
    """What happened during a training run.

    Attributes:
        step: optimisation steps (1-based) at which ``loss`` and ``lr`` were recorded.
        loss: mean training loss over the steps since the previous record.
        lr: learning rate at that step.
        val_step: steps at which ``val_loss`` was measured (on the EMA weights).
        val_loss: held-out loss, empty if no validation data was given.
        wall_time_s: seconds spent in the training loop.
        settings: the arguments of the call (JSON-serialisable), for provenance.
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)


def _check_images(data: Tensor, what: str) -> None:
    if not isinstance(data, Tensor) or data.ndim != 4 or not data.is_floating_point():
        raise ConfigError(
            f"{what} must be a float tensor of shape (N, C, H, W) in [-1, 1], "
            f"got {type(data).__name__} {tuple(getattr(data, 'shape', ()))}"
        )
    if data.shape[0] == 0:
        raise ConfigError(f"{what} is empty")


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG (weight init, dropout) inside a block; restore the caller's after."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _flow_pair(x: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``(x_t, t, target)`` for a batch of data ``x`` (B, ...): t ~ U[0, 1], target x - z."""
    z = torch.randn(x.shape, generator=gen).to(x)
    t = torch.rand(x.shape[0], generator=gen).to(x)
    x_t, target = interpolate(z, x, t)
    return x_t, t, target


def train_base(
    data: Tensor,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    model_config: dict[str, Any] | None = None,
    warmup: int = 100,
    lr_schedule: Literal["cosine", "constant"] = "cosine",
    ema_decay: float = 0.999,
    grad_clip: float = 1.0,
    weight_decay: float = 0.0,
    val_data: Tensor | None = None,
    val_every: int = 500,
    log_every: int = 50,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[DigitUNet, TrainLog]:
    """Train a :class:`DigitUNet` velocity field on ``data`` by rectified flow.

    ``x_t = t x + (1 - t) z``, ``z ~ N(0, I)``, ``t ~ U[0, 1]``; loss
    ``mean ||v(x_t, t) - (x - z)||^2`` (mean over batch and pixels). Adam with linear warmup and
    cosine or constant learning rate, gradient-norm clipping, EMA of the weights with decay
    ``min(ema_decay, (1 + s) / (10 + s))`` at step ``s``.

    Args:
        data: training images, shape (N, C, H, W), values in [-1, 1].
        steps: optimisation steps.
        batch_size: images per step (capped at N).
        lr: peak learning rate.
        seed: seeds the weights, batches, noise and times.
        model_config: keyword arguments of :class:`DigitUNet` (``in_channels`` is taken from
            ``data``); default: the class defaults.
        warmup: linear warmup steps.
        lr_schedule: ``"cosine"`` (to 0 at ``steps``) or ``"constant"``.
        ema_decay: maximum EMA decay.
        grad_clip: maximum gradient norm (``0`` disables clipping).
        weight_decay: Adam (L2) weight decay.
        val_data: held-out images (M, C, H, W); if given, :func:`flow_validation_loss` of the EMA
            model is logged every ``val_every`` steps and at the end.
        val_every: steps between validations.
        log_every: steps between training-loss records.
        device: where to train (default: ``data``'s device).
        progress: show a progress bar (on a terminal only).

    Returns:
        ``(ema_model, log)``: the EMA weights as a :class:`DigitUNet` in eval mode, on ``device``,
        and the :class:`TrainLog`.

    Raises:
        ConfigError: bad data shape or settings.
    """
    _check_images(data, "data")
    if val_data is not None:
        _check_images(val_data, "val_data")
    if steps < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= ema_decay < 1.0:
        raise ConfigError(
            f"need steps >= 1, batch_size >= 1, lr > 0 and 0 <= ema_decay < 1; got steps={steps}, "
            f"batch_size={batch_size}, lr={lr}, ema_decay={ema_decay}"
        )
    learning_rate(0, steps, lr, warmup, lr_schedule)  # validates the schedule name
    device = torch.device(device) if device is not None else data.device
    config = {**(model_config or {}), "in_channels": data.shape[1]}
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "model_config": config,
        "warmup": warmup,
        "lr_schedule": lr_schedule,
        "ema_decay": ema_decay,
        "grad_clip": grad_clip,
        "weight_decay": weight_decay,
        "val_every": val_every,
        "log_every": log_every,
        "num_images": data.shape[0],
        "image_shape": list(data.shape[1:]),
    }

    # The global RNG (weight init, dropout) is seeded inside and the caller's state restored.
    with _seeded_global_rng(seed, device):
        model = DigitUNet(**config).to(device).train()
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # holds the averages
        averages = EMA(
            model.parameters(),
            ema_decay,
            copy=model.buffers(),
            shadow=ema.parameters(),
            shadow_copied=ema.buffers(),
        )
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        data = data.to(device=device, dtype=torch.float32)
        if val_data is not None:
            val_data = val_data.to(device=device, dtype=torch.float32)
        batches = epoch_batches(data.shape[0], batch_size, gen)
        log = TrainLog(settings=settings)

        def validate(step: int) -> None:
            if val_data is not None:
                log.val_step.append(step)
                log.val_loss.append(flow_validation_loss(ema, val_data, seed=seed))

        start = time.perf_counter()
        running, count = 0.0, 0
        bar = progress_bar(total=steps, desc="train-base", enabled=progress)
        for step in range(steps):
            current_lr = learning_rate(step, steps, lr, warmup, lr_schedule)
            for group in opt.param_groups:
                group["lr"] = current_lr
            x = data[next(batches)]
            x_t, t, target = _flow_pair(x, gen)
            loss = F.mse_loss(model(x_t, t), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            averages.update(step)

            running += loss.item()  # a sync point on GPU; cheap next to this model's step
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.step.append(step + 1)
                log.loss.append(running / count)
                log.lr.append(current_lr)
                bar.set_postfix(loss=f"{running / count:.4f}", lr=f"{current_lr:.2e}")
                running, count = 0.0, 0
            bar.update(1)
            if val_every > 0 and (step + 1) % val_every == 0 and step + 1 != steps:
                validate(step + 1)
        bar.close()
        validate(steps)
        log.wall_time_s = time.perf_counter() - start
        return ema, log


@torch.no_grad()
def flow_validation_loss(
    model: Callable[[Tensor, Tensor], Tensor],
    data: Tensor,
    seed: int = 0,
    repeats: int = 8,
    batch_size: int = 512,
) -> float:
    """Rectified-flow loss on held-out data with fixed noise and times (comparable across models).

    Each image is used ``repeats`` times with its own ``(z, t)`` from a generator seeded by
    ``seed``; times are stratified (``t = (k + u) / repeats``, ``u ~ U[0, 1)``, k = 0..repeats-1)
    to lower the variance of the estimate.

    Args:
        model: velocity field ``v(x, t)``, ``x: (B, C, H, W)``, ``t: (B,)``.
        data: held-out images, shape (N, C, H, W), in [-1, 1].
        seed: seed of the noise and times.
        repeats: noise/time draws per image.
        batch_size: evaluation batch size.

    Returns:
        ``mean ||v(x_t, t) - (x - z)||^2`` over images, draws and pixels.
    """
    _check_images(data, "data")
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for k in range(repeats):
        for i in range(0, data.shape[0], batch_size):
            x = data[i : i + batch_size]
            z = torch.randn(x.shape, generator=gen).to(x)
            t = ((k + torch.rand(x.shape[0], generator=gen, dtype=torch.float64)) / repeats).to(x)
            tb = t.view(-1, *([1] * (x.ndim - 1)))
            err = (model(tb * x + (1 - tb) * z, t) - (x - z)).double().pow(2)
            total += err.sum().item()
            count += err.numel()
    return total / count


def _nearest_distance(x: Tensor, reference: Tensor) -> Tensor:
    """Per-image RMS pixel distance from each x (N, ...) to its nearest reference image (M, ...)."""
    d2 = torch.cdist(x.flatten(1).double(), reference.flatten(1).double()).pow(2)
    return (d2.min(dim=1).values / x[0].numel()).sqrt()


@torch.no_grad()
def sample_check(
    model: Callable[[Tensor, Tensor], Tensor],
    classifier: DigitClassifier,
    train_images: Tensor,
    heldout_images: Tensor,
    num_samples: int = 500,
    steps: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Quality checks of a flow model's fine-Euler samples against real held-out digits.

    Samples: ``num_samples`` noises from a generator seeded by ``seed``, integrated by
    :func:`bossflow.solvers.sample` with ``steps`` uniform Euler steps. Each statistic is also computed on the held-out
    images, the yardstick for what real unseen digits give:

    - ``mean_confidence`` / ``confident_fraction``: classifier max-softmax, mean and share > 0.9.
    - ``class_histogram``: predicted classes of the samples (10 counts).
    - ``nearest_train_rms``: mean RMS pixel distance to the nearest training image; far below the
      held-out value would mean the model copies its training set.
    - ``frechet_to_heldout``: Fréchet distance of classifier features, samples vs held-out; the
      yardstick is a same-sized random subset of the training images vs held-out.
    - ``out_of_range_fraction``: pixels of the samples outside [-1.1, 1.1].

    Args:
        model: velocity field, ``x: (B, C, H, W)``, ``t: (B,)`` in [0, 1], data at ``t = 1``.
        classifier: digit classifier on images in [-1, 1].
        train_images: training images (N, C, H, W).
        heldout_images: held-out images (M, C, H, W).
        num_samples: number of samples.
        steps: Euler steps of the reference solve.
        seed: seed of the noise and of the training subset.

    Returns:
        JSON-serialisable dict: ``{"samples": {...}, "heldout": {...}, "train_subset": {...}}`` of
        the statistics above, plus the settings.
    """
    classifier = classifier.eval()
    gen = torch.Generator().manual_seed(seed)
    device = train_images.device
    noise = torch.randn((num_samples, *train_images.shape[1:]), generator=gen).to(device)
    samples = sample(model, noise, uniform(steps))
    subset = train_images[torch.randperm(train_images.shape[0], generator=gen)[:num_samples]]
    heldout_stats = feature_stats(classifier.features(heldout_images))

    def stats(images: Tensor, exclude_self: bool = False) -> dict[str, Any]:
        probs = classifier(images).softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        if exclude_self:
            # Subset images are themselves training images: drop the zero distance to themselves.
            d2 = torch.cdist(images.flatten(1).double(), train_images.flatten(1).double()).pow(2)
            d2[d2 == 0] = float("inf")
            nearest = (d2.min(dim=1).values / images[0].numel()).sqrt()
        else:
            nearest = _nearest_distance(images, train_images)
        return {
            "count": images.shape[0],
            "mean_confidence": round(float(confidence.mean()), 4),
            "confident_fraction": round(float((confidence > 0.9).float().mean()), 4),
            "class_histogram": torch.bincount(predicted, minlength=10).tolist(),
            "nearest_train_rms": round(float(nearest.mean()), 4),
            "frechet_to_heldout": round(
                frechet_from_stats(*feature_stats(classifier.features(images)), *heldout_stats), 4
            ),
            "out_of_range_fraction": round(float((images.abs() > 1.1).float().mean()), 5),
        }

    return {
        "num_samples": num_samples,
        "euler_steps": steps,
        "seed": seed,
        "samples": stats(samples),
        "heldout": {k: v for k, v in stats(heldout_images).items() if k != "frechet_to_heldout"},
        "train_subset": stats(subset, exclude_self=True),
    }


def _shift_augment(x: Tensor, max_shift: int, gen: torch.Generator) -> Tensor:
    """Shift each image (B, C, H, W) by up to ``max_shift`` pixels, filling with -1 (background)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


def train_classifier(
    images: Tensor,
    labels: Tensor,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    *,
    model_config: dict[str, Any] | None = None,
    max_shift: int = 1,
    noise_std: float = 0.05,
    warmup: int = 50,
    weight_decay: float = 1e-4,
    label_smoothing: float = 0.05,
    log_every: int = 50,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[DigitClassifier, TrainLog]:
    """Train a :class:`DigitClassifier` by cross-entropy with light augmentation.

    Augmentation: random translations by up to ``max_shift`` pixels (background filled with -1) and
    Gaussian pixel noise of std ``noise_std``, so that generated digits, which are slightly off the
    data manifold, are still classified reliably. AdamW, warmup then cosine learning rate.

    Args:
        images: training images, shape (N, C, H, W), in [-1, 1].
        labels: classes, int64 of shape (N,).
        steps: optimisation steps.
        batch_size: images per step.
        lr: peak learning rate.
        seed: seeds weights, batches and augmentation.
        model_config: keyword arguments of :class:`DigitClassifier` (``in_channels`` from data).
        max_shift: largest translation in pixels.
        noise_std: std of additive Gaussian noise.
        warmup: warmup steps.
        weight_decay: AdamW weight decay.
        label_smoothing: cross-entropy label smoothing.
        log_every: steps between loss records.
        device: where to train (default: ``images``' device).
        progress: show a progress bar (on a terminal only).

    Returns:
        ``(classifier, log)``, the classifier in eval mode.
    """
    _check_images(images, "images")
    if labels.shape != (images.shape[0],):
        raise ConfigError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(
            f"need steps >= 1, batch_size >= 1 and lr > 0; got steps={steps}, "
            f"batch_size={batch_size}, lr={lr}"
        )
    device = torch.device(device) if device is not None else images.device
    config = {**(model_config or {}), "in_channels": images.shape[1]}
    config.setdefault("num_classes", int(labels.max()) + 1 if labels.numel() else 10)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "model_config": config,
        "max_shift": max_shift,
        "noise_std": noise_std,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "num_images": images.shape[0],
    }
    with _seeded_global_rng(seed, device):
        model = DigitClassifier(**config).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        images = images.to(device=device, dtype=torch.float32)
        labels = labels.to(device)
        batches = epoch_batches(images.shape[0], batch_size, gen)
        log = TrainLog(settings=settings)

        start = time.perf_counter()
        running, count = 0.0, 0
        bar = progress_bar(total=steps, desc="train-classifier", enabled=progress)
        for step in range(steps):
            current_lr = learning_rate(step, steps, lr, warmup, "cosine")
            for group in opt.param_groups:
                group["lr"] = current_lr
            idx = next(batches)
            x = _shift_augment(images[idx], max_shift, gen)
            x = x + noise_std * torch.randn(x.shape, generator=gen).to(x)
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            count += 1
            if (step + 1) % log_every == 0 or step + 1 == steps:
                log.step.append(step + 1)
                log.loss.append(running / count)
                log.lr.append(current_lr)
                bar.set_postfix(loss=f"{running / count:.4f}")
                running, count = 0.0, 0
            bar.update(1)
        bar.close()
        log.wall_time_s = time.perf_counter() - start
        return model.eval(), log


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024
) -> float:
    """Fraction of ``images`` (N, C, H, W) whose arg-max class equals ``labels`` (N,)."""
    classifier.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        logits = classifier(images[i : i + batch_size])
        correct += int((logits.argmax(dim=1) == labels[i : i + batch_size]).sum())
    return correct / images.shape[0]


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }


def train_and_save(
    directory: str | Path,
    dataset: str = "digits",
    name: str | None = None,
    seed: int = 0,
    *,
    flow: dict[str, Any] | None = None,
    classifier: dict[str, Any] | None = None,
    check_samples: int = 500,
    check_steps: int = 200,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the flow UNet and the classifier on an embedded data set, evaluate, and save both.

    Writes ``<name>.safetensors/.json`` (the EMA UNet) and ``<name>-classifier.safetensors/.json``
    with :func:`~bossflow.pretrained.save_pretrained`. Their provenance records the call, seed,
    data, wall times, environment and held-out metrics: classifier accuracy; the flow's
    :func:`flow_validation_loss` and :func:`sample_check`.

    Args:
        directory: output folder.
        dataset: a key of :data:`bossflow.data.DATASETS`.
        name: file stem of the flow model (default: ``dataset``).
        seed: seed of both trainings and of the checks.
        flow: extra keyword arguments of :func:`train_base` (``steps``, ``batch_size``, ...).
        classifier: extra keyword arguments of :func:`train_classifier`.
        check_samples: samples drawn for :func:`sample_check`.
        check_steps: Euler steps of those samples.
        device: where to train.
        progress: show progress bars.

    Returns:
        ``{"flow": provenance, "classifier": provenance, "paths": [...]}``.
    """
    flow, classifier = dict(flow or {}), dict(classifier or {})
    name = name or dataset
    train, heldout = load_dataset(dataset, "train"), load_dataset(dataset, "heldout")
    data_desc = {
        "dataset": dataset,
        "train_split": f"bossflow.data.load_dataset({dataset!r}, 'train')",
        "num_train": len(train),
        "num_heldout": len(heldout),
        "scaling": "[-1, 1]",
    }
    call = (
        f"bossflow.train_base.train_and_save(directory, dataset={dataset!r}, name={name!r}, "
        f"seed={seed}, flow={flow!r}, classifier={classifier!r}, check_samples={check_samples}, "
        f"check_steps={check_steps})"
    )

    clf, clf_log = train_classifier(
        train.images, train.labels, seed=seed, device=device, progress=progress, **classifier
    )
    clf_device = next(clf.parameters()).device
    accuracy = classifier_accuracy(
        clf, heldout.images.to(clf_device), heldout.labels.to(clf_device)
    )
    clf_prov = {
        "call": call,
        "function": "bossflow.train_base.train_classifier",
        "settings": clf_log.settings,
        "data": data_desc,
        "wall_time_s": round(clf_log.wall_time_s, 1),
        "final_train_loss": round(clf_log.loss[-1], 5),
        "heldout_accuracy": round(accuracy, 4),
        "environment": _environment(),
    }

    model, log = train_base(
        train.images, seed=seed, val_data=heldout.images, device=device, progress=progress, **flow
    )
    dev = next(model.parameters()).device
    check_start = time.perf_counter()
    check = sample_check(
        model,
        clf.to(dev),
        train.images.to(dev),
        heldout.images.to(dev),
        num_samples=check_samples,
        steps=check_steps,
        seed=seed,
    )
    flow_prov = {
        "call": call,
        "function": "bossflow.train_base.train_base",
        "settings": log.settings,
        "data": data_desc,
        "time_convention": "noise at t=0, data at t=1; x_t = t*x + (1-t)*z; v = dx/dt",
        "wall_time_s": round(log.wall_time_s, 1),
        "final_train_loss": round(log.loss[-1], 5),
        "heldout_loss": round(log.val_loss[-1], 5),
        "heldout_loss_curve": {
            "step": log.val_step,
            "loss": [round(v, 5) for v in log.val_loss],
        },
        "sample_check": check,
        "sample_check_wall_time_s": round(time.perf_counter() - check_start, 1),
        "classifier": f"{name}-classifier",
        "environment": _environment(),
    }
    paths = [
        save_pretrained(model.cpu(), directory, name, flow_prov),
        save_pretrained(clf.cpu(), directory, f"{name}-classifier", clf_prov),
    ]
    return {"flow": flow_prov, "classifier": clf_prov, "paths": [str(p) for p in paths]}
