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

* :class:`Nesterov` -- Nesterov's accelerated gradient in Sutskever et al.'s momentum form, state
  (phi, beta v) with phi the look-ahead iterate (the one PyTorch stores), gradients taken at phi.
* :class:`AcceleratedSGD` -- the accelerated SGD (ASGD) of Kidambi et al. 2018, state (w, w_bar).
* :class:`PolyakAverage` -- uniform average of the iterates of a base optimizer.
* :class:`ScheduleFree` -- schedule-free SGD (Defazio et al. 2024), state (y, z, x).

Every optimizer takes ``weight_decay`` (wd >= 0): the gradient in the *update* is (h + wd) theta + eps,
PyTorch's coupled L2 decay, so wd adds lr * wd to the curvature the update sees while the loss stays
1/2 sum h theta^2.  The NQM measures theta from its optimum, so weight decay there pulls towards the
optimum (an optimum at the origin of parameter space); it changes the stability limit and the
contraction, not the noise.  In linear regression and the power-law random features theta starts at 0
away from w_star and the state is the error e = theta - w_star: the update's gradient is
(h + wd) e + eps + wd w_star, the constant wd w_star entering every state entry with the gradient's
weight b1.  :class:`toymodels.GaussianLinearRegression` appends a constant entry 1 to each mode's state,
so that the drive is a column of A1 and the second moments are the non-central ones its
state-dependent noise needs; the optimum moves to the ridge solution theta_i = h_i w*_i / (h_i + wd).
:class:`toymodels.FiniteLinearRegression` (a fixed data set) steps its moments with the same coupled
decay (its own m and S recursion).

:class:`PolyakAverage` and :class:`ScheduleFree` average with a weight that changes at every update
(c_k = 1 / (k + 2) at update k): they are *time-varying* (``time_varying = True``) and write
``parts(h)`` = (P0, P1, Q0, Q1, R0, R1) with A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1) and
b_k = lr_k (R0 + c_k R1) instead of a constant (A0, A1, b1); the engine steps them one update at a time.
On the NQM at a constant learning rate and batch size two have faster exact routes: the Polyak average
of SGD a closed form per mode (its running sum is a constant system), and schedule-free SGD a compiled
scan of two states per mode that stops at the target.  Linear regression and the power-law random
features step them one update at a time with their state-dependent noise (read at state entry 0, the
gradient point), weight decay included.

Compositions are values: ``EMA(Momentum(0.1, 0.9), 0.99)`` is momentum with iterate averaging.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
    I. Sutskever, J. Martens, G. Dahl, G. Hinton, "On the importance of initialization and momentum in
    deep learning", ICML 2013, Section 2.1 (Nesterov's accelerated gradient as momentum).
    R. Kidambi, P. Netrapalli, P. Jain, S. Kakade, "On the insufficiency of existing momentum schemes
    for stochastic optimization", ICLR 2018, Algorithm 1.
    B. T. Polyak, A. B. Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control Optim. 30(4), 1992.
    A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
    Scheduled", NeurIPS 2024, Section 2 (schedule-free SGD).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ._validate import Array, Instance, Options, Real, check_real, validate, validate_init
from .schedules import LEARNING_RATE, Schedule, as_schedule

_CURVATURE = Array(1, low=0.0, low_open=True)
_UNIT = Real(0.0, 1.0, high_open=True)
_WD = Real(0.0, math.inf, high_open=True)

__all__ = ["Optimizer", "SGD", "Momentum", "EMA", "Nesterov", "AcceleratedSGD", "PolyakAverage", "ScheduleFree"]


