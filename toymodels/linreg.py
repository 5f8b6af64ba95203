"""Stochastic linear regression with a teacher (Grosse, CSC 2541 Lecture 7, "Stochastic Linear Regression").

Online data x ~ N(0, Sigma), labels t = w*.x + n with n ~ N(0, noise_std^2); squared loss
l = (w.x - t)^2 / 2.  We work in Sigma's eigenbasis (Sigma = diag(lambda)) with the error
e = w - w* (w_0 = 0, so e_0 = -w*).  The per-example gradient is g = x (x.e - n); given e its mean
is Sigma e and, by the Gaussian fourth-moment identity E[x x^T A x x^T] = 2 Sigma A Sigma +
tr(A Sigma) Sigma and the law of total covariance,

    Cov(g | e) = sigma^2 Sigma              (label noise)
               + Sigma e e^T Sigma + (e^T Sigma e) Sigma     (batch noise: vanishes at e = 0).

So a mini-batch of B gives the per-mode gradient noise variance, averaged over e,

    q_i = (lambda_i^2 E[e_i^2] + lambda_i sum_j lambda_j E[e_j^2] + sigma^2 lambda_i) / B,

which is the NQM's noise plus two terms that follow the state: the optimizers of
:mod:`toymodels.optimizers` act per mode exactly as on the NQM with h = lambda, and the modes couple
only through the current loss (:func:`toymodels.dynamics.propagate` with ``q_self``, ``q_loss``):
one step costs O(d).  For SGD (any preconditioner) the coupled system of the E[e_i^2] is
diag + rank one, whose closed form :mod:`toymodels.secular` gives: exact losses at any step and the
exact first crossing, as for the NQM.  The reported loss is the excess risk
E[(x.e)^2] / 2 = sum_i lambda_i E[e_i^2] / 2 (the label-noise floor sigma^2 / 2 is not included).

Without label noise the optimum interpolates, the gradient noise vanishes there, and SGD converges
exponentially (the lecture's "Exponential Convergence"); with it the risk settles at a floor
(:meth:`GaussianLinearRegression.stationary_loss`).

Weight decay wd (coupled, as :mod:`toymodels.optimizers`: the update's gradient is g + wd theta)
pulls theta towards 0, so the error gets a constant drive: the update's gradient is
(Sigma + wd) e + xi + wd w*, xi the mini-batch noise.  Each mode's state x (the optimizer's entries of
e_i) is augmented by a constant entry 1, x~ = (x, 1), whose update

    x~' = [[A, lr b wd w*_i], [0, 1]] x~ + [lr b; 0] xi_i

is homogeneous again; its second moments E[x~ x~^T] hold the non-central E[e_i^2] (what q_i above
needs: the noise is E over e of Cov(g | e)) and the mean in the cross terms with the constant entry.
So the same engine steps it exactly, with x~_0 = (init e_0, 1).  The mean settles at the ridge
solution theta_i = lambda_i w*_i / (lambda_i + wd), and the stationary risk is the ridge solution's
plus the fluctuations (closed form in :meth:`GaussianLinearRegression.stationary_loss`).  SGD's
secular closed form does not carry the mean: with weight decay SGD is stepped like the other
optimizers (``modal_form`` refuses it, naming ``weight_decay``); :meth:`~GaussianLinearRegression.stable_lr`
stays exact (the drive is bounded and does not change stability).

The optimizers whose averaging weight c_k = 1 / (k + 2) changes at every update
(:class:`~toymodels.optimizers.PolyakAverage`, :class:`~toymodels.optimizers.ScheduleFree`) write
A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1) per mode and are stepped one update at
a time (:func:`toymodels.dynamics.propagate_varying`) with the same state-dependent noise, E[e_i^2]
read at the state entry the gradient is taken at (entry 0: the base iterate of the Polyak average,
schedule-free SGD's interpolation y = (1 - beta) z + beta x, not its readout x).  Weight decay's
constant entry composes with them: its column is wd w*_i b_k, i.e. wd w*_i R0 in Q0 and wd w*_i R1
in Q1.  Their :meth:`~GaussianLinearRegression.stationary_loss` is the limit of L_k (the ridge risk
where they are stable).

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from . import dynamics, secular
from ._args import (BATCH_SIZE, BATCH_SIZES, MAYBE_LR, MC_STEPS, N_RUNS, OPTIMIZER, POSITIVE_ARRAY, PROGRESS, SEED,
                    STEP, STEPS, TARGET)
from ._validate import (MAX_STEPS, Array, Boolean, Integer, Maybe, Real, check_bytes, check_int, check_real, check_spectrum,
                        validate)
from .montecarlo import mc_divergence, mc_stats_dataset
from .nqm import (NQM, _check_optimizer, _check_target, batch_at_steps, batch_fields, check_batch_size,
                  checked_trajectory, mc_setup)
from .optimizers import SGD, PolyakAverage, ScheduleFree
from .schedules import Constant, Schedule, batch_sizes_at, constant_from
from .schedules import check_batch_size as check_batch_sizes
from .schema import attach_attrs
from .spectra import power_law
from .stats import gradient_statistics

__all__ = ["GaussianLinearRegression"]

_SCAN_DEFAULT = 10**6  # step-by-step search limit for optimizers without a closed form


def _power_sums(mu, gamma, ks, block: int = 256):
    """sum_m gamma_m mu_m^k at the sorted steps ``ks``, ``(len(ks),)``, or one such sum per column of
    ``gamma`` ``(modes, n)``, ``(len(ks), n)``; in blocks of ``block`` steps (memory block x modes, 2 MB
    for 1000 modes: cache-sized); a block of consecutive steps takes mu^k0 once and the powers mu^i,
    i < block, from one cumulative product (relative error <= block x eps) instead of a power per entry."""
    g = gamma.reshape(mu.size, -1)
    out = np.empty((ks.size, g.shape[1]))
    kf = ks.astype(np.float64)
    table = None
    with np.errstate(under="ignore"):
        for i in range(0, ks.size, block):
            k = kf[i : i + block]
            if k.size > 16 and k[-1] - k[0] == k.size - 1:
                if table is None:
                    table = np.empty((block, mu.size))
                    table[0] = 1.0
                    np.cumprod(np.broadcast_to(mu, (block - 1, mu.size)), axis=0, out=table[1:])
                scale = mu ** k[0]
                for j in range(g.shape[1]):  # a matrix-vector product per column: faster than one thin product
                    out[i : i + block, j] = table[: k.size] @ (g[:, j] * scale)
            else:
                out[i : i + block] = (mu[None, :] ** k[:, None]) @ g
    return out.reshape(ks.shape + gamma.shape[1:])


class GaussianLinearRegression:
    """Online linear regression, x ~ N(0, diag(spectrum)), t = w*.x + N(0, noise_std^2).

    Args:
        spectrum: ``(d,)`` eigenvalues lambda_i of the input covariance, finite and > 0.
        w_star: the teacher's weights in that eigenbasis, scalar or ``(d,)``, finite (w_0 = 0).
        noise_std: label-noise standard deviation sigma >= 0 (0: interpolation).
    """

    model_name = "linreg"

    @validate(spectrum=POSITIVE_ARRAY, w_star=Array((0, 1)), noise_std=Real(0.0, math.inf, high_open=True))
    def __init__(self, spectrum, w_star=1.0, noise_std: float = 0.0):
        self.h = check_spectrum("spectrum", spectrum)
        d = self.h.size
        w = np.asarray(w_star, dtype=np.float64)
        if w.ndim == 0:
            w = np.full(d, float(w))
        if w.ndim != 1 or w.size != d:
            raise ValueError(f"`w_star` must be a scalar or have length {d} to match the spectrum; got shape {w.shape}.")
        if not np.all(np.isfinite(w)):
            raise ValueError("`w_star` must be finite.")
        self.w_star = w.copy()
        self.noise_std = check_real("noise_std", noise_std, low=0.0, high=math.inf, high_open=True)

    @classmethod
    @validate(dim=Integer(1, 2**40), power=Real(0.0, 50.0), w_star=Array((0, 1)),
              noise_std=Real(0.0, math.inf, high_open=True))
    def power_law(cls, dim: int, power: float = 1.0, w_star=1.0, noise_std: float = 0.0):
        """lambda_i = i^-power."""
        return cls(power_law(dim, power), w_star, noise_std)

    # ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of features d (eigen-directions of Sigma)."""
        return self.h.size

    @property
    def init_sq(self) -> np.ndarray:
        """E[e_i^2] at step 0 (= w*_i^2)."""
        return self.w_star**2

    @property
    def initial_loss(self) -> float:
        """Excess risk at w_0 = 0: sum_i lambda_i w*_i^2 / 2 (the label-noise floor sigma^2 / 2 not
        included)."""
        return float(0.5 * np.sum(self.h * self.init_sq))

    @property
    def params(self) -> dict:
        """The attrs of the model's results: ``dim``, ``initial_loss`` and ``noise_std``."""
        return {"dim": self.dim, "initial_loss": self.initial_loss, "noise_std": self.noise_std}

    @staticmethod
    def _weight_decay(optimizer) -> float:
        """The spec's weight decay wd (0 for specs without one)."""
        return float(optimizer.hyperparameters.get("weight_decay", 0.0))

    def _parts(self, optimizer):
        """The engine's per-mode ``(P0, P1, Q0, Q1, R0, R1)`` of the error e = theta - w* (update k:
        A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1); a constant optimizer has
        P1 = Q1 = R1 = 0, so (P0, Q0, R0) = (A0, A1, b1)).

        Without weight decay the spec's own.  With weight decay wd > 0 the update's gradient is
        g + wd theta = (lambda + wd) e + eps + wd w*: the spec's system (whose curvature already holds
        lambda + wd) plus the constant drive wd w*_i, which enters every state entry with the
        gradient's weight b_k.  The state is augmented by a constant entry 1 (last), so the drive
        becomes the column ``A_k[:, :s, s] = wd w*_i b_k`` (``Q0[:, :s, s] = wd w*_i R0``,
        ``Q1[:, :s, s] = wd w*_i R1``) of a homogeneous system (``P0[:, s, s] = 1``, no noise on the
        entry) whose second moments are the non-central E[x x^T], the mean carried in the cross terms
        with the constant entry.
        """
        parts = optimizer.parts(self.h)
        wd = self._weight_decay(optimizer)
        if not wd:
            return parts
        P0, P1, Q0, Q1, R0, R1 = parts
        d, s = R0.shape
        P0a, P1a, Q0a, Q1a = (np.zeros((d, s + 1, s + 1)) for _ in range(4))
        R0a, R1a = np.zeros((d, s + 1)), np.zeros((d, s + 1))
        for out, x in zip((P0a, P1a, Q0a, Q1a), (P0, P1, Q0, Q1)):
            out[:, :s, :s] = x
        R0a[:, :s], R1a[:, :s] = R0, R1
        P0a[:, s, s] = 1.0
        drive = (wd * self.w_star)[:, None]
        Q0a[:, :s, s] = drive * R0
        Q1a[:, :s, s] = drive * R1
        return P0a, P1a, Q0a, Q1a, R0a, R1a

    def _affine(self, optimizer):
        """The engine's per-mode ``(A0, A1, b1)`` of the error e = theta - w* for an optimizer with a
        constant system: ``(P0, Q0, R0)`` of :meth:`_parts` (weight decay's drive included)."""
        P0, _, Q0, _, R0, _ = self._parts(optimizer)
        return P0, Q0, R0

    def _S0(self, optimizer):
        """E[x_0 x_0^T] per mode, ``(d, s, s)``: x_0 = init e_0 with e_0 = -w*, and under weight decay
        the constant entry 1 appended (:meth:`_affine`)."""
        u = optimizer.init
        if not self._weight_decay(optimizer):
            return np.ascontiguousarray(self.init_sq[:, None, None] * np.outer(u, u)[None])
        x0 = np.concatenate([-self.w_star[:, None] * u[None, :], np.ones((self.dim, 1))], axis=1)
        return np.ascontiguousarray(x0[:, :, None] * x0[:, None, :])

    def _noise(self, batch_size):
        """(q, q_self, q_loss) of the per-mode gradient noise variance (module docstring); each is
        per-example over B, so ``_noise(1.0)`` divided by B is ``_noise(B)`` bit for bit."""
        lam = self.h
        return self.noise_std**2 * lam / batch_size, lam**2 / batch_size, lam / batch_size

    @validate(optimizer=OPTIMIZER)
    def lr_limit(self, optimizer) -> float:
        """The deterministic (full-batch) stability limit: an upper bound of the stable learning
        rates at any batch size (see :meth:`stable_lr` for the exact one of SGD)."""
        return float(_check_optimizer(optimizer).lr_limit(self.h))

    # ------------------------------------------------------------------------------------------
    # SGD: the closed form of the diag + rank-one second-moment recursion
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _is_sgd(optimizer) -> bool:
        return isinstance(optimizer, SGD)

    def _is_closed(self, optimizer) -> bool:
        """SGD without weight decay: the second moments E[e_i^2] alone form a closed linear system
        (:meth:`_sgd_system`), whose secular closed form gives the curve at any step.  Weight decay
        adds the drive -lr p wd w*, so E[e_i^2] then also follows the mean: stepped instead."""
        return self._is_sgd(optimizer) and not self._weight_decay(optimizer)

    def _sgd_system(self, optimizer, batch_size, lr):
        """s' = (diag(a) + u v^T) s + c for s_i = E[e_i^2] under SGD with preconditioner p (with weight
        decay, the homogeneous part of the centred moments: a_i = (1 - lr p_i (lambda_i + wd))^2 + ...,
        what decides stability; c then omits the drive)."""
        p = -optimizer.affine(self.h)[2][:, 0]  # the update is e' = e - lr p (gradient)
        lam = self.h
        rate = lr * p
        wd = self._weight_decay(optimizer)
        a = (1.0 - rate * (lam + wd)) ** 2 + rate**2 * lam**2 / batch_size
        u = rate**2 * lam / batch_size
        return a, u, lam, self.noise_std**2 * u

    def _sgd_stationary(self, a, u, c):
        """s_inf of s' = (diag(a) + u v^T) s + c with v = lambda, or None if unstable.

        Sherman-Morrison: s = (I - D)^-1 (u tau + c) with tau = v^T s = phi_c / (1 - phi),
        phi = sum_i v_i u_i / (1 - a_i); stable iff every a_i < 1 and phi < 1 (then the largest
        secular root is below 1).
        """
        if np.any(a >= 1.0):
            return None
        one_minus = 1.0 - a
        phi = float(np.sum(self.h * u / one_minus))
        if phi >= 1.0:
            return None
        tau = float(np.sum(self.h * c / one_minus)) / (1.0 - phi)
        return (u * tau + c) / one_minus

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE)
    def stable_lr(self, optimizer, batch_size) -> float:
        """The largest stable constant learning rate of (preconditioned) SGD at batch size B:
        the root of phi(lr) = (lr / B) sum_i p_i lambda_i / (2 - lr p_i lambda_i (1 + 1/B)) = 1.

        With weight decay wd the update contracts by x_i = lr p_i (lambda_i + wd) while the batch noise
        still scales with lambda_i: phi(lr) = sum_i (lr p_i lambda_i^2 / B) / ((lambda_i + wd)(2 - x_i)
        - lr p_i lambda_i^2 / B) = 1 (the drive wd w* is bounded and does not change stability)."""
        _check_optimizer(optimizer)
        bs = check_batch_size(batch_size)
        if not self._is_sgd(optimizer):
            raise NotImplementedError("stable_lr is exact for SGD only; other optimizers: lr_limit bounds it.")
        # every a_i < 1 needs x_i < 2 B / (B + 1) without weight decay (x_i < 2 with it)
        lo, hi = 0.0, self.lr_limit(optimizer) * (bs / (bs + 1.0) if not self._weight_decay(optimizer) else 1.0)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            a, u, _, c = self._sgd_system(optimizer, bs, mid)
            if self._sgd_stationary(a, u, c + u) is None:  # c + u > 0: stability does not depend on it
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-15 * hi:
                break
        return lo

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, lr=MAYBE_LR)
    def modal_form(self, optimizer, batch_size, lr: float | None = None) -> dynamics.ModalForm:
        """The closed form of SGD's expected loss, as a :class:`toymodels.dynamics.ModalForm` of
        one-state modes: mode m has rate mu_m (a root of the secular equation) and contributes
        gamma_m mu_m^k + L_inf / n to L_k (``stable`` is False, and the values meaningless, above
        :meth:`stable_lr`).  Raises NotImplementedError for other optimizers and for SGD with
        ``weight_decay`` > 0 (stepped exactly by the other methods instead)."""
        _check_optimizer(optimizer)
        bs = check_batch_size(batch_size)
        if not self._is_sgd(optimizer):
            raise NotImplementedError(
                "linear regression has a closed form for SGD (with preconditioning) only; momentum and "
                "averaging are stepped exactly one update at a time (loss_curve, steps_to_target)."
            )
        if self._weight_decay(optimizer):
            raise NotImplementedError(
                f"linear regression has no closed form for SGD with weight_decay > 0 (got "
                f"{self._weight_decay(optimizer):g}): the decay drives the error's mean, which the secular form "
                f"does not carry; loss_curve, loss_at_step and steps_to_target step it exactly."
            )
        if lr is None:
            if not isinstance(optimizer.lr, Constant):
                raise ValueError("`optimizer` must have a constant learning rate here.")
            lr = optimizer.lr.lr
        return self._modal_from(self.init_sq, optimizer, bs, lr)

    def _modal_from(self, s0, optimizer, bs, lr):
        a, u, v, c = self._sgd_system(optimizer, bs, lr)
        s_inf = self._sgd_stationary(a, u, c)
        if s_inf is None:  # unstable: a one-mode form with rate >= 1 reports it
            A = np.full((1, 1, 1), 1.0 + 1e-3)
            return dynamics.ModalForm(A, np.zeros((1, 1)), np.zeros(1), np.ones(1), 0, np.ones((1, 1, 1)))
        mu, gamma = secular.loss_modes(a, u, v, s0 - s_inf)
        n = mu.size
        l_inf = 0.5 * float(np.sum(v * s_inf)) / n
        # mode m: A = sqrt(mu) (so S scales by mu per step), h = 2, b = 1, q = (1 - mu) l_inf,
        # S0 = gamma + l_inf: then L_m(k) = gamma mu^k + l_inf exactly
        A = np.sqrt(np.maximum(mu, 0.0)).reshape(n, 1, 1)
        return dynamics.ModalForm(A, np.ones((n, 1)), (1.0 - mu) * l_inf, np.full(n, 2.0), 0,
                                  (gamma + l_inf).reshape(n, 1, 1))

    # ------------------------------------------------------------------------------------------
    # any optimizer, step by step
    # ------------------------------------------------------------------------------------------
    def _propagate(self, optimizer, batch_size, lrs, record, S, bss=None):
        """Step S through the updates ``lrs``; ``bss`` (optional) the batch size of each update, else
        ``batch_size`` throughout."""
        a0, a1, b1 = self._affine(optimizer)
        if bss is not None and np.all(bss == bss[0]):
            batch_size, bss = bss[0], None  # the noise / B once, as for a constant batch size
        q, q_self, q_loss = self._noise(1.0 if bss is not None else batch_size)
        with np.errstate(over="ignore", invalid="ignore"):
            return dynamics.propagate(a0, a1, b1, q, self.h, optimizer.readout, lrs, record, S,
                                      q_self=q_self, q_loss=q_loss, batch=bss)

    def _propagate_schedule(self, optimizer, batch_size, schedule, record, S, progress=None, readout=None):
        """Step by step through ``schedule`` and the batch size (a float or a schedule) in chunks
        (bounded: :func:`toymodels.dynamics.propagate_schedule`)."""
        if optimizer.time_varying:
            return self._propagate_varying(optimizer, batch_size, schedule, record, S, progress=progress,
                                           readout=readout)
        a0, a1, b1 = self._affine(optimizer)
        batch = batch_size if isinstance(batch_size, Schedule) else None
        q, q_self, q_loss = self._noise(1.0 if batch is not None else batch_size)
        r = optimizer.readout if readout is None else readout
        try:
            with np.errstate(over="ignore", invalid="ignore"):
                return dynamics.propagate_schedule(a0, a1, b1, q, self.h, r, schedule, record, S, q_self=q_self,
                                                   q_loss=q_loss, progress=progress, batch=batch)
        except ValueError as err:
            wd = self._weight_decay(optimizer)
            if not (self._is_sgd(optimizer) and wd):
                raise
            raise ValueError(f"{err} SGD with weight_decay {wd:g} > 0 is computed step by step here (its closed "
                             f"form does not carry the mean that the decay drives).") from None

    def _propagate_varying(self, optimizer, batch_size, schedule, record, S, *, k_start=0, progress=None,
                           readout=None):
        """:meth:`_propagate_schedule` for an optimizer that changes at every update (the Polyak average,
        schedule-free SGD): stepped one update at a time from step ``k_start`` (S there) with the
        state-dependent noise read at the gradient entry 0 (:func:`toymodels.dynamics.propagate_varying`);
        ``record`` holds absolute steps >= ``k_start``."""
        batch = batch_size if isinstance(batch_size, Schedule) else None
        q, q_self, q_loss = self._noise(1.0 if batch is not None else batch_size)
        r = optimizer.readout if readout is None else readout
        with np.errstate(over="ignore", invalid="ignore"):
            return dynamics.propagate_varying(self._parts(optimizer), optimizer.coefficients, q, self.h, r, schedule,
                                              record, S, k_start=k_start, batch=batch, progress=progress,
                                              q_self=q_self, q_loss=q_loss)

    @staticmethod
    def _constant_from(optimizer, batch):
        """``(change, lr, B)``: the update from which the learning rate and the batch size (a float or
        a schedule) are both constant and their values there, or ``(None, None, None)``."""
        sched = optimizer.lr
        ends = (sched.constant_after, constant_from(batch) if isinstance(batch, Schedule) else 0)
        if None in ends:
            return None, None, None
        change = max(int(e) for e in ends)
        at = np.array([change])
        bs = float(batch_sizes_at(batch, at)[0]) if isinstance(batch, Schedule) else batch
        return change, float(sched.at(at)[0]), bs

    def _trajectory(self, optimizer, batch_size, ks, progress=None):
        """Exact expected loss and sum lambda^2 E[e^2] at sorted steps ``ks``: step by step, and for
        SGD in closed form from the step where the learning rate and the batch size (a float or a
        schedule) are both constant."""
        sched = optimizer.lr
        S = self._S0(optimizer)
        change, lr, bs = self._constant_from(optimizer, batch_size)
        if not (self._is_closed(optimizer) and change is not None and ks[-1] > change + 20_000):
            return self._propagate_schedule(optimizer, batch_size, sched, ks, S, progress)
        head = ks[ks <= change]
        rec = head if head.size and head[-1] == change else np.append(head, change).astype(np.int64)
        loss_h, gsq_h = self._propagate_schedule(optimizer, batch_size, sched, rec, S, progress)  # S: at `change`
        loss_t, gsq_t = self._sgd_closed_trajectory(optimizer, bs, lr, ks[ks > change] - change, S[:, 0, 0].copy())
        return (np.concatenate([loss_h[: head.size], loss_t]), np.concatenate([gsq_h[: head.size], gsq_t]))

    def _sgd_closed_trajectory(self, optimizer, bs, lr, ks, s0=None):
        """Loss and sum lambda^2 E[e^2] at steps ``ks`` of constant-lr SGD from E[e^2] = ``s0``
        (default: the initial one)."""
        s0 = self.init_sq if s0 is None else s0
        a, u, v, c = self._sgd_system(optimizer, bs, lr)
        s_inf = self._sgd_stationary(a, u, c)
        if s_inf is None:  # unstable: the second moments grow without bound
            return self._unstable_trajectory(optimizer, bs, lr, ks, s0)
        reads = (v, v * self.h)  # the loss v.s / 2, then half of sum lambda^2 s: the same modes mu
        mu, gammas = secular._modes_of_readouts(a, u, v, s0 - s_inf, reads)
        sums = _power_sums(mu, np.column_stack(gammas), ks)
        loss, half_gsq = (0.5 * float(np.sum(f * s_inf)) + sums[:, j] for j, f in enumerate(reads))
        return loss, 2.0 * half_gsq

    def _unstable_trajectory(self, optimizer, bs, lr, ks, s0, n_max: int = 10**6):
        """An unstable constant-lr run: stepped until it overflows (at most ``n_max`` updates); its
        second moments grow without bound, so steps beyond are reported ``inf``."""
        S = np.ascontiguousarray(s0.reshape(-1, 1, 1).copy())
        near = ks[ks <= n_max]
        loss, gsq = np.full(ks.size, np.inf), np.full(ks.size, np.inf)
        if near.size:
            loss[: near.size], gsq[: near.size] = self._propagate_schedule(optimizer, bs, Constant(lr), near, S)
        return loss, gsq

    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE)
    def stationary_loss(self, optimizer, batch_size) -> float:
        """The stationary excess risk for the spec's constant learning rate (``inf`` if unstable).

        Closed form for any optimizer: with kappa_i = E[theta_i^2] and rho_i = E[x_r^2] of mode
        i's stationary moments under unit noise (per-mode Stein equations), the noise variances
        solve q_i = lambda_i (tau + sigma^2) / (B - lambda_i^2 kappa_i) with
        tau = sum_j lambda_j kappa_j q_j = sigma^2 phi / (1 - phi), phi = sum_j lambda_j^2 kappa_j /
        (B - lambda_j^2 kappa_j); the risk is sum_i lambda_i rho_i q_i / 2.  Stable iff every mode
        is, every lambda_i^2 kappa_i < B and phi < 1 (the second-moment map preserves the PSD cone).

        With weight decay wd the per-mode state x has the stationary mean m_i = (I - A_i)^-1 b_i wd w*_i
        (the drive of :meth:`_affine`; A_i, b_i at the learning rate), whose gradient entry is the ridge
        solution's error -wd w*_i / (lambda_i + wd), i.e. theta_i = lambda_i w*_i / (lambda_i + wd).  The
        noise follows the non-central E[e_i^2] = kappa_i q_i + mbar_i (mbar_i = m_i0^2), so
        q_i = lambda_i (sigma^2 + lambda_i mbar_i + M + tau) / (B - lambda_i^2 kappa_i) with
        M = sum_j lambda_j mbar_j and tau = (psi + phi M) / (1 - phi),
        psi = sum_j lambda_j^2 kappa_j (sigma^2 + lambda_j mbar_j) / (B - lambda_j^2 kappa_j); the risk is
        sum_i lambda_i (rho_i q_i + m_ir^2) / 2 (ridge risk plus fluctuations; same stability conditions).

        The optimizers whose averaging weight c_k = 1 / (k + 2) goes to 0 have no stationary law; this
        is then the limit of L_k as k -> infinity (:meth:`_averaged_limit`): the ridge risk (0 without
        weight decay) where the averaged process is stable, ``inf`` where it is not.
        """
        _check_optimizer(optimizer)
        bs = check_batch_size(batch_size)
        if not isinstance(optimizer.lr, Constant):
            raise ValueError("`optimizer` must have a constant learning rate here.")
        lr = optimizer.lr.lr
        if optimizer.time_varying:
            return self._averaged_limit(optimizer, bs)
        a0, a1, b1 = optimizer.affine(self.h)  # the spec's own: the drive of weight decay is m below
        A, b = a0 + lr * a1, lr * b1
        if np.max(np.abs(np.linalg.eigvals(A))) >= 1.0:
            return math.inf
        unit = dynamics.lyapunov(A, b, np.ones(self.dim))
        r = optimizer.readout
        kappa, rho = unit[:, 0, 0], unit[:, r, r]
        lam = self.h
        room = bs - lam**2 * kappa
        if np.any(room <= 0):
            return math.inf
        phi = float(np.sum(lam**2 * kappa / room))
        if phi >= 1.0:
            return math.inf
        sigma2 = self.noise_std**2
        wd = self._weight_decay(optimizer)
        if not wd:
            tau = sigma2 * phi / (1.0 - phi)
            q = lam * (tau + sigma2) / room
            return float(0.5 * np.sum(lam * rho * q))
        eye = np.broadcast_to(np.eye(A.shape[1]), A.shape)
        m = np.linalg.solve(eye - A, (b * (wd * self.w_star)[:, None])[..., None])[..., 0]
        mbar = m[:, 0] ** 2
        big_m = float(np.sum(lam * mbar))
        psi = float(np.sum(lam**2 * kappa * (sigma2 + lam * mbar) / room))
        tau = (psi + phi * big_m) / (1.0 - phi)
        q = lam * (sigma2 + lam * mbar + big_m + tau) / room
        return float(0.5 * np.sum(lam * (rho * q + m[:, r] ** 2)))

    noise_floor = stationary_loss

    def _averaged_limit(self, optimizer, bs):
        """lim_k L_k of the Polyak average or schedule-free SGD at a constant learning rate.

        The Polyak average of a base whose moments settle (its :meth:`stationary_loss` finite) is the
        time average of a process with a stationary law whose correlations decay geometrically (the
        conditional mean follows the stable A), so Var(avg_k) = O(1/k) and avg_k tends to the base's
        mean, where the gradient's mean (lambda + wd) e + wd w* vanishes: e_i = -wd w*_i / (lambda_i + wd),
        the ridge solution.  Schedule-free SGD: as c_k -> 0 the readout x moves by O(c_k) per update
        while y' = y - lr (1 - beta) ((lambda + wd) y + xi + wd w*) + O(c_k) is SGD at the learning
        rate lr (1 - beta); where that is stable, x (the uniform average of z) tends to the same
        ridge solution (its mean's deviation decays as k^(-1 / (1 - beta)), its variance as 1 / k).
        ``averaging="none"`` is SGD itself.  So the limit is the ridge risk
        sum_i lambda_i (wd w*_i / (lambda_i + wd))^2 / 2 (0 without weight decay), ``inf`` if unstable.
        """
        wd = self._weight_decay(optimizer)
        if isinstance(optimizer, ScheduleFree):
            if optimizer.averaging == "none":
                return self.stationary_loss(SGD(optimizer.lr, weight_decay=wd), bs)
            fast = SGD(optimizer.lr.lr * (1.0 - optimizer.beta), weight_decay=wd)
        elif isinstance(optimizer, PolyakAverage):
            fast = optimizer.base
        else:  # pragma: no cover - every time-varying spec is one of the two
            raise NotImplementedError(f"no stationary loss for {type(optimizer).__name__}.")
        if not math.isfinite(self.stationary_loss(fast, bs)):
            return math.inf
        return float(0.5 * np.sum(self.h * (wd * self.w_star / (self.h + wd)) ** 2))

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, k=STEP, lr=MAYBE_LR)
    def loss_at_step(self, optimizer, batch_size, k: int, lr: float | None = None) -> float:
        """Exact expected excess risk at step k for a constant learning rate (the spec's or ``lr``):
        closed form for SGD without weight decay (k <= 10^15), step by step otherwise (bounded as
        :meth:`loss_curve`)."""
        if lr is None:
            if not isinstance(optimizer.lr, Constant):
                raise ValueError("`optimizer` must have a constant learning rate here (or pass `lr`).")
            lr = optimizer.lr.lr
        if self._is_closed(optimizer):
            mf = self._modal_from(self.init_sq, optimizer, batch_size, lr)
            return float(mf.loss(np.array([k]))[0]) if mf.stable else math.inf
        S = self._S0(optimizer)
        try:
            loss, _ = self._propagate_schedule(optimizer, batch_size, Constant(lr), np.array([int(k)]), S)
        except ValueError as err:
            raise ValueError(str(err).replace("`steps`", "`k`", 1)) from None
        v = float(loss[0])
        return v if math.isfinite(v) else math.inf

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def gradient_stats(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.Dataset:
        """Loss and gradient statistics along the exact expected trajectory.

        |E g|^2 = sum_i lambda_i^2 E[e_i^2] (at the base iterate; the loss's gradient, without weight
        decay's wd theta, which adds no noise); the per-example covariance trace
        splits (law of total covariance) into ``trace_cov_label`` = sigma^2 tr Sigma and
        ``trace_cov_batch`` = sum_i lambda_i^2 E[e_i^2] + (sum_i lambda_i E[e_i^2]) tr Sigma.
        (Under iterate averaging the loss is read at the average, the gradients at the base iterate;
        for schedule-free SGD at y, its readout being x.)
        The statistics at step k use the batch size of step k: under a batch-size schedule B_k, that
        of the mini-batch drawn at step k (for the update k -> k + 1).

        Args:
            batch_size: B >= 1, or a batch-size schedule (as :meth:`toymodels.NQM.loss_curve`): every
                1/B term of update k (label noise and both batch-noise terms) uses B_k.

        Returns:
            Dataset over ``step``: ``loss``, the five statistics of :mod:`toymodels.stats`,
            ``trace_cov_label`` and ``trace_cov_batch``; ``source="exact"``; under a batch-size
            schedule the coordinates ``batch_size`` (B_k) and ``examples`` (sum_{j<k} B_j).
        """
        batch, ks, loss, gsq, bad = checked_trajectory(self, optimizer, batch_size, steps, progress)
        bs = batch_at_steps(batch, ks)
        tr = float(np.sum(self.h))
        label = np.full(ks.size, self.noise_std**2 * tr)
        if optimizer.readout == 0:
            btrace = gsq + 2.0 * loss * tr
        else:  # EMA: gradients are taken at the base iterate, whose risk is not the reported loss
            btrace = self._base_batch_trace(optimizer, batch, ks, gsq)
        btrace[bad] = np.inf
        stats = gradient_statistics(gsq, label + btrace, self.dim, bs)
        coords, bs_attr = batch_fields(batch, ks, bs)
        ds = xr.Dataset(
            {"loss": ("step", loss), **{k: ("step", np.asarray(v, np.float64)) for k, v in stats.items()},
             "trace_cov_label": ("step", label), "trace_cov_batch": ("step", btrace)},
            coords={"step": ks, **coords},
        )
        for v in ds.data_vars.values():
            v.values[np.isnan(v.values)] = np.inf
        attach_attrs(ds, model=self.model_name, source="exact", batch_size=bs_attr, diverged=bool(bad.any()),
                     **self.params, **optimizer.hyperparameters)
        for v in ds.data_vars.values():
            v.attrs.update(ds.attrs)
        return ds

    def _base_batch_trace(self, optimizer, batch, ks, gsq):
        S = self._S0(optimizer)
        # read the base iterate: a copy of the system whose readout is entry 0
        base, _ = self._propagate_schedule(optimizer, batch, optimizer.lr, ks, S, readout=0)
        return gsq + 2.0 * base * float(np.sum(self.h))

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def loss_curve(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.DataArray:
        """Exact expected excess risk over steps (``DataArray`` named ``loss`` over ``step``).

        ``batch_size``: B >= 1 or a batch-size schedule (as :meth:`gradient_stats`).  SGD without weight
        decay whose learning rate and batch size become constant is computed in closed form from that step on
        (any step up to 10^15); every other update (and every update of the time-varying Polyak average
        and schedule-free SGD) is computed one at a time, at most 10^9 of them
        (and 2e10 updates x modes, :data:`toymodels.dynamics.MAX_SCAN_UPDATES`), else ValueError;
        ``progress`` as in :meth:`toymodels.NQM.loss_curve`.
        """
        return self.gradient_stats(optimizer, batch_size, steps, progress=progress)["loss"]

    @validate(w=Array(1))
    def gradient_covariance(self, w) -> dict:
        """The per-example gradient covariance at weights ``w`` (eigenbasis), split by the law of
        total covariance: ``label`` = sigma^2 Sigma, ``batch`` = Sigma e e^T Sigma + (e^T Sigma e) Sigma
        with e = w - w*, and ``mean`` = Sigma e.  Each a numpy array, ``(d, d)`` or ``(d,)``."""
        w = np.asarray(w, dtype=np.float64)
        if w.shape != (self.dim,) or not np.all(np.isfinite(w)):
            raise ValueError(f"`w` must be a finite array of shape ({self.dim},); got shape {w.shape}.")
        e = w - self.w_star
        se = self.h * e
        return {"mean": se, "label": self.noise_std**2 * np.diag(self.h),
                "batch": np.outer(se, se) + float(e @ se) * np.diag(self.h)}

    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, target=TARGET, max_steps=Maybe(Integer(1, MAX_STEPS)),
              full_output=Boolean())
    def steps_to_target(self, optimizer, batch_size, target, *, max_steps: int | None = None,
                        full_output: bool = False):
        """The first step k with expected excess risk L_k <= target (``inf`` if never).

        ``batch_size``: B >= 1 or a batch-size schedule (as :meth:`gradient_stats`).  SGD without weight
        decay whose learning rate and batch size become constant: exact through the closed form from that
        update on and :meth:`toymodels.dynamics.ModalForm.first_crossing` (default ``max_steps``
        10^15).  Other optimizers and schedules that keep changing: every step is computed (exact for
        any curve) up to ``max_steps`` (default 10^6).
        """
        _check_optimizer(optimizer)
        batch = check_batch_sizes(batch_size)
        target = _check_target(target)
        closed = self._is_closed(optimizer) and self._constant_from(optimizer, batch)[0] is not None
        if max_steps is None:
            max_steps = 10**15 if closed else _SCAN_DEFAULT
        max_steps = check_int("max_steps", max_steps, low=1)
        if not closed and max_steps > dynamics.MAX_SCAN_UPDATES:
            raise ValueError(f"`max_steps` must be at most {dynamics.MAX_SCAN_UPDATES} here (every step is computed "
                             f"for this optimizer and schedule); got {max_steps}.")
        k, reason, floor = self._first_crossing(optimizer, batch, target, max_steps, closed)
        steps = float(k) if k >= 0 else math.inf
        if full_output:
            return steps, {"reason": reason, "noise_floor": floor}
        return steps

    def _first_crossing(self, optimizer, batch, target, max_steps, closed):
        if self.initial_loss <= target:
            return 0, "", math.nan
        sched = optimizer.lr
        S = self._S0(optimizer)
        start = 0
        change, lr, bs = self._constant_from(optimizer, batch)
        if closed:
            start = min(change, max_steps)
        k, reason = self._scan(optimizer, batch, S, sched, start if closed else max_steps, target)
        if k >= 0 or reason.startswith("diverges") or not closed or start >= max_steps:
            floor = math.nan
            if (not closed and k < 0 and not reason.startswith("diverges") and isinstance(sched, Constant)
                    and change == 0):  # a constant learning rate and batch size
                floor = self.stationary_loss(optimizer, bs)
                if floor == math.inf:
                    reason = "diverges: the learning rate is above the stable limit (the second moments grow)"
                elif floor > target:
                    reason = f"unreachable: noise floor {floor:.6g} > target {target:.6g}"
            return k, reason, floor
        if lr <= 0.0:
            return -1, "unreachable: the learning rate decays to 0 before the target", math.nan
        mf = self._modal_from(S[:, 0, 0].copy(), optimizer, bs, lr)
        if not mf.stable:
            return -1, "diverges: the second moments grow (learning rate above the stable limit)", math.inf
        floor = mf.loss_inf
        k_hi = NQM._horizon(mf, target, max_steps - start)
        if k_hi >= 0:
            k = mf.first_crossing(target, k_hi)
            if k >= 0:
                return start + k, "", floor
        if floor > target:
            return -1, f"unreachable: noise floor {floor:.6g} > target {target:.6g}", floor
        return -1, f"not reached within max_steps={max_steps}", floor

    def _scan(self, optimizer, batch, S, schedule, n_steps, target):
        """Exact step-by-step search over steps 0..n_steps (chunks); S ends at step n_steps."""
        k0 = 0
        chunk = 4096
        scheduled = isinstance(batch, Schedule)
        while k0 < n_steps:
            idx = np.arange(k0, min(n_steps, k0 + chunk))
            if optimizer.time_varying:  # its weight c_k follows the absolute step
                loss, _ = self._propagate_varying(optimizer, batch, schedule, np.arange(k0, idx[-1] + 2), S,
                                                  k_start=k0, progress=False)
                part = idx
            else:
                part = schedule.at(idx)
                rec = np.arange(part.size + 1, dtype=np.int64)
                loss, _ = self._propagate(optimizer, batch, part, rec, S,
                                          bss=batch_sizes_at(batch, idx) if scheduled else None)
            if not np.all(np.isfinite(loss)):
                return -1, "diverges: the loss overflowed"
            hit = np.nonzero(loss <= target)[0]
            if hit.size:
                return k0 + int(hit[0]), ""
            k0 += part.size
        return -1, f"not reached within max_steps={n_steps}"

    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=MC_STEPS, n_runs=N_RUNS, seed=SEED,
              progress=Boolean())
    def simulate(self, optimizer, batch_size, steps, *, n_runs: int = 100, seed: int = 0,
                 progress: bool = False) -> xr.Dataset:
        """Monte Carlo of the optimizer on sampled data: each step draws B fresh inputs x ~ N(0, Sigma)
        and labels, and takes the mini-batch gradient at the optimizer's gradient point (state entry 0;
        schedule-free SGD's y), time-varying optimizers included.

        ``batch_size``: a whole number B, or a batch-size schedule whose B_k are whole numbers
        (e.g. ``BatchSizeWarmup(..., integer=True)``): update k draws B_k examples.  Weight decay is
        coupled: the update's gradient is the mini-batch gradient plus wd theta (theta = e + w*).

        Returns:
            Dataset over ``step``: ``loss`` (mean excess risk over runs) and ``loss_sem``, and the
            statistics of the mean |Sigma e|^2 (at step k with B_k); ``source="simulation"``; the
            coordinates ``batch_size`` and ``examples`` under a batch-size schedule.  Runs that
            overflow make every value ``inf`` from the first recorded step where they have
            (``attrs["diverged"]``, ``attrs["reason"]``), never NaN.  Limits as
            :meth:`toymodels.NQM.simulate`.
        """
        from .montecarlo import simulate_regression

        batch, ks, n_runs, seed, rng, bar = mc_setup(optimizer, batch_size, steps, n_runs, seed, progress)
        n = int(ks[-1])
        if isinstance(batch, Schedule):
            updates = np.arange(n)
            sizes = batch_sizes_at(batch, updates)
            frac = sizes != np.floor(sizes)
            if frac.any():
                i = int(np.argmax(frac))
                raise ValueError(f"`batch_size` must be whole numbers for sampled data; got {sizes[i]:g} at "
                                 f"update {i}.")
            draws = sizes.astype(np.int64)
            b_max = int(draws.max()) if n else 1
        else:
            if batch != int(batch):
                raise ValueError(f"`batch_size` must be a whole number for sampled data; got {batch:g}.")
            draws = b_max = int(batch)
        check_bytes("batch_size", 8.0 * n_runs * b_max * self.dim,
                    what=f"one step's inputs, {n_runs} runs x {b_max} examples x {self.dim} features")
        # the spec's own system: the drive of weight decay is added to each gradient
        loss, gsq, base = simulate_regression(
            optimizer.parts(self.h), optimizer.coefficients(np.arange(n)), self.h, self.noise_std, draws,
            optimizer.readout, optimizer.init, -self.w_star, optimizer.lr.values(n), ks, n_runs, rng,
            progress=None if bar is None else bar.update, drive=self._weight_decay(optimizer) * self.w_star,
        )
        if bar is not None:
            bar.close()
        first, reason = mc_divergence(ks, loss, gsq, base)
        tr = float(np.sum(self.h))
        bs = batch_at_steps(batch, ks)
        with np.errstate(over="ignore", invalid="ignore"):
            g2 = gsq.mean(axis=1)
            stats = gradient_statistics(g2, self.noise_std**2 * tr + g2 + 2.0 * base.mean(axis=1) * tr, self.dim, bs)
        ds = mc_stats_dataset(ks, loss, stats, n_runs, first)
        coords, bs_attr = batch_fields(batch, ks, bs)
        ds = ds.assign_coords(coords)
        attach_attrs(ds, model=self.model_name, source="simulation", batch_size=bs_attr, n_runs=n_runs, seed=seed,
                     diverged=first is not None, reason=reason, **self.params, **optimizer.hyperparameters)
        return ds


# the finite-data model lives in its own module; it is part of the linear-regression family
from .finite_regression import FiniteLinearRegression  # noqa: E402

__all__ += ["FiniteLinearRegression"]
