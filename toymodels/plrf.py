"""Power-law random features (PLRF): exact expected risk of SGD and the other optimizers.

The model of Paquette, Paquette, Xiao and Pennington 2024 (Sec. 1, "Problem setup"): data
x in R^v with independent coordinates x_j ~ N(0, j^(-2 alpha)), i.e. x ~ N(0, D) with
D = diag(j^(-2 alpha)); a target b in R^v with b_j = j^(-beta); random features W in R^(v x d) with
independent N(0, 1/d) entries; parameters theta in R^d started at 0; the risk

    P(theta) = 1/2 E[(x^T W theta - x^T b)^2] = 1/2 |D^(1/2) (W theta - b)|^2,

and one-pass mini-batch SGD on the per-example loss (x^T W theta - x^T b)^2 / 2 with fresh x.

**Reduction to online linear regression.**  Write z = W^T x (the model's input, in R^d) and
y = x^T b (the label).  (z, y) is jointly Gaussian with

    Cov z = K = W^T D W,        E[z y] = W^T D b,        Var y = b^T D b.

Let theta* = K^+ W^T D b (the best parameters; K^+ the pseudo-inverse) and r = y - z^T theta*.
Then E[z r] = W^T D b - K K^+ W^T D b = 0 (W^T D b lies in the range of K), and r is Gaussian
jointly with z, so r is independent of z: y = z^T theta* + r with label noise r ~ N(0, sigma^2),

    sigma^2 = b^T D b - (W^T D b)^T K^+ (W^T D b) = |c - P P^T c|^2,     c = D^(1/2) b,

where D^(1/2) W = P S Q^T is the thin SVD (P ``(v, r)``, S = diag(s), Q ``(d, r)``, r the rank):
sigma^2 is the part of the target outside the span the features can reach.  So the pair (z, y) has
exactly the law of online linear regression with input covariance K, teacher theta* and label
noise sigma (:class:`toymodels.GaussianLinearRegression`), and SGD on theta only ever sees (z, y):
its iterates have the same law.  In K's eigenbasis K = Q S^2 Q^T the regression has spectrum
lambda_i = s_i^2 and teacher Q^T theta* = S^-1 P^T c, so lambda_i (Q^T theta*)_i^2 = (P^T c)_i^2
(each pair of singular vectors p_i, q_i is signed so that p_i^T c >= 0: a convention that makes the
basis, and so the eigenbasis Monte Carlo's sample paths, independent of the SVD algorithm).
Directions in K's null space (d > v) are never moved by a gradient z (z^T theta - y) and hold no
part of theta*: they are left out.  The risk is the regression's excess risk plus the irreducible
risk sigma^2 / 2,

    P(theta) = 1/2 (theta - theta*)^T K (theta - theta*) + sigma^2 / 2,

and this model reports P (the paper's risk, which includes the approximation error that the
compute-optimal trade-off is about).  Beyond a few thousand features the SVD is replaced by the
deterministic equivalent of the spectrum (:func:`deterministic_equivalent`).  Every exact method delegates to the regression's moment
recursion (:mod:`toymodels.linreg`; closed form for SGD) and adds sigma^2 / 2; weight decay (the
gradient plus wd theta) is the regression's in K's eigenbasis (the basis is orthogonal, the null
space stays at 0), so its long-run mean is the ridge solution (K + wd)^-1 W^T D b; the SVD of the
``(v, d)`` matrix D^(1/2) W costs O(v d min(v, d)) once (as a QR of [D^(1/2) W, c] and a reduction
of the d x d triangular factor to bidiagonal form, whose SVD rotates the single vector Q^T c instead
of forming singular vectors: 0.7 s of CPU at v = 2000, d = 1000, one BLAS thread, against 1.2 s
for the same QR followed by a full SVD and 1.5 s for a plain SVD), and is used rather than an
eigendecomposition of K because it resolves eigenvalues down to eps * s_max * s_i instead of
eps * s_max^2.

References:
    E. Paquette, C. Paquette, L. Xiao and J. Pennington, "4+3 Phases of Compute-Optimal Neural
    Scaling Laws", NeurIPS 2024 (arXiv:2405.15074), Sec. 1 (the problem setup), the table of the
    risk's four terms at large d (p. 4) and the table of the compute-optimal curves per phase (p. 8)
    with its propositions (:func:`phase`, :func:`frontier_exponents`, which say what of it was
    checked).
"""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
import scipy.linalg
import scipy.optimize
import xarray as xr
from numba import njit
from numba.extending import get_cython_function_address

from . import dynamics
from ._args import (BATCH_SIZE, BATCH_SIZES, MAYBE_LR, MC_STEPS, N_RUNS, OPTIMIZER, PROGRESS, SEED, STEP, STEPS,
                    TARGET)
from ._validate import (MAX_STEPS, Array, Boolean, Integer, Maybe, Options, Real, check_bytes, check_int,
                        check_real, check_steps, validate)
from .linreg import GaussianLinearRegression
from .montecarlo import mc_stats_dataset
from .nqm import _check_optimizer, _check_target
from .optimizers import EMA, SGD, Momentum, PolyakAverage, ScheduleFree
from .schema import attach_attrs
from .stats import gradient_statistics

__all__ = ["PowerLawRF", "deterministic_equivalent", "compute_optimal_frontier", "plrf_frontier", "phase",
           "frontier_exponents", "PHASES", "EXACT_MAX"]

EXACT_MAX = 4096  # spectrum="auto": the exact SVD up to min(v, d) = 4096, the deterministic equivalent beyond
SPECTRA = ("auto", "exact", "deterministic")

_ALPHA = Real(0.0, 50.0, low_open=True)
_BETA = Real(0.0, 50.0)
_SIZE = Integer(1, 2**40)


