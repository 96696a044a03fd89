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
models: train both, measure them on the held-out split, and save them with their provenance.
:func:`train_and_save_conditional` is the recipe of ``digits-cond``: the same training with the
digit labels and label dropout (the null label teaches the unconditional field, for
classifier-free guidance), a class-accuracy check of guided samples per guidance scale with the
shipped classifier, and the chosen default scale saved in the provenance. It
sits above the core (it uses the data, models, metrics, solvers and the training toolkit
:mod:`bossflow.training`); nothing in the core imports it. ``bossflow.train_base`` is an alias
kept so the provenance of the shipped weights still names an importable function.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import noise_fingerprint
from ..data import load_dataset
from ..errors import CheckpointError, ConfigError
from ..field import Guided
from ..metrics import feature_stats, frechet_from_stats
from ..models.unet import DigitClassifier, DigitUNet
from ..pretrained import (
    class_labels_cond,
    load_digits_classifier,
    null_class_cond,
    save_pretrained,
)
from ..progress import progress_bar
from ..schedule import uniform
from ..solvers import sample
from ..training import (
    EMA,
    LR_SCHEDULES,
    epoch_batches,
    interpolate,
    learning_rate,
    load_state,
    save_state,
)

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
    "GUIDANCE_SCALES",
    "guidance_check",
    "choose_guidance_scale",
    "train_and_save_conditional",
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


_CHECKPOINT_FORMAT = "bossflow.train-base/1"


class _Checkpoints:
    """A training loop's checkpoint at ``path``: written every ``every`` steps and at the end
    (atomically), read back when a rerun has the same ``identity``; ``path=None``: none."""

    def __init__(self, path: str | Path | None, every: int, identity: dict[str, Any]):
        if every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {every}")
        self.path = None if path is None else Path(path)
        self.every, self.identity = every, identity

    def resume(
        self, parts: dict[str, Any], gen: torch.Generator, device: torch.device, log: TrainLog
    ) -> tuple[TrainLog, int, float, int, float]:
        """Restore ``parts`` (objects with ``load_state_dict``), the generators and the loop from
        the checkpoint of this run, if any: ``(log, first step, running loss, count, seconds)``."""
        if self.path is None or not self.path.exists():
            return log, 0, 0.0, 0, 0.0
        state = load_state(self.path, _CHECKPOINT_FORMAT)
        if state.get("identity") != self.identity:
            raise CheckpointError(
                f"{self.path} is the checkpoint of another training run (other settings or data); "
                "delete it to train from the start, or use another folder"
            )
        for name, part in parts.items():
            part.load_state_dict(state[name])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        loop = (state[k] for k in ("step", "running", "count", "wall"))
        return TrainLog(**state["log"]), *loop

    def due(self, step: int, steps: int) -> bool:
        return self.path is not None and (step % self.every == 0 or step == steps)

    def save(
        self,
        parts: dict[str, Any],
        gen: torch.Generator,
        device: torch.device,
        log: TrainLog,
        step: int,
        running: float,
        count: int,
        wall: float,
    ) -> None:
        rng = {"cpu": torch.get_rng_state()}  # the global RNG: weight init, dropout
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        state = {name: part.state_dict() for name, part in parts.items()}
        state.update(generator=gen.get_state(), rng=rng, log=asdict(log), step=step)
        state.update(running=running, count=count, wall=wall)
        save_state(self.path, {"format": _CHECKPOINT_FORMAT, "identity": self.identity, **state})


