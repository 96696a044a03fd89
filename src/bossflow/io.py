"""Small file helpers: atomic writes, so an interrupted job never leaves a file that looks complete."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BossflowError

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "ensure_dir"]


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


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``.

    The temporary file lives in the same directory (so the rename is atomic) and is removed if
    ``write`` fails; ``path`` is either untouched or complete, never half written.
    """
    path = Path(path)
    ensure_dir(path.parent)
    tmp_path: Path | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except OSError as err:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise BossflowError(f"could not write {path}: {err.strerror or err}") from None
    except BaseException:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))
