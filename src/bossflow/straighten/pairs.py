"""Straightening pairs: the pretrained model's fine-trajectory states at the schedules' times.

Straightening (paper eq. 9) needs, for every training noise ``z^m``, the states ``x^m_{s_0..s_K}``
that the *pretrained* field's fine Euler trajectory passes through at the schedule's times. Only
those states are stored: for several budgets at once (e.g. Bellman schedules for K = 2, 4, 8) the
union of their times, so each state is kept once, not once per interval and budget.

On disk a pair store is a folder::

    manifest.json          what was made and how far it got (written atomically after every shard)
    shard-00000.npy        (n_0, T, *sample_shape) states of samples 0 .. n_0 - 1
    shard-00001.npy        (n_1, T, *sample_shape) the next samples, ...

where ``T`` is the number of union times, column ``j`` holds the state at ``times[j]`` (column 0 is
the noise itself at t = 0, the last column the final sample at t = 1). Shards are plain ``.npy``
files (float32 or float16), memory-mappable with ``np.load(path, mmap_mode="r")``. A shard counts
only once the manifest lists it, so a crash between writing a shard and updating the manifest
leaves a file that is ignored and rewritten on the next run.

The manifest records the fine grid, the union times and their fine-grid indices, the schedules
(their ``to_dict()``), the sample shape and dtype, the caller's ``meta`` (model id, seed, ...),
fingerprints of the model's weights and of the first noise, the number of samples asked for and the
shards complete. Running :func:`make_pairs` again with the same arguments continues after the last
complete shard; with another schedule, grid, model or noise it raises
:class:`~bossflow.errors.CheckpointError` instead of mixing pairs.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import distributed as dist
from ..checkpoint import module_fingerprint
from ..checkpoint import noise_fingerprint as _noise_fingerprint
from ..errors import BossflowError, CheckpointError, ConfigError
from ..field import VelocityField, guidance_identity
from ..io import atomic_write, atomic_write_text, ensure_dir
from ..noise import (
    CondLike,
    NoiseLike,
    cond_fingerprint,
    cond_reader,
    noise_reader,
    same_cond,
)
from ..schedule import Schedule, resolve_grid
from ..solvers import sample

__all__ = ["PairStore", "make_pairs", "module_fingerprint"]

FORMAT = "bossflow.pairs/1"
MANIFEST = "manifest.json"
# Times closer than this to a fine-grid time are taken to be on it (schedules made on the grid hold
# its exact float64 values; JSON round trips are exact too, so this only absorbs foreign rounding).
_TIME_TOL = 1e-9
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}


def _as_schedules(schedules: Schedule | Sequence[Schedule] | Mapping[Any, Schedule]) -> list:
    if isinstance(schedules, Schedule):
        return [schedules]
    if isinstance(schedules, Mapping):  # e.g. bellman_schedules(...) -> {K: Schedule}
        schedules = list(schedules.values())
    out = list(schedules)
    if not out or not all(isinstance(s, Schedule) for s in out):
        raise ConfigError("schedules must be a Schedule, a non-empty list of them or {K: Schedule}")
    return out


def _grid_indices(schedule: Schedule, grid: Schedule) -> list[int]:
    """Positions of the schedule's times in the fine grid; an error if one is not on it."""
    tau = grid.times
    pos = np.clip(np.searchsorted(tau, schedule.times), 1, len(tau) - 1)
    # nearest grid point: the left or the right neighbour of the insertion point
    left_closer = np.abs(schedule.times - tau[pos - 1]) <= np.abs(tau[pos] - schedule.times)
    nearest = np.where(left_closer, pos - 1, pos)
    off = np.abs(tau[nearest] - schedule.times)
    if (off > _TIME_TOL).any():
        bad = int(np.argmax(off > _TIME_TOL))
        raise ConfigError(
            f"time {float(schedule.times[bad])!r} of the {schedule.steps}-step {schedule.method} schedule "
            f"is not on the fine grid ({len(tau) - 1} intervals; nearest time {float(tau[nearest[bad]])!r}). "
            "Pairs are fine-trajectory states, so every schedule time must be a fine-grid time: "
            "pass fine_grid= the grid the schedule was made on (a Bellman schedule's cost-matrix "
            "grid), or a schedule whose times lie on this grid."
        )
    return [int(i) for i in nearest]


