"""Strict state-dict comparison shared by every loader (shipped models, user modules, Rectified Flow)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["state_dict_problems", "listing", "shape_of"]


def listing(items: list[str], limit: int = 12) -> str:
    """``a, b, c, ... (N more)``: a readable list for error messages."""
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items) - limit} more)" if len(items) > limit else shown


def shape_of(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, Tensor) else type(value).__name__


def state_dict_problems(
    expected: Mapping[str, Tensor], state: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """What keeps ``state`` from loading strictly into a module whose state dict is ``expected``.

    Args:
        expected: the module's ``state_dict()``.
        state: the tensors read from a file, by key.
        prefix: prepended to key names in the messages (e.g. ``"module."``).

    Returns:
        Up to three phrases (``"missing keys: ..."``, ``"unexpected keys: ..."``,
        ``"wrong shapes: ..."``); empty when the state loads strictly.
    """
    missing = [prefix + k for k in expected if k not in state]
    unexpected = [prefix + k for k in state if k not in expected]
    wrong = [
        f"{prefix}{k} {shape_of(state[k])} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], Tensor) or state[k].shape != v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {listing(wrong)}")
    return problems