class PowerLawRF:
    """Power-law random features (Paquette, Paquette, Xiao and Pennington 2024, Sec. 1).

    x ~ N(0, diag(j^(-2 alpha))) in R^v, target b_j = j^(-beta), features W ``(v, d)`` with N(0, 1/d)
    entries drawn from ``seed``; theta ``(d,)`` starts at 0; risk P(theta) = 1/2 E[(x^T W theta -
    x^T b)^2].  The exact expected risk of any optimizer spec comes from the equivalent online linear
    regression in K = W^T D W's eigenbasis (module docstring), held as :attr:`regression`; losses
    reported here are the full risk P, i.e. the regression's excess risk plus
    :attr:`irreducible_risk`.

    Args:
        alpha: data exponent alpha > 0 (x_j has variance j^(-2 alpha)).
        beta: target exponent beta >= 0 (b_j = j^(-beta)).
        v: data dimension (the paper's v).
        d: number of features, i.e. parameters (the paper's d).
        seed: seed of the features W.
        spectrum: ``"exact"``: K's eigendecomposition (SVD of D^(1/2) W, this seed's features);
            ``"deterministic"``: the deterministic equivalent (:func:`deterministic_equivalent`, the
            large-(v, d) limit, no features drawn, a few seconds to a minute, any size);
            ``"auto"`` (default): exact up to min(v, d) = :data:`EXACT_MAX` (4096), deterministic
            beyond.
    """

    model_name = "plrf"

    @validate(alpha=_ALPHA, beta=_BETA, v=_SIZE, d=_SIZE, seed=SEED, spectrum=Options(*SPECTRA))
    def __init__(self, alpha: float, beta: float, v: int, d: int, *, seed: int = 0, spectrum: str = "auto"):
        self.alpha = check_real("alpha", alpha, low=0.0, high=50.0, low_open=True)
        self.beta = check_real("beta", beta, low=0.0, high=50.0)
        self.v = check_int("v", v, low=1)
        self.d = check_int("d", d, low=1)
        self.seed = check_int("seed", seed, low=0)
        if spectrum not in SPECTRA:
            raise ValueError(f"`spectrum` must be one of {SPECTRA}; got {spectrum!r}.")
        if spectrum == "auto":
            spectrum = "exact" if min(self.v, self.d) <= EXACT_MAX else "deterministic"
        self.method = spectrum
        self._W = None
        j = np.arange(1, self.v + 1, dtype=np.float64)
        self._sqrt_cov = j**-self.alpha  # D^(1/2)
        self.target = j**-self.beta
        self._c = self._sqrt_cov * self.target  # c = D^(1/2) b
        if spectrum == "exact":
            check_bytes("d", 8.0 * 3 * self.v * self.d, what=f"the {self.v} x {self.d} features and their SVD")
            self._W = self._draw()
            self._setup()
        else:
            lam, rho, sigma2 = deterministic_equivalent(self.alpha, self.beta, self.v, self.d)
            self.irreducible_risk = 0.5 * sigma2
            self.regression = GaussianLinearRegression(lam, np.sqrt(rho / lam), math.sqrt(sigma2))

    @classmethod
    @validate(alpha=_ALPHA, beta=_BETA, features=Array(2))
    def from_features(cls, alpha: float, beta: float, features) -> "PowerLawRF":
        """The same model with given features W ``(v, d)`` instead of random ones (e.g. an orthogonal
        W, with which it is linear regression on x itself); ``seed`` is reported as -1."""
        W = np.asarray(features, dtype=np.float64)
        if W.ndim != 2 or W.size == 0 or not np.all(np.isfinite(W)):
            raise ValueError(f"`features` must be a finite, non-empty 2-D array; got shape {W.shape}.")
        self = object.__new__(cls)
        self.alpha = check_real("alpha", alpha, low=0.0, high=50.0, low_open=True)
        self.beta = check_real("beta", beta, low=0.0, high=50.0)
        self.v, self.d = W.shape
        self.seed, self.method = -1, "exact"
        j = np.arange(1, self.v + 1, dtype=np.float64)
        self._sqrt_cov = j**-self.alpha
        self.target = j**-self.beta
        self._c = self._sqrt_cov * self.target
        self._W = W.copy()
        self._setup()
        return self

    def _draw(self):
        return np.random.default_rng(self.seed).standard_normal((self.v, self.d)) / math.sqrt(self.d)

    @property
    def features(self) -> np.ndarray:
        """W ``(v, d)``, N(0, 1/d) entries from ``seed`` (drawn on first use when the spectrum is the
        deterministic equivalent)."""
        if self._W is None:
            check_bytes("d", 8.0 * self.v * self.d, what=f"the {self.v} x {self.d} features")
            self._W = self._draw()
        return self._W

    @property
    def _M(self):
        """D^(1/2) W, so that P(theta) = |M theta - c|^2 / 2."""
        return self._sqrt_cov[:, None] * self.features

    def _setup(self):
        # D^(1/2) W in the order the QR reads: columns of M (v >= d), of M^T (v < d)
        M = np.empty((self.v, self.d), order="F" if self.v >= self.d else "C")
        np.multiply(self._sqrt_cov[:, None], self.features, out=M)
        s, pc, resid_sq = _svd_projection(M, self._c)
        if s.size == 0:
            raise ValueError("`features` must not be zero: K = W^T D W has no nonzero eigenvalue.")
        # rank v: the features span R^v and the residual is zero but for rounding
        self.irreducible_risk = 0.0 if s.size == self.v else 0.5 * resid_sq
        # the sign convention p_i^T c >= 0 (module docstring)
        self.regression = GaussianLinearRegression(s**2, np.abs(pc) / s, math.sqrt(2.0 * self.irreducible_risk))

    # ------------------------------------------------------------------------------------------
    @property
    def spectrum(self) -> np.ndarray:
        """``(r,)``: the nonzero eigenvalues of K = W^T D W, decreasing (r = min(v, d) almost surely)."""
        return self.regression.h

    @property
    def dim(self) -> int:
        """Number of parameters d."""
        return self.d

    @property
    def initial_loss(self) -> float:
        """P(0) = |D^(1/2) b|^2 / 2 = sum_j j^(-2 alpha - 2 beta) / 2 (j <= v)."""
        return self.regression.initial_loss + self.irreducible_risk

    @property
    def params(self) -> dict:
        """The attrs of the model's results: ``alpha``, ``beta``, ``v``, ``d``, ``seed``, ``spectrum``
        (``"exact"`` or ``"deterministic"``), ``initial_loss`` and ``irreducible_risk``."""
        return {"alpha": self.alpha, "beta": self.beta, "v": self.v, "d": self.d, "seed": self.seed,
                "spectrum": self.method, "initial_loss": self.initial_loss, "irreducible_risk": self.irreducible_risk}

    @validate(theta=Array(1))
    def risk(self, theta) -> float:
        """P(theta) = |D^(1/2) (W theta - b)|^2 / 2 for parameters ``theta`` ``(d,)``."""
        t = np.asarray(theta, dtype=np.float64)
        if t.shape != (self.d,) or not np.all(np.isfinite(t)):
            raise ValueError(f"`theta` must be a finite array of shape ({self.d},); got shape {t.shape}.")
        r = self._sqrt_cov * (self.features @ t) - self._c
        return 0.5 * float(r @ r)

    def _attrs(self, obj):
        attach_attrs(obj, model=self.model_name, source=obj.attrs.get("source", "exact"), **self.params)
        return obj

    # ------------------------------------------------------------------------------------------
    # exact: the regression's moment recursion, plus the irreducible risk
    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER)
    def lr_limit(self, optimizer) -> float:
        """The full-batch stability limit (an upper bound of the stable learning rates), as
        :meth:`toymodels.GaussianLinearRegression.lr_limit` on K's spectrum."""
        return self.regression.lr_limit(optimizer)

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE)
    def stable_lr(self, optimizer, batch_size) -> float:
        """The largest stable constant learning rate of SGD at batch size B
        (:meth:`toymodels.GaussianLinearRegression.stable_lr`)."""
        return self.regression.stable_lr(optimizer, batch_size)

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE)
    def stationary_loss(self, optimizer, batch_size) -> float:
        """The stationary risk of the spec's constant learning rate (``inf`` if unstable): the
        regression's stationary excess risk plus the irreducible risk."""
        return self.regression.stationary_loss(optimizer, batch_size) + self.irreducible_risk

    noise_floor = stationary_loss

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def loss_curve(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.DataArray:
        """Exact expected risk P(theta_k) over steps (``DataArray`` named ``loss`` over ``step``).

        Arguments, limits and closed forms as :meth:`toymodels.GaussianLinearRegression.loss_curve`
        (``batch_size`` a number or a batch-size schedule; ``steps`` a count or sorted indices).
        Divergent runs are ``inf`` (``attrs["diverged"]``).
        """
        da = self.regression.loss_curve(optimizer, batch_size, steps, progress=progress)
        out = da.copy(data=da.values + self.irreducible_risk)  # inf stays inf
        for key in ("dim", "noise_std"):  # the regression's, not this model's
            out.attrs.pop(key, None)
        return self._attrs(out)

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def gradient_stats(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.Dataset:
        """Risk and per-example gradient statistics along the exact expected trajectory.

        The per-example gradient g = z (z^T theta - y), z = W^T x, is the regression's in K's
        eigenbasis: y = z^T theta* + r, where r, the part of the target outside the features' span,
        is Gaussian, independent of z (uncorrelated with it, jointly Gaussian) and of variance
        2 P_irr (P_irr the irreducible risk).  So, with a = D^(1/2) (W theta - b) and E over x,

            |E g|^2 = |grad P(theta)|^2 = |M^T a|^2,
            tr Sigma = tr Cov g = |M^T a|^2 + |a|^2 tr K = |grad P|^2 + 2 P(theta) tr K

        (M = D^(1/2) W; Gaussian fourth moments), averaged over the iterate's distribution:
        :meth:`toymodels.GaussianLinearRegression.gradient_stats` on K's spectrum, with P_irr added to
        the loss (``trace_cov_label`` = 2 P_irr tr K is the unrepresentable target's share,
        ``trace_cov_batch`` the rest).  The per-coordinate statistics (``grad_var``, ...) count the d
        parameters.  :meth:`simulate` measures the same on the explicit features.

        Returns:
            Dataset over ``step``: ``loss`` (P), the five statistics of :mod:`toymodels.stats`,
            ``trace_cov`` (tr Sigma) and its parts ``trace_cov_label``, ``trace_cov_batch``;
            ``source="exact"``; ``inf`` after a divergence.
        """
        ds = self.regression.gradient_stats(optimizer, batch_size, steps, progress=progress)
        bs = ds["batch_size"].values if "batch_size" in ds.coords else ds.attrs["batch_size"]
        trace = ds.trace_cov_label.values + ds.trace_cov_batch.values
        stats = gradient_statistics(ds.grad_norm_sq.values, trace, self.d, bs)
        ds = ds.assign(loss=ds.loss + self.irreducible_risk,  # inf stays inf
                       **{k: ("step", np.asarray(v, np.float64)) for k, v in stats.items()},
                       trace_cov=("step", trace))
        for v in ds.data_vars.values():
            v.values[np.isnan(v.values)] = np.inf
        for obj in (ds, *ds.data_vars.values()):
            for key in ("dim", "noise_std"):  # the regression's, not this model's
                obj.attrs.pop(key, None)
            self._attrs(obj)
        return ds

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, k=STEP, lr=MAYBE_LR)
    def loss_at_step(self, optimizer, batch_size, k: int, lr: float | None = None) -> float:
        """Exact expected risk at step k for a constant learning rate (the spec's or ``lr``), as
        :meth:`toymodels.GaussianLinearRegression.loss_at_step` plus the irreducible risk."""
        return self.regression.loss_at_step(optimizer, batch_size, k, lr=lr) + self.irreducible_risk

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, lr=MAYBE_LR)
    def modal_form(self, optimizer, batch_size, lr: float | None = None) -> dynamics.ModalForm:
        """SGD's closed-form risk curve as a :class:`toymodels.dynamics.ModalForm` (what the sweeps of
        :mod:`toymodels.sweep` tune on): the regression's modes and one constant mode holding the
        irreducible risk.  Raises NotImplementedError for optimizers other than SGD and for SGD with
        ``weight_decay`` > 0 (stepped exactly by the other methods)."""
        mf = self.regression.modal_form(optimizer, batch_size, lr=lr)
        if not mf.stable:
            return mf
        irr = self.irreducible_risk
        # a constant mode: A = 0, h = 2, b = 1, q = irr, S0 = irr gives L(k) = irr at every k
        return dynamics.ModalForm(np.concatenate([mf.A, np.zeros((1, 1, 1))]), np.concatenate([mf.b, np.ones((1, 1))]),
                                  np.append(mf.q, irr), np.append(mf.h, 2.0), mf.readout,
                                  np.concatenate([mf.S0, np.full((1, 1, 1), irr)]))

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, target=TARGET, max_steps=Maybe(Integer(1, MAX_STEPS)),
              full_output=Boolean())
    def steps_to_target(self, optimizer, batch_size, target, *, max_steps: int | None = None,
                        full_output: bool = False):
        """The first step k with expected risk P(theta_k) <= target (``inf`` if never).

        A target at or below the irreducible risk is unreachable with d features (``reason`` says
        so); otherwise :meth:`toymodels.GaussianLinearRegression.steps_to_target` at the excess
        target, exact, with its defaults and limits.  ``full_output``: also a dict with ``reason``
        and ``noise_floor`` (the stationary risk, NaN where not computed).
        """
        _check_optimizer(optimizer)
        target = _check_target(target)
        irr = self.irreducible_risk
        if target <= irr and self.initial_loss > target:
            steps, info = math.inf, {"reason": f"unreachable: target {target:.6g} <= irreducible risk {irr:.6g} "
                                               f"(the part of the target the {self.d} features cannot represent)",
                                     "noise_floor": math.nan}
        elif self.initial_loss <= target:
            steps, info = 0.0, {"reason": "", "noise_floor": math.nan}
        else:
            steps, info = self.regression.steps_to_target(optimizer, batch_size, target - irr, max_steps=max_steps,
                                                          full_output=True)
            info = {"reason": info["reason"], "noise_floor": info["noise_floor"] + irr}
        return (steps, info) if full_output else steps

    # ------------------------------------------------------------------------------------------
    # Monte Carlo on the explicit features
    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=Integer(1, 2**20), steps=MC_STEPS, n_runs=N_RUNS, seed=SEED)
    def simulate(self, optimizer, batch_size: int, steps, *, n_runs: int = 100, seed: int = 0) -> xr.Dataset:
        """Monte Carlo of the optimizer on the explicit features: each update draws B fresh
        x ~ N(0, D), forms z = W^T x and y = x^T b, and steps theta with the mini-batch gradient
        (1/B) sum z (z^T theta - y) plus wd theta under weight decay (coupled, as PyTorch's SGD); the
        risk of each run is P(theta) computed exactly.

        Supports SGD and heavy-ball Momentum (without preconditioning, any ``weight_decay``), their EMA
        and their uniform (Polyak) average, and schedule-free SGD (gradients at y = (1 - beta) z + beta x,
        the risk read at x); the learning rate may be any schedule.  Cost O(n_runs x B x v x d) per update.

        Returns:
            Dataset over ``step``: ``loss`` (mean of P over runs) and ``loss_sem``; the per-example
            gradient statistics at each run's (base) iterate, exact given the iterate (the formulas
            of :meth:`gradient_stats`) and averaged over runs: the five of :mod:`toymodels.stats` and
            ``trace_cov``, with ``grad_norm_sq_sem`` and ``trace_cov_sem``; ``source="simulation"``; runs that
            overflow make the values ``inf`` from there on.
        """
        _check_optimizer(optimizer)
        schedule_free = isinstance(optimizer, ScheduleFree)
        base = optimizer.base if isinstance(optimizer, (EMA, PolyakAverage)) else optimizer
        if not (schedule_free or isinstance(base, (SGD, Momentum))) or base.precond != 0.0:
            raise NotImplementedError("simulate runs SGD, Momentum, their EMA and Polyak average, without "
                                      "preconditioning, and ScheduleFree.")
        bs = check_int("batch_size", batch_size, low=1)
        ks = check_steps(steps, high=10**8)
        n_runs = check_int("n_runs", n_runs, low=2)
        rng = np.random.default_rng(check_int("seed", seed, low=0))
        check_bytes("n_runs", 8.0 * n_runs * bs * (self.v + self.d), what=f"one update's {n_runs} x {bs} examples")
        n = int(ks[-1])
        lrs = optimizer.lr.values(n)
        beta = base.beta if isinstance(base, Momentum) else 0.0
        wd = base.weight_decay
        decay = optimizer.decay if isinstance(optimizer, EMA) else None
        # the uniform average's weights c_k (Polyak, schedule-free), and schedule-free's interpolation
        weights = optimizer.coefficients(np.arange(n)) if optimizer.time_varying else None
        interp = optimizer.beta if schedule_free else 0.0
        averaged = decay is not None or weights is not None
        theta = np.zeros((n_runs, self.d))  # schedule-free: z
        vel = np.zeros_like(theta)
        avg = np.zeros_like(theta)  # schedule-free: x
        M, c = np.ascontiguousarray(self._M), self._c
        loss = np.empty((ks.size, n_runs))
        gsq, trace = np.empty_like(loss), np.empty_like(loss)
        tr_k = float(np.sum(M * M))  # tr K = tr M^T M
        rec = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(n + 1):
                point = (1.0 - interp) * theta + interp * avg if schedule_free else theta  # the gradient point
                if k == ks[rec]:
                    at = avg if averaged else theta
                    r = at @ M.T - c
                    loss[rec] = 0.5 * np.einsum("ij,ij->i", r, r)
                    a = r if not averaged else point @ M.T - c  # the gradients: at the base iterate (y)
                    ga = a @ M
                    gsq[rec] = np.einsum("ij,ij->i", ga, ga)
                    trace[rec] = gsq[rec] + np.einsum("ij,ij->i", a, a) * tr_k
                    rec += 1
                    if rec == ks.size:
                        break
                g = rng.standard_normal((n_runs, bs, self.v))  # x = D^(1/2) g
                z = g @ M  # (runs, B, d): z = W^T x
                err = np.einsum("rbd,rd->rb", z, point) - g @ c
                grad = np.einsum("rb,rbd->rd", err, z) / bs
                if wd:
                    grad = grad + wd * point
                vel = beta * vel - lrs[k] * grad
                theta = theta + vel
                if decay is not None:
                    avg = decay * avg + (1.0 - decay) * theta
                elif weights is not None:
                    avg = (1.0 - weights[k]) * avg + weights[k] * theta
        bad = ~np.isfinite(loss).all(axis=1)
        first = int(np.argmax(bad)) if bad.any() else None
        with np.errstate(over="ignore", invalid="ignore"):
            stats = gradient_statistics(gsq.mean(axis=1), trace.mean(axis=1), self.d, bs)
            stats["trace_cov"] = trace.mean(axis=1)
            stats["grad_norm_sq_sem"] = gsq.std(axis=1, ddof=1) / math.sqrt(n_runs)
            stats["trace_cov_sem"] = trace.std(axis=1, ddof=1) / math.sqrt(n_runs)
        ds = mc_stats_dataset(ks, loss, stats, n_runs, first)
        attach_attrs(ds, model=self.model_name, source="simulation", batch_size=float(bs), n_runs=n_runs,
                     mc_seed=int(seed), diverged=first is not None, **self.params, **optimizer.hyperparameters)
        return ds


