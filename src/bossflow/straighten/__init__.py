"""Straightening (paper eq. 9): reference pairs from the pretrained model, then fine-tuning.

:func:`make_pairs` stores the pretrained field's fine-trajectory states at the schedules' times;
:func:`straighten` fine-tunes a copy of the field (fully or with LoRA) so that one Euler step per
interval lands on them, or trains the reflow baseline in the same loop.
"""

from .pairs import PairStore, make_pairs, module_fingerprint
from .train import (
    LR_SCHEDULES,
    OBJECTIVES,
    StraightenConfig,
    StraightenResult,
    eval_interval_error,
    save_straightened,
    straighten,
)

__all__ = [
    "LR_SCHEDULES",
    "OBJECTIVES",
    "PairStore",
    "StraightenConfig",
    "StraightenResult",
    "eval_interval_error",
    "make_pairs",
    "module_fingerprint",
    "save_straightened",
    "straighten",
]
