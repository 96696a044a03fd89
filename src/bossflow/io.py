"""Small file helpers: atomic writes, so an interrupted job never leaves a file that looks complete,
and a lock on an output folder, so two runs never mix their outputs there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BossflowError

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_bytes",
    "ensure_dir",
    "output_lock",
    "remove_stale_temporaries",
    "LOCK_FILE",
]


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` would give (read once, at import)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _file_mode()


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create directory ``path`` (and parents); a clear error if it exists as a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BossflowError(f"{path} exists and is not a directory; choose another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BossflowError(f"cannot create output folder {path}: {err.strerror or err}") from None
    return path


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], None], every_rank: bool = False
) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``.

    In a multi-process run (torchrun) only rank 0 writes: the other ranks return ``path`` without
    writing, so shared files are written once, and a failure of rank 0's write is published to
    them (:func:`~bossflow.distributed.fail_together`: they are bound to wait for rank 0 at the
    next collective). ``every_rank=True`` writes on every rank (a file only this rank makes, e.g.
    its pair shard).

    The temporary file lives in the same directory (so the rename is atomic) and is removed if
    ``write`` fails; ``path`` is either untouched or complete, never half written.

    Any failure of ``write`` or of the file system (``OSError``, but also e.g. the
    ``RuntimeError`` ``torch.save`` raises on a full disk) becomes one :class:`BossflowError`
    naming ``path``; a :class:`BossflowError` from ``write`` and ``KeyboardInterrupt`` /
    ``SystemExit`` propagate as they are. The temporary file is removed in every case.
    """
    path = Path(path)
    if every_rank:
        return _atomic_write(path, write)
    from .distributed import fail_together, is_rank_zero

    if not is_rank_zero():
        return path
    with fail_together():
        return _atomic_write(path, write)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    ensure_dir(path.parent)
    tmp_path: Path | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; give the usual file mode
        _fsync(tmp_path)  # the data on disk before the rename, so a crash leaves old or new
        os.replace(tmp_path, path)
        _fsync(path.parent, directory=True)  # and the rename itself
    except BaseException as err:
        if tmp_path is not None:
            with contextlib.suppress(OSError):
                tmp_path.unlink(missing_ok=True)
        if isinstance(err, BossflowError) or not isinstance(err, Exception):
            raise
        raise BossflowError(f"could not write {path}: {_write_failure(err)}") from err
    return path


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush ``path`` (a file, or a folder's entries) to disk; a file system that cannot fsync a
    folder (some network ones) is left to its own guarantees."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _write_failure(err: Exception) -> str:
    """What went wrong in a write, in a few words, with a hint when the disk may be full."""
    if isinstance(err, OSError) and err.strerror:
        reason = err.strerror
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return reason  # "Permission denied", "Read-only file system": clear as they are
    else:  # torch.save on a full disk: RuntimeError("... file write failed"); numpy: OSError(...)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0][:300] if lines else type(err).__name__
    return f"{reason} (is the disk full? free some space or choose another output folder)"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


LOCK_FILE = ".bossflow.lock"
# The names atomic_write's mkstemp gives: "." + target name + "." + 8 random [a-z0-9_] + ".tmp".
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
_STALE_S = 3600.0  # a temporary file untouched this long belongs to no live write
_HELD: dict[str, list] = {}  # folder -> [fd, depth]: locks this process holds (re-entrant)
_HELD_GUARD = threading.Lock()


def remove_stale_temporaries(folder: str | os.PathLike, depth: int = 4) -> list[Path]:
    """Delete the temporary files killed :func:`atomic_write` calls left in ``folder``.

    Only names :func:`atomic_write` makes (``.NAME.XXXXXXXX.tmp``) are removed, in ``folder`` and
    its sub-folders down to ``depth`` levels, and only once untouched for an hour (a command that
    writes without the lock, such as ``sample`` into the same folder, may be writing one now);
    symbolic links are not followed and a sub-folder with its own lock file (another run's output
    folder) is left alone. Call it while holding :func:`output_lock` on ``folder``.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    pending = [(Path(folder), 0)]
    while pending:
        here, level = pending.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    if level < depth and not os.path.lexists(os.path.join(entry.path, LOCK_FILE)):
                        pending.append((Path(entry.path), level + 1))
                elif (
                    entry.is_file(follow_symlinks=False)
                    and _TEMPORARY.fullmatch(entry.name)
                    and time.time() - entry.stat(follow_symlinks=False).st_mtime > _STALE_S
                ):  # older than any live write: a command without the lock may be writing one
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                continue  # gone meanwhile, or not ours to delete: leave it
    return removed


def _holder(fd: int) -> str:
    """The ``PID command`` line the holder of a lock wrote (waits briefly for a fresh holder)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        if text:
            pid, _, command = text.partition(" ")
            return f"PID {pid}" + (f": {command}" if command else "")
        time.sleep(0.05)  # it took the lock an instant ago and has not written its PID yet
    return "PID unknown"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "bossflow") -> Iterator[Path]:
    """Hold an advisory lock on output folder ``folder`` for the duration of the ``with`` block.

    The lock is ``flock`` on ``folder/.bossflow.lock``, which then holds ``PID what``. The kernel
    releases it when the process ends, however it ends, so a killed run never blocks the next one.
    On taking it, temporary files that killed writes left in the folder are removed
    (:func:`remove_stale_temporaries`). Taking it again in the same process is a no-op; where the
    platform or file system has no ``flock``, nothing is locked. In a multi-process run
    (torchrun) rank 0 takes the lock and the other ranks share it.

    Args:
        folder: the output folder (created if needed).
        what: the command, written next to the PID for the message another run gets.

    Yields:
        ``folder`` as a :class:`Path`.

    Raises:
        BossflowError: another process holds the lock (the message names its PID and command), or
            the lock file cannot be created.
    """
    path = ensure_dir(folder)
    from .distributed import is_rank_zero

    if not is_rank_zero():  # a multi-process run: rank 0 holds the lock for all its processes
        yield path
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks, run unlocked
        yield path
        return
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield path
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    lock_path = path / LOCK_FILE
    for _attempt in range(5):
        try:
            path.mkdir(parents=True, exist_ok=True)  # (a failed run may have just removed it)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise BossflowError(
                f"cannot create the lock file {lock_path}: {err.strerror or err}; choose an "
                "output folder you can write to"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BossflowError(
                f"{path} is in use by another run ({holder}); wait for it to finish, or choose "
                "another --out"
            ) from None
        except OSError:  # e.g. a network file system without flock: run unlocked
            os.close(fd)
            yield path
            return
        if _same_file(fd, lock_path):
            break
        os.close(fd)  # the holder removed that file as it ended: lock the one there now
    else:
        raise BossflowError(f"could not lock {lock_path}: it kept being replaced; run again")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
    except OSError:
        pass  # the lock holds without the note; another run would name "PID unknown"
    with _HELD_GUARD:
        _HELD[key] = [fd, 1]
    try:
        remove_stale_temporaries(path)
        yield path
    finally:
        with _HELD_GUARD:
            del _HELD[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            if os.listdir(path) == [LOCK_FILE]:  # nothing made: the folder can go (see _output_dir)
                os.unlink(lock_path)  # while still held, so no other run holds this file
        os.close(fd)  # releases the flock


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not removed or replaced meanwhile)."""
    try:
        there, mine = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)