def _svd_projection(M, c):
    """The nonzero singular values s ``(r,)`` of M ``(v, d)`` = P S Q^T (decreasing), the projections
    P^T c ``(r,)`` and the squared residual |c - P P^T c|^2, without forming P.

    Tall M (v >= d): a Householder QR of [M, c] gives R_aug = [[R, q], [0, rho]] with R ``(d, d)``,
    q = Q^T c and rho the part of c outside M's column space; then R = U S Q^T and P^T c = U^T q
    (:func:`_singular_values_and_projection`, which never forms U).  Wide M: a QR of M^T gives
    M = R^T Q^T, and the left singular vectors of R^T ``(v, v)`` are P itself.  Orthogonal
    transformations only, so s is as accurate as an SVD of M (resolved down to eps * s_max * s_i),
    at O(v d min(v, d)) with a smaller constant: no singular vectors are formed.  The rank is an
    SVD's: s_i > s_max * max(v, d) * eps; the directions below it count to the residual.
    """
    v, d = M.shape
    if v >= d:
        A = np.empty((v, d + 1), order="F")  # [M, c] in LAPACK's column order, factored in place
        A[:, :d], A[:, d] = M, c
        R = scipy.linalg.qr(A, mode="r", overwrite_a=True, check_finite=False)[0]
        s, pc = _singular_values_and_projection(R[:d, :d], R[:d, d])
        rho_sq = float(R[d, d]) ** 2 if R.shape[0] > d else 0.0
    else:
        R = scipy.linalg.qr(M.T, mode="r", check_finite=False)[0]
        s, pc = _singular_values_and_projection(R[:v, :v].T, c)
        rho_sq = 0.0
    keep = s > (s[0] if s.size else 0.0) * max(v, d) * np.finfo(np.float64).eps
    return s[keep], pc[keep], rho_sq + float(pc[~keep] @ pc[~keep])