def _columns(times: np.ndarray, schedule: Schedule) -> np.ndarray:
    """Column of every schedule time among the stored ``times``."""
    cols = []
    for t in schedule.times:
        hit = np.flatnonzero(np.abs(times - t) <= _TIME_TOL)
        if hit.size == 0:
            raise CheckpointError(
                f"pairs were made with another schedule: time {float(t)!r} of the {schedule.steps}-step "
                f"{schedule.method} schedule is not among the stored times "
                f"{[round(float(v), 6) for v in times]}. Make pairs for this schedule with "
                "make_pairs(..., schedules=[...]) in another folder."
            )
        cols.append(int(hit[0]))
    return np.asarray(cols, dtype=np.int64)


# Shards memory-mapped at once by one store: each map holds a file descriptor, and a store can
# have more shards than a process may open files (often 1024).
_MAX_OPEN_SHARDS = 32


@dataclass(frozen=True)
class _Shard:
    """Where a shard's array lies in its ``.npy`` file (read from the header, file closed)."""

    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int  # bytes of header before the data
    fortran: bool


def _open_failure(store: Path, name: str, err: OSError) -> BossflowError:
    """The error for a file of the store that cannot be opened now: unless it is missing, the
    pairs are not at fault."""
    if isinstance(err, FileNotFoundError):
        return CheckpointError(
            f"pair store {store}: shard {name} listed in the manifest is missing; delete the "
            "folder and make the pairs again"
        )
    hint = (
        "raise the open-file limit (e.g. ulimit -n 4096) and rerun"
        if err.errno in (errno.EMFILE, errno.ENFILE)
        else "fix that and rerun"
    )
    what = name if name == MANIFEST else f"shard {name}"
    return BossflowError(
        f"pair store {store}: cannot open {what}: {err.strerror or err} (the pairs are not "
        f"damaged; {hint})"
    )