def _check_labels(labels: Tensor, count: int, num_classes: int, what: str) -> None:
    if not isinstance(labels, Tensor) or labels.shape != (count,) or labels.is_floating_point():
        raise ConfigError(
            f"{what} must be an integer tensor of shape ({count},), got "
            f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}"
        )
    if count and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(
            f"{what} must lie in 0..{num_classes - 1} (num_classes={num_classes}), got values "
            f"from {int(labels.min())} to {int(labels.max())}"
        )


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
    labels: Tensor | None = None,
    val_labels: Tensor | None = None,
    label_dropout: float = 0.1,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
) -> tuple[DigitUNet, TrainLog]:
    """Train a :class:`DigitUNet` velocity field on ``data`` by rectified flow.

    ``x_t = t x + (1 - t) z``, ``z ~ N(0, I)``, ``t ~ U[0, 1]``; loss
    ``mean ||v(x_t, t) - (x - z)||^2`` (mean over batch and pixels). Adam with linear warmup and
    cosine or constant learning rate, gradient-norm clipping, EMA of the weights with decay
    ``min(ema_decay, (1 + s) / (10 + s))`` at step ``s``.

    With ``labels`` the model is class-conditional (``num_classes`` from ``model_config``, default
    ``labels.max() + 1``): the loss is ``mean ||v(x_t, t, y') - (x - z)||^2`` where ``y'`` is the
    image's label, replaced by the null label ``num_classes`` with probability ``label_dropout``
    (Ho & Salimans 2022, classifier-free guidance), so one network learns both the conditional and
    the unconditional field. Without labels, training is exactly the unconditional recipe (the
    generator draws nothing more).

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
        labels: classes of ``data``, int64 of shape (N,), for a class-conditional model.
        val_labels: classes of ``val_data`` (M,); required with ``labels`` and ``val_data``.
        label_dropout: probability that a training label is replaced by the null label.
        checkpoint: a file for the run's state, written every ``checkpoint_every`` steps and at
            the end (atomically); a rerun with the same settings and data resumes from it and
            ends with the weights of an uninterrupted run. ``None``: no checkpoints.
        checkpoint_every: steps between checkpoints.

    Returns:
        ``(ema_model, log)``: the EMA weights as a :class:`DigitUNet` in eval mode, on ``device``,
        and the :class:`TrainLog`.

    Raises:
        ConfigError: bad data shape or settings.
    """
    _check_images(data, "data")
    if val_data is not None:
        _check_images(val_data, "val_data")
    num_classes = int((model_config or {}).get("num_classes", 0) or 0)
    if labels is None and (num_classes or val_labels is not None):
        raise ConfigError(
            "a class-conditional model needs labels=: the class of every training image "
            "(or drop num_classes / val_labels for the unconditional model)"
        )
    if labels is not None:
        num_classes = num_classes or (int(labels.max()) + 1 if labels.numel() else 0)
        _check_labels(labels, data.shape[0], num_classes, "labels")
        if val_data is not None:
            if val_labels is None:
                raise ConfigError("give val_labels= (the classes of val_data) with labels=")
            _check_labels(val_labels, val_data.shape[0], num_classes, "val_labels")
        if not 0.0 <= label_dropout <= 1.0:
            raise ConfigError(f"label_dropout must lie in [0, 1], got {label_dropout}")
    if steps < 1 or batch_size < 1 or lr <= 0 or not 0.0 <= ema_decay < 1.0:
        raise ConfigError(
            f"need steps >= 1, batch_size >= 1, lr > 0 and 0 <= ema_decay < 1; got steps={steps}, "
            f"batch_size={batch_size}, lr={lr}, ema_decay={ema_decay}"
        )
    learning_rate(0, steps, lr, warmup, lr_schedule)  # validates the schedule name
    device = torch.device(device) if device is not None else data.device
    config = {**(model_config or {}), "in_channels": data.shape[1]}
    if labels is not None:
        config["num_classes"] = num_classes
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
    if labels is not None:  # only then: an unconditional run records exactly what it always did
        settings["label_dropout"] = label_dropout

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
        if labels is not None:
            labels = labels.to(device=device, dtype=torch.int64)
            if val_labels is not None:
                val_labels = val_labels.to(device=device, dtype=torch.int64)
        batches = epoch_batches(data.shape[0], batch_size, gen)
        log = TrainLog(settings=settings)
        identity = {
            "run": "flow",
            "settings": settings,
            "data": noise_fingerprint(data),
            "labels": None if labels is None else noise_fingerprint(labels),
        }
        checkpoints = _Checkpoints(checkpoint, checkpoint_every, identity)
        parts = {"model": model, "ema": ema, "optimizer": opt, "batches": batches}
        log, first, running, count, elapsed = checkpoints.resume(parts, gen, device, log)

        def validate(step: int) -> None:
            if val_data is not None:
                log.val_step.append(step)
                log.val_loss.append(
                    flow_validation_loss(ema, val_data, seed=seed, labels=val_labels)
                )

        start = time.perf_counter() - elapsed
        bar = progress_bar(total=steps, initial=first, desc="train-base", enabled=progress)
        for step in range(first, steps):
            current_lr = learning_rate(step, steps, lr, warmup, lr_schedule)
            for group in opt.param_groups:
                group["lr"] = current_lr
            idx = next(batches)
            x = data[idx]
            x_t, t, target = _flow_pair(x, gen)
            cond = {}
            if labels is not None:
                # label dropout: the null label teaches the same network the unconditional field
                drop = torch.rand(idx.shape[0], generator=gen) < label_dropout
                y = labels[idx]
                cond["class_labels"] = torch.where(drop.to(y.device), num_classes, y)
            loss = F.mse_loss(model(x_t, t, **cond), target)
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
            if checkpoints.due(step + 1, steps):
                loop = (step + 1, running, count, time.perf_counter() - start)
                checkpoints.save(parts, gen, device, log, *loop)
        bar.close()
        validate(steps)
        log.wall_time_s = time.perf_counter() - start
        return ema, log