def _svd_projection_reference(M, c):
    """:func:`_svd_projection` by the previous route, a full SVD (dgesdd, U formed) of the QR's
    triangular factor: the slow reference of the tests and benchmarks/plrf_speed.py."""
    v, d = M.shape
    if v >= d:
        R = scipy.linalg.qr(np.column_stack([M, c]), mode="r", check_finite=False)[0]
        U, s, _ = scipy.linalg.svd(R[:d, :d], lapack_driver="gesdd", check_finite=False)
        pc = U.T @ R[:d, d]
        rho_sq = float(R[d, d]) ** 2 if R.shape[0] > d else 0.0
    else:
        R = scipy.linalg.qr(M.T, mode="r", check_finite=False)[0]
        U, s, _ = scipy.linalg.svd(R[:v, :v].T, lapack_driver="gesdd", check_finite=False)
        pc, rho_sq = U.T @ c, 0.0
    keep = s > (s[0] if s.size else 0.0) * max(v, d) * np.finfo(np.float64).eps
    return s[keep], pc[keep], rho_sq + float(pc[~keep] @ pc[~keep])


@functools.cache
def _lapack(name: str, n_args: int):
    """The LAPACK routine ``name`` of scipy's own build (:mod:`scipy.linalg.cython_lapack`, 32-bit
    integers), callable through ctypes with every argument by pointer (Fortran's convention)."""
    address = get_cython_function_address("scipy.linalg.cython_lapack", name)
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * n_args)(address)


def _singular_values_and_projection(A, q):
    """The singular values s ``(n,)`` of the square A ``(n, n)`` = U S V^T, decreasing, and U^T q
    ``(n,)``, without forming U or V.

    The route by which LAPACK's least-squares driver dgelss gets U^T b (Anderson et al. 1999, "LAPACK
    Users' Guide", 3rd ed., the SVD's computational routines): dgebrd reduces A = Q_B B P_B^T with B
    upper bidiagonal (Householder reflections, 8/3 n^3 flops), dormbr applies Q_B^T to q, and dbdsqr
    computes B = U_B S V_B^T by implicit-shift QR sweeps (Demmel and Kahan 1990, "Accurate singular
    values of bidiagonal matrices", SIAM J. Sci. Stat. Comput. 11(5)) whose rotations it applies to
    the single column Q_B^T q only, giving U^T q = U_B^T Q_B^T q in O(n^2); it sorts s decreasing and
    permutes the column with it.  The same reduction as an SVD (dgesdd) without the n x n singular
    vectors: half of dgesdd's time at n = 1000 (0.4 s against 0.8 s of CPU, one thread).  The
    routines are scipy's own LAPACK, called through ctypes (:func:`_lapack`): scipy.linalg.lapack
    wraps none of the three.
    """
    n = A.shape[0]
    a = np.array(A, dtype=np.float64, order="F")  # overwritten by the reflectors
    x = np.array(q, dtype=np.float64).reshape(n, 1)  # overwritten by U^T q
    s, e = np.empty(n), np.empty(max(n - 1, 1))
    tauq, taup, one, rotations = np.empty(n), np.empty(n), np.empty(1), np.empty(4 * n)
    info, query = ctypes.c_int(0), np.empty(1)
    ptr = lambda arr: arr.ctypes.data  # noqa: E731
    int_ = lambda i: ctypes.byref(ctypes.c_int(i))  # noqa: E731

    def call(name, *args, workspace=True):
        fn = _lapack(name, len(args) + 1 + 2 * workspace)
        if workspace:  # a workspace query first
            fn(*args, ptr(query), int_(-1), ctypes.byref(info))
            buf = np.empty(max(1, int(query[0])))
            fn(*args, ptr(buf), int_(buf.size), ctypes.byref(info))
        else:
            fn(*args, ctypes.byref(info))
        if info.value != 0:
            raise np.linalg.LinAlgError(f"LAPACK {name} failed (info = {info.value}).")

    call("dgebrd", int_(n), int_(n), ptr(a), int_(n), ptr(s), ptr(e), ptr(tauq), ptr(taup))
    call("dormbr", b"Q", b"L", b"T", int_(n), int_(1), int_(n), ptr(a), int_(n), ptr(tauq), ptr(x), int_(n))
    call("dbdsqr", b"U", int_(n), int_(0), int_(0), int_(1), ptr(s), ptr(e), ptr(one), int_(1), ptr(one), int_(1),
         ptr(x), int_(n), ptr(rotations), workspace=False)
    return s, x[:, 0]


