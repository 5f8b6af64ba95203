"""Toy models of stochastic optimization: exact moment dynamics with Monte Carlo beside them."""

from . import bootstrap, secular
from .features import RandomFeatures
from .linreg import FiniteLinearRegression, GaussianLinearRegression
from .nqm import NQM
from .optimizers import EMA, SGD, AcceleratedSGD, Momentum, Nesterov, PolyakAverage, ScheduleFree
from .plrf import PowerLawRF
from .schedules import (BatchSizeWarmup, Constant, Cosine, Exponential, InverseSqrt, LinearDecay, PiecewiseConstant,
                        StepDecay, Tabulated, Warmup, WarmupStableDecay)
from .spectra import power_law

__all__ = [
    "NQM",
    "GaussianLinearRegression",
    "FiniteLinearRegression",
    "RandomFeatures",
    "PowerLawRF",
    "secular",
    "bootstrap",
    "SGD",
    "Momentum",
    "EMA",
    "Nesterov",
    "AcceleratedSGD",
    "PolyakAverage",
    "ScheduleFree",
    "Constant",
    "PiecewiseConstant",
    "StepDecay",
    "Exponential",
    "Cosine",
    "Warmup",
    "Tabulated",
    "WarmupStableDecay",
    "LinearDecay",
    "InverseSqrt",
    "BatchSizeWarmup",
    "power_law",
]
