"""The training toolkit shared by every loop in bossflow (straightening, the base-model recipe).

- :func:`learning_rate`: linear warm-up, then constant or cosine decay to 0.
- :class:`EMA`: exponential moving average of a list of tensors, with a warm-up of its decay
  (``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update) and a context that swaps it in.
- :func:`interpolate`: the flow interpolant ``x_t = t x_1 + (1 - t) x_0`` and its velocity target
  ``x_1 - x_0`` (noise ``x_0`` at t = 0, data ``x_1`` at t = 1).
- :func:`random_rows` and :func:`epoch_batches`: seeded batches of indices, with or without
  replacement.
- :func:`save_state` / :func:`load_state`: a training checkpoint written atomically and read
  without running pickled code, with a clear error for a file that is not one.

Every random draw takes an explicit ``torch.Generator``: the same seed gives the same run, and a
checkpointed generator state resumes it exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointError, ConfigError
from .io import atomic_write

__all__ = [
    "LR_SCHEDULES",
    "learning_rate",
    "EMA",
    "interpolate",
    "random_rows",
    "epoch_batches",
    "save_state",
    "load_state",
]

LR_SCHEDULES = ("constant", "cosine")


def learning_rate(
    step: int, total: int, lr: float, warmup: int, schedule: str = "constant"
) -> float:
    """Learning rate at 0-based ``step`` of ``total``.

    Linear warm-up ``lr * (step + 1) / warmup`` for ``step < warmup``; then ``lr`` (``"constant"``)
    or ``lr * (1 + cos(pi p)) / 2`` with ``p = (step - warmup) / (total - warmup)`` clamped to 1
    (``"cosine"``, 0 at ``total``).
    """
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr schedule {schedule!r}; choose one of {list(LR_SCHEDULES)}")
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * lr * (1.0 + math.cos(math.pi * progress))


def _half(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


class EMA:
    """Exponential moving average of ``tensors`` (e.g. a model's trainable parameters).

    After the ``n``-th call of :meth:`update` (``n`` counted from 0) each average moves
    ``shadow <- shadow + (1 - d) (tensor - shadow)`` with ``d = min(decay, (1 + n) / (10 + n))``,
    so short runs average too. ``copy`` tensors (e.g. buffers) are copied, not averaged.

    Args:
        tensors: the tensors to average; their current values start the average.
        decay: the largest decay (e.g. 0.999).
        copy: tensors whose average is simply their latest value (buffers), optional.
        shadow: tensors that hold the averages (e.g. the parameters of a copy of the model, so
            the copy *is* the averaged model), each shaped like its tensor and already equal to
            it; default: fresh clones.
        shadow_copied: the same for ``copy``.
    """

    def __init__(
        self,
        tensors: Iterable[Tensor],
        decay: float,
        copy: Iterable[Tensor] = (),
        shadow: Iterable[Tensor] | None = None,
        shadow_copied: Iterable[Tensor] | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"the EMA decay must be in [0, 1), got {decay}")
        self.tensors = list(tensors)
        self.copied = list(copy)
        self.decay = float(decay)
        # half-precision weights average in float32: a bf16 shadow stops moving once
        # (1 - d) * step falls below its resolution
        self.shadow = (
            [t.detach().float() if _half(t) else t.detach().clone() for t in self.tensors]
            if shadow is None
            else list(shadow)
        )
        self.shadow_copied = (
            [t.detach().clone() for t in self.copied]
            if shadow_copied is None
            else list(shadow_copied)
        )
        if len(self.shadow) != len(self.tensors) or len(self.shadow_copied) != len(self.copied):
            raise ConfigError("an EMA needs one shadow tensor per averaged tensor")

    def decay_at(self, n: int) -> float:
        """The decay used by the ``n``-th update (0-based)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, n: int) -> None:
        """The ``n``-th update (0-based) of every average from the tensors' current values."""
        weight = 1.0 - self.decay_at(n)
        for s, t in zip(self.shadow, self.tensors, strict=True):
            s.lerp_(t.to(s.dtype), weight)
        for s, t in zip(self.shadow_copied, self.copied, strict=True):
            s.copy_(t)

    @torch.no_grad()
    def copy_to(self, tensors: Sequence[Tensor] | None = None) -> None:
        """Write the averages into ``tensors`` (default: the tensors being averaged)."""
        for t, s in zip(self.tensors if tensors is None else tensors, self.shadow, strict=True):
            t.copy_(s)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the averages into the tensors for the block; the raw values come back after."""
        raw = [t.detach().clone() for t in self.tensors]
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for t, r in zip(self.tensors, raw, strict=True):
                    t.copy_(r)


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The flow interpolant and its velocity: ``x_t = t x1 + (1 - t) x0``, target ``x1 - x0``.

    Args:
        x0: (B, ...) states at t = 0 (noise).
        x1: (B, ...) states at t = 1 (data, or a model's sample for reflow).
        t: (B,) times in [0, 1].

    Returns:
        ``(x_t, x1 - x0)``, both shaped like ``x0``.
    """
    tb = t.view(-1, *([1] * (x0.ndim - 1)))
    return tb * x1 + (1 - tb) * x0, x1 - x0


def random_rows(pool: np.ndarray, batch_size: int, generator: torch.Generator) -> np.ndarray:
    """``batch_size`` entries of ``pool`` drawn uniformly with replacement from ``generator``."""
    pick = torch.randint(len(pool), (batch_size,), generator=generator)
    return pool[pick.numpy()]


class EpochBatches:
    """Endless batches of indices in ``0..n-1``: a fresh permutation each epoch (drawn from
    ``generator`` when the epoch starts), the last partial batch dropped (``batch_size`` is capped
    at ``n``). :meth:`state_dict` / :meth:`load_state_dict` resume it mid-epoch (with the
    generator's own state saved beside it)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.perm: Tensor | None = None
        self.pos = 0

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        batch = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"], int(state["pos"])


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> EpochBatches:
    """Endless batches of indices in ``0..n-1`` (:class:`EpochBatches`)."""
    return EpochBatches(n, batch_size, generator)


def save_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training checkpoint (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | os.PathLike, fmt: str) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state` whose ``"format"`` is ``fmt``.

    Loaded with ``weights_only=True``: pickled code is refused, never run.

    Raises:
        CheckpointError: unreadable, refused, or not a checkpoint of format ``fmt``.
    """
    from .checkpoint import load_torch_weights

    path = Path(path)
    try:
        state = load_torch_weights(path, map_location="cpu")
    except CheckpointError:
        raise
    except OSError as err:  # cannot be opened (permissions, I/O): not necessarily damaged
        raise CheckpointError(
            f"cannot read {path}: {err.strerror or err}; the file is not necessarily damaged: fix "
            "that and rerun"
        ) from None
    except Exception as err:  # truncated, foreign or unreadable: torch raises many types
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]}); "
            "delete it to start over, or use another folder"
        ) from None
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise CheckpointError(
            f"{path} is not a {fmt} checkpoint; delete it to start over, or use another folder"
        )
    return state