@torch.no_grad()
def flow_validation_loss(
    model: Callable[..., Tensor],
    data: Tensor,
    seed: int = 0,
    repeats: int = 8,
    batch_size: int = 512,
    labels: Tensor | None = None,
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
        labels: (N,) class labels of ``data`` for a class-conditional model, passed as
            ``class_labels`` (the null label everywhere gives the unconditional loss).

    Returns:
        ``mean ||v(x_t, t) - (x - z)||^2`` over images, draws and pixels.
    """
    _check_images(data, "data")
    if labels is not None and labels.shape != (data.shape[0],):
        raise ConfigError(f"labels must have shape ({data.shape[0]},), got {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for k in range(repeats):
        for i in range(0, data.shape[0], batch_size):
            x = data[i : i + batch_size]
            z = torch.randn(x.shape, generator=gen).to(x)
            t = ((k + torch.rand(x.shape[0], generator=gen, dtype=torch.float64)) / repeats).to(x)
            tb = t.view(-1, *([1] * (x.ndim - 1)))
            cond = {} if labels is None else {"class_labels": labels[i : i + batch_size]}
            err = (model(tb * x + (1 - tb) * z, t, **cond) - (x - z)).double().pow(2)
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
    cond: dict[str, Tensor] | None = None,
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
        cond: conditioning of the samples for a conditional ``model`` (``model(x, t, **cond)``),
            tensors of first dimension ``num_samples`` or 1.

    Returns:
        JSON-serialisable dict: ``{"samples": {...}, "heldout": {...}, "train_subset": {...}}`` of
        the statistics above, plus the settings.
    """
    classifier = classifier.eval()
    gen = torch.Generator().manual_seed(seed)
    device = train_images.device
    noise = torch.randn((num_samples, *train_images.shape[1:]), generator=gen).to(device)
    samples = sample(model, noise, uniform(steps), cond=cond)
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
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 200,
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
        checkpoint: a file for the run's state (see :func:`train_base`); ``None``: none.
        checkpoint_every: steps between checkpoints.

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
        identity = {
            "run": "classifier",
            "settings": settings,
            "data": noise_fingerprint(images),
            "labels": noise_fingerprint(labels),
        }
        checkpoints = _Checkpoints(checkpoint, checkpoint_every, identity)
        parts = {"model": model, "optimizer": opt, "batches": batches}
        log, first, running, count, elapsed = checkpoints.resume(parts, gen, device, log)

        start = time.perf_counter() - elapsed
        bar = progress_bar(total=steps, initial=first, desc="train-classifier", enabled=progress)
        for step in range(first, steps):
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
            if checkpoints.due(step + 1, steps):
                loop = (step + 1, running, count, time.perf_counter() - start)
                checkpoints.save(parts, gen, device, log, *loop)
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

    # each training keeps a checkpoint in the folder until both models are saved: a rerun of an
    # interrupted call resumes (a finished classifier is not trained again)
    ckpt = {k: Path(directory) / f".checkpoint-{name}-{k}.pt" for k in ("classifier", "flow")}
    classifier.setdefault("checkpoint", ckpt["classifier"])
    flow.setdefault("checkpoint", ckpt["flow"])
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
    for path in ckpt.values():  # the models are saved: the checkpoints have served
        path.unlink(missing_ok=True)
    return {"flow": flow_prov, "classifier": clf_prov, "paths": [str(p) for p in paths]}


#: Guidance scales tried by :func:`train_and_save_conditional` to choose the default.
GUIDANCE_SCALES: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)


