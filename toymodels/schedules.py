"""Learning-rate schedules.

A schedule maps the update index k = 0, 1, 2, ... (the update that takes the iterate from step k to
step k + 1) to a learning rate.  Piecewise-constant schedules expose their pieces, so the exact
dynamics can jump over a whole piece at once; the others are propagated step by step.

All schedules are small frozen values::

    >>> StepDecay(0.5, factor=0.1, every=1000).values(3)
    array([0.5, 0.5, 0.5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validate import (MAX_STEPS, AnyOf, Array, Instance, Integer, Real, check_bytes, check_int, check_real,
                        validate, validate_init)

__all__ = [
    "Schedule",
    "Constant",
    "PiecewiseConstant",
    "StepDecay",
    "Exponential",
    "Cosine",
    "Warmup",
    "as_schedule",
    "LEARNING_RATE",
]

_POSITIVE = dict(low=0.0, high=math.inf, low_open=True, high_open=True)
_LR = Real(0.0, math.inf, low_open=True, high_open=True)
_STEP_COUNT = Integer(1, MAX_STEPS)


class Schedule:
    """Base class.  Subclasses implement :meth:`values`; piecewise-constant ones :meth:`pieces`."""

    piecewise_constant = False

    @validate(n=Integer(0, MAX_STEPS))
    def values(self, n: int) -> np.ndarray:
        """Learning rates of updates 0..n-1, shape ``(n,)`` (at most :data:`~toymodels._validate.MAX_BYTES`
        of them: long curves step through a schedule in chunks with :meth:`at`)."""
        check_bytes("n", 8.0 * n, what=f"{n} learning rates")
        return self._at(np.arange(n))

    @validate(k=Array((0, 1), low=0.0, min_size=0))
    def at(self, k) -> np.ndarray:
        """Learning rates of the updates with indices ``k`` (a non-negative index or 1-D array), same shape."""
        return self._at(k)

    def _at(self, k: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def constant_after(self) -> int | None:  # pragma: no cover - abstract
        """The update index from which the rate no longer changes (None: it changes for ever)."""
        raise NotImplementedError

    def pieces(self):  # pragma: no cover - abstract
        """``(starts, lrs)``: piece p uses ``lrs[p]`` for updates ``starts[p] <= k < starts[p+1]``."""
        raise NotImplementedError

    @property
    def max_lr(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@validate_init(lr=_LR)
@dataclass(frozen=True)
class Constant(Schedule):
    """The same learning rate at every update."""

    lr: float
    piecewise_constant = True

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))

    def _at(self, k):
        return np.full(np.shape(k), self.lr)

    @property
    def constant_after(self):
        return 0

    def pieces(self):
        return np.array([0], dtype=np.int64), np.array([self.lr])

    @property
    def max_lr(self):
        return self.lr


@validate_init(boundaries=Array((0, 1), low=1, high=MAX_STEPS, min_size=0), lrs=Array((0, 1), **_POSITIVE))
@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    """``lrs[p]`` for updates ``boundaries[p-1] <= k < boundaries[p]`` (boundaries strictly increasing).

    ``len(lrs) == len(boundaries) + 1``; the last piece lasts for ever.
    """

    boundaries: tuple
    lrs: tuple
    piecewise_constant = True

    def __post_init__(self):
        b = tuple(check_int("boundaries", x, low=1) for x in np.atleast_1d(self.boundaries))
        lrs = tuple(check_real("lrs", x, **_POSITIVE) for x in np.atleast_1d(self.lrs))
        if len(lrs) != len(b) + 1:
            raise ValueError(f"`lrs` must have len(boundaries) + 1 = {len(b) + 1} entries; got {len(lrs)}.")
        if any(b2 <= b1 for b1, b2 in zip(b, b[1:])):
            raise ValueError("`boundaries` must be strictly increasing.")
        object.__setattr__(self, "boundaries", b)
        object.__setattr__(self, "lrs", lrs)

    def _at(self, k):
        return np.asarray(self.lrs)[np.searchsorted(self.boundaries, k, side="right")]

    @property
    def constant_after(self):
        return self.boundaries[-1] if self.boundaries else 0

    def pieces(self):
        return np.array((0,) + self.boundaries, dtype=np.int64), np.array(self.lrs)

    @property
    def max_lr(self):
        return max(self.lrs)


@validate_init(lr=_LR, factor=Real(0.0, 1.0, low_open=True), every=_STEP_COUNT, n_decays=Integer(0, 1000))
@dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr * factor**(k // every)``, for ``n_decays`` decays (then constant)."""

    lr: float
    factor: float = 0.1
    every: int = 1000
    n_decays: int = 3
    piecewise_constant = True

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "factor", check_real("factor", self.factor, low=0.0, high=1.0, low_open=True))
        object.__setattr__(self, "every", check_int("every", self.every, low=1))
        object.__setattr__(self, "n_decays", check_int("n_decays", self.n_decays, low=0, high=1000))

    def _as_piecewise(self):
        b = tuple(self.every * (j + 1) for j in range(self.n_decays))
        return PiecewiseConstant(b, tuple(self.lr * self.factor**j for j in range(self.n_decays + 1)))

    def _at(self, k):
        return self._as_piecewise()._at(k)

    @property
    def constant_after(self):
        return self.every * self.n_decays

    def pieces(self):
        return self._as_piecewise().pieces()

    @property
    def max_lr(self):
        return self.lr