class Optimizer:
    """Base class of the optimizer specs."""

    n_state: int
    readout: int
    time_varying = False  # True: the system changes at every update (parts() and coefficients())

    @property
    def init(self) -> np.ndarray:  # pragma: no cover - abstract
        """How the state starts from theta_0: x_0 = ``init`` * theta_0 per mode, shape ``(n_state,)``."""
        raise NotImplementedError

    @validate(h=_CURVATURE)
    def affine(self, h: np.ndarray):
        """Per-mode ``(A0, A1, b1)`` of shapes ``(d, s, s)``, ``(d, s, s)``, ``(d, s)`` for curvatures
        ``h`` ``(d,)``, finite and > 0.  Time-varying optimizers have none (NotImplementedError): see
        :meth:`parts`."""
        if self.time_varying:
            raise NotImplementedError(f"{type(self).__name__} changes at every update (its averaging weight): it has "
                                      f"no constant (A0, A1, b1); use parts() and coefficients().")
        return self._affine(h)

    @validate(h=_CURVATURE)
    def parts(self, h: np.ndarray):
        """Per-mode ``(P0, P1, Q0, Q1, R0, R1)`` with A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1) and
        b_k = lr_k (R0 + c_k R1) at update k (c_k from :meth:`coefficients`); shapes ``(d, s, s)`` x 4 and
        ``(d, s)`` x 2.  A constant optimizer gives P1 = Q1 = R1 = 0."""
        if self.time_varying:
            return self._parts(h)
        a0, a1, b1 = self._affine(h)
        return a0, np.zeros_like(a0), a1, np.zeros_like(a1), b1, np.zeros_like(b1)

    @validate(k=Array((0, 1), low=0.0, min_size=0))
    def coefficients(self, k) -> np.ndarray:
        """The time-varying weight c_k of the updates with indices ``k`` (same shape; 0 for a
        constant optimizer)."""
        k = np.asarray(k, dtype=np.float64)
        return self._coefficients(k) if self.time_varying else np.zeros_like(k)

    def _coefficients(self, k):  # pragma: no cover - abstract
        raise NotImplementedError

    def _parts(self, h):  # pragma: no cover - abstract
        raise NotImplementedError

    @validate(h=_CURVATURE, lr=Real(0.0, math.inf, high_open=True))
    def transition(self, h: np.ndarray, lr: float):
        """Per-mode ``(A, b)`` at learning rate ``lr``: shapes ``(d, s, s)`` and ``(d, s)``."""
        a0, a1, b1 = self.affine(h)
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
        ``"momentum"``, ``"nesterov"``, ``"asgd"``, ``"schedule_free"``, with ``"+ema"`` or ``"+polyak"``
        under iterate averaging) and the hyper-parameters other than the learning rate (``precond``,
        ``momentum``, ``decay``, ``weight_decay``, ...)."""
        raise NotImplementedError


def _check_precond(precond):
    return check_real("precond", precond, low=0.0, high=1.0)


def _check_wd(wd):
    return check_real("weight_decay", wd, low=0.0, high=math.inf, high_open=True)


def _update_curvature(opt, h):
    """h^-precond (h + wd): the curvature the update sees (preconditioned, with weight decay)."""
    return h ** (-opt.precond) * (h + opt.weight_decay)


@validate_init(lr=LEARNING_RATE, precond=Real(0.0, 1.0), weight_decay=_WD)
@dataclass(frozen=True)
class SGD(Optimizer):
    """(Preconditioned) SGD, P = H^precond: theta' = theta - lr P^-1 ((h + wd) theta + eps).

    ``lr`` is a number or a :class:`Schedule`; ``weight_decay`` wd >= 0 (module docstring).
    """

    lr: Schedule | float
    precond: float = 0.0
    weight_decay: float = 0.0
    n_state = 1
    readout = 0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "precond", _check_precond(self.precond))
        object.__setattr__(self, "weight_decay", _check_wd(self.weight_decay))

    @property
    def init(self):
        """``[1.0]``: the state is theta itself."""
        return np.array([1.0])

    def _affine(self, h):
        d = h.size
        a0 = np.ones((d, 1, 1))
        a1 = (-_update_curvature(self, h)).reshape(d, 1, 1)
        b1 = (-(h ** (-self.precond))).reshape(d, 1)
        return a0, a1, b1

    def _lr_limit(self, h):
        return 2.0 / np.max(_update_curvature(self, h))

    @property
    def hyperparameters(self):
        """``optimizer`` (``"sgd"``, or ``"precond"`` when ``precond > 0``), ``precond`` and
        ``weight_decay``."""
        return {"optimizer": "sgd" if self.precond == 0 else "precond", "precond": self.precond,
                "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class _TwoStateMomentum(Optimizer):
    """The fields and checks that heavy-ball :class:`Momentum` and :class:`Nesterov` share: ``lr``,
    ``beta`` in [0, 1), ``precond`` and ``weight_decay``; a state of two entries started at
    ``[1.0, 0.0]`` (theta_0, or Nesterov's look-ahead phi_0 = theta_0, and zero velocity), the loss
    read at the first."""

    lr: Schedule | float
    beta: float = 0.9
    precond: float = 0.0
    weight_decay: float = 0.0
    n_state = 2
    readout = 0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "beta", check_real("beta", self.beta, low=0.0, high=1.0, high_open=True))
        object.__setattr__(self, "precond", _check_precond(self.precond))
        object.__setattr__(self, "weight_decay", _check_wd(self.weight_decay))

    @property
    def init(self):
        """``[1.0, 0.0]``: theta_0 (Nesterov: phi_0 = theta_0) and zero velocity."""
        return np.array([1.0, 0.0])


@validate_init(lr=LEARNING_RATE, beta=_UNIT, precond=Real(0.0, 1.0), weight_decay=_WD)
@dataclass(frozen=True)
class Momentum(_TwoStateMomentum):
    """Heavy-ball momentum v' = beta v - a g, theta' = theta + v', beta in [0, 1).

    The form of Grosse's CSC 2541 Lecture 7, "NQM: Momentum and Iterate Averaging".
    """

    def _affine(self, h):
        # State (theta, v):  theta' = (1 - a h) theta + beta v - a eps,  v' = -a h theta + beta v - a eps.
        d = h.size
        heff = _update_curvature(self, h)
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
        return 2.0 * (1.0 + self.beta) / np.max(_update_curvature(self, h))

    @property
    def hyperparameters(self):
        """``optimizer="momentum"``, ``precond``, ``momentum`` (beta) and ``weight_decay``."""
        return {"optimizer": "momentum", "precond": self.precond, "momentum": self.beta,
                "weight_decay": self.weight_decay}


class _IterateAverage(Optimizer):
    """What the averages of a base optimizer's iterates share (:class:`EMA`, :class:`PolyakAverage`):
    the base's learning rate, its state followed by the average, the loss read at the average."""

    def _check_base(self):
        if not isinstance(self.base, _CONSTANT_BASES):
            raise TypeError(f"`base` must be an SGD, Momentum, Nesterov or AcceleratedSGD spec; got "
                            f"{type(self.base).__name__}.")

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


@validate_init(base=Instance(Optimizer, what="an SGD, Momentum, Nesterov or AcceleratedSGD spec"), decay=_UNIT)
@dataclass(frozen=True)
class EMA(_IterateAverage):
    """Exponential moving average of a base optimizer's iterates, decay mu in [0, 1).

    avg' = mu avg + (1 - mu) theta', avg_0 = theta_0; the loss is measured at the average.
    ``lr`` is the base optimizer's (``EMA(...).lr`` reads it, ``with_lr`` sets it).
    """

    base: Optimizer
    decay: float = 0.99

    def __post_init__(self):
        self._check_base()
        object.__setattr__(self, "decay", check_real("decay", self.decay, low=0.0, high=1.0, high_open=True))

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



def _jury_limit(a0, a1):
    """Largest lr with every 2x2 mode of A = A0 + lr A1 stable on (0, lr), for A1 with a zero second
    column (the gradient is taken at state 0), so that tr A and det A are affine in lr.

    Schur-Cohn (Jury) conditions of lambda^2 - tr lambda + det: 1 - det > 0, 1 - tr + det > 0 and
    1 + tr + det > 0; each is affine in lr, f0 + lr f1, and bounds lr by -f0 / f1 where f1 < 0.
    """
    if np.any(a1[:, :, 1] != 0):
        raise ValueError("_jury_limit needs A1 with a zero second column.")
    tr0 = a0[:, 0, 0] + a0[:, 1, 1]
    tr1 = a1[:, 0, 0]
    det0 = a0[:, 0, 0] * a0[:, 1, 1] - a0[:, 0, 1] * a0[:, 1, 0]
    det1 = a1[:, 0, 0] * a0[:, 1, 1] - a0[:, 0, 1] * a1[:, 1, 0]
    limit = math.inf
    for f0, f1 in ((1.0 - det0, -det1), (1.0 - tr0 + det0, det1 - tr1), (1.0 + tr0 + det0, det1 + tr1)):
        f0 = np.maximum(f0, 0.0)  # marginal at lr = 0 (an eigenvalue 1): stability starts at lr > 0
        neg = f1 < 0
        if np.any(neg):
            limit = min(limit, float(np.min(f0[neg] / -f1[neg])))
    return limit


class _JuryLimited(Optimizer):
    """A two-state spec whose stability limit is :func:`_jury_limit` of its own (A0, A1)."""

    def _lr_limit(self, h):
        a0, a1, _ = self._affine(h)
        return _jury_limit(a0, a1)


@validate_init(lr=LEARNING_RATE, beta=_UNIT, precond=Real(0.0, 1.0), weight_decay=_WD)
@dataclass(frozen=True)
class Nesterov(_TwoStateMomentum):
    """Nesterov's accelerated gradient, in the momentum form of Sutskever et al. 2013:

        v' = beta v - a g(theta + beta v),   theta' = theta + v',

    with a = lr P^-1 and g the mini-batch gradient (plus weight decay).  The engine's state is
    (phi, m) with phi = theta + beta v the look-ahead point, where the gradient is taken and the
    loss is read (PyTorch's ``nesterov=True`` stores phi), and m = beta v:

        phi' = phi - (1 + beta) a g(phi) + beta m,   m' = beta m - beta a g(phi),

    a system affine in beta (so the tuner's compiled path sweeps it).

    Per mode with x = a (h + wd) the characteristic polynomial is
    lambda^2 - (1 + beta)(1 - x) lambda + beta (1 - x), stable iff 0 < x < 2 (1 + beta) / (1 + 2 beta)
    (heavy ball: 2 (1 + beta)).  ``beta = 0`` is SGD.
    """

    def _affine(self, h):
        d, beta = h.size, self.beta
        heff = _update_curvature(self, h)
        a0 = np.zeros((d, 2, 2))
        a0[:, 0, 0] = 1.0
        a0[:, 0, 1] = beta
        a0[:, 1, 1] = beta
        a1 = np.zeros((d, 2, 2))
        a1[:, 0, 0] = -(1.0 + beta) * heff
        a1[:, 1, 0] = -beta * heff
        noise = -(h ** (-self.precond))
        b1 = np.stack([(1.0 + beta) * noise, beta * noise], axis=1)
        return a0, a1, b1

    def _lr_limit(self, h):
        return 2.0 * (1.0 + self.beta) / ((1.0 + 2.0 * self.beta) * np.max(_update_curvature(self, h)))

    @property
    def hyperparameters(self):
        """``optimizer="nesterov"``, ``precond``, ``momentum`` (beta) and ``weight_decay``."""
        return {"optimizer": "nesterov", "precond": self.precond, "momentum": self.beta,
                "weight_decay": self.weight_decay}


@validate_init(lr=LEARNING_RATE, kappa=Real(1.0, math.inf, high_open=True), xi=Real(0.0, math.inf, low_open=True,
               high_open=True), small_const=Real(0.0, 1.0, low_open=True), weight_decay=_WD)
@dataclass(frozen=True)
class AcceleratedSGD(_JuryLimited):
    """Accelerated SGD (ASGD) of Kidambi, Netrapalli, Jain and Kakade 2018 (Algorithm 1).

    Four parameters: the short step ``lr`` (delta), the long-step parameter ``kappa`` >= 1, the
    statistical advantage ``xi`` in (0, sqrt(kappa)] and the constant ``small_const`` c (the paper's
    0.7).  With alpha = 1 - c^2 xi / kappa and zeta = c / (c + 1 - alpha), one update with the
    mini-batch gradient g at w (plus weight decay) is

        w_bar' = alpha w_bar + (1 - alpha) (w - (kappa delta / c) g)      (long step),
        w'     = zeta (w - delta g) + (1 - zeta) w_bar'                   (short step),

    from w_bar_0 = w_0; the loss is read at w.  State (w, w_bar).  The stability limit comes from
    the Schur-Cohn conditions per mode (tr A and det A are affine in delta).

    References:
        R. Kidambi, P. Netrapalli, P. Jain, S. Kakade, "On the insufficiency of existing momentum
        schemes for stochastic optimization", ICLR 2018, Algorithm 1 (the lecture's alternative that
        does accelerate: Grosse, CSC 2541 Lecture 7).
    """

    lr: Schedule | float
    kappa: float = 1000.0
    xi: float = 10.0
    small_const: float = 0.7
    weight_decay: float = 0.0
    n_state = 2
    readout = 0
    precond = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "kappa", check_real("kappa", self.kappa, low=1.0, high=math.inf, high_open=True))
        object.__setattr__(self, "xi", check_real("xi", self.xi, low=0.0, high=math.sqrt(self.kappa), low_open=True))
        object.__setattr__(self, "small_const", check_real("small_const", self.small_const, low=0.0, high=1.0,
                                                           low_open=True))
        object.__setattr__(self, "weight_decay", _check_wd(self.weight_decay))

    @property
    def init(self):
        """``[1.0, 1.0]``: w_0 = w_bar_0 = theta_0."""
        return np.array([1.0, 1.0])

    def _coefficients_asgd(self):
        c = self.small_const
        alpha = 1.0 - c * c * self.xi / self.kappa
        zeta = c / (c + 1.0 - alpha)
        return alpha, zeta, self.kappa / c

    def _affine(self, h):
        alpha, zeta, long = self._coefficients_asgd()
        d = h.size
        hu = h + self.weight_decay
        # w' = zeta (w - delta g) + (1 - zeta) w_bar', w_bar' = alpha w_bar + (1 - alpha)(w - long delta g)
        gw = zeta + (1.0 - zeta) * (1.0 - alpha) * long  # the gradient's weight in w'
        a0 = np.zeros((d, 2, 2))
        a0[:, 0, 0] = zeta + (1.0 - zeta) * (1.0 - alpha)
        a0[:, 0, 1] = (1.0 - zeta) * alpha
        a0[:, 1, 0] = 1.0 - alpha
        a0[:, 1, 1] = alpha
        a1 = np.zeros((d, 2, 2))
        a1[:, 0, 0] = -gw * hu
        a1[:, 1, 0] = -(1.0 - alpha) * long * hu
        b1 = np.empty((d, 2))
        b1[:, 0] = -gw
        b1[:, 1] = -(1.0 - alpha) * long
        return a0, a1, b1

    @property
    def momentum_form(self):
        """An optimizer spec whose loss equals this one's at every step: state (w, m), m_0 = 0,

            w' = w - gamma a g(w) + beta m,   m' = beta m - (gamma - 1) a g(w),

        with a = lr, u = c xi / kappa, beta = (1 - c u) / (1 + u) and gamma = (1 + c xi u) / (1 + u).

        Both are linear in the gradient at w, so w follows w_{k+1} = (1 + beta) w_k - beta w_{k-1}
        - a (gamma g_k - beta g_{k-1}) (the noise enters with the gradient) from w_1 = w_0 - gamma a g_0:
        per mode (x = a (h + wd)) the characteristic polynomial of either system is
        lambda^2 - (1 + beta - gamma x) lambda + beta (1 - x) and the response to the noise is
        -a (gamma z - beta) / that polynomial, so the moments of w and the stability limits are the
        same.  (With gamma = 1 + beta it is Nesterov's method.)  The form is affine in (beta, gamma),
        and both are affine in v = 1 / (1 + u) while xi = sqrt(kappa) (beta = (1 + c) v - c,
        gamma = (1 + c^2) v) and while xi is held fixed (gamma = c xi + (1 - c xi) v): a tuner sweeps
        it like momentum (:func:`toymodels.sweep.tune`).
        """
        c = self.small_const
        u = c * self.xi / self.kappa
        beta = (1.0 - c * u) / (1.0 + u)
        gamma = (1.0 + c * self.xi * u) / (1.0 + u)
        return _MomentumForm(self.lr, beta, gamma, self.weight_decay)

    @property
    def hyperparameters(self):
        """``optimizer="asgd"``, ``kappa``, ``xi``, ``small_const`` and ``weight_decay``."""
        return {"optimizer": "asgd", "kappa": self.kappa, "xi": self.xi, "small_const": self.small_const,
                "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class _MomentumForm(_JuryLimited):
    """The two-state system of :attr:`AcceleratedSGD.momentum_form` (gradient weight ``gamma``,
    momentum ``beta``): w' = w - gamma a g(w) + beta m, m' = beta m - (gamma - 1) a g(w), state
    (w, m) from (theta_0, 0), the loss read at w."""

    lr: Schedule | float
    beta: float
    gamma: float
    weight_decay: float = 0.0
    n_state = 2
    readout = 0
    precond = 0.0

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))

    @property
    def init(self):
        """``[1.0, 0.0]``: w_0 = theta_0 and no momentum."""
        return np.array([1.0, 0.0])

    def _affine(self, h):
        d, beta, gamma = h.size, self.beta, self.gamma
        hu = h + self.weight_decay
        a0 = np.zeros((d, 2, 2))
        a0[:, 0, 0] = 1.0
        a0[:, 0, 1] = beta
        a0[:, 1, 1] = beta
        a1 = np.zeros((d, 2, 2))
        a1[:, 0, 0] = -gamma * hu
        a1[:, 1, 0] = -(gamma - 1.0) * hu
        b1 = np.empty((d, 2))
        b1[:, 0] = -gamma
        b1[:, 1] = -(gamma - 1.0)
        return a0, a1, b1

    @property
    def hyperparameters(self):
        """``optimizer="asgd"`` (the form of one), ``momentum`` (beta), ``gamma`` and ``weight_decay``."""
        return {"optimizer": "asgd", "momentum": self.beta, "gamma": self.gamma, "weight_decay": self.weight_decay}


