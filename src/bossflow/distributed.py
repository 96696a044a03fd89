"""Several processes (torchrun): who does which samples, how partial results meet, who writes.

bossflow runs on one process unless ``torch.distributed`` has been initialised with more than one
rank: by :func:`init_from_env` (the CLI calls it, so ``torchrun --nproc_per_node=N -m bossflow ...``
works), or by the caller before calling the library (``cost_matrix``, ``make_pairs``,
``straighten``, ... then use the group they find). With one process nothing here touches
``torch.distributed`` and every code path is the single-process one.

Work is split by *sample index*, never by rank: noise ``m`` (and its conditioning) is drawn from
``(seed, m)`` whatever the number of processes, so the ranks compute the same per-sample values a
single process would, and only the order of float64 additions differs.

Failures: a rank that fails calls :func:`report_failure` (the CLI and :func:`fail_together` do);
the message goes into the process group's key-value store, and every other rank waiting in one
of the collectives below sees it within ~0.1 s and raises :class:`~bossflow.errors.PeerFailedError`
instead of waiting for the collective's timeout. Only the first failure is printed.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import BossflowError, DistributedError, PeerFailedError

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "local_rank",
    "is_rank_zero",
    "init_from_env",
    "shutdown",
    "all_reduce_sum_float64",
    "all_gather_object",
    "broadcast_object",
    "barrier",
    "round_rows",
    "split_range",
    "report_failure",
    "fail_together",
    "rank_label",
    "map_rows",
    "lost_peer",
    "SHARED_FOLDER",
]

#: what a process that cannot see rank 0's files is told
SHARED_FOLDER = (
    "the output folder must be one folder that all processes (all nodes) see, with their writes "
    "visible to each other"
)

# Keys in the process group's store (a PrefixStore of the default group: one namespace per run).
_FAILURES_KEY = "bossflow/failures"
_ERROR_KEY = "bossflow/error"
_POLL_S = 0.05  # how often a waiting rank looks for a peer's failure
_TIMEOUT = datetime.timedelta(minutes=30)  # gloo/nccl's own limit, the last resort

_INITIALISED_HERE = False
_FAILED = False  # this process failed or saw a peer fail: collectives may be left pending


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised (cheap; no import cost)."""
    if not torch.distributed.is_available():
        return False
    dist = _dist()
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 without a process group."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes, 1 without a process group."""
    return _dist().get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """Rank on this machine (torchrun's ``LOCAL_RANK``), 0 without a process group."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_rank_zero() -> bool:
    """Whether this process prints and writes shared files (rank 0, or the only process)."""
    return rank() == 0


def rank_label() -> str:
    """``"[rank r/N] "`` in a multi-process run, ``""`` otherwise (a prefix for messages)."""
    return f"[rank {rank()}/{world_size()}] " if is_distributed() else ""


def init_from_env(device: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment when ``WORLD_SIZE > 1``.

    Backend: ``nccl`` when CUDA is used (``device`` starting with ``cuda``, or ``None`` / ``"auto"``
    and CUDA available), ``gloo`` otherwise; on CUDA each process takes device ``LOCAL_RANK``
    (``torch.cuda.set_device``), so ``"cuda"`` means that device from then on.

    Returns:
        True if this process is part of a multi-process run (the group was initialised here or
        before), False for a single process (nothing is imported or started).

    Raises:
        DistributedError: torchrun's variables are incomplete, or the rendezvous fails.
    """
    global _INITIALISED_HERE
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return is_distributed()
    if not torch.distributed.is_available():
        raise DistributedError(
            "WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process"
        )
    dist = _dist()
    if dist.is_initialized():
        return is_distributed()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; launch with "
            "torchrun --nproc_per_node=N -m bossflow ..., or unset WORLD_SIZE"
        )
    auto = device is None or str(device) == "auto"
    cuda = torch.cuda.is_available() if auto else str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(_cuda_index(str(device)))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_TIMEOUT)
    except (RuntimeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"could not join the torchrun process group ({first}); check --rdzv-endpoint / "
            "MASTER_ADDR and that every node runs the same command"
        ) from None
    _INITIALISED_HERE = True
    return is_distributed()


