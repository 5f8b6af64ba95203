"""Optimizer specs as per-mode linear systems.

On a quadratic with diagonal curvature h_i and gradient noise eps_i (variance c_i / B per step), every
optimizer here is linear in its state x (a vector of ``n_state`` numbers per eigen-direction):

    x' = A(lr) x + b(lr) eps,        A(lr) = A0 + lr * A1,   b(lr) = lr * b1.

A spec only writes (A0, A1, b1); :mod:`toymodels.dynamics` propagates the moments of any such system.
``init`` says how the state starts from theta_0 (x_0 = init * theta_0) and ``readout`` which state entry
the loss is measured at.

* :class:`SGD` -- theta' = theta - a (h theta + eps), with a = lr * h^-gamma for P = H^gamma
  (Grosse's lecture, "NQM: Preconditioning").  State (theta,).
* :class:`Momentum` -- heavy ball in the lecture's form, v' = beta v - a g, theta' = theta + v'.
  State (theta, v).
* :class:`EMA` -- exponential moving average of the iterates of any base optimizer,
  avg' = mu avg + (1 - mu) theta', avg_0 = theta_0; the loss is read at avg.  State (base..., avg).

Compositions are values: ``EMA(Momentum(0.1, 0.9), 0.99)`` is momentum with iterate averaging.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._validate import Array, Instance, Real, check_real, validate, validate_init
from .schedules import LEARNING_RATE, Schedule, as_schedule

_CURVATURE = Array(1, low=0.0, low_open=True)
_UNIT = Real(0.0, 1.0, high_open=True)

__all__ = ["Optimizer", "SGD", "Momentum", "EMA"]


class Optimizer:
    """Base class of the optimizer specs."""

    n_state: int
    readout: int

    @property
    def init(self) -> np.ndarray:  # pragma: no cover - abstract
        """How the state starts from theta_0: x_0 = ``init`` * theta_0 per mode, shape ``(n_state,)``."""
        raise NotImplementedError

    @validate(h=_CURVATURE)
    def affine(self, h: np.ndarray):
        """Per-mode ``(A0, A1, b1)`` of shapes ``(d, s, s)``, ``(d, s, s)``, ``(d, s)`` for curvatures
        ``h`` ``(d,)``, finite and > 0."""
        return self._affine(h)

    @validate(h=_CURVATURE, lr=Real(0.0, math.inf, high_open=True))
    def transition(self, h: np.ndarray, lr: float):
        """Per-mode ``(A, b)`` at learning rate ``lr``: shapes ``(d, s, s)`` and ``(d, s)``."""
        a0, a1, b1 = self._affine(h)
        return a0 + lr * a1, lr * b1

    @validate(h=_CURVATURE)
    def lr_limit(self, h: np.ndarray) -> float:
        """Largest constant learning rate with every mode stable (spectral radius < 1)."""
        return self._lr_limit(h)

    def _affine(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    def _lr_limit(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    @validate(lr=LEARNING_RATE)
    def with_lr(self, lr):
        """A copy with another learning rate (number or schedule)."""
        return self._with_lr(lr)

    def _with_lr(self, lr):
        return replace(self, lr=lr)

    @property
    def hyperparameters(self) -> dict:  # pragma: no cover - abstract
        """The settings that name the spec in results' attrs: ``optimizer`` (``"sgd"``, ``"precond"``,
        ``"momentum"``, with ``"+ema"`` under iterate averaging) and the hyper-parameters other than the
        learning rate (``precond``, ``momentum``, ``decay``)."""
        raise NotImplementedError


def _check_precond(precond):
    return check_real("precond", precond, low=0.0, high=1.0)


@validate_init(lr=LEARNING_RATE, precond=Real(0.0, 1.0))
@dataclass(frozen=True)
class SGD(Optimizer):
    """(Preconditioned) SGD, P = H^precond.  ``lr`` is a number or a :class:`Schedule`."""

    lr: Schedule | float
    precond: float = 0.0
    n_state = 1
    readout = 0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "precond", _check_precond(self.precond))

    @property
    def init(self):
        """``[1.0]``: the state is theta itself."""
        return np.array([1.0])

    def _affine(self, h):
        d = h.size
        a0 = np.ones((d, 1, 1))
        a1 = (-(h ** (1.0 - self.precond))).reshape(d, 1, 1)
        b1 = (-(h ** (-self.precond))).reshape(d, 1)
        return a0, a1, b1

    def _lr_limit(self, h):
        return 2.0 / np.max(h ** (1.0 - self.precond))

    @property
    def hyperparameters(self):
        """``optimizer`` (``"sgd"``, or ``"precond"`` when ``precond > 0``) and ``precond``."""
        return {"optimizer": "sgd" if self.precond == 0 else "precond", "precond": self.precond}


@validate_init(lr=LEARNING_RATE, beta=_UNIT, precond=Real(0.0, 1.0))
@dataclass(frozen=True)
class Momentum(Optimizer):
    """Heavy-ball momentum v' = beta v - a g, theta' = theta + v', beta in [0, 1).

    The form of Grosse's CSC 2541 Lecture 7, "NQM: Momentum and Iterate Averaging".
    """

    lr: Schedule | float
    beta: float = 0.9
    precond: float = 0.0
    n_state = 2
    readout = 0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "beta", check_real("beta", self.beta, low=0.0, high=1.0, high_open=True))
        object.__setattr__(self, "precond", _check_precond(self.precond))

    @property
    def init(self):
        """``[1.0, 0.0]``: theta_0 and zero velocity."""
        return np.array([1.0, 0.0])

    def _affine(self, h):
        # State (theta, v):  theta' = (1 - a h) theta + beta v - a eps,  v' = -a h theta + beta v - a eps.
        d = h.size
        heff = h ** (1.0 - self.precond)
        a0 = np.zeros((d, 2, 2))
        a0[:, 0, 0] = 1.0
        a0[:, 0, 1] = self.beta
        a0[:, 1, 1] = self.beta
        a1 = np.zeros((d, 2, 2))
        a1[:, 0, 0] = -heff
        a1[:, 1, 0] = -heff
        b1 = np.repeat(-(h ** (-self.precond))[:, None], 2, axis=1)
        return a0, a1, b1

    def _lr_limit(self, h):
        # Eigenvalues of [[1 - x, beta], [-x, beta]] (x = a h) lie inside the unit circle iff
        # 0 < x < 2 (1 + beta).
        return 2.0 * (1.0 + self.beta) / np.max(h ** (1.0 - self.precond))

    @property
    def hyperparameters(self):
        """``optimizer="momentum"``, ``precond`` and ``momentum`` (beta)."""
        return {"optimizer": "momentum", "precond": self.precond, "momentum": self.beta}


@validate_init(base=Instance(Optimizer, what="an SGD or Momentum spec"), decay=_UNIT)
@dataclass(frozen=True)
class EMA(Optimizer):
    """Exponential moving average of a base optimizer's iterates, decay mu in [0, 1).

    avg' = mu avg + (1 - mu) theta', avg_0 = theta_0; the loss is measured at the average.
    ``lr`` is the base optimizer's (``EMA(...).lr`` reads it, ``with_lr`` sets it).
    """

    base: Optimizer
    decay: float = 0.99

    def __post_init__(self):
        if not isinstance(self.base, (SGD, Momentum)):
            raise TypeError(f"`base` must be an SGD or Momentum spec; got {type(self.base).__name__}.")
        object.__setattr__(self, "decay", check_real("decay", self.decay, low=0.0, high=1.0, high_open=True))

    @property
    def lr(self):
        """The base optimizer's learning rate (a :class:`~toymodels.schedules.Schedule`)."""
        return self.base.lr

    @property
    def n_state(self):
        """The base optimizer's state entries and one more, the average."""
        return self.base.n_state + 1

    @property
    def readout(self):
        """Index of the average in the state (its last entry): the loss is measured there."""
        return self.base.n_state

    @property
    def init(self):
        """The base optimizer's ``init`` followed by 1 (avg_0 = theta_0)."""
        return np.concatenate([self.base.init, [1.0]])

    def _affine(self, h):
        a0b, a1b, b1b = self.base._affine(h)
        d, s = h.size, self.base.n_state
        mu = self.decay
        a0 = np.zeros((d, s + 1, s + 1))
        a1 = np.zeros((d, s + 1, s + 1))
        a0[:, :s, :s] = a0b
        a1[:, :s, :s] = a1b
        r = self.base.readout
        a0[:, s, :s] = (1 - mu) * a0b[:, r, :]
        a1[:, s, :s] = (1 - mu) * a1b[:, r, :]
        a0[:, s, s] = mu
        b1 = np.concatenate([b1b, (1 - mu) * b1b[:, r : r + 1]], axis=1)
        return a0, a1, b1

    def _lr_limit(self, h):
        return self.base._lr_limit(h)

    def _with_lr(self, lr):
        return replace(self, base=self.base.with_lr(lr))

    @property
    def hyperparameters(self):
        """The base optimizer's, with ``"+ema"`` appended to ``optimizer``, and the ``decay``."""
        hp = dict(self.base.hyperparameters)
        hp["optimizer"] = hp["optimizer"] + "+ema"
        hp["decay"] = self.decay
        return hp