def _shard_header(store: Path, name: str) -> _Shard:
    """Read a shard's ``.npy`` header and close the file again."""
    file = store / name
    try:
        with open(file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except OSError as err:
        raise _open_failure(store, name, err) from None
    except ValueError as err:
        raise CheckpointError(
            f"pair store {store}: shard {name} listed in the manifest cannot be read ({err}); "
            "delete the folder and make the pairs again"
        ) from None
    if dtype.hasobject or size < offset + int(np.prod(shape)) * dtype.itemsize:
        raise CheckpointError(
            f"pair store {store}: shard {name} listed in the manifest is truncated ({size} bytes "
            f"for a {shape} {dtype} array); delete the folder and make the pairs again"
        )
    return _Shard(file, tuple(int(d) for d in shape), dtype.str, offset, bool(fortran))


class _StatesView:
    """Index-able view over the shards: ``states[rows]`` or ``states[rows, cols]`` -> Tensor.

    ``rows`` is an int, a slice or a 1-D integer sequence of sample indices; ``cols`` an int, a
    slice, or a 1-D integer sequence with one column per row (then row ``i`` gets column
    ``cols[i]``). Only the requested states are read from the shards, which are memory-mapped on
    demand, at most ``_MAX_OPEN_SHARDS`` at a time (least recently used closed first).
    """

    def __init__(
        self,
        store: Path,
        shards: list[_Shard],
        starts: np.ndarray,
        shape: tuple[int, ...],
        dtype: str,
    ):
        self._store = store
        self._shards = shards
        self._dtype = dtype
        self._starts = starts  # (S,) first sample index of each shard
        self.shape = shape  # (M, T, *sample_shape)
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self._guard = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # e.g. for DataLoader workers: no open maps
        state = self.__dict__.copy()
        del state["_maps"], state["_guard"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._maps, self._guard = OrderedDict(), threading.Lock()

    def _shard(self, s: int) -> np.memmap:
        """Shard ``s`` memory-mapped (kept among the most recently used ones)."""
        with self._guard:
            arr = self._maps.get(s)
            if arr is not None:
                self._maps.move_to_end(s)
                return arr
            sh = self._shards[s]
            try:
                arr = np.memmap(
                    sh.file,
                    dtype=np.dtype(sh.dtype),
                    mode="r",
                    offset=sh.offset,
                    shape=sh.shape,
                    order="F" if sh.fortran else "C",
                )
            except OSError as err:
                raise _open_failure(self._store, sh.file.name, err) from None
            except ValueError as err:  # shrunk since the store was opened
                raise CheckpointError(
                    f"pair store {self._store}: shard {sh.file.name} changed on disk ({err}); "
                    "delete the folder and make the pairs again"
                ) from None
            self._maps[s] = arr
            while len(self._maps) > _MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)  # its file closes once no result refers to it
            return arr

    def __len__(self) -> int:
        return self.shape[0]

    def _rows(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            return np.arange(self.shape[0])[rows]
        if isinstance(rows, Tensor):
            rows = rows.detach().cpu().numpy()
        arr = np.asarray(rows)
        if arr.size == 0:
            arr = arr.astype(np.int64)  # np.asarray([]) is float
        if arr.dtype.kind not in "iu" or arr.ndim > 1:
            raise IndexError("sample indices must be an int, a slice or a 1-D integer sequence")
        arr = np.atleast_1d(arr).astype(np.int64)
        if arr.size and (arr.max() >= self.shape[0] or arr.min() < -self.shape[0]):
            raise IndexError(f"sample index out of range for a store of {self.shape[0]} samples")
        return arr % max(self.shape[0], 1)

    def __getitem__(self, key: Any) -> Tensor:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        scalar = isinstance(rows, (int, np.integer))
        idx = self._rows(rows)
        per_row = not isinstance(cols, (int, np.integer, slice))
        if per_row:
            cols = np.asarray(cols.cpu() if isinstance(cols, Tensor) else cols, dtype=np.int64)
            if cols.shape != idx.shape:
                raise IndexError("give one column per row (cols shaped like rows)")
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        parts, order = [], []
        for s in np.unique(shard_of):
            sel = np.flatnonzero(shard_of == s)
            local = idx[sel] - self._starts[s]
            c = cols[sel] if per_row else cols
            parts.append(np.asarray(self._shard(int(s))[local, c]))  # advanced indexing: a copy
            order.append(sel)
        if parts:
            out = np.concatenate(parts)[np.argsort(np.concatenate(order), kind="stable")]
        else:  # no rows asked: an empty result shaped as the same indexing would give
            one = np.empty((1, *self.shape[1:]), dtype=self._dtype)
            out = one[idx, cols] if per_row else one[:0, cols]
        tensor = torch.from_numpy(np.ascontiguousarray(out))
        return tensor[0] if scalar else tensor


class PairStore:
    """A pair store on disk (see the module docstring for the format).

    Attributes:
        path: the folder.
        manifest: the parsed ``manifest.json``.
        times: (T,) float64 union of the schedules' times; column ``j`` of the states is at ``times[j]``.
        grid_indices: (T,) positions of ``times`` in the fine grid.
        grid: the fine grid the trajectories were integrated on.
        schedules: the schedules the pairs were made for.
        sample_shape: shape of one sample.
        dtype: the stored dtype (``torch.float32`` or ``torch.float16``).
        states: index-able ``(M, T, *sample_shape)`` view; ``states[rows]`` and
            ``states[rows, cols]`` return tensors in the stored dtype.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], shards: list[_Shard]):
        self.path = path
        self.manifest = manifest
        self.times = np.asarray(manifest["times"], dtype=np.float64)
        self.grid_indices = np.asarray(manifest["grid_indices"], dtype=np.int64)
        self.grid = Schedule(np.asarray(manifest["fine_grid"], dtype=np.float64), method="fine")
        self.schedules = [Schedule.from_dict(d) for d in manifest["schedules"]]
        self.sample_shape = tuple(manifest["sample_shape"])
        self.dtype = {v: k for k, v in _DTYPES.items()}[manifest["dtype"]]
        counts = [int(s["count"]) for s in manifest["shards"]]
        starts = np.cumsum([0, *counts[:-1]]).astype(np.int64)
        shape = (sum(counts), len(self.times), *self.sample_shape)
        self.states = _StatesView(path, shards, starts, shape, manifest["dtype"])

    def __len__(self) -> int:
        """Number of complete samples (noises) in the store."""
        return self.states.shape[0]

    def __repr__(self) -> str:
        return f"PairStore({str(self.path)!r}, samples={len(self)}, times={len(self.times)})"

    @property
    def complete(self) -> bool:
        """Whether every sample asked for by :func:`make_pairs` is stored."""
        return len(self) >= int(self.manifest["samples"])

    def for_schedule(self, schedule: Schedule) -> np.ndarray:
        """Columns of ``states`` holding the schedule's times ``s_0..s_K``, shape (K + 1,).

        Raises:
            CheckpointError: a time of the schedule is not stored ("pairs were made with another
                schedule").
        """
        return _columns(self.times, schedule)

    @classmethod
    def open(cls, path: str | os.PathLike) -> PairStore:
        """Open a store written by :func:`make_pairs`, checking the manifest against the shards.

        Only the shards' ``.npy`` headers are read here (each file is closed again); the data
        is memory-mapped when it is indexed, a bounded number of shards at a time.

        Raises:
            CheckpointError: no manifest, an unreadable one, or a listed shard that is missing,
                truncated or has the wrong shape or dtype.
            BossflowError: a shard cannot be opened for another reason (too many open files,
                permissions); the message does not blame the pairs.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise CheckpointError(
                f"{path} is not a pair store (no {MANIFEST}); make one with make_pairs(...)"
            )
        t = len(manifest["times"])
        shape = tuple(manifest["sample_shape"])
        shards, start = [], 0
        for entry in manifest["shards"]:
            if int(entry["start"]) != start:
                raise CheckpointError(
                    f"pair store {path}: shard {entry['file']} starts at sample {entry['start']}, "
                    f"expected {start}; the manifest is inconsistent, delete {path} and start over"
                )
            start += int(entry["count"])
            arr = _shard_header(path, str(entry["file"]))
            if arr.shape != (int(entry["count"]), t, *shape) or arr.dtype != np.dtype(
                manifest["dtype"]
            ):
                raise CheckpointError(
                    f"pair store {path}: shard {entry['file']} has shape {arr.shape} and dtype "
                    f"{np.dtype(arr.dtype)}, the manifest says ({entry['count']}, {t}, *{shape}) "
                    f"{manifest['dtype']}; delete the folder and make the pairs again"
                )
            shards.append(arr)
        return cls(path, manifest, shards)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        text = file.read_text()
    except OSError as err:  # too many open files, permissions: not the store's fault
        raise _open_failure(path, MANIFEST, err) from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err}); delete {path} to start over"
        ) from None
    keys = {"format", "times", "grid_indices", "fine_grid", "schedules", "sample_shape", "dtype"}
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a bossflow pair-store manifest ({FORMAT})")
    keys |= {"shards", "samples", "count"}
    if not keys <= manifest.keys():
        raise CheckpointError(f"{file} lacks {sorted(keys - manifest.keys())}; delete {path}")
    if manifest["dtype"] not in _DTYPES.values():
        raise CheckpointError(f"{file}: unknown dtype {manifest['dtype']!r}; delete {path}")
    return manifest