def _cuda_index(device: str) -> int:
    """This process's GPU: its ``LOCAL_RANK``, or the one ``device`` names when the node runs one
    process; an index named for several processes, or too few GPUs, is one clear error."""
    local, per_node = int(os.environ.get("LOCAL_RANK", "0")), os.environ.get("LOCAL_WORLD_SIZE")
    if ":" in device:
        if int(per_node or 1) > 1:
            raise DistributedError(
                f"--device {device} would put all {per_node} processes of this node on one GPU; "
                "under torchrun give --device cuda (each process takes the GPU of its LOCAL_RANK)"
            )
        try:
            return torch.device(device).index or 0
        except RuntimeError:
            raise DistributedError(f"unknown --device {device!r}; use cuda or cuda:N") from None
    count = torch.cuda.device_count()
    if local >= count:
        raise DistributedError(
            f"process {local} of this node has no GPU of its own: {count} visible "
            "(CUDA_VISIBLE_DEVICES); launch at most that many with --nproc_per_node"
        )
    return local


def shutdown() -> None:
    """Destroy the process group if :func:`init_from_env` created it.

    After a failure a collective may be pending that will never complete; destroying an NCCL
    group waits for it (a hang on the surviving nodes), so the group is aborted instead.
    """
    global _INITIALISED_HERE
    if _INITIALISED_HERE and _dist().is_initialized():
        if _FAILED and _dist().get_backend() == "nccl":
            from torch.distributed import distributed_c10d

            with contextlib.suppress(Exception):  # experimental API; the process ends anyway
                distributed_c10d._abort_process_group()
        else:
            _dist().destroy_process_group()
    _INITIALISED_HERE = False


# --------------------------------------------------------------------------------------------------
# failures


def _store() -> Any:
    try:
        return _dist().distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a private helper: absent is fine
        return None


def _raise_if_peer_failed(store: Any) -> None:
    global _FAILED
    try:
        if store is None or not store.check([_ERROR_KEY]):
            return
        message = store.get(_ERROR_KEY).decode(errors="replace")
    except (RuntimeError, OSError):  # the store's host is gone too: nothing to read there
        return
    _FAILED = True
    raise PeerFailedError(f"another process failed: {message}")


def report_failure(err: BaseException) -> bool:
    """Publish this rank's failure so the other ranks stop waiting; True if it should be printed.

    Returns True for a single process, and for the first failure of a multi-process run; False
    for a :class:`~bossflow.errors.PeerFailedError` (the peer prints its own) and for later
    failures (one message per job).
    """
    global _FAILED
    if isinstance(err, PeerFailedError):
        return False
    if not is_distributed():
        return True
    _FAILED = True
    if hasattr(err, "_bossflow_first"):  # reported already, e.g. by fail_together on its way up
        return err._bossflow_first
    store = _store()
    if store is None:
        return True
    text = str(err).strip().splitlines()
    message = f"rank {rank()}: {text[0] if text else type(err).__name__}"
    try:
        first = store.add(_FAILURES_KEY, 1) == 1
        if first:
            store.set(_ERROR_KEY, message)
    except (RuntimeError, OSError):  # the store is gone (its host died): print anyway
        first = True
    with contextlib.suppress(AttributeError):  # (an exception type with __slots__)
        err._bossflow_first = first  # so the CLI, reporting it again on its way out, prints it
    return first


@contextlib.contextmanager
def fail_together() -> Iterator[None]:
    """Run a block whose exceptions other ranks must hear about (they are waiting for this rank).

    An exception leaving the block is published with :func:`report_failure`, then re-raised.
    """
    try:
        yield
    except Exception as err:
        if is_distributed():
            report_failure(err)
        raise


def _wait(work: Any, what: str) -> None:
    """Wait for an async collective, looking for a peer's failure every ``_POLL_S`` seconds."""
    store = _store()
    delay, checked = 1e-4, time.monotonic()
    try:
        while not work.is_completed():
            if time.monotonic() - checked > _POLL_S:
                _raise_if_peer_failed(store)
                checked = time.monotonic()
            time.sleep(delay)
            delay = min(2 * delay, 0.01)
        work.wait()
    except RuntimeError as err:  # e.g. gloo: "Connection closed by peer" when a rank died
        if isinstance(err, PeerFailedError):
            raise
        raise _lost_peer(err, what, store) from None


def _lost_peer(err: BaseException, what: str, store: Any) -> BossflowError:
    """The error for a collective that failed: the peer's own message if it published one."""
    _raise_if_peer_failed(store)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return DistributedError(
        f"{what} failed on rank {rank()} ({first}); another process probably died, see its "
        "error above"
    )


