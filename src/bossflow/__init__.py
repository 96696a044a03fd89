"""bossflow: Bellman optimal step sizes and straightening for pretrained flow-matching models.

Time runs from 0 (noise) to 1 (data); a velocity field is any callable ``v(x, t)`` with
``x: (B, ...)`` and ``t: (B,)``. See :mod:`bossflow.field` for adapters to other conventions.

Typical use::

    import bossflow
    model = bossflow.load_model("digits")                        # the same specs as the CLI
    field = model.field
    noise = bossflow.NoiseSource(model.sample_shape, seed=0)
    cost = bossflow.cost_matrix(field, noise, grid=100, samples=256)   # paper eq. 5
    schedules = bossflow.bellman_schedules(cost, [2, 4, 8])            # paper eq. 8
    x = bossflow.sample(field, noise.take(16), schedules[4])           # 4 Euler steps
    pairs = bossflow.make_pairs(field, noise, [schedules[4]], "pairs/", 100, samples=256)
    result = bossflow.straighten(field, pairs, schedules[4])           # paper eq. 9
"""

from .bellman import CostMatrix, bellman_schedules, cost_matrix
from .errors import BossflowError
from .field import Guided, NFECounter, VelocityField
from .noise import NoiseSource
from .sampler import Sampler, load_schedule
from .schedule import Schedule, edm, quadratic, uniform
from .solvers import reference_solve, sample
from .spec import LoadedModel, load_model
from .straighten import PairStore, StraightenConfig, make_pairs, save_straightened, straighten

__version__ = "0.1.0"

__all__ = [
    "BossflowError",
    "CostMatrix",
    "LoadedModel",
    "NFECounter",
    "NoiseSource",
    "PairStore",
    "Sampler",
    "Schedule",
    "StraightenConfig",
    "VelocityField",
    "bellman_schedules",
    "cost_matrix",
    "edm",
    "load_model",
    "load_schedule",
    "make_pairs",
    "quadratic",
    "reference_solve",
    "sample",
    "Guided",
    "save_straightened",
    "straighten",
    "uniform",
    "__version__",
]