def _integrate(
    field: VelocityField,
    z: Tensor,
    grid: Schedule,
    keep: list[int],
    cond: dict[str, Tensor] | None = None,
) -> Tensor:
    """Fine Euler trajectories from ``z`` (:func:`bossflow.solvers.sample` on ``grid``), keeping
    only the states at fine-grid indices ``keep``: the states of
    :func:`bossflow.bellman.fine_trajectories`, in memory O(B * T * D) instead of O(B * N * D).

    Returns:
        (B, len(keep), ...) states in the dtype and on the device of ``z``.
    """
    out = z.new_empty((z.shape[0], len(keep), *z.shape[1:]))
    column = {i: c for c, i in enumerate(keep)}
    if 0 in column:
        out[:, column[0]] = z

    def record(step: dict[str, Any]) -> None:
        if step["i"] + 1 in column:
            out[:, column[step["i"] + 1]] = step["x_next"]

    sample(field, z, grid, callback=record, cond=cond)
    return out


def make_pairs(
    field: VelocityField,
    noise: NoiseLike,
    schedules: Schedule | Sequence[Schedule] | Mapping[Any, Schedule],
    out_dir: str | os.PathLike,
    fine_grid: Schedule | int | Sequence[float] | None = None,
    samples: int | None = None,
    batch_size: int = 64,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
    cond: CondLike | None = None,
) -> PairStore:
    """Integrate the pretrained field's fine Euler trajectories and store the states at the
    schedules' times (the straightening pairs of paper eq. 9).

    For noise ``z^m`` the fine Euler trajectory ``x^m_0 = z^m``,
    ``x^m_{i+1} = x^m_i + (tau_{i+1} - tau_i) v(x^m_i, tau_i)`` is integrated on the fine grid and
    only ``x^m`` at the union of the schedules' times is kept: for one schedule, the K + 1 states
    ``x_{s_0}, ..., x_{s_K}`` (``s_0 = 0``: the noise, ``s_K = 1``: the final sample).

    Args:
        field: the *pretrained* velocity field ``v(x, t)``, ``x: (B, ...)``, ``t: (B,)``.
        noise: an (M, ...) tensor, or a callable ``noise(range(a, b)) -> (b - a, ...)`` whose sample
            ``m`` depends only on ``(seed, m)`` (e.g. :class:`~bossflow.noise.NoiseSource`).
        schedules: a Schedule, a list of them or ``{K: Schedule}``; all times must be fine-grid times.
        out_dir: the store's folder (created; resumed if it holds a matching store).
        fine_grid: a Schedule, an int N (uniform, default 100) or a list of times.
        samples: M when ``noise`` is a callable (ignored for a tensor).
        batch_size: trajectories integrated at once; also the samples per shard. The stored values
            do not depend on it.
        dtype: stored dtype, ``torch.float32`` or ``torch.float16`` (integration runs in the
            noise's dtype).
        progress: show a tqdm bar.
        meta: JSON-serialisable facts stored in the manifest (``model`` id, ``seed``, ...).
        cond: per-sample conditioning of a conditional field (a dict of (M, ...) tensors, row m
            with noise m, or ``cond(range) -> dict``). The store keeps the row index (sample m is
            row m) and a fingerprint of the conditioning; :func:`~bossflow.straighten.straighten`
            takes the same ``cond`` and slices it with each training batch.

    Returns:
        The :class:`PairStore`, complete.

    Raises:
        ConfigError: bad arguments, or a schedule time that is not on the fine grid.
        CheckpointError: ``out_dir`` holds a store made with other schedules, grid, model, noise
            or dtype, or more samples than asked.
        BossflowError: ``out_dir`` is a file or cannot be created.
    """
    grid = resolve_grid(fine_grid)
    scheds = _as_schedules(schedules)
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    total, take = noise_reader(noise, samples, "make_pairs")
    take_cond = cond_reader(cond, total, "make_pairs")

    keep = sorted({i for s in scheds for i in _grid_indices(s, grid)})
    first = take(range(0, 1))
    meta = dict(meta or {})
    identity = {
        "format": FORMAT,
        "fine_grid": grid.tolist(),
        "times": [float(grid.times[i]) for i in keep],
        "grid_indices": keep,
        "schedules": [s.to_dict() for s in scheds],
        "sample_shape": list(first.shape[1:]),
        "dtype": _DTYPES[dtype],
        "meta": meta,
        "seed": meta.get("seed", getattr(noise, "seed", None)),
        "model_fingerprint": module_fingerprint(field),
        "noise_fingerprint": _noise_fingerprint(first[0]),
        "cond_fingerprint": cond_fingerprint(take_cond, total),
        "guidance": guidance_identity(field),
    }
    identity = json.loads(json.dumps(identity))  # what a JSON round trip gives, for comparison

    path = ensure_dir(out_dir)
    # several processes: rank 0 reads, checks and writes the manifest; the others get it
    manifest = None
    if dist.is_rank_zero():
        with dist.fail_together():
            manifest = _start_manifest(path, identity, total, take_cond)
    manifest = dist.broadcast_object(manifest)

    bar = None
    if progress and dist.is_rank_zero():
        from ..progress import progress_bar

        bar = progress_bar(total=total, initial=manifest["count"], desc="pairs", unit="traj")
    try:
        while manifest["count"] < total:
            if dist.is_distributed():
                covered = _distributed_round(
                    field, take, take_cond, grid, keep, dtype, path, manifest, batch_size, total
                )
                if bar is not None:
                    bar.update(covered)
                continue
            start = manifest["count"]
            rows = range(start, min(start + batch_size, total))
            states = _integrate(field, take(rows), grid, keep, take_cond(rows))
            arr = states.detach().to("cpu", dtype).numpy()
            name = f"shard-{len(manifest['shards']):05d}.npy"

            def write(tmp: Path, arr: np.ndarray = arr) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)

            atomic_write(path / name, write)
            # The shard counts only from here on: a crash before this line leaves a file that no
            # manifest lists, which the next run overwrites.
            manifest["shards"].append({"file": name, "start": start, "count": len(rows)})
            manifest["count"] = start + len(rows)
            atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            if bar is not None:
                bar.update(len(rows))
    finally:
        if bar is not None:
            bar.close()
    dist.barrier()  # rank 0 has written the last manifest
    if not dist.is_distributed():
        return PairStore.open(path)
    # every rank reads the store rank 0 finished (training draws the same batches from it)
    with dist.fail_together():
        try:
            store = PairStore.open(path)
        except CheckpointError as err:
            if dist.is_rank_zero():
                raise
            raise ConfigError(
                f"rank 0 wrote the pairs in {path}, which this process cannot read ({err}); "
                f"{dist.SHARED_FOLDER}"
            ) from None
    counts = dist.all_gather_object(len(store))
    if len(set(counts)) > 1:
        raise ConfigError(
            f"the processes read different pair stores in {path} ({counts}); {dist.SHARED_FOLDER}"
        )
    return store


