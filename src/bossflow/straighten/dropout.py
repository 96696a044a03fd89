"""Dropout masks keyed by the row of the global batch, so N processes draw what one process draws.

A straightening step trains on one global batch, split over the processes (each takes the rows
``start .. start + n``). torch's dropout draws the masks of the rows a process holds from that
process's generator, so with dropout a run on N processes is not the one-process run with the same
batch (other masks), and a run resumed at another N continues differently. While a step runs,
:class:`RowKeyedDropout` gives every ``nn.Dropout`` / ``nn.Dropout1d/2d/3d`` of the model
(0 < p < 1, training mode) the rows ``start .. start + n`` of a mask drawn for the *whole* batch
from a generator seeded by (seed, iteration, layer, call): row b gets the same mask whichever
process holds it. The work of one process is that of torch's dropout (one ``rand`` per call, on
the layer's device); each of N processes draws the whole batch's mask and keeps its rows, so it
draws N times the random numbers, and holds a float32 ``(batch, *shape)`` tensor for the call.

Only inputs whose first dimension is the process's rows are keyed (``blocks`` times them for a
guided student, whose model sees ``cat([x, x])``). Anything else (another first dimension,
functional dropout, attention's ``dropout_p``, other dropout classes, subclasses with their own
``forward``) keeps torch's own dropout, drawn from the global generators the training loop seeds
per step and process, and so depends on the number of processes. The masks are the same for
processes on the same kind of device.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["RowKeyedDropout", "keep_mask"]

#: the context of the training step running in this process (one straightening run at a time)
_ACTIVE: RowKeyedDropout | None = None


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


class _Keyed:
    """Mixin of the keyed dropout classes: the layer's ``forward`` asks the active step."""

    _bossflow_index: int
    base: type  # the torch class it stands in for
    batched_ndim: int | None  # a batched input's ndim for channel-wise masks; None: any

    def forward(self, x: Tensor) -> Tensor:
        if _ACTIVE is None or not self.training:
            return super().forward(x)
        return _ACTIVE.apply(self, x, super().forward)


class _KeyedDropout(_Keyed, nn.Dropout):
    base, batched_ndim = nn.Dropout, None  # any input: element-wise masks


class _KeyedDropout1d(_Keyed, nn.Dropout1d):
    base, batched_ndim = nn.Dropout1d, 3  # (N, C, L): channel-wise masks


class _KeyedDropout2d(_Keyed, nn.Dropout2d):
    base, batched_ndim = nn.Dropout2d, 4


class _KeyedDropout3d(_Keyed, nn.Dropout3d):
    base, batched_ndim = nn.Dropout3d, 5


#: torch's dropout class -> its keyed subclass
_KEYED: dict[type, type] = {
    k.base: k for k in (_KeyedDropout, _KeyedDropout1d, _KeyedDropout2d, _KeyedDropout3d)
}


class RowKeyedDropout:
    """Row-keyed dropout for the dropout layers of ``model`` while :meth:`step` blocks run.

    ``with RowKeyedDropout(model, seed) as keyed:`` gives the layers a keyed class (a subclass
    of their own, importable, so the model still pickles; the state dict is untouched) and
    restores their class on exit; ``with keyed.step(iteration, start, n, total, blocks):`` keys
    the masks of one training step whose forward passes see rows ``start .. start + n`` of a
    global batch of ``total`` (``blocks`` times: a guided student's ``cat([x, x])``). Outside a
    step the layers behave as torch's.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.seed = seed
        self.layers = [
            (index, m)
            for index, m in enumerate(model.modules())
            if type(m) in _KEYED and 0 < m.p < 1
        ]
        self._step: tuple[int, int, int, int, int] | None = None
        self._calls: dict[int, int] = {}
        self._recomputed: dict[int, int] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._warned = False

    def __enter__(self) -> RowKeyedDropout:
        global _ACTIVE
        if _ACTIVE is not None:
            raise RuntimeError("another straightening run's keyed dropout is active")
        _ACTIVE = self
        for index, layer in self.layers:
            layer.__class__ = _KEYED[type(layer)]
            layer._bossflow_index = index
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        _ACTIVE = None
        for _, layer in self.layers:
            layer.__class__ = type(layer).base
            del layer._bossflow_index

    @contextmanager
    def step(
        self, iteration: int, start: int, rows: int, total: int, blocks: int = 1
    ) -> Iterator[None]:
        """Key the masks of one step: this process holds rows ``start .. start + rows`` of a
        global batch of ``total``; the model sees them ``blocks`` times (stacked)."""
        if start < 0 or rows < 1 or start + rows > total or blocks < 1:
            raise ValueError(f"rows {start}..{start + rows} are not rows of a batch of {total}")
        self._step = (iteration, start, rows, total, blocks)
        self._calls, self._recomputed = {}, {}
        try:
            yield
        finally:
            self._step = None

    def apply(self, layer: nn.Module, x: Tensor, plain: Callable[[Tensor], Tensor]) -> Tensor:
        """``layer``'s dropout of ``x`` (``plain``: torch's, for inputs that are not rows)."""
        if self._step is None:
            return plain(x)
        iteration, start, rows, total, blocks = self._step
        batched_ndim = type(layer).batched_ndim
        if (
            x.ndim == 0
            or x.shape[0] != rows * blocks
            or (batched_ndim is not None and x.ndim != batched_ndim)
        ):
            if not self._warned and torch.distributed.is_initialized():
                self._warned = True
                warnings.warn(
                    f"dropout layer {type(layer).base.__name__} saw input "
                    f"{tuple(x.shape)}, not the batch's {rows * blocks} rows: its masks depend on "
                    "the number of processes",
                    stacklevel=3,
                )
            return plain(x)
        index = layer._bossflow_index
        # the call's number: a layer may run several times per forward pass; a recomputation
        # (gradient checkpointing, inside the backward pass) repeats the forward pass's masks
        if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            if self._calls.get(index, 0) > 1:
                raise ConfigError(
                    f"a dropout layer runs {self._calls[index]} times per forward pass and the "
                    "model recomputes activations (gradient checkpointing): turn gradient "
                    "checkpointing off, or that dropout (p = 0), to straighten it"
                )
            call = self._recomputed.get(index, 0)
            self._recomputed[index] = call + 1
        else:
            call = self._calls.get(index, 0)
            self._calls[index] = call + 1
        generator = self._generators.get(x.device)
        if generator is None:
            generator = self._generators[x.device] = torch.Generator(x.device)
        shape = tuple(x.shape[1:2]) if batched_ndim else tuple(x.shape[1:])
        part = slice(start, start + rows)
        keep = torch.cat(
            [keep_mask(generator, _key(self.seed, iteration, index, call, j), total, part, shape,
                       layer.p)
             for j in range(blocks)]
        )  # fmt: skip
        if batched_ndim:
            keep = keep.view(*keep.shape, *([1] * (x.ndim - 2)))
        scale = 1.0 / (1.0 - layer.p)  # a Python float: not rounded to a half-precision x
        if layer.inplace:
            return x.mul_(keep).mul_(scale)
        return (x * keep).mul_(scale)
