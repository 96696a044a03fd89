"""Reproducible noise: sample ``m`` of a run depends only on ``(seed, m)``.

So a result does not depend on the batch size, on how a run was split across processes, or on where
an interrupted run resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

__all__ = [
    "NoiseSource",
    "OffsetNoise",
    "STAGE_OFFSETS",
    "NoiseLike",
    "CondLike",
    "noise_reader",
    "cond_reader",
    "cond_fingerprint",
    "same_cond",
]

#: Index offsets of each stage's noises in a run's :class:`NoiseSource`: the cost matrix, the
#: straightening pairs and the evaluation never share a noise. Sample ``m`` of stage ``s`` is
#: source index ``STAGE_OFFSETS[s] + m``.
STAGE_OFFSETS: dict[str, int] = {"schedule": 0, "pairs": 10_000_000, "eval": 20_000_000}

#: Noise as the long jobs take it: an (M, ...) tensor, or ``noise(range(a, b)) -> (b - a, ...)``.
NoiseLike = Tensor | Callable[[range], Tensor]

#: Per-sample conditioning as the long jobs take it: a dict of (M, ...) tensors (row m goes with
#: noise m; a (1, ...) tensor is shared by every sample), or ``cond(range(a, b)) -> dict`` of
#: (b - a, ...) tensors.
CondLike = dict[str, Tensor] | Callable[[range], dict[str, Tensor]]


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


class OffsetNoise:
    """``noise(range(a, b))`` = ``source(range(offset + a, offset + b))``: one stage's noises.

    Args:
        source: the run's noise source.
        offset: first source index of the stage, e.g. ``STAGE_OFFSETS["eval"]``.
    """

    def __init__(self, source: NoiseSource, offset: int):
        self.source, self.offset = source, int(offset)

    @property
    def seed(self) -> int:
        return self.source.seed

    def __call__(self, rows: Sequence[int] | range) -> Tensor:
        return self.source([self.offset + int(r) for r in rows])

    def take(self, count: int, start: int = 0) -> Tensor:
        """Stage samples ``start .. start + count - 1`` as one tensor."""
        return self(range(start, start + count))

    def __repr__(self) -> str:
        return f"OffsetNoise({self.source!r}, offset={self.offset})"


def noise_reader(noise: NoiseLike, samples: int | None, what: str) -> tuple[int, Callable]:
    """``(M, take)`` for noise given as a tensor or a callable; ``take(range(a, b))`` reads rows.

    Args:
        noise: an (M, ...) tensor (then ``samples`` is ignored) or a callable
            ``noise(range(a, b)) -> (b - a, ...)`` such as :class:`NoiseSource`.
        samples: M when ``noise`` is a callable.
        what: the caller's name, for messages.

    Raises:
        ConfigError: a callable without ``samples``, not a tensor or callable, or M < 1.
    """
    if isinstance(noise, Tensor):
        total = int(noise.shape[0])

        def take(rows: range) -> Tensor:
            return noise[rows.start : rows.stop]
    elif callable(noise):
        if samples is None:
            raise ConfigError(f"{what}: pass samples=M when noise is a callable")
        total, take = int(samples), noise
    else:
        raise ConfigError(
            f"{what}: noise must be an (M, ...) tensor or a callable noise(range) -> tensor"
        )
    if total < 1:
        raise ConfigError(f"{what} needs at least one noise sample, got {total}")
    return total, take


def cond_reader(
    cond: CondLike | None, total: int, what: str
) -> Callable[[range], dict[str, Tensor] | None]:
    """``take(rows)`` -> the conditioning of noises ``rows`` (``None`` without conditioning).

    ``rows`` is a ``range`` (batches in order) or a list of sample indices (random training
    batches).

    Args:
        cond: ``None``, a dict of (M, ...) or (1, ...) tensors, or a callable
            ``cond(rows) -> dict`` given a range or a list of sample indices (e.g. labels
            computed from the sample index).
        total: M, the number of noises the conditioning goes with.
        what: the caller's name, for messages.

    Raises:
        ConfigError: not a dict of tensors or a callable; a tensor whose first dimension is neither
            M nor 1; a callable returning rows of the wrong count.
    """
    from .field import check_cond

    if cond is None:
        return lambda rows: None
    if isinstance(cond, dict):
        for name, value in cond.items():
            if not isinstance(value, Tensor) or value.ndim == 0:
                raise ConfigError(
                    f"{what}: cond[{name!r}] must be a tensor with one row per noise, got "
                    f"{type(value).__name__ if not isinstance(value, Tensor) else 'a 0-dim tensor'}"
                )
            if value.shape[0] not in (1, total):
                raise ConfigError(
                    f"{what}: cond[{name!r}] has {value.shape[0]} rows for {total} noises; give "
                    "one row per noise (row m goes with noise m) or one row shared by all"
                )

        def take(rows: range | Sequence[int]) -> dict[str, Tensor] | None:
            if isinstance(rows, range) and rows.step == 1:
                index: slice | Tensor = slice(rows.start, rows.stop)
            else:
                index = torch.as_tensor(list(rows), dtype=torch.long)
            out = {k: v if v.shape[0] == 1 and total != 1 else v[index] for k, v in cond.items()}
            return check_cond(out, len(rows), what)

        return take
    if callable(cond):

        def take(rows: range | Sequence[int]) -> dict[str, Tensor] | None:
            return check_cond(cond(rows), len(rows), what)

        return take
    raise ConfigError(
        f"{what}: cond must be a dict of (M, ...) tensors or a callable cond(range) -> dict"
    )


def cond_fingerprint(take: Callable, total: int, rows: int = 256) -> dict[str, str] | None:
    """Fingerprints of the conditioning of the first ``rows`` samples (``None`` without any).

    ``take`` is a :func:`cond_reader`. Stored with caches, pair stores, teacher files and
    checkpoints, so a resumed run notices other conditioning: not only sample 0's (10 cycled
    labels and one shared label agree there), but the first ``min(total, rows)`` rows of every
    tensor, hashed together.
    """
    import hashlib

    count = min(int(total), rows)
    cond = take(range(0, count))
    if not cond:
        return None
    out: dict[str, Any] = {}
    for key, value in sorted(cond.items()):
        arr = value.detach().to("cpu").contiguous()
        digest = hashlib.sha256(str((tuple(arr.shape), str(arr.dtype))).encode())
        digest.update(arr.view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
        out[key] = digest.hexdigest()[:16]
    out[ROWS_KEY] = count  # so a run with more samples can compare the same first rows
    return out


ROWS_KEY = "#rows"


def same_cond(recorded: Any, take: Callable, total: int) -> bool:
    """Whether conditioning recorded by :func:`cond_fingerprint` is ``take``'s: the same first
    rows, as many as were hashed then (a store or cache grown to more samples stays the same
    run). A record without its row count (older files) is compared as it was made."""
    if isinstance(recorded, dict) and isinstance(recorded.get(ROWS_KEY), int):
        rows = recorded[ROWS_KEY]
        return rows <= total and recorded == cond_fingerprint(take, rows)
    now = cond_fingerprint(take, total)
    if isinstance(now, dict):
        now.pop(ROWS_KEY)
    return recorded == now


def same_identity(recorded: Any, mine: dict, take: Callable, total: int, key: str) -> bool:
    """``recorded == mine`` for a cache's identity dict, the conditioning under ``key`` compared
    by :func:`same_cond`."""
    if not isinstance(recorded, dict):
        return False
    theirs, ours = dict(recorded), dict(mine)
    cond, wanted = theirs.pop(key, None), ours.pop(key, None)
    if theirs != ours:
        return False
    return cond is None if wanted is None else same_cond(cond, take, total)