# ----------------------------------------------------------------------------------------------
# the deterministic equivalent of the spectrum (large d)
# ----------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _solve_t(D, d, z, t):
    """Newton for t = 1 + delta(z) of the deterministic equivalent (see
    :func:`deterministic_equivalent`) from the guess ``t``; ``(t, ok)``, ok False if Newton fails
    or leaves the branch Im t >= 0."""
    for _ in range(60):
        g = t - 1.0
        dg = 1.0 + 0.0j
        for j in range(D.size):
            den = D[j] - z * t
            g -= D[j] * t / den / d
            dg -= D[j] * D[j] / (den * den) / d
        step = g / dg
        t = t - step
        if not (np.isfinite(t.real) and np.isfinite(t.imag)):
            return t, False
        if abs(step) <= 1e-12 * abs(t):
            return t, t.imag >= -1e-12 * abs(t)
    return t, False


@njit(cache=True, nogil=True)
def _densities(D, c2, t, z):
    """(Im sum_j 1 / (D_j / t - z), Im sum_j c2_j / (D_j / t - z))."""
    n, w = 0.0, 0.0
    for j in range(D.size):
        im = (1.0 / (D[j] / t - z)).imag
        n += im
        w += c2[j] * im
    return n, w


def _advance(D, d, x_from, t_from, x_to, eps):
    """t at log lambda = ``x_to`` by continuation from (``x_from``, ``t_from``): Newton steps in
    log lambda, halved where Newton fails, doubled after a success."""
    h = x_from - x_to
    x, t = x_from, t_from
    while x > x_to:
        h = min(h, x - x_to)
        t_try, ok = _solve_t(D, d, math.exp(x - h) * (1.0 + 1j * eps), t)
        if not ok:
            h *= 0.5
            if h < 1e-12:
                raise RuntimeError(f"deterministic_equivalent: Newton failed at lambda = {math.exp(x):.3g}.")
            continue
        x, t, h = x - h, t_try, 2.0 * h
    return t


@validate(alpha=_ALPHA, beta=_BETA, v=_SIZE, d=_SIZE, ratio=Real(1.0, 1.1, low_open=True),
          eps=Real(0.0, 0.1, low_open=True))
def deterministic_equivalent(alpha: float, beta: float, v: int, d: int, *, ratio: float = 1.002, eps: float = 1e-8):
    """The PLRF's spectrum from the deterministic equivalent of the features' resolvent, for d (or v)
    too large for an SVD.

    The exact dynamics (module docstring) depend on the features through two measures only: the
    eigenvalues of K = W^T D W (equivalently the nonzero eigenvalues of M M^T, M = D^(1/2) W) and the
    target's weights on them, mu_c = sum_i (P^T c)_i^2 delta(lambda_i) (c = D^(1/2) b), plus the
    irreducible risk sigma^2 / 2.  Both are spectral measures of M M^T = (1/d) sum_k D^(1/2) g_k
    g_k^T D^(1/2), a sample covariance of d Gaussian vectors with population covariance D, whose
    resolvent Q(z) = (M M^T - z)^-1 has the deterministic equivalent (Marchenko-Pastur / Silverstein;
    Couillet and Liao 2022, "Random Matrix Methods for Machine Learning", Thm. 2.6; the form Paquette
    et al. 2024 use in their Sec. 2 and App. C)

        Q(z) ~ (D / t(z) - z)^-1,        t - 1 = (1/d) sum_j D_j t / (D_j - z t).

    So the eigenvalue count has density (1/pi) Im sum_j 1 / (D_j / t - z) and mu_c the density
    (1/pi) Im sum_j c_j^2 / (D_j / t - z), read at z = lambda (1 + i eps) on a log grid of ratio
    ``ratio`` (Newton with continuation from large lambda down, halving a step whenever Newton
    leaves the branch Im t >= 0; the Cauchy tails of the zero eigenvalues, v - d of them, are
    subtracted; those of the rest of the spectrum below lambda add about eps / pi per unit of
    log lambda and per eigenvalue, which is why eps is small: at eps = 1e-4 they moved ~0.1 of a
    mode into the gaps between the top eigenvalues and cost 3% of sum_k rho_k lambda_k at d = 1000,
    at 1e-8 the first moments E tr K = sum_j D_j and E c^T M M^T c = sum_j c_j^2 D_j are met to
    5e-4).  sigma^2 is the limit z -> 0-: sigma^2 = sum_j c_j^2 u / (D_j + u) with u > 0 the
    root of sum_j D_j / (D_j + u) = d (v > d; 0 for v <= d).  The r = min(v, d) modes are the
    classical locations (the count from the top reaching k - 1/2) and each takes the mass of mu_c
    between its neighbours' half-way counts, so the mode count is exact and the masses add up to
    |c|^2 - sigma^2.

    Accuracy: the deterministic equivalent is the large-(v, d) limit of the seed average, checked
    against the mean of exact eigendecompositions over seeds, SGD at B = 1 and half the stable
    learning rate, 10^5 steps: v = 600, d = 300 (16 seeds): within 2.4% (0.6 standard errors of the
    seed mean) at alpha = 1, beta = 0.7 and 1.0% at alpha = 0.7, beta = 0.3, where single seeds
    differ by up to 21%; v = 2000, d = 1000 (4 seeds): within 8% (3 standard errors), and 0.3-1%
    high over the first three steps, where the seeds agree to 0.1% (the top eigenvalues, isolated
    spikes, are each one mode at their median).

    Returns:
        ``(lam, rho, sigma2)``: eigenvalues ``(r,)`` decreasing, the target's weight
        rho_k = lambda_k theta*_k^2 on each ``(r,)``, and sigma^2.
    """
    alpha = check_real("alpha", alpha, low=0.0, high=50.0, low_open=True)
    beta = check_real("beta", beta, low=0.0, high=50.0)
    v, d = check_int("v", v, low=1), check_int("d", d, low=1)
    check_bytes("v", 8.0 * 8 * v, what=f"{v} data coordinates")
    j = np.arange(1, v + 1, dtype=np.float64)
    D = j ** (-2.0 * alpha)
    c2 = D * j ** (-2.0 * beta)
    r = min(v, d)
    sigma2 = 0.0
    if v > d:
        u = math.exp(scipy.optimize.brentq(lambda y: np.sum(D / (D + math.exp(y))) - d, -690.0, 690.0, xtol=1e-14))
        sigma2 = float(np.sum(c2 * u / (D + u)))
    n_zero = v - r
    step = math.log(ratio)
    lam_hi = 4.0 * (D[0] + np.sum(D) / d)
    log_lam, count, weight = [], [], []
    x = math.log(lam_hi)
    t, ok = _solve_t(D, d, lam_hi * (1.0 + 1j * eps), 1.0 + 0.0j)
    if not ok:  # pragma: no cover - outside the support Newton starts at the answer
        raise RuntimeError("deterministic_equivalent: Newton failed above the spectrum.")
    total = 0.0
    x_floor = math.log(D[-1]) - 25.0
    while True:
        z = math.exp(x) * (1.0 + 1j * eps)
        im_n, im_w = _densities(D, c2, t, z)
        tail = eps * math.exp(x) / (math.pi * abs(z) ** 2)  # the Cauchy tail of an atom at 0, per unit mass
        log_lam.append(x)
        count.append(max(0.0, im_n / math.pi - n_zero * tail))
        weight.append(max(0.0, im_w / math.pi - sigma2 * tail))
        if len(log_lam) > 1:
            lam2 = np.exp(log_lam[-2:])
            total += 0.5 * step * float(count[-2] * lam2[0] + count[-1] * lam2[1])
            if total >= 0.9 * r and count[-1] * lam2[1] < 1e-6 * r:
                break
            if x < x_floor:  # v = d: the hard edge at 0 (density ~ lambda^-1/2); what is left is < 1e-5 r
                break
            if len(log_lam) > 10**6:
                raise RuntimeError("deterministic_equivalent: the spectrum did not close within 10^6 grid points.")
        try:
            t = _advance(D, d, x, t, x - step, eps)
        except RuntimeError:
            if x > x_floor + 15.0:
                raise
            break  # far below the smallest D_j (v = d, where the spectrum reaches 0): Newton runs out of digits
        x -= step
    xg = np.array(log_lam)
    lam = np.exp(xg)
    n_cum = np.concatenate([[0.0], np.cumsum(0.5 * step * (np.array(count)[1:] * lam[1:] + np.array(count)[:-1] * lam[:-1]))])
    w_cum = np.concatenate([[0.0], np.cumsum(0.5 * step * (np.array(weight)[1:] * lam[1:]
                                                           + np.array(weight)[:-1] * lam[:-1]))])
    n_cum *= r / n_cum[-1]
    w_cum *= (float(np.sum(c2)) - sigma2) / w_cum[-1]
    keep = np.concatenate([[True], np.diff(n_cum) > 0])  # strictly increasing for the interpolation
    n_k, x_k = n_cum[keep], xg[keep]
    mids = np.exp(np.interp(np.arange(r) + 0.5, n_k, x_k))
    edges = np.interp(np.arange(r + 1.0), n_k, x_k)
    rho = np.diff(np.interp(-edges, -xg, w_cum))
    return mids, np.maximum(rho, 0.0), sigma2


