"""Network architectures: NCSN++/DDPM++ for the official Rectified Flow checkpoints, and the
small UNet and classifier of the embedded digits default.

Names are imported lazily on first access, so ``import bossflow.models`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ncsnpp import NCSNpp, NCSNppConfig
    from .rectified_flow import RF_CONFIGS, load_rectified_flow, rectified_flow_config
    from .unet import DigitClassifier, DigitUNet

# public name -> submodule that defines it
_EXPORTS = {
    "NCSNpp": "ncsnpp",
    "NCSNppConfig": "ncsnpp",
    "RF_CONFIGS": "rectified_flow",
    "load_rectified_flow": "rectified_flow",
    "rectified_flow_config": "rectified_flow",
    "DigitUNet": "unet",
    "DigitClassifier": "unet",
}

__all__ = [
    "DigitClassifier",
    "DigitUNet",
    "NCSNpp",
    "NCSNppConfig",
    "RF_CONFIGS",
    "load_rectified_flow",
    "rectified_flow_config",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
