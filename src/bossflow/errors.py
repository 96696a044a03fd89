"""Exceptions raised by bossflow.

Every error a user can cause (bad input, bad file, bad model) is a :class:`BossflowError`, so the
CLI can print its message alone, without a traceback. Each subclass also derives from the built-in
exception a Python user would expect (``ValueError``, ``FileNotFoundError`` ...).
"""

from __future__ import annotations


class BossflowError(Exception):
    """Base class of the errors bossflow raises on bad input; the message says what to do."""


class ScheduleError(BossflowError, ValueError):
    """A time grid is not a valid schedule (not increasing, not from 0 to 1, NaN, too short)."""


class ModelOutputError(BossflowError, ValueError):
    """A velocity field returned something unusable (wrong shape, NaN or infinite values)."""


class ModelCallError(BossflowError, RuntimeError):
    """Calling a user's model failed inside the model; the message names the call and the cause."""


class CostMatrixError(BossflowError, ValueError):
    """A cost matrix cannot be used for dynamic programming (shape, values, budget)."""


class CheckpointError(BossflowError, ValueError):
    """A checkpoint or cache file is corrupt, or does not match what it is loaded into."""


class ConfigError(BossflowError, ValueError):
    """A model spec, option or configuration is unknown or inconsistent."""


class DistributedError(BossflowError, RuntimeError):
    """A multi-process run (torchrun) cannot start or continue; the message says which rank failed."""


class PeerFailedError(DistributedError):
    """Another rank of a multi-process run failed; that rank reports its own error."""


class MissingExtraError(BossflowError, ImportError):
    """An optional dependency is needed; the message names the pip extra to install."""


def require(module: str, extra: str, purpose: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra.

    Args:
        module: the module to import, e.g. ``"peft"``.
        extra: the bossflow extra that installs it, e.g. ``"lora"``.
        purpose: what it is needed for, used in the message.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the optional package '{module}', which is not importable here "
            f"({err}). Install it with: pip install 'bossflow[{extra}]'"
        ) from err