# ----------------------------------------------------------------------------------------------
# the phase diagram of the compute-optimal frontier
# ----------------------------------------------------------------------------------------------
PHASES = ("Ia", "Ib", "Ic", "II", "III", "IVa", "IVb")
ALPHA_IV = 1.0 - 1.0 / math.sqrt(2.0)  # the IVa / IVb line, where K_pp's size stops depending on d


def _check_phase_args(alpha, beta):
    alpha = check_real("alpha", alpha, low=0.0, high=50.0, low_open=True)
    beta = check_real("beta", beta, low=0.0, high=50.0)
    if 2.0 * (alpha + beta) <= 1.0:
        raise ValueError(f"`beta` must satisfy 2 (alpha + beta) > 1 (else the risk P(0) = sum_j j^(-2 alpha - 2 beta) "
                         f"diverges with v and there is no phase); got alpha = {alpha}, beta = {beta}.")
    return alpha, beta


@validate(alpha=_ALPHA, beta=_BETA)
def phase(alpha: float, beta: float) -> str:
    """The phase of (alpha, beta) in the compute-optimal phase diagram of Paquette, Paquette, Xiao and
    Pennington 2024, "4+3 Phases of Compute-Optimal Neural Scaling Laws" (NeurIPS 2024): their phase
    diagram (the figure on p. 2), their table of the compute-optimal curves per phase (p. 8), and,
    below the high-dimensional line 2 alpha = 1, their section "Below the
    high-dimensional line (Phases IVa, IVb, Ib, Ic)" with one proposition per phase.

    =======  ===============================================  ================================
    phase    region (2 (alpha + beta) > 1 throughout)          the risk at the frontier is
    =======  ===============================================  ================================
    Ia       2 beta < 1, 2 alpha > 1                           F_pp + F_0
    Ib       2 beta < 1, 2 alpha < 1                           F_pp + F_0
    Ic       2 beta > 1, 4 alpha < 1                           F_pp + F_0
    II       2 beta > 1, 2 alpha > 1, beta < alpha             F_pp + F_ac + F_0
    III      2 beta > 1, 2 alpha > 1, beta > alpha             F_ac + F_0 + K_pp
    IVa      2 beta > 1, 1 - 1/sqrt(2) < alpha < 1/2           F_0 + K_pp
    IVb      2 beta > 1, 1/4 < alpha < 1 - 1/sqrt(2)           F_pp + K_pp
    =======  ===============================================  ================================

    The terms (the paper's table of their large-d behaviour, p. 4; tau = gamma k the SGD time,
    gamma ~ 1 / tr K the learning rate, so gamma ~ 1 for 2 alpha > 1 and gamma ~ d^(2 alpha - 1)
    below the high-dimensional line, where v grows with d): F_pp(tau) ~ tau^(-(2 alpha + 2 beta - 1)
    / (2 alpha)) the target's power-law part not yet learned; F_ac(tau, d) ~ d^-1 tau^(-1 + 1 /
    (2 alpha)) (2 beta > 1, 2 alpha > 1) the target's weight spread by the random embedding over all
    of K's spectrum (0 for 2 beta < 1; for 2 alpha < 1 the same density cut off at K's smallest
    eigenvalues ~ d^(-2 alpha) gives a plateau of the size of F_0, which moves no exponent); F_0(d) ~
    d^(-2 alpha + max(0, 1 - 2 beta)) the irreducible risk (the model's capacity); K_pp(tau) ~ gamma
    tau^(-2 + 1/(2 alpha)) the SGD noise (the early risk passed on by the Volterra kernel, whose size
    sum_j lambda_j^2 stops converging at alpha = 1/4), which wins over F_pp for beta > alpha.  Each
    line is where the ordering of two terms changes: 2 beta = 1 (F_ac appears, F_0 changes form),
    2 alpha = 1 (gamma starts to fall with d), beta = alpha (K_pp against F_pp), alpha = 1/4 (the
    kernel's size) and alpha = 1 - 1/sqrt(2), the root of 2 alpha^2 - 4 alpha + 1 where K_pp at a
    fixed budget stops growing with d (:func:`frontier_exponents`).

    Checked against the paper: the regions and dominant terms of Ib ("Phase Ib: 2 beta < 1, 1/4 <
    alpha < 1/2, 2 (alpha + beta) > 1", P ~ F_pp + F_0, proved for alpha > 1/4 and believed below)
    and of Ic ("Phase Ic: 2 beta > 1, 0 < alpha < 1/4", P ~ F_pp + F_0, stated under the assumption
    that their Theorem 5.1, the kernel bounds, extends to alpha < 1/4), as quoted from the two
    propositions; the section's list of the four phases below the line; the horizontal cut at
    alpha = 0.7 passing through Ia, II and III as beta grows (panel (b) of their figure of the
    exponents over the (alpha, beta) plane, p. 5).  The lines
    alpha = 1/4 between Ic and IVb and alpha = 1 - 1/sqrt(2) between IVb and IVa are where the
    exponents of the four terms above change order (the brute-force minimisation in the tests
    finds them); the paper's own statement of the IVa and IVb propositions was not readable in any
    source at hand.  Points on a boundary line go to the first phase of the table whose closed
    inequalities they satisfy; the exponents are continuous across every line but
    alpha = 1 - 1/sqrt(2).

    Raises:
        ValueError: if 2 (alpha + beta) <= 1.
    """
    alpha, beta = _check_phase_args(alpha, beta)
    if 2.0 * beta <= 1.0:
        return "Ia" if 2.0 * alpha >= 1.0 else "Ib"
    if 4.0 * alpha <= 1.0:
        return "Ic"
    if 2.0 * alpha >= 1.0:
        return "II" if beta <= alpha else "III"
    return "IVa" if alpha >= ALPHA_IV else "IVb"