_CONSTANT_BASES = (SGD, Momentum, Nesterov, AcceleratedSGD)


def _uniform_weights(k):
    """c_k = 1 / (k + 2): update k (step k -> k + 1) makes the average the mean of k + 2 iterates."""
    return 1.0 / (k + 2.0)


@validate_init(base=Instance(Optimizer, what="an SGD, Momentum, Nesterov or AcceleratedSGD spec"))
@dataclass(frozen=True)
class PolyakAverage(_IterateAverage):
    """Uniform (Polyak-Ruppert) average of a base optimizer's iterates, read by the loss.

    avg_k = (theta_0 + ... + theta_k) / (k + 1), i.e. at update k (step k -> k + 1)

        avg' = (1 - c_k) avg + c_k theta',   c_k = 1 / (k + 2),   avg_0 = theta_0.

    Time-varying (``time_varying = True``): the engine steps its curves one update at a time and
    ``modal_form`` refuses it.  The running sum sigma_k = (k + 1) avg_k is a constant system
    (:meth:`sum_affine`), so the NQM computes the loss at one step in O(log k) for any base, and for an
    SGD base in closed form per mode with an exact first crossing (bounds, then every step near it).
    ``lr`` is the base optimizer's.  State (base..., avg).

    References:
        B. T. Polyak, A. B. Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
        Control Optim. 30(4), 1992; Grosse, CSC 2541 Lecture 7, "NQM: Momentum and Iterate Averaging".
    """

    base: Optimizer
    time_varying = True

    def __post_init__(self):
        self._check_base()

    def _coefficients(self, k):
        return _uniform_weights(k)

    def _parts(self, h):
        a0b, a1b, b1b = self.base._affine(h)
        d, s = h.size, self.base.n_state
        r = self.base.readout
        P0, P1, Q0, Q1 = (np.zeros((d, s + 1, s + 1)) for _ in range(4))
        R0, R1 = np.zeros((d, s + 1)), np.zeros((d, s + 1))
        P0[:, :s, :s] = a0b
        P0[:, s, s] = 1.0
        P1[:, s, :s] = a0b[:, r, :]
        P1[:, s, s] = -1.0
        Q0[:, :s, :s] = a1b
        Q1[:, s, :s] = a1b[:, r, :]
        R0[:, :s] = b1b
        R1[:, s] = b1b[:, r]
        return P0, P1, Q0, Q1, R0, R1

    def sum_affine(self, h):
        """``(A0, A1, b1)`` of the constant system with the running *sum* sigma_k = theta_0 + ... + theta_k
        in place of the average (sigma' = sigma + theta', sigma_0 = theta_0; same ``init``): then
        E[avg_k^2] = E[sigma_k^2] / (k + 1)^2, so the loss at one step k comes from k constant steps
        (binary powering, O(log k)) although the average itself changes at every update."""
        a0b, a1b, b1b = self.base._affine(h)
        d, s = h.size, self.base.n_state
        r = self.base.readout
        a0 = np.zeros((d, s + 1, s + 1))
        a1 = np.zeros((d, s + 1, s + 1))
        a0[:, :s, :s] = a0b
        a1[:, :s, :s] = a1b
        a0[:, s, :s] = a0b[:, r, :]
        a1[:, s, :s] = a1b[:, r, :]
        a0[:, s, s] = 1.0
        b1 = np.concatenate([b1b, b1b[:, r : r + 1]], axis=1)
        return a0, a1, b1

    def _lr_limit(self, h):
        return self.base._lr_limit(h)

    def _with_lr(self, lr):
        return replace(self, base=self.base.with_lr(lr))

    @property
    def hyperparameters(self):
        """The base optimizer's, with ``"+polyak"`` appended to ``optimizer``."""
        hp = dict(self.base.hyperparameters)
        hp["optimizer"] = hp["optimizer"] + "+polyak"
        return hp


