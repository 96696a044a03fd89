"""Reproducible noise: sample ``m`` of a run depends only on ``(seed, m)``.

So a result does not depend on the batch size, on how a run was split across processes, or on where
an interrupted run resumed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["NoiseSource"]


class NoiseSource:
    """Standard normal noise of a fixed per-sample shape, indexed by sample number.

    ``source(range(a, b))`` returns a ``(b - a, *shape)`` tensor whose row ``k`` is drawn from a
    generator seeded by ``(seed, a + k)`` alone (through ``numpy.random.SeedSequence``).

    Args:
        shape: shape of one sample, e.g. ``(1, 8, 8)``.
        seed: the run's seed.
        dtype: dtype of the returned tensor (noise is drawn in float32, then cast).
        device: device of the returned tensor (noise is drawn on the CPU, then moved).
    """

    def __init__(
        self,
        shape: Sequence[int],
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        from .errors import ConfigError

        self.shape = tuple(int(s) for s in shape)
        self.seed = int(seed)
        if self.seed < 0:
            raise ConfigError(f"the noise seed must be a non-negative integer, got {seed}")
        self.dtype = dtype
        self.device = device

    def _one(self, index: int) -> Tensor:
        state = np.random.SeedSequence([self.seed, int(index)]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return torch.randn(self.shape, generator=gen)

    def __call__(self, indices: Sequence[int] | range) -> Tensor:
        rows = [self._one(i) for i in indices]
        out = torch.stack(rows) if rows else torch.empty((0, *self.shape))
        return out.to(dtype=self.dtype, device=self.device)

    def take(self, count: int, start: int = 0) -> Tensor:
        """Samples ``start .. start + count - 1`` as one tensor."""
        return self(range(start, start + count))

    def __repr__(self) -> str:
        return f"NoiseSource(shape={self.shape}, seed={self.seed})"
