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
lambda_i = s_i^2 and teacher Q^T theta* = S^-1 P^T c, so lambda_i (Q^T theta*)_i^2 = (P^T c)_i^2.
Directions in K's null space (d > v) are never moved by a gradient z (z^T theta - y) and hold no
part of theta*: they are left out.  The risk is the regression's excess risk plus the irreducible
risk sigma^2 / 2,

    P(theta) = 1/2 (theta - theta*)^T K (theta - theta*) + sigma^2 / 2,

and this model reports P (the paper's risk, which includes the approximation error that the
compute-optimal trade-off is about).  Every exact method delegates to the regression's moment
recursion (:mod:`toymodels.linreg`; closed form for SGD) and adds sigma^2 / 2; the SVD of the
``(v, d)`` matrix D^(1/2) W costs O(v d min(v, d)) once (a few seconds at d = v = 4000), and is
used rather than an eigendecomposition of K because it resolves eigenvalues down to
eps * s_max * s_i instead of eps * s_max^2.

References:
    E. Paquette, C. Paquette, L. Xiao and J. Pennington, "4+3 Phases of Compute-Optimal Neural
    Scaling Laws", NeurIPS 2024 (arXiv:2405.15074), Sec. 1 (the problem setup) and Sec. 2.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import xarray as xr

from . import dynamics
from ._args import (BATCH_SIZE, BATCH_SIZES, MAYBE_LR, MC_STEPS, N_RUNS, OPTIMIZER, PROGRESS, SEED, STEP, STEPS,
                    TARGET)
from ._validate import (MAX_STEPS, Array, Boolean, Integer, Maybe, Real, check_bytes, check_int, check_real,
                        check_steps, validate)
from .linreg import GaussianLinearRegression
from .montecarlo import mc_stats_dataset
from .nqm import _check_optimizer, _check_target
from .optimizers import EMA, SGD, Momentum
from .schema import attach_attrs