@validate(alpha=_ALPHA, beta=_BETA)
def frontier_exponents(alpha: float, beta: float) -> tuple[float, float]:
    """The compute-optimal exponents (xi, eta) of the PLRF under one-pass SGD: d*(F) ~ F^xi and
    P(F / d*, d*) ~ F^-eta as the FLOP budget F = d x B x steps grows (B fixed, learning rate a fixed
    fraction of the stable one, ~ 1 / tr K), by phase (:func:`phase`); Paquette, Paquette, Xiao and
    Pennington 2024, "4+3 Phases of Compute-Optimal Neural Scaling Laws" (NeurIPS 2024), their table
    of the compute-optimal curves per phase (p. 8) and the propositions behind it.  Writing a = alpha,
    b = beta and s = 2a + 2b - 1 (s / (2a) is F_pp's exponent in time):

    =====  ===========================  ===================================  ===========  ===============
    phase  xi                           eta                                  trade-off    checked against
    =====  ===========================  ===================================  ===========  ===============
    Ia     1 / (2a + 1)                 s / (2a + 1)                         F_pp = F_0   (2)
    Ib     1 / 2                        s / 2                                F_pp = F_0   (1), (2)
    Ic     s / (2 (3a + 2b - 1 - 2ab))  a s / (3a + 2b - 1 - 2ab)            F_pp = F_0   (1), (2)
    II     b / (a + b)                  s / (2 (a + b))                      F_pp = F_ac  (2), (3)
    III    1 / 2                        1 - 1 / (4a)                         K_pp = F_ac  (2), (3)
    IVa    1 / 2                        a                                    K_pp = F_0   none
    IVb    (b - a) / (2b - a - 2ab)     (1 - 2a) s / (2 (2b - a - 2ab))      F_pp = K_pp  none
    =====  ===========================  ===================================  ===========  ===============

    How a row follows from the four terms of :func:`phase` (k = F / (d B) steps, tau = gamma k, so
    tau = F / d above the high-dimensional line and d^(2a - 2) F below it): at a fixed budget F_pp
    grows with d, F_0 and F_ac fall, and K_pp grows for a > 1 - 1/sqrt(2) and falls below (its
    exponent in d is 4 - 2a - 1/a below the line); the optimum is where the largest growing term
    meets the largest falling one, and setting two power laws of (d, F) equal gives the row.  The
    table is also checked against a brute-force minimisation of the sum of the four terms (tests).

    What was checked, and against what.  The paper's table itself could not be read (no copy of the
    paper past its first page was reachable); each row is checked against what could be:

    (1) the paper's propositions for Ib and Ic (quoted in :func:`phase`): P ~ F_pp + F_0 in the
        stated regions, whose balance with F_0 ~ d^-s (Ib) or d^(-2a) (Ic) is the row;
    (2) the authors' public working code (the GitHub repository LosVolterrosHermanos/Experimental,
        its notebook of approximate SGD loss curves), which draws the compute-optimal curve of six
        points, (a, b) = (0.75, 0.25), (1.25, 0.75), (1, 2), (0.25, 2), (0.33, 0.45), (0.45, 0.33),
        as the corner of two power laws c (F / d)^-g d^-p with the trade-offs of this table (for II
        in closed form, d* ~ F^(b / (a + b))): its formulas, general in (a, b), are rows Ia, Ib, Ic,
        II and III (its Ic point is on the Ic / IVb line a = 1/4, where the two rows agree);
    (3) the paper's comparison of a measured loss exponent, 0.648, with its theory, 0.643, on the
        II / III boundary, as reported by a summary of the paper's figures that does not give the
        point (the weakest check): 0.643 = 9/14 = 1 - 1/(4a) at a = b = 0.7 (the a of the paper's
        horizontal cut), the value of both II and III there.

    IVa and IVb are this derivation's only: no statement of the paper or of the authors' code for
    them could be read.  The paper reports a region of universal d* ~ F^(1/2) (independent of a and
    b); here that is Ib, III and IVa (which phases the paper's region covers could not be read).  The
    exact risks agree with rows Ia, II and III at d <= 4096 and approach
    Ib, Ic, IVa and IVb slowly (:func:`plrf_frontier`).

    On the line a = 1 - 1/sqrt(2) K_pp does not depend on d: eta is continuous, xi jumps from 1/2 to
    the IVb value (every d in between is optimal to leading order).  Phase Ia is the noiseless
    balance of F_pp against the capacity F_0 alone; in II and III that balance (xi = s / (s + 4 a^2))
    is wrong, e.g. 0.375 instead of 0.412 at alpha = 1, beta = 0.7.  These are limits of large d and
    F; how far the exact frontier is from them at d <= 4096 is given in :func:`plrf_frontier`.

    Returns:
        ``(xi, eta)``.

    Raises:
        ValueError: if 2 (alpha + beta) <= 1.
    """
    alpha, beta = _check_phase_args(alpha, beta)
    ph = phase(alpha, beta)
    s = 2.0 * alpha + 2.0 * beta - 1.0
    if ph == "Ia":
        return 1.0 / (2.0 * alpha + 1.0), s / (2.0 * alpha + 1.0)
    if ph == "Ib":
        return 0.5, 0.5 * s
    if ph == "Ic":
        den = 3.0 * alpha + 2.0 * beta - 1.0 - 2.0 * alpha * beta
        return s / (2.0 * den), alpha * s / den
    if ph == "II":
        return beta / (alpha + beta), s / (2.0 * (alpha + beta))
    if ph == "III":
        return 0.5, 1.0 - 1.0 / (4.0 * alpha)
    if ph == "IVa":
        return 0.5, alpha
    den = 2.0 * beta - alpha - 2.0 * alpha * beta
    return (beta - alpha) / den, (1.0 - 2.0 * alpha) * s / (2.0 * den)



