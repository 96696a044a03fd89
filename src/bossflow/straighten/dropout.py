"""Dropout masks keyed by the row of the global batch, so N processes draw what one process draws.

A straightening step trains on one global batch, split over the processes (each takes the rows
``start .. start + n``). torch's dropout draws the masks of the rows a process holds from that
process's generator, so with dropout a run on N processes is not the one-process run with the same
batch (other masks), and a run resumed at another N continues differently. While a step runs,
:class:`RowKeyedDropout` gives every ``nn.Dropout`` / ``nn.Dropout1d/2d/3d`` of the model (p > 0,
training mode) the rows ``start .. start + n`` of a mask drawn for the *whole* batch from a
generator seeded by (seed, iteration, layer, call): row b gets the same mask whichever process
holds it. One process draws exactly what torch's dropout draws (one ``rand`` per call, on the
layer's device); N processes each draw the whole batch's mask and keep their rows (N times the
random numbers, a small cost next to the convolutions around a dropout layer).

Inputs whose first dimension is k times the process's rows (a guided model's ``cat([x, x])``) are
read as k blocks of those rows. Anything else (functional dropout, other dropout classes, another
first dimension) keeps torch's own dropout, drawn from the global generators the training loop
seeds per step and process. The masks are the same for processes on the same kind of device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["RowKeyedDropout", "keep_mask"]

_KEYED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def _key(*values: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence: distinct inputs, unrelated seeds)."""
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def keep_mask(
    generator: torch.Generator, key: int, total: int, rows: slice, shape: tuple[int, ...], p: float
) -> Tensor:
    """Rows ``rows`` of the boolean keep-mask of a ``(total, *shape)`` batch drawn from
    ``generator`` (on the mask's device) seeded with ``key``: kept where ``rand >= p``."""
    generator.manual_seed(key)
    u = torch.rand((total, *shape), generator=generator, device=generator.device)
    return u[rows] >= p


class RowKeyedDropout:
    """Row-keyed dropout for the dropout layers of ``model`` while :meth:`step` blocks run.

    ``with RowKeyedDropout(model, seed) as keyed:`` patches the layers (their ``forward``; the
    state dict is untouched) and restores them on exit; ``with keyed.step(iteration, start, n,
    total):`` keys the masks of one training step whose forward passes see rows
    ``start .. start + n`` of a global batch of ``total``. Outside a step the layers behave as
    torch's.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.layers = [
            (index, m)
            for index, m in enumerate(model.modules())
            if isinstance(m, _KEYED) and m.p > 0
        ]
        self._step: tuple[int, int, int, int] | None = None
        self._calls: dict[int, int] = {}
        self._recomputed: dict[int, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned = False

    def __enter__(self) -> RowKeyedDropout:
        for index, layer in self.layers:
            layer.forward = lambda x, i=index, m=layer: self._forward(i, m, x)
        return self

    def __exit__(self, *exc: object) -> None:
        for _, layer in self.layers:
            layer.__dict__.pop("forward", None)

    @contextmanager
    def step(self, iteration: int, start: int, rows: int, total: int) -> Iterator[None]:
        """Key the masks of one step: this process holds rows ``start .. start + rows`` of a
        global batch of ``total``."""
        if start < 0 or rows < 1 or start + rows > total:
            raise ValueError(f"rows {start}..{start + rows} are not rows of a batch of {total}")
        self._step, self._calls, self._recomputed = (iteration, start, rows, total), {}, {}
        try:
            yield
        finally:
            self._step = None

    def _forward(self, index: int, layer: nn.Module, x: Tensor) -> Tensor:
        if not layer.training or self._step is None:
            return type(layer).forward(layer, x)
        iteration, start, rows, total = self._step
        channel_wise = not isinstance(layer, nn.Dropout)  # Dropout1d/2d/3d: (N, C, *) masks
        batched_ndim = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}.get(type(layer))
        if x.ndim == 0 or x.shape[0] % rows or (channel_wise and x.ndim != batched_ndim):
            if not self._warned and torch.distributed.is_initialized():
                self._warned = True
                warnings.warn(
                    f"dropout layer {type(layer).__name__} saw input {tuple(x.shape)}, not rows of "
                    f"the batch ({rows} here): its masks depend on the number of processes",
                    stacklevel=2,
                )
            return type(layer).forward(layer, x)
        # the call's number: a layer may run several times per forward pass; a recomputation
        # (gradient checkpointing, inside the backward pass) repeats the forward pass's masks
        if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            if self._calls.get(index, 0) > 1:
                raise ConfigError(
                    f"dropout layer {type(layer).__name__} runs {self._calls[index]} times per "
                    "forward pass and the model recomputes activations (gradient checkpointing): "
                    "turn gradient checkpointing off, or dropout (p = 0), to straighten it"
                )
            call = self._recomputed.get(index, 0)
            self._recomputed[index] = call + 1
        else:
            call = self._calls.get(index, 0)
            self._calls[index] = call + 1
        generator = self._generators.get(x.device)
        if generator is None:
            generator = self._generators[x.device] = torch.Generator(x.device)
        shape = tuple(x.shape[1:2]) if channel_wise else tuple(x.shape[1:])
        part = slice(start, start + rows)
        keep = torch.cat(
            [keep_mask(generator, _key(self.seed, iteration, index, call, j), total, part, shape,
                       layer.p)
             for j in range(x.shape[0] // rows)]
        )  # fmt: skip
        if channel_wise:
            keep = keep.view(*keep.shape, *([1] * (x.ndim - 2)))
        scale = keep.to(x.dtype) * (1.0 / (1.0 - layer.p))
        return x.mul_(scale) if layer.inplace else x * scale