__all__ = ["PowerLawRF"]

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
    """

    model_name = "plrf"

    @validate(alpha=_ALPHA, beta=_BETA, v=_SIZE, d=_SIZE, seed=SEED)
    def __init__(self, alpha: float, beta: float, v: int, d: int, *, seed: int = 0):
        self.alpha = check_real("alpha", alpha, low=0.0, high=50.0, low_open=True)
        self.beta = check_real("beta", beta, low=0.0, high=50.0)
        self.v = check_int("v", v, low=1)
        self.d = check_int("d", d, low=1)
        self.seed = check_int("seed", seed, low=0)
        check_bytes("d", 8.0 * 3 * self.v * self.d, what=f"the {self.v} x {self.d} features and their SVD")
        W = np.random.default_rng(self.seed).standard_normal((self.v, self.d)) / math.sqrt(self.d)
        self._setup(W)

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
        self.seed = -1
        self._setup(W.copy())
        return self

    def _setup(self, W):
        j = np.arange(1, self.v + 1, dtype=np.float64)
        self._sqrt_cov = j**-self.alpha  # D^(1/2)
        self.features = W
        self.target = j**-self.beta
        self._c = self._sqrt_cov * self.target  # c = D^(1/2) b
        self._M = self._sqrt_cov[:, None] * W  # D^(1/2) W, so P(theta) = |M theta - c|^2 / 2
        P, s, _ = scipy.linalg.svd(self._M, full_matrices=False, check_finite=False, lapack_driver="gesdd")
        keep = s > (s[0] if s.size else 0.0) * max(self.v, self.d) * np.finfo(np.float64).eps
        P, s = P[:, keep], s[keep]
        if s.size == 0:
            raise ValueError("`features` must not be zero: K = W^T D W has no nonzero eigenvalue.")
        pc = P.T @ self._c
        resid = self._c - P @ pc
        # rank v: the features span R^v and the residual is zero but for rounding
        self.irreducible_risk = 0.0 if s.size == self.v else 0.5 * float(resid @ resid)
        self.regression = GaussianLinearRegression(s**2, pc / s, math.sqrt(2.0 * self.irreducible_risk))

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
        """The attrs of the model's results: ``alpha``, ``beta``, ``v``, ``d``, ``seed``,
        ``initial_loss`` and ``irreducible_risk``."""
        return {"alpha": self.alpha, "beta": self.beta, "v": self.v, "d": self.d, "seed": self.seed,
                "initial_loss": self.initial_loss, "irreducible_risk": self.irreducible_risk}

    @validate(theta=Array(1))
    def risk(self, theta) -> float:
        """P(theta) = |D^(1/2) (W theta - b)|^2 / 2 for parameters ``theta`` ``(d,)``."""
        t = np.asarray(theta, dtype=np.float64)
        if t.shape != (self.d,) or not np.all(np.isfinite(t)):
            raise ValueError(f"`theta` must be a finite array of shape ({self.d},); got shape {t.shape}.")
        r = self._M @ t - self._c
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

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, k=STEP, lr=MAYBE_LR)
    def loss_at_step(self, optimizer, batch_size, k: int, lr: float | None = None) -> float:
        """Exact expected risk at step k for a constant learning rate (the spec's or ``lr``), as
        :meth:`toymodels.GaussianLinearRegression.loss_at_step` plus the irreducible risk."""
        return self.regression.loss_at_step(optimizer, batch_size, k, lr=lr) + self.irreducible_risk

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, lr=MAYBE_LR)
    def modal_form(self, optimizer, batch_size, lr: float | None = None) -> dynamics.ModalForm:
        """SGD's closed-form risk curve as a :class:`toymodels.dynamics.ModalForm` (what the sweeps of
        :mod:`toymodels.sweep` tune on): the regression's modes and one constant mode holding the
        irreducible risk.  Raises NotImplementedError for optimizers other than SGD."""
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
        (1/B) sum z (z^T theta - y); the risk of each run is P(theta) computed exactly.

        Supports SGD and heavy-ball Momentum (without preconditioning) and EMA of either; the
        learning rate may be any schedule.  Cost O(n_runs x B x v x d) per update.

        Returns:
            Dataset over ``step``: ``loss`` (mean of P over runs) and ``loss_sem``;
            ``source="simulation"``; runs that overflow make the values ``inf`` from there on.
        """
        _check_optimizer(optimizer)
        base = optimizer.base if isinstance(optimizer, EMA) else optimizer
        if not isinstance(base, (SGD, Momentum)) or base.precond != 0.0:
            raise NotImplementedError("simulate runs SGD, Momentum and their EMA, without preconditioning.")
        bs = check_int("batch_size", batch_size, low=1)
        ks = check_steps(steps, high=10**8)
        n_runs = check_int("n_runs", n_runs, low=2)
        rng = np.random.default_rng(check_int("seed", seed, low=0))
        check_bytes("n_runs", 8.0 * n_runs * bs * (self.v + self.d), what=f"one update's {n_runs} x {bs} examples")
        n = int(ks[-1])
        lrs = optimizer.lr.values(n)
        beta = base.beta if isinstance(base, Momentum) else 0.0
        decay = optimizer.decay if isinstance(optimizer, EMA) else None
        theta = np.zeros((n_runs, self.d))
        vel = np.zeros_like(theta)
        avg = np.zeros_like(theta)
        M, c = self._M, self._c
        loss = np.empty((ks.size, n_runs))
        rec = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for k in range(n + 1):
                if k == ks[rec]:
                    at = avg if decay is not None else theta
                    r = at @ M.T - c
                    loss[rec] = 0.5 * np.einsum("ij,ij->i", r, r)
                    rec += 1
                    if rec == ks.size:
                        break
                g = rng.standard_normal((n_runs, bs, self.v))  # x = D^(1/2) g
                z = g @ M  # (runs, B, d): z = W^T x
                err = np.einsum("rbd,rd->rb", z, theta) - g @ c
                grad = np.einsum("rb,rbd->rd", err, z) / bs
                vel = beta * vel - lrs[k] * grad
                theta = theta + vel
                if decay is not None:
                    avg = decay * avg + (1.0 - decay) * theta
        bad = ~np.isfinite(loss).all(axis=1)
        first = int(np.argmax(bad)) if bad.any() else None
        ds = mc_stats_dataset(ks, loss, {}, n_runs, first)
        attach_attrs(ds, model=self.model_name, source="simulation", batch_size=float(bs), n_runs=n_runs,
                     mc_seed=int(seed), diverged=first is not None, **self.params, **optimizer.hyperparameters)
        return ds
