"""The constraints shared by the public methods of the toy models (declared once, used with
:func:`toymodels._validate.validate`)."""

from __future__ import annotations

import math

from ._validate import MAX_EXACT_INT, MAX_STEPS, Array, Boolean, Instance, Integer, Maybe, Real, Steps
from .optimizers import _WD as WEIGHT_DECAY  # defined where weight decay is (the optimizers' docstring)
from .optimizers import Optimizer
from .schedules import BATCH_SIZE as BATCH_SIZES

__all__ = ["BATCH_SIZE", "BATCH_SIZES", "OPTIMIZER", "TARGET", "SEED", "N_RUNS", "STEPS", "MC_STEPS", "STEP", "LR", "MAYBE_LR",
           "PROGRESS", "POSITIVE_ARRAY", "MAX_MC_STEPS", "MAX_RUNS", "WEIGHT_DECAY"]

MAX_RUNS = 10**6  # Monte Carlo runs at once
MAX_MC_STEPS = 10**8  # Monte Carlo steps (each one costs n_runs x d random draws)

BATCH_SIZE = Real(1.0, float(MAX_EXACT_INT))  # a count: large powers of two are given as floats
# ... or a batch-size schedule (the methods that propagate or simulate over steps take one)
OPTIMIZER = Instance(Optimizer, what="an optimizer spec (SGD, Momentum, EMA, Nesterov, ...)")
TARGET = Real(0.0, math.inf, low_open=True, high_open=True)
SEED = Integer(0, 2**63 - 1)
N_RUNS = Integer(2, MAX_RUNS)
STEPS = Steps(MAX_STEPS)
MC_STEPS = Steps(MAX_MC_STEPS)
STEP = Integer(0, MAX_STEPS)
LR = Real(0.0, math.inf, low_open=True, high_open=True)
MAYBE_LR = Maybe(LR)
PROGRESS = Maybe(Boolean())
POSITIVE_ARRAY = Array(1, low=0.0, low_open=True)