def lost_peer(err: BaseException, what: str) -> BossflowError | None:
    """The one-line error for ``err`` if it is a collective that another process's death broke
    (gloo's "Connection reset by peer", NCCL's ``DistBackendError``; the message keeps the
    error's first line, so a local failure reported that way still shows) in a collective bossflow
    does not wait on itself (DDP's gradient all-reduce, FSDP's gathers); ``None`` otherwise."""
    if not is_distributed():
        return None
    text = str(err)
    backend = getattr(_dist(), "DistBackendError", ())
    # a dead peer, not a local failure inside a collective (out of memory, invalid usage)
    markers = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    if not isinstance(err, backend) and not any(m in text for m in markers):
        return None
    return _lost_peer(err, what, _store())


def _device() -> torch.device:
    """Where collective tensors live: the current CUDA device under nccl, else the CPU."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# collectives (each is the identity for a single process)


def all_reduce_sum_float64(value: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Sum over ranks in float64 (counts too: exact up to 2**53).

    Args:
        value: an array or tensor, the same shape on every rank.

    Returns:
        The float64 sum, of the input's kind (numpy array or CPU/float64 tensor on the input's
        device).
    """
    if not is_distributed():
        return value
    is_tensor = isinstance(value, Tensor)
    t = value.detach() if is_tensor else torch.from_numpy(np.asarray(value, dtype=np.float64))
    out = t.to(_device(), torch.float64).clone()
    _wait(_dist().all_reduce(out, async_op=True), "summing over processes")
    if is_tensor:
        return out.to(value.device)
    return out.cpu().numpy()


def _all_gather_bytes(data: bytes) -> list[bytes]:
    dist, dev, n = _dist(), _device(), world_size()
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    _wait(dist.all_gather(sizes, size, async_op=True), "gathering sizes")
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.zeros_like(buf) for _ in range(n)]
    _wait(dist.all_gather(bufs, buf, async_op=True), "gathering results")
    return [
        bytes(b[: int(s.item())].cpu().numpy().tobytes()) for b, s in zip(bufs, sizes, strict=True)
    ]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable; tensors are moved to the CPU first), in rank order."""
    if not is_distributed():
        return [obj]
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu()
    blobs = _all_gather_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    return [pickle.loads(b) for b in blobs]  # noqa: S301 - our own ranks' data


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (what ``src`` read from a file, a decision, ...)."""
    if not is_distributed():
        return obj
    # a size, then one buffer of it: each rank holds the object's bytes once (a checkpoint sent
    # to N ranks through an all-gather took N copies on every rank)
    dist, dev, mine = _dist(), _device(), rank() == src
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if mine else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    _wait(dist.broadcast(size, src, async_op=True), "receiving a size")
    buf = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
    if mine:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    del data
    _wait(dist.broadcast(buf, src, async_op=True), f"receiving rank {src}'s data")
    return obj if mine else pickle.loads(buf.cpu().numpy().tobytes())  # noqa: S301


def barrier() -> None:
    """Wait for every rank (raising promptly if one of them failed)."""
    if is_distributed():
        _wait(_dist().barrier(async_op=True), "waiting for the other processes")


# --------------------------------------------------------------------------------------------------
# splitting samples


def round_rows(done: int, total: int, batch_size: int) -> tuple[range, int]:
    """This rank's batch of the next round, and where the round ends.

    A round is the ``world_size * batch_size`` samples after the first ``done``; rank ``r`` takes
    the ``r``-th ``batch_size`` of them (possibly fewer, or none, in the last round). A run that
    stops after a round has completed exactly the samples ``0 .. round_end - 1``, so it resumes
    with any number of processes.
    """
    start = min(done + rank() * batch_size, total)
    return range(start, min(start + batch_size, total)), min(
        done + world_size() * batch_size, total
    )


def split_range(total: int) -> range:
    """This rank's contiguous block of ``range(total)`` (blocks in rank order, sizes differ by at
    most one), so gathering the blocks in rank order gives the single-process order."""
    n, r = world_size(), rank()
    base, extra = divmod(total, n)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def map_rows(fn: Callable[[range], Tensor], total: int, device: torch.device | str) -> Tensor:
    """``fn(rows)`` for every row of ``range(total)``, the rows split over the processes.

    Each rank calls ``fn`` once on its :func:`split_range` block (not at all if the block is
    empty); the (rows, ...) results are gathered in rank order, so every rank gets the
    (total, ...) tensor one process would compute with ``fn(range(total))``, on ``device``.
    """
    if not is_distributed():
        return fn(range(total))
    block = split_range(total)
    part = None
    with fail_together():  # the other ranks wait in the gather below
        if len(block):
            part = fn(block).detach().cpu()
    parts = [p for p in all_gather_object(part) if p is not None]
    if not parts:  # no rows at all: what one process returns
        return fn(range(0))
    return torch.cat(parts).to(device)
