"""What every loader and resumable job shares: strict state-dict comparison, weight fingerprints
and reading torch files without running pickled code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .errors import CheckpointError

__all__ = [
    "state_dict_problems",
    "listing",
    "shape_of",
    "module_fingerprint",
    "noise_fingerprint",
    "load_torch_weights",
    "refused_global",
]


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


def module_fingerprint(module: Any) -> str | None:
    """A short fingerprint of a module's weights, or ``None`` for a plain callable.

    Hashes every state-dict entry's name, shape and dtype, its first 64 values and its float64 sum
    (printed to 8 significant digits, so the same weights on another device give the same
    fingerprint), the ``fingerprint_config()`` of every submodule that has one (bossflow's
    adapters and :class:`~bossflow.field.Precision`: the same weights called in another
    convention, time scale or precision are another field; the analytic fields' constants) and
    non-persistent buffers. Cheap even for large models: it never copies a whole tensor to the
    CPU.
    """
    if not isinstance(module, nn.Module):
        return None
    h = hashlib.sha256()
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if not isinstance(value, Tensor):
                continue
            flat = value.detach().reshape(-1)
            head = flat[:64].to("cpu", torch.float64).numpy()
            total = float(flat.double().sum()) if flat.numel() else 0.0
            h.update(f"{name}|{tuple(value.shape)}|{value.dtype}|{total:.8e}|".encode())
            h.update(np.ascontiguousarray(head).tobytes())
        for name, sub in module.named_modules():
            config = getattr(sub, "fingerprint_config", None)
            if callable(config):
                h.update(f"{name}|{config()}|".encode())  # (not the class: a subclass is one)
            for buffer in sorted(getattr(sub, "_non_persistent_buffers_set", ())):
                value = getattr(sub, buffer, None)  # constants outside the state dict
                if isinstance(value, Tensor):
                    head = value.detach().reshape(-1)[:64].to("cpu", torch.float64).numpy()
                    h.update(f"{name}.{buffer}|{tuple(value.shape)}|".encode())
                    h.update(np.ascontiguousarray(head).tobytes())
    return h.hexdigest()[:16]


def noise_fingerprint(first: Tensor) -> str:
    """Fingerprint of noise sample 0, so a resumed run notices another seed or noise tensor."""
    arr = first.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


# What torch's weights-only unpickler says when it stops at a global it will not import or call
# (torch 2.4 .. 2.13 wordings); group 1 is the global's name.
_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs to .*)?$", re.M),
    re.compile(r"allowlisted via `add_safe_globals`,? but got (?:<class '([^']+)'>|(\S+))"),
)


def refused_global(err: BaseException) -> str | None:
    """The global (``module.name``) a weights-only ``torch.load`` refused, or ``None``.

    ``None`` means ``err`` is not such a refusal (a truncated or foreign file, say).
    """
    if not isinstance(err, pickle.UnpicklingError):
        return None
    text = str(err)
    for pattern in _REFUSAL_PATTERNS:
        found = pattern.search(text)
        if found:
            name = next(g for g in found.groups() if g).strip().rstrip(".")
            # torch prints builtins without their module ("print" for builtins.print)
            return name if "." in name or name.startswith("<") else f"builtins.{name}"
    return None


def load_torch_weights(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    allow: Sequence[Any] = (),
    hint: str = "",
) -> Any:
    """``torch.load(path, weights_only=True)``, refusing pickled code with a clear message.

    Args:
        path: the file.
        map_location: passed to ``torch.load``.
        allow: extra globals the file may hold (``torch.serialization.safe_globals`` entries).
        hint: appended to the refusal message (e.g. how to load a trusted file instead).

    Returns:
        What ``torch.load`` returned.

    Raises:
        CheckpointError: the file holds a pickled global that weights-only loading refuses (the
            message names it). Any other failure of ``torch.load`` propagates unchanged, for the
            caller to word.
    """
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        name = refused_global(err)
        if name is None:
            raise
        raise CheckpointError(
            f"{path} was refused: it holds pickled Python code/objects (blocked global: {name}) "
            "that bossflow does not run; re-save the weights as a plain state dict or "
            f".safetensors{hint}"
        ) from None
