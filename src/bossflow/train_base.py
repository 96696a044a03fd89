"""Alias of :mod:`bossflow.recipes.digits` (the recipe of the shipped digits models).

Kept because the provenance of the shipped weights names ``bossflow.train_base.train_and_save``.
"""

from .recipes.digits import *  # noqa: F403
from .recipes.digits import __all__  # noqa: F401
