"""Toy models of stochastic optimization: exact moment dynamics with Monte Carlo beside them."""

from . import secular
from .features import RandomFeatures
from .linreg import FiniteLinearRegression, GaussianLinearRegression
from .nqm import NQM
from .optimizers import EMA, SGD, Momentum
from .plrf import PowerLawRF
from .schedules import (BatchSizeWarmup, Constant, Cosine, Exponential, PiecewiseConstant, StepDecay, Tabulated,
                        Warmup)
from .spectra import power_law

__all__ = [
    "NQM",
    "GaussianLinearRegression",
    "FiniteLinearRegression",
    "RandomFeatures",
    "PowerLawRF",
    "secular",
    "SGD",
    "Momentum",
    "EMA",
    "Constant",
    "PiecewiseConstant",
    "StepDecay",
    "Exponential",
    "Cosine",
    "Warmup",
    "Tabulated",
    "BatchSizeWarmup",
    "power_law",
]