@torch.no_grad()
def guidance_check(
    model: nn.Module,
    classifier: DigitClassifier,
    heldout_images: Tensor,
    scales: Sequence[float] = GUIDANCE_SCALES,
    num_samples: int = 500,
    steps: int = 50,
    seed: int = 0,
) -> dict[str, Any]:
    """Class accuracy of guided samples of a class-conditional model, per guidance scale.

    Sample m gets label ``m % num_classes`` (:func:`~bossflow.pretrained.class_labels_cond`) and
    noise row m of a generator seeded by ``seed``; the same noises and labels are integrated with
    ``steps`` uniform Euler steps of ``Guided(model, w, uncond=null label)`` for every scale ``w``.
    Per scale: ``accuracy`` (classifier arg-max equals the label), ``confident_accuracy`` (the
    classifier gives the label a probability > 0.9, the threshold of :func:`sample_check`'s
    ``confident_fraction``), ``label_probability`` (its mean), ``mean_confidence``,
    ``frechet_to_heldout`` (classifier features) and ``out_of_range_fraction`` (pixels outside
    [-1.1, 1.1]), so what guidance buys in class fidelity can be weighed against samples moving
    away from the data.

    Args:
        model: class-conditional velocity field ``model(x, t, class_labels=y)`` with a
            ``num_classes`` attribute (null label = ``num_classes``).
        classifier: digit classifier on images in [-1, 1].
        heldout_images: held-out images (M, C, H, W), the reference of the Fréchet distance.
        scales: guidance scales ``w`` (1 = the conditional field without guidance).
        num_samples: samples per scale.
        steps: Euler steps.
        seed: seed of the noise.

    Returns:
        ``{"num_samples", "euler_steps", "seed", "labels", "scales": [{"scale", "accuracy", ...}]}``.
    """
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes < 1:
        raise ConfigError("guidance_check needs a class-conditional model (num_classes > 0)")
    classifier = classifier.eval()
    device = heldout_images.device
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *heldout_images.shape[1:]), generator=gen).to(device)
    cond = {k: v.to(device) for k, v in class_labels_cond(num_samples, num_classes).items()}
    labels = cond["class_labels"]
    heldout_stats = feature_stats(classifier.features(heldout_images))
    rows = []
    for w in scales:
        guided = Guided(model, float(w), uncond=null_class_cond(num_classes))
        images = sample(guided, noise, uniform(steps), cond=cond)
        probs = classifier(images).softmax(dim=1)
        confidence, predicted = probs.max(dim=1)
        label_prob = probs.gather(1, labels[:, None])[:, 0]
        rows.append(
            {
                "scale": float(w),
                "accuracy": round(float((predicted == labels).float().mean()), 4),
                "confident_accuracy": round(float((label_prob > 0.9).float().mean()), 4),
                "label_probability": round(float(label_prob.mean()), 4),
                "mean_confidence": round(float(confidence.mean()), 4),
                "frechet_to_heldout": round(
                    frechet_from_stats(*feature_stats(classifier.features(images)), *heldout_stats),
                    4,
                ),
                "out_of_range_fraction": round(float((images.abs() > 1.1).float().mean()), 5),
            }
        )
    return {
        "num_samples": num_samples,
        "euler_steps": steps,
        "seed": seed,
        "labels": f"sample m has label m % {num_classes}",
        "scales": rows,
    }