@validate_init(lr=LEARNING_RATE, beta=Real(0.0, 1.0, high_open=True), weight_decay=_WD,
               averaging=Options("uniform", "none"))
@dataclass(frozen=True)
class ScheduleFree(Optimizer):
    """Schedule-free SGD (Defazio et al. 2024, Section 2), gradients at the interpolation y:

        y = (1 - beta) z + beta x,   z' = z - lr g(y),   x' = (1 - c) x + c z',

    from x_0 = z_0 = theta_0; the loss is read at x.  The paper's c_{t+1} = 1 / (t + 1) (t = 1, 2, ...)
    is c_k = 1 / (k + 2) at our update k = t - 1 (step k -> k + 1), so x_k is the uniform average of
    z_0..z_k (``averaging="uniform"``).  ``averaging="none"`` sets c_k = 1: then x = y = z and the
    method *is* SGD (a check of the engine); ``beta = 0`` gives y = z, i.e. the Polyak average of SGD.

    State (y, z, x) with y kept as an entry so that the gradient point is state 0:
    y' = (1 - beta + beta c) z' + beta (1 - c) x.  Time-varying: stepped one update at a time.
    ``lr_limit`` is the limit of the fast subsystem as c -> 0, z' = z - lr (h + wd)((1 - beta) z + beta x):
    2 / ((1 - beta) max (h + wd)) (``averaging="none"``: SGD's 2 / max (h + wd)).

    References:
        A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
        Scheduled", NeurIPS 2024, Section 2, equations (1)-(3) (schedule-free SGD).
    """

    lr: Schedule | float
    beta: float = 0.9
    weight_decay: float = 0.0
    averaging: str = "uniform"
    n_state = 3
    readout = 2
    precond = 0.0
    time_varying = True

    def __post_init__(self):
        object.__setattr__(self, "lr", as_schedule(self.lr))
        object.__setattr__(self, "beta", check_real("beta", self.beta, low=0.0, high=1.0, high_open=True))
        object.__setattr__(self, "weight_decay", _check_wd(self.weight_decay))
        if self.averaging not in ("uniform", "none"):
            raise ValueError(f"`averaging` must be 'uniform' or 'none'; got {self.averaging!r}.")

    @property
    def init(self):
        """``[1.0, 1.0, 1.0]``: y_0 = z_0 = x_0 = theta_0."""
        return np.array([1.0, 1.0, 1.0])

    def _coefficients(self, k):
        return _uniform_weights(k) if self.averaging == "uniform" else np.ones_like(k)

    def _parts(self, h):
        d, beta = h.size, self.beta
        hu = h + self.weight_decay
        P0, P1, Q0, Q1 = (np.zeros((d, 3, 3)) for _ in range(4))
        R0, R1 = np.zeros((d, 3)), np.zeros((d, 3))
        # z' = z - lr (hu y + eps)
        P0[:, 1, 1] = 1.0
        Q0[:, 1, 0] = -hu
        R0[:, 1] = -1.0
        # x' = (1 - c) x + c z'
        P0[:, 2, 2] = 1.0
        P1[:, 2, 1] = 1.0
        P1[:, 2, 2] = -1.0
        Q1[:, 2, 0] = -hu
        R1[:, 2] = -1.0
        # y' = (1 - beta) z' + beta x' = (1 - beta + beta c) z' + beta (1 - c) x
        P0[:, 0, 1] = 1.0 - beta
        P0[:, 0, 2] = beta
        P1[:, 0, 1] = beta
        P1[:, 0, 2] = -beta
        Q0[:, 0, 0] = -(1.0 - beta) * hu
        Q1[:, 0, 0] = -beta * hu
        R0[:, 0] = -(1.0 - beta)
        R1[:, 0] = -beta
        return P0, P1, Q0, Q1, R0, R1

    def _lr_limit(self, h):
        slow = 1.0 - self.beta if self.averaging == "uniform" else 1.0
        return 2.0 / (slow * np.max(h + self.weight_decay))

    @property
    def hyperparameters(self):
        """``optimizer="schedule_free"``, ``momentum`` (beta), ``weight_decay`` and ``averaging``."""
        return {"optimizer": "schedule_free", "momentum": self.beta, "weight_decay": self.weight_decay,
                "averaging": self.averaging}