@validate_init(lr=_LR, gamma=Real(0.0, 1.0, low_open=True), min_lr=Real(0.0, math.inf, high_open=True))
@dataclass(frozen=True)
class Exponential(Schedule):
    """``lr * gamma**k``, floored at ``min_lr``."""

    lr: float
    gamma: float = 0.999
    min_lr: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "gamma", check_real("gamma", self.gamma, low=0.0, high=1.0, low_open=True))
        object.__setattr__(self, "min_lr", check_real("min_lr", self.min_lr, low=0.0, high=self.lr))

    def _at(self, k):
        return np.maximum(self.lr * self.gamma ** np.asarray(k, dtype=np.float64), self.min_lr)

    @property
    def constant_after(self):
        if self.min_lr <= 0 or self.gamma == 1.0:
            return None if self.gamma < 1.0 else 0
        return max(0, math.ceil(math.log(self.min_lr / self.lr) / math.log(self.gamma)))

    @property
    def max_lr(self):
        return self.lr


@validate_init(lr=_LR, total_steps=_STEP_COUNT, final_lr=Real(0.0, math.inf, high_open=True))
@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine decay from ``lr`` to ``final_lr`` over ``total_steps`` updates, then ``final_lr``."""

    lr: float
    total_steps: int
    final_lr: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "total_steps", check_int("total_steps", self.total_steps, low=1))
        object.__setattr__(self, "final_lr", check_real("final_lr", self.final_lr, low=0.0, high=self.lr))

    def _at(self, k):
        k = np.minimum(np.asarray(k, dtype=np.float64), self.total_steps)
        return self.final_lr + 0.5 * (self.lr - self.final_lr) * (1 + np.cos(np.pi * k / self.total_steps))

    @property
    def constant_after(self):
        return self.total_steps

    @property
    def max_lr(self):
        return self.lr


@validate_init(base=Instance(Schedule), warmup_steps=_STEP_COUNT)
@dataclass(frozen=True)
class Warmup(Schedule):
    """Linear warm-up over ``warmup_steps`` updates to the base schedule's rate, then the base schedule.

    During warm-up update k uses ``base(k) * (k + 1) / warmup_steps``.
    """

    base: Schedule
    warmup_steps: int

    def __post_init__(self):
        if not isinstance(self.base, Schedule):
            raise TypeError(f"`base` must be a Schedule; got {type(self.base).__name__}.")
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=1))

    def _at(self, k):
        k = np.asarray(k)
        return self.base._at(k) * np.minimum(1.0, (k + 1.0) / self.warmup_steps)

    @property
    def constant_after(self):
        base = self.base.constant_after
        return None if base is None else max(base, self.warmup_steps)

    @property
    def max_lr(self):
        return self.base.max_lr


LEARNING_RATE = AnyOf(_LR, Instance(Schedule), what="a float in (0, inf) or a Schedule")
"""The constraint of every ``lr`` argument that takes a number or a schedule."""


@validate(lr=LEARNING_RATE)
def as_schedule(lr) -> Schedule:
    """A number becomes :class:`Constant`; a :class:`Schedule` is returned as is."""
    if isinstance(lr, Schedule):
        return lr
    return Constant(lr)