def choose_guidance_scale(
    rows: Sequence[dict[str, Any]],
    metric: str = "confident_accuracy",
    tolerance: float = 0.01,
) -> float:
    """The smallest scale whose ``metric`` is within ``tolerance`` of the best scale's.

    Larger scales push samples further from the data (Fréchet distance and pixels out of range
    grow), so the default is the least guidance that gets (almost) all the class fidelity guidance
    can give. The metric is ``confident_accuracy`` rather than ``accuracy`` because on the digits
    arg-max accuracy is already 1.0 without guidance and cannot tell scales apart.

    Args:
        rows: the ``"scales"`` of :func:`guidance_check` (each with ``scale`` and ``metric``).
        metric: the key compared, higher is better.
        tolerance: accepted shortfall from the best scale.

    Returns:
        The chosen scale.
    """
    if not rows:
        raise ConfigError("no guidance scales to choose from")
    best = max(r[metric] for r in rows)
    # a small slack so a value printed as exactly best - tolerance is not lost to rounding
    return min(r["scale"] for r in rows if r[metric] >= best - tolerance - 1e-9)


def train_and_save_conditional(
    directory: str | Path,
    dataset: str = "digits",
    name: str | None = None,
    seed: int = 0,
    *,
    flow: dict[str, Any] | None = None,
    classifier: DigitClassifier | None = None,
    scales: Sequence[float] = GUIDANCE_SCALES,
    guidance_samples: int = 500,
    guidance_steps: int = 50,
    check_samples: int = 500,
    check_steps: int = 100,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the class-conditional flow UNet, choose its guidance scale, and save it.

    The recipe of the shipped ``digits-cond``: :func:`train_base` with the training labels
    (``num_classes`` = 10 for digits, label dropout 0.1 unless ``flow`` says otherwise), then
    :func:`guidance_check` of the EMA model with ``classifier`` over ``scales``,
    :func:`choose_guidance_scale`, and :func:`sample_check` of the guided model at that scale.
    Writes ``<name>.safetensors/.json``; the provenance records the settings, wall times, the
    held-out loss with the true labels and with the null label (unconditional), the accuracy table
    and the chosen scale under ``"guidance"``.

    Args:
        directory: output folder.
        dataset: a key of :data:`bossflow.data.DATASETS`.
        name: file stem (default: ``"<dataset>-cond"``).
        seed: seed of the training and of the checks.
        flow: extra keyword arguments of :func:`train_base` (``steps``, ``label_dropout``, ...).
        classifier: digit classifier of the checks; default: the shipped ``digits-classifier``
            (digits only).
        scales: guidance scales to compare.
        guidance_samples: samples per scale in :func:`guidance_check`.
        guidance_steps: Euler steps of those samples.
        check_samples: samples of :func:`sample_check` at the chosen scale.
        check_steps: Euler steps of those samples.
        device: where to train.
        progress: show a progress bar.

    Returns:
        ``{"flow": provenance, "paths": [...]}``.
    """
    flow = dict(flow or {})
    name = name or f"{dataset}-cond"
    if classifier is None:
        if dataset != "digits":
            raise ConfigError(
                f"the conditional recipe checks samples with a digit classifier; only 'digits' "
                f"ships one, so for {dataset!r} pass classifier= (train one with train_classifier)"
            )
        classifier = load_digits_classifier()
    train, heldout = load_dataset(dataset, "train"), load_dataset(dataset, "heldout")
    num_classes = int(train.labels.max()) + 1
    flow.setdefault("model_config", {})
    flow["model_config"] = {**flow["model_config"], "num_classes": num_classes}
    data_desc = {
        "dataset": dataset,
        "train_split": f"bossflow.data.load_dataset({dataset!r}, 'train')",
        "num_train": len(train),
        "num_heldout": len(heldout),
        "scaling": "[-1, 1]",
        "labels": f"digit classes 0..{num_classes - 1}; null label {num_classes}",
    }
    call = (
        f"bossflow.recipes.digits.train_and_save_conditional(directory, dataset={dataset!r}, "
        f"name={name!r}, seed={seed}, flow={flow!r}, scales={tuple(scales)!r}, "
        f"guidance_samples={guidance_samples}, guidance_steps={guidance_steps}, "
        f"check_samples={check_samples}, check_steps={check_steps})"
    )
    ckpt = Path(directory) / f".checkpoint-{name}-flow.pt"  # until the model is saved
    flow.setdefault("checkpoint", ckpt)
    model, log = train_base(
        train.images,
        seed=seed,
        val_data=heldout.images,
        labels=train.labels,
        val_labels=heldout.labels,
        device=device,
        progress=progress,
        **flow,
    )
    dev = next(model.parameters()).device
    classifier = classifier.to(dev)
    heldout_images, heldout_labels = heldout.images.to(dev), heldout.labels.to(dev)
    null_loss = flow_validation_loss(
        model, heldout_images, seed=seed, labels=torch.full_like(heldout_labels, num_classes)
    )

    check_start = time.perf_counter()
    table = guidance_check(
        model,
        classifier,
        heldout_images,
        scales,
        num_samples=guidance_samples,
        steps=guidance_steps,
        seed=seed,
    )
    scale = choose_guidance_scale(table["scales"])
    guided = Guided(model, scale, uncond=null_class_cond(num_classes))
    cond = {k: v.to(dev) for k, v in class_labels_cond(check_samples, num_classes).items()}
    check = sample_check(
        guided,
        classifier,
        train.images.to(dev),
        heldout_images,
        num_samples=check_samples,
        steps=check_steps,
        seed=seed,
        cond=cond,
    )
    flow_prov = {
        "call": call,
        "function": "bossflow.recipes.digits.train_base",
        "settings": log.settings,
        "data": data_desc,
        "time_convention": "noise at t=0, data at t=1; x_t = t*x + (1-t)*z; v = dx/dt",
        "conditioning": {
            "cond_key": "class_labels",
            "num_classes": num_classes,
            "null_label": num_classes,
            "label_dropout": log.settings["label_dropout"],
        },
        "wall_time_s": round(log.wall_time_s, 1),
        "final_train_loss": round(log.loss[-1], 5),
        "heldout_loss": round(log.val_loss[-1], 5),
        "heldout_loss_null_label": round(null_loss, 5),
        "heldout_loss_curve": {
            "step": log.val_step,
            "loss": [round(v, 5) for v in log.val_loss],
        },
        "guidance": {
            "scale": scale,
            "rule": "smallest scale whose confident_accuracy (label probability > 0.9) is within "
            "0.01 of the best (choose_guidance_scale)",
            "classifier": "digits-classifier" if dataset == "digits" else "given",
            **table,
        },
        "sample_check": {"guidance_scale": scale, "labels": table["labels"], **check},
        "sample_check_wall_time_s": round(time.perf_counter() - check_start, 1),
        "environment": _environment(),
    }
    path = save_pretrained(model.cpu(), directory, name, flow_prov)
    ckpt.unlink(missing_ok=True)
    return {"flow": flow_prov, "paths": [str(path)]}
