"""Learning-rate and batch-size schedules.

A schedule maps the update index k = 0, 1, 2, ... (the update that takes the iterate from step k to
step k + 1) to a learning rate, or to the batch size B_k of the mini-batch that update draws (any
schedule whose values are >= 1 is a batch-size schedule; :class:`BatchSizeWarmup` is made for it).
Piecewise-constant schedules expose their pieces, so the exact dynamics can jump over a whole piece
at once; the others are propagated step by step.

All schedules are small frozen values::

    >>> StepDecay(0.5, factor=0.1, every=1000).values(3)
    array([0.5, 0.5, 0.5])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._validate import (MAX_EXACT_INT, MAX_STEPS, AnyOf, Array, Boolean, Constraint, Instance, Integer, Options, Real,
                        Steps, check_bytes, check_int, check_real, validate, validate_init)

__all__ = [
    "Schedule",
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
    "as_schedule",
    "cumulative",
    "constant_from",
    "batch_sizes_at",
    "check_batch_values",
    "schedule_segments",
    "check_batch_size",
    "LEARNING_RATE",
    "BATCH_SIZE",
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
        """The largest value the schedule takes: the peak learning rate, or for a batch-size schedule the
        largest batch size."""
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


_DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


def _decay_factor(shape: str, u):
    """The fraction of the way from the peak to the final rate left at decay progress ``u`` in [0, 1]."""
    if shape == "linear":
        return 1.0 - u
    if shape == "1-sqrt":
        return 1.0 - np.sqrt(u)
    return 0.5 * (1.0 + np.cos(np.pi * u))


@validate_init(lr=_LR, total_steps=Integer(2, MAX_STEPS), warmup_steps=Integer(0, MAX_STEPS),
               decay_fraction=Real(0.0, 1.0, low_open=True), final_lr=Real(0.0, math.inf, high_open=True),
               shape=Options(*_DECAY_SHAPES))
@dataclass(frozen=True)
class WarmupStableDecay(Schedule):
    """Warmup-stable-decay ("trapezoidal") schedule: linear warm-up, a long constant phase, a short decay.

    With W = ``warmup_steps``, T = ``total_steps`` and D = max(1, round(``decay_fraction`` * T)) decay
    updates starting at update T - D, update k uses

        lr * (k + 1) / W                                  for k < W                (warm-up),
        lr                                                for W <= k < T - D       (stable),
        final_lr + (lr - final_lr) * f((k - T + D) / D)   for T - D <= k < T       (decay),
        final_lr                                          for k >= T,

    with f(u) = 1 - u (``shape="linear"``), 1 - sqrt(u) (``"1-sqrt"``, the cooldown Hägele et al. found
    best) or (1 + cos(pi u)) / 2 (``"cosine"``).  The exact engine jumps the stable phase and the final
    constant in closed form and steps through warm-up and decay one update at a time.

    Args:
        lr: the peak (stable) learning rate, > 0.
        total_steps: T, the training length in updates, >= 2.
        warmup_steps: W >= 0 (0: no warm-up), with W <= T - D.
        decay_fraction: D / T in (0, 1]; 0.2 is the paper's usual cooldown length.
        final_lr: the rate reached at the end of the decay, in [0, lr].
        shape: ``"linear"``, ``"1-sqrt"`` or ``"cosine"``.

    References:
        A. Hägele, E. Bakouch, A. Kosson, L. Ben Allal, L. von Werra, M. Jaggi, "Scaling Laws and
        Compute-Optimal Training Beyond Fixed Training Durations", NeurIPS 2024, Section 3 (the
        constant learning rate with cooldown, and the cooldown's shape).

    Example:
        >>> WarmupStableDecay(1.0, 10, warmup_steps=2, decay_fraction=0.2).values(11)
        array([0.5, 1. , 1. , 1. , 1. , 1. , 1. , 1. , 1. , 0.5, 0. ])
    """

    lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_fraction: float = 0.2
    final_lr: float = 0.0
    shape: str = "linear"

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "total_steps", check_int("total_steps", self.total_steps, low=2))
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0))
        object.__setattr__(self, "decay_fraction", check_real("decay_fraction", self.decay_fraction, low=0.0,
                                                              high=1.0, low_open=True))
        object.__setattr__(self, "final_lr", check_real("final_lr", self.final_lr, low=0.0, high=self.lr))
        if self.shape not in _DECAY_SHAPES:
            raise ValueError(f"`shape` must be one of {_DECAY_SHAPES}; got {self.shape!r}.")
        if self.warmup_steps > self.decay_start:
            raise ValueError(f"`warmup_steps` must be at most total_steps - decay steps = {self.decay_start}; "
                             f"got {self.warmup_steps}.")

    @property
    def decay_steps(self) -> int:
        """D = max(1, round(decay_fraction * total_steps)), the number of decay updates."""
        return max(1, int(round(self.decay_fraction * self.total_steps)))

    @property
    def decay_start(self) -> int:
        """T - D, the first update of the decay."""
        return self.total_steps - self.decay_steps

    def _at(self, k):
        k = np.asarray(k, dtype=np.float64)
        warm = np.minimum(1.0, (k + 1.0) / self.warmup_steps) if self.warmup_steps else np.ones_like(k)
        u = np.clip((k - self.decay_start) / self.decay_steps, 0.0, 1.0)
        dec = self.final_lr + (self.lr - self.final_lr) * _decay_factor(self.shape, u)
        return np.where(k >= self.total_steps, self.final_lr, np.where(k >= self.decay_start, dec, self.lr * warm))

    @property
    def constant_after(self):
        return self.total_steps

    def _segments(self, end):
        """(start, stop, value) over [0, end): warm-up and decay stepped (None), the rest constant."""
        w, s, t = self.warmup_steps, self.decay_start, self.total_steps
        segs = [(0, w, None), (w, s, self.lr), (s, t, None), (t, max(end, t), self.final_lr)]
        return [(a, min(b, end), v) for a, b, v in segs if a < end and b > a]

    @property
    def max_lr(self):
        return self.lr


@validate_init(lr=_LR, total_steps=_STEP_COUNT, final_lr=Real(0.0, math.inf, high_open=True),
               warmup_steps=Integer(0, MAX_STEPS))
@dataclass(frozen=True)
class LinearDecay(Schedule):
    """Linear decay from ``lr`` to ``final_lr`` at update ``total_steps``, after an optional linear warm-up.

    With W = ``warmup_steps`` and T = ``total_steps`` (W < T), update k uses

        lr * (k + 1) / W                                  for k < W,
        lr + (final_lr - lr) * (k - W) / (T - W)          for W <= k < T,
        final_lr                                          for k >= T,

    the "linear schedule with warm-up" of BERT's pre-training (Devlin et al. 2019, "BERT: Pre-training
    of Deep Bidirectional Transformers for Language Understanding", Appendix A.2).  The exact engine
    steps through updates 0..T-1 and jumps the constant tail.

    Example:
        >>> LinearDecay(1.0, 4).values(5)
        array([1.  , 0.75, 0.5 , 0.25, 0.  ])
    """

    lr: float
    total_steps: int
    final_lr: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "total_steps", check_int("total_steps", self.total_steps, low=1))
        object.__setattr__(self, "final_lr", check_real("final_lr", self.final_lr, low=0.0, high=self.lr))
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0,
                                                           high=self.total_steps - 1))

    def _at(self, k):
        k = np.asarray(k, dtype=np.float64)
        w, t = self.warmup_steps, self.total_steps
        warm = self.lr * (k + 1.0) / w if w else np.full_like(k, self.lr)
        dec = self.lr + (self.final_lr - self.lr) * np.clip((k - w) / (t - w), 0.0, 1.0)
        return np.where(k < w, warm, dec)

    @property
    def constant_after(self):
        return self.total_steps

    @property
    def max_lr(self):
        return self.lr


@validate_init(lr=_LR, warmup_steps=_STEP_COUNT, min_lr=Real(0.0, math.inf, high_open=True))
@dataclass(frozen=True)
class InverseSqrt(Schedule):
    """Inverse-square-root decay after a linear warm-up to ``lr`` over ``warmup_steps`` updates.

    With W = ``warmup_steps``, update k uses

        lr * min((k + 1) / W, sqrt(W / (k + 1))),   floored at ``min_lr``,

    the schedule of the Transformer (Vaswani et al. 2017, "Attention Is All You Need", Section 5.3:
    d_model^-0.5 min(n^-0.5, n W^-1.5) at step n = k + 1, peaking at W with lr = (d_model W)^-0.5).
    It never becomes constant unless ``min_lr > 0`` (then from the update where it reaches the floor),
    so the exact engine steps through it one update at a time.

    Example:
        >>> InverseSqrt(1.0, 4).values(8).round(3)
        array([0.25 , 0.5  , 0.75 , 1.   , 0.894, 0.816, 0.756, 0.707])
    """

    lr: float
    warmup_steps: int = 1
    min_lr: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", check_real("lr", self.lr, **_POSITIVE))
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=1))
        object.__setattr__(self, "min_lr", check_real("min_lr", self.min_lr, low=0.0, high=self.lr))

    def _at(self, k):
        n = np.asarray(k, dtype=np.float64) + 1.0
        w = float(self.warmup_steps)
        return np.maximum(self.lr * np.minimum(n / w, np.sqrt(w / n)), self.min_lr)

    @property
    def constant_after(self):
        if self.min_lr <= 0:
            return None
        # sqrt(W / n) <= min_lr / lr  <=>  n >= W (lr / min_lr)^2; update k = n - 1
        return max(self.warmup_steps, math.ceil(self.warmup_steps * (self.lr / self.min_lr) ** 2) - 1)

    @property
    def max_lr(self):
        return self.lr


@validate_init(lrs=Array(1, **_POSITIVE))
@dataclass(frozen=True, repr=False)
class Tabulated(Schedule):
    """Any values, one per update: ``lrs[k]`` for update k < n = ``len(lrs)``, then ``lrs[-1]`` for ever.

    For rates (or batch sizes) that follow no formula, e.g. a learning rate that follows a
    batch-size schedule update by update (:func:`toymodels.batch_schedule.lr_follows_batch`).  The
    exact engine steps through the first n - 1 updates one at a time (``constant_after`` = n - 1)
    and jumps the constant tail in closed form.

    Example:
        >>> Tabulated([0.3, 0.2, 0.1]).values(5)
        array([0.3, 0.2, 0.1, 0.1, 0.1])
    """

    lrs: tuple

    def __post_init__(self):
        arr = np.array(np.atleast_1d(self.lrs), dtype=np.float64)
        if arr.ndim != 1 or arr.size == 0 or not np.all((arr > 0) & (arr < math.inf)):
            raise ValueError(f"`lrs` must be a non-empty 1-D array of values in (0, inf); got {arr.size} values "
                             f"of shape {arr.shape}.")
        arr.setflags(write=False)
        object.__setattr__(self, "lrs", tuple(arr.tolist()))
        object.__setattr__(self, "_table", arr)

    def __repr__(self):
        if len(self.lrs) <= 6:
            return f"Tabulated(lrs={self.lrs!r})"
        return (f"Tabulated(lrs=<{len(self.lrs)} values: {self.lrs[0]!r}, {self.lrs[1]!r}, ..., "
                f"{self.lrs[-1]!r}>)")

    def _at(self, k):
        return self._table[np.minimum(np.asarray(k, dtype=np.int64), len(self.lrs) - 1)]

    @property
    def constant_after(self):
        return len(self.lrs) - 1

    @property
    def max_lr(self):
        return max(self.lrs)


LEARNING_RATE = AnyOf(_LR, Instance(Schedule), what="a float in (0, inf) or a Schedule")
"""The constraint of every ``lr`` argument that takes a number or a schedule."""


@validate(lr=LEARNING_RATE)
def as_schedule(lr) -> Schedule:
    """A number becomes :class:`Constant`; a :class:`Schedule` is returned as is."""
    if isinstance(lr, Schedule):
        return lr
    return Constant(lr)


_BATCH = Real(1.0, float(MAX_EXACT_INT))
_BATCH_RANGE = f"[1, {float(MAX_EXACT_INT):g}]"


@validate_init(start=_BATCH, final=_BATCH, warmup_steps=_STEP_COUNT, every=_STEP_COUNT, integer=Boolean())
@dataclass(frozen=True)
class BatchSizeWarmup(Schedule):
    """Geometric batch-size warm-up: from ``start`` to ``final`` over ``warmup_steps`` updates, then ``final``.

    Update k < ``warmup_steps`` draws a mini-batch of

        B_k = start * 2 ** (log2(final / start) * m_k / warmup_steps),   m_k = every * (k // every),

    so the batch size changes every ``every`` updates (stage j = k // every), and B_k = ``final`` from
    update ``warmup_steps`` on.  ``every=1`` grows it at every update (the exact engine steps through
    the warm-up one update at a time); ``every > 1`` makes it piecewise constant (each stage jumped in
    closed form).  Doubling every m updates from b0 to b0 * 2^n is ``BatchSizeWarmup(b0, b0 * 2**n,
    n * m, every=m)``: stage j uses exactly b0 * 2^j.  ``final < start`` (a decreasing batch size) is
    allowed.

    Batch sizes need not be whole numbers for the exact moments, nor for the NQM's Monte Carlo
    (only the noise variance c / B_k enters); ``integer=True`` rounds every B_k to the nearest whole
    number (halves up), as sampled data needs (:meth:`toymodels.GaussianLinearRegression.simulate`
    draws B_k examples at update k); ``start`` and ``final`` must then be whole numbers.

    Example:
        >>> BatchSizeWarmup(8, 64, 30, every=10).values(31)[::10]
        array([ 8., 16., 32., 64.])
    """

    start: float
    final: float
    warmup_steps: int
    every: int = 1
    integer: bool = False

    def __post_init__(self):
        for name in ("start", "final"):
            v = check_real(name, getattr(self, name), low=1.0, high=float(MAX_EXACT_INT))
            if self.integer and not v.is_integer():
                raise ValueError(f"`{name}` must be a whole number when integer=True; got {v:g}.")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "warmup_steps", check_int("warmup_steps", self.warmup_steps, low=1))
        object.__setattr__(self, "every", check_int("every", self.every, low=1))
        if not isinstance(self.integer, (bool, np.bool_)):
            raise TypeError(f"`integer` must be True or False; got {type(self.integer).__name__}.")
        object.__setattr__(self, "integer", bool(self.integer))

    @property
    def piecewise_constant(self):
        return self.every > 1

    def _at(self, k):
        k = np.asarray(k, dtype=np.int64)
        m = (k // self.every) * self.every
        with np.errstate(over="ignore"):
            b = self.start * np.exp2(math.log2(self.final / self.start) * m / self.warmup_steps)
        if self.integer:
            b = np.floor(b + 0.5)
        return np.where(k >= self.warmup_steps, self.final, np.clip(b, min(self.start, self.final),
                                                                    max(self.start, self.final)))

    @property
    def constant_after(self):
        return self.warmup_steps

    def pieces(self):
        n_stages = -(-self.warmup_steps // self.every)
        check_bytes("every", 16.0 * (n_stages + 1), what=f"{n_stages} warm-up stages")
        starts = np.append(np.arange(n_stages, dtype=np.int64) * self.every, self.warmup_steps)
        vals = self._at(starts)
        keep = np.r_[True, vals[1:] != vals[:-1]]  # stages that round to the same size are one piece
        return starts[keep], vals[keep]

    @property
    def max_lr(self):
        """The largest value (the name of the :class:`Schedule` interface)."""
        return max(self.start, self.final)


def schedule_segments(schedule, end: int):
    """Split updates 0..end-1 of ``schedule`` into ``(start, stop, value)`` segments: ``value`` a float
    on constant pieces, ``None`` where it changes at every update (duck-typed: ``piecewise_constant``,
    ``pieces()``, ``constant_after``, ``at(k)``)."""
    custom = getattr(schedule, "_segments", None)
    if custom is not None:  # schedules with constant phases between changing ones (warmup-stable-decay)
        return [sg for sg in custom(end) if sg[1] > sg[0]]
    if schedule.piecewise_constant:
        starts, lrs = schedule.pieces()
        stops = list(starts[1:]) + [end]
        segs = [(int(a), int(min(b, end)), float(lr)) for a, b, lr in zip(starts, stops, lrs) if a < end]
    else:
        change = schedule.constant_after
        change = end if change is None else min(int(change), end)
        segs = [(0, change, None)] if change > 0 else []
        if change < end:
            segs.append((change, end, float(schedule.at(np.array([change]))[0])))
    return [sg for sg in segs if sg[1] > sg[0]]


def constant_from(schedule) -> int | None:
    """The update from which the values of ``schedule`` never change again (None: they change for
    ever): ``constant_after``, moved back over the trailing pieces of a piecewise-constant schedule
    that repeat its final value (so ``PiecewiseConstant((7, 90), (6, 6, 6))`` is constant from 0)."""
    if schedule.piecewise_constant:
        starts, vals = schedule.pieces()
        i = len(vals) - 1
        while i > 0 and vals[i - 1] == vals[i]:
            i -= 1
        return int(starts[i])
    change = schedule.constant_after
    return None if change is None else int(change)


_CUM_CHUNK = 1 << 16
MAX_CUMULATIVE_UPDATES = 10**9  # values summed one at a time where a schedule keeps changing


@validate(schedule=Instance(Schedule), steps=Steps(MAX_STEPS))
def cumulative(schedule, steps) -> np.ndarray:
    """Sum of the values of updates 0..k-1 at each step k: for a batch-size schedule the number of
    examples drawn before step k (sum_{j<k} B_j), for a learning-rate schedule the total rate.

    Args:
        schedule: any :class:`Schedule`.
        steps: a count n (0..n) or a strictly increasing array of steps <= 10^15.

    Returns:
        ``(len(steps),)`` float64.  Constant pieces are summed in closed form; where the value
        changes at every update, at most 10^9 of them are summed one at a time (else ValueError).
    """
    ks = np.asarray(steps, dtype=np.int64)
    segs = schedule_segments(schedule, int(ks[-1]))
    n_scan = sum(b - a for a, b, v in segs if v is None)
    if n_scan > MAX_CUMULATIVE_UPDATES:
        raise ValueError(f"`steps` must be reached within {MAX_CUMULATIVE_UPDATES:.0e} updates where the schedule "
                         f"keeps changing; got {n_scan}.")
    out = np.zeros(ks.size)
    total = 0.0
    j = 0
    for a, b, v in segs:
        if v is not None:
            while j < ks.size and ks[j] <= b:
                out[j] = total + v * (int(ks[j]) - a)
                j += 1
            total += v * (b - a)
            continue
        for k0 in range(a, b, _CUM_CHUNK):
            k1 = min(b, k0 + _CUM_CHUNK)
            c = total + np.concatenate([[0.0], np.cumsum(schedule.at(np.arange(k0, k1)))])
            hi = int(np.searchsorted(ks, k1, side="right"))
            out[j:hi] = c[ks[j:hi] - k0]
            j = hi
            total = float(c[-1])
    return out


def check_batch_values(values, updates, *, name: str = "batch_size") -> np.ndarray:
    """``values`` (batch sizes of the updates ``updates``, same shape) as float64 after checking each is
    a finite number in [1, 2^53]; else a ``ValueError`` naming ``name`` and the first bad update."""
    b = np.asarray(values, dtype=np.float64)
    bad = ~((b >= 1.0) & (b <= float(MAX_EXACT_INT)))  # NaN too
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"`{name}` must be a schedule of batch sizes in {_BATCH_RANGE} at every update; got "
                         f"{b.flat[i]:g} at update {int(np.asarray(updates).flat[i])}.")
    return b


def batch_sizes_at(schedule, k, *, name: str = "batch_size") -> np.ndarray:
    """The batch sizes B_k of ``schedule`` at update indices ``k`` (int array), checked by
    :func:`check_batch_values`."""
    k = np.asarray(k, dtype=np.int64)
    return check_batch_values(schedule.at(k), k, name=name)


def check_batch_size(value, name: str = "batch_size"):
    """A batch size (a real number in [1, 2^53], returned as float) or a batch-size :class:`Schedule`
    (returned as is after checking what can be checked without stepping through it: every piece of
    a piecewise-constant one, the first 64 and the final value of the others; the values where it
    keeps changing are checked as they are computed, :func:`batch_sizes_at`)."""
    if isinstance(value, Schedule):
        if value.piecewise_constant:
            starts, vals = value.pieces()
            check_batch_values(vals, starts, name=name)
        else:  # the first 64 updates and the final value
            change = value.constant_after
            head = np.arange(64 if change is None else min(64, int(change)))
            batch_sizes_at(value, head if change is None else np.append(head, int(change)), name=name)
        return value
    return check_real(name, value, low=1.0, high=float(MAX_EXACT_INT))  # the messages of a number, as before


class BatchSizes(Constraint):
    """A batch size in [1, 2^53] or a batch-size :class:`Schedule` (:func:`check_batch_size`)."""

    def __call__(self, name, value):
        return check_batch_size(value, name)

    def bad_values(self):
        """Values the constraint must refuse (the generated bad-input tests use them): a bad number,
        an object, and schedules with a value below 1 (a learning-rate schedule passed as batch sizes)."""
        return _BATCH.bad_values() + [object(), Constant(0.5), PiecewiseConstant((3,), (4.0, 0.5)),
                                      Exponential(4.0, 0.5)]

    def __repr__(self):
        return "BatchSizes()"


BATCH_SIZE = BatchSizes()
"""The constraint of every ``batch_size`` argument that takes a number or a batch-size schedule."""
