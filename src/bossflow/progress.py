"""Progress bars that appear only on a terminal.

A tqdm bar redraws itself with carriage returns; written to a log file or a pipe these updates pile
up (a log of the demo grew to 136 KB of them). :func:`progress_bar` therefore draws only when it is
asked to (``enabled``) *and* stderr is a terminal. The environment variable ``BOSSFLOW_PROGRESS``
overrides the terminal check: ``1`` always draws (when enabled), ``0`` never draws.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["progress_bar", "progress_wanted", "ENV_VAR"]

ENV_VAR = "BOSSFLOW_PROGRESS"


def progress_wanted(enabled: bool = True) -> bool:
    """Whether a bar would be drawn: ``enabled``, then ``BOSSFLOW_PROGRESS`` or a terminal stderr."""
    if not enabled:
        return False
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(
    total: int | None = None,
    desc: str | None = None,
    enabled: bool = True,
    initial: int = 0,
    unit: str = "it",
    **kwargs: Any,
):
    """A tqdm bar on stderr, disabled unless ``enabled`` and stderr is a terminal.

    A disabled bar accepts the same calls (``update``, ``set_postfix``, ``close``, iteration) and
    draws nothing, so callers need no ``if bar is not None`` checks.

    Args:
        total: the count the bar runs to (``None``: unknown).
        desc: the label on the left.
        enabled: ``False`` never draws (e.g. ``--quiet``).
        initial: where the bar starts (work already done by an earlier, resumed run).
        unit: what is counted, e.g. ``"traj"``.
        **kwargs: passed on to ``tqdm`` (e.g. ``iterable``, ``leave``).

    Returns:
        A ``tqdm`` object.
    """
    from tqdm.auto import tqdm

    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(
        total=total,
        desc=desc,
        initial=initial,
        unit=unit,
        disable=not progress_wanted(enabled),
        file=sys.stderr,
        **kwargs,
    )