def _start_manifest(
    path: Path, identity: dict[str, Any], total: int, take_cond: Callable
) -> dict[str, Any]:
    """The manifest to continue from (a new one, or the folder's, checked against ``identity``),
    written back with ``samples = total``."""
    manifest = _read_manifest(path)
    if manifest is None:
        manifest = {**identity, "samples": total, "count": 0, "shards": []}
    else:
        key = "cond_fingerprint"  # the same first rows: a store grown to more samples
        # not the schedules themselves: the states depend on the union of their times (compared),
        # not on the cost or provenance a schedule file records (another cost-matrix run's)
        differ = [k for k in identity if k != "schedules" and manifest.get(k) != identity[k]]
        if key in differ and identity[key] and same_cond(manifest.get(key), take_cond, total):
            differ.remove(key)
        if differ:
            raise CheckpointError(
                f"{path} holds pairs made with another schedule, grid, model or noise (different: "
                f"{', '.join(differ)}). Use another out_dir for these pairs, or delete {path}."
            )
        if manifest["count"] > total:
            raise CheckpointError(
                f"{path} already holds {manifest['count']} samples, more than the {total} asked; "
                "pass samples >= that or use another out_dir"
            )
        manifest["samples"] = total
        manifest["cond_fingerprint"] = identity["cond_fingerprint"]  # of the rows it now covers
        if manifest["count"]:
            PairStore.open(path)  # the shards already listed must be readable before adding more
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_shard(path: Path, name: str, arr: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    atomic_write(path / name, write, every_rank=True)  # the rank that made it writes it


def _distributed_round(
    field: VelocityField,
    take: Any,
    take_cond: Any,
    grid: Schedule,
    keep: list[int],
    dtype: torch.dtype,
    path: Path,
    manifest: dict[str, Any],
    batch_size: int,
    total: int,
) -> int:
    """One round of a multi-process run: rank ``r`` integrates the ``r``-th batch of the next
    ``world_size * batch_size`` samples and writes it as its own shard (the shards of a round
    are numbered in sample order, as one process would number them); the shard entries are
    gathered and rank 0 writes the manifest once they are all on disk. Every rank updates its
    copy of ``manifest``. Returns the number of samples the round covered."""
    rows, end = dist.round_rows(manifest["count"], total, batch_size)
    entry = None
    with dist.fail_together():  # a rank that fails here tells the others, waiting below
        if len(rows):
            states = _integrate(field, take(rows), grid, keep, take_cond(rows))
            arr = states.detach().to("cpu", dtype).numpy()
            # ranks with rows are a prefix of the ranks, so shard numbers follow sample order
            name = f"shard-{len(manifest['shards']) + dist.rank():05d}.npy"
            _write_shard(path, name, arr)
            entry = {"file": name, "start": rows.start, "count": len(rows)}
    entries = [e for e in dist.all_gather_object(entry) if e is not None]
    if sum(e["count"] for e in entries) != end - manifest["count"]:
        raise CheckpointError(
            "the processes made shards of different rounds; every rank must be given the same "
            "noise, samples and batch_size"
        )
    covered = end - manifest["count"]
    manifest["shards"].extend(entries)
    manifest["count"] = end
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # rank 0 only
    return covered