# ----------------------------------------------------------------------------------------------
# the compute-optimal frontier
# ----------------------------------------------------------------------------------------------
def _isoflop_minimum(log_d, losses):
    """argmin over log d of one iso-FLOP slice (finite values): the grid minimum refined by the
    parabola through it and its two neighbours (in log d, log loss); the grid end if it is there."""
    i = int(np.argmin(losses))
    if i == 0 or i == losses.size - 1 or not np.all(np.isfinite(losses[i - 1 : i + 2])):
        return log_d[i], float(losses[i]), i in (0, losses.size - 1)
    x, y = log_d[i - 1 : i + 2], np.log(losses[i - 1 : i + 2])
    a, b, c = np.polyfit(x, y, 2)
    xm = float(np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else float(x[1])
    return xm, float(math.exp(np.polyval([a, b, c], xm))), False


@validate(losses=Array(2), model_sizes=Array(1, low=0.0, low_open=True), flops=Array(1, low=0.0, low_open=True))
def compute_optimal_frontier(losses, model_sizes, flops) -> xr.Dataset:
    """The compute-optimal frontier of a table of losses, and its power-law exponents.

    For each budget F (a column of ``losses``) the iso-FLOP slice L(d; F) is minimised over the
    model sizes (grid minimum refined by a parabola in (log d, log L)); d*(F) and L*(F) = L(d*; F)
    are then fitted as d* ~ F^xi and L* ~ F^-eta by least squares in log-log over the budgets whose
    minimum is inside the grid (not at an end).

    Args:
        losses: ``(n_sizes, n_flops)`` loss of model size d_i at budget F_j (``inf`` allowed).
        model_sizes: ``(n_sizes,)`` increasing.
        flops: ``(n_flops,)`` increasing.

    Returns:
        Dataset over ``flops``: ``d_opt``, ``loss_opt`` and ``at_grid_end`` (bool); attrs ``xi`` and
        ``eta`` (NaN if fewer than two interior minima) and ``n_fit``.
    """
    L = np.asarray(losses, dtype=np.float64)
    ds, fs = np.asarray(model_sizes, dtype=np.float64), np.asarray(flops, dtype=np.float64)
    if L.shape != (ds.size, fs.size):
        raise ValueError(f"`losses` must have shape (len(model_sizes), len(flops)) = ({ds.size}, {fs.size}); "
                         f"got {L.shape}.")
    if np.any(np.isnan(L)) or np.any(L <= 0):
        raise ValueError("`losses` must be > 0 (inf allowed), without NaN.")
    log_d = np.log(ds)
    d_opt, loss_opt, edge = np.empty(fs.size), np.empty(fs.size), np.zeros(fs.size, dtype=bool)
    for j in range(fs.size):
        xm, lm, edge[j] = _isoflop_minimum(log_d, L[:, j])
        d_opt[j], loss_opt[j] = math.exp(xm), lm
    ok = ~edge & np.isfinite(loss_opt)
    xi = eta = math.nan
    if ok.sum() >= 2:
        xi = float(np.polyfit(np.log(fs[ok]), np.log(d_opt[ok]), 1)[0])
        eta = -float(np.polyfit(np.log(fs[ok]), np.log(loss_opt[ok]), 1)[0])
    ds_out = xr.Dataset({"d_opt": ("flops", d_opt), "loss_opt": ("flops", loss_opt), "at_grid_end": ("flops", edge)},
                        coords={"flops": fs})
    ds_out.attrs.update(xi=xi, eta=eta, n_fit=int(ok.sum()))
    return ds_out


@validate(alpha=_ALPHA, beta=_BETA, model_sizes=Array(1, low=1.0), flops=Array(1, low=0.0, low_open=True),
          v=Maybe(_SIZE), batch_size=BATCH_SIZE, lr_fraction=Real(0.0, 1.0, low_open=True), seed=SEED,
          spectrum=Options(*SPECTRA))
def plrf_frontier(alpha: float, beta: float, model_sizes, flops, *, v: int | None = None, batch_size: float = 1.0,
                  lr_fraction: float = 0.5, seed: int = 0, spectrum: str = "auto") -> xr.Dataset:
    """The PLRF's compute-optimal frontier under SGD, exactly: F = d x B x steps.

    For each model size d a :class:`PowerLawRF` is trained by SGD at batch size B with
    ``lr_fraction`` of its largest stable constant learning rate (~ 1 / tr K at B = 1, as in
    Paquette et al. 2024); its exact risk at k = F / (d B) steps (rounded down) gives the table
    L(d; F), and :func:`compute_optimal_frontier` the frontier and the fitted exponents.

    Theory (attrs ``phase``, ``xi_theory``, ``eta_theory``): the phase of (alpha, beta) and its
    exponents d* ~ F^xi, P* ~ F^-eta from :func:`phase` and :func:`frontier_exponents` (Paquette,
    Paquette, Xiao and Pennington 2024, "4+3 Phases of Compute-Optimal Neural Scaling Laws", the
    table of the compute-optimal curves per phase).  They are large-d limits.  Measured (``spectrum="deterministic"``, d = 32...4096 on 13 sizes,
    v = 8192, or v = 2d for 2 alpha < 1; B = 1, half the stable rate; 81 budgets F = 1e3...3e16; the
    local exponents xi / eta over the budgets whose d* lies in 40-320, 120-960 and 400-3200):

    ===========  =====  =============  =============  =============  =============
    alpha, beta  phase  theory         d* 40-320      d* 120-960     d* 400-3200
    ===========  =====  =============  =============  =============  =============
    1.0, 0.3     Ia     0.333 / 0.533  0.355 / 0.518  0.344 / 0.525  0.334 / 0.533
    1.0, 0.7     II     0.412 / 0.706  0.420 / 0.696  0.411 / 0.702  0.405 / 0.706
    1.5, 1.0     II     0.400 / 0.800  0.366 / 0.818  0.370 / 0.813  0.377 / 0.808
    1.0, 1.5     III    0.500 / 0.750  0.516 / 0.793  0.511 / 0.778  0.506 / 0.766
    0.4, 0.3     Ib     0.500 / 0.200  0.574 / 0.153  0.531 / 0.172  0.514 / 0.182
    0.4, 0.8     IVa    0.500 / 0.400  0.638 / 0.365  0.618 / 0.384  0.604 / 0.400
    0.27, 0.8    IVb    0.590 / 0.292  0.675 / 0.219  0.619 / 0.243  0.608 / 0.258
    0.2, 0.8     Ic     0.568 / 0.227  0.597 / 0.147  0.569 / 0.164  0.572 / 0.177
    ===========  =====  =============  =============  =============  =============

    Every row moves towards its theory as d* grows.  Above the high-dimensional line (Ia, II, III)
    the last window is within the finite-size deviation the four-term risk has itself at d* ~ 100
    (the noiseless Phase-I balance xi = s / (s + 4 alpha^2) would give 0.375 / 0.750 and
    0.308 / 0.923 for the two Phase II points: ruled out).  Below it (2 alpha < 1) the frontier is
    not yet at the theory at these sizes: SGD's time before the smallest eigenvalue is learned,
    tau < d^(2 alpha), spans under three decades, and in Ic and IVb the optimum sits at
    tau* ~ d^0.16-0.24, a few units of SGD time; at IVa, F_pp, F_0 and K_pp are within a factor 2 of
    each other at d = 2048, so xi is still near the F_pp = F_0 balance (0.60).

    Args:
        alpha, beta: the data and target exponents.
        model_sizes: ``(n_sizes,)`` increasing whole numbers d.
        flops: ``(n_flops,)`` increasing budgets F.
        v: the data dimension of every model; default: 2 max(d) for 2 alpha > 1 (the risk has a
            v -> infinity limit, v hardly matters) and 2 d per model below the high-dimensional line
            2 alpha <= 1, where the risk depends on v through tr K ~ v^(1 - 2 alpha) and the paper's
            phases assume v / d fixed.
        batch_size: B; lr_fraction: the learning rate's fraction of the largest stable one.
        seed: the features' seed; spectrum: as :class:`PowerLawRF` (``"deterministic"`` for sizes
            beyond a few thousand).

    Returns:
        The frontier (:func:`compute_optimal_frontier`) with the table ``loss`` over
        (``n_features``, ``flops``) and attrs ``phase``, ``xi_theory``, ``eta_theory`` (NaN where
        2 (alpha + beta) <= 1), ``v`` (the largest data dimension) and ``v_per_d`` (2.0 when v grows
        with d, 0.0 when fixed).
    """
    ds = np.asarray(model_sizes, dtype=np.float64)
    if np.any(ds != np.round(ds)) or np.any(np.diff(ds) <= 0):
        raise ValueError("`model_sizes` must be increasing whole numbers.")
    fs = np.asarray(flops, dtype=np.float64)
    proportional = v is None and 2.0 * alpha <= 1.0
    vv = None if v is None else check_int("v", v, low=1)
    table = np.full((ds.size, fs.size), np.inf)
    for i, d in enumerate(ds.astype(np.int64)):
        vd = 2 * int(d) if proportional else (int(2 * ds[-1]) if vv is None else vv)
        model = PowerLawRF(alpha, beta, vd, int(d), seed=seed, spectrum=spectrum)
        opt = SGD(lr_fraction * model.stable_lr(SGD(1.0), batch_size))
        k = np.floor(fs / (d * batch_size)).astype(np.int64)
        valid = k >= 0
        uniq, inv = np.unique(k[valid], return_inverse=True)
        table[i, valid] = model.loss_curve(opt, batch_size, uniq).values[inv]
    out = compute_optimal_frontier(table, ds, fs)
    out["loss"] = (("n_features", "flops"), table)
    out = out.assign_coords(n_features=ds)
    if 2.0 * (alpha + beta) > 1.0:
        name, (xi_t, eta_t) = phase(alpha, beta), frontier_exponents(alpha, beta)
    else:
        name, xi_t, eta_t = "none", math.nan, math.nan
    attach_attrs(out, model=PowerLawRF.model_name, source="exact", alpha=alpha, beta=beta,
                 v=int(2 * ds[-1]) if vv is None else vv, v_per_d=2.0 if proportional else 0.0,
                 batch_size=float(batch_size), lr_fraction=lr_fraction, seed=seed, xi=out.attrs["xi"],
                 eta=out.attrs["eta"], n_fit=out.attrs["n_fit"], phase=name, xi_theory=xi_t, eta_theory=eta_t)
    return out
