"""The deep bootstrap in linear regression, exactly: population risk of SGD on a fixed training set
against SGD on fresh samples.

Nakkiran, Neyshabur and Sedghi (2021, "The Deep Bootstrap Framework: Good Online Learners are Good
Offline Generalizers", Section 2) split the test error of a model trained for k steps on n fixed
examples ("real world", offline) as

    TestError(f_k) = TestError(f_k^iid) + [TestError(f_k) - TestError(f_k^iid)],

where f_k^iid is trained for the same k steps with fresh examples at every step ("ideal world",
online); the bracket is the *bootstrap error*, which they find small until the training set is fit.
In linear regression both terms are exact.

Population (:class:`toymodels.GaussianLinearRegression`, its eigenbasis): x ~ N(0, Sigma),
Sigma = diag(lambda), t = w*.x + N(0, sigma^2), w_0 = 0.  A training set is n rows drawn from it,
X ``(n, d)``, y ``(n,)`` (:func:`training_set`), with least-squares solution w_ls (minimum norm) and
empirical covariance Sigma_hat = X^T X / n.  SGD on the set draws batches of B rows uniformly with
replacement; :class:`toymodels.FiniteLinearRegression` carries the exact moments m_k = E[e_k],
S_k = E[e_k e_k^T] of e = w - w_ls, the expectation over the batches *given the set*.  With
delta = w_ls - w*, the expected population excess risk of the offline run given the set is

    R_off(k) = 1/2 E[(w_k - w*)^T Sigma (w_k - w*) | set]
             = 1/2 [tr(Sigma S_k) + 2 delta^T Sigma m_k + delta^T Sigma delta],

its expected training loss L_off(k) = 1/2 tr(Sigma_hat S_k) + |y - X w_ls|^2 / (2n) (X^T (y - X w_ls) = 0
cancels the cross term), and the online risk R_on(k) is
:meth:`toymodels.GaussianLinearRegression.loss_curve` (fresh examples at every step).  The
bootstrap error is R_off(k) - R_on(k).  Risks are *excess* risks, as everywhere in the library: the
population risk of w is R + sigma^2 / 2, the number to set beside the training loss.

What is exact, and where the two worlds agree:

* step 0: w_0 = 0 in both, so R_off(0) = R_on(0) = w*^T Sigma w* / 2 for every set (to rounding:
  R_off is assembled from m, S and delta);
* step 1, given the set: they differ (the first update -a (X^T X w_0 - X^T y) / n is the set's, not
  the population's); averaged over the draw of the set, with batches drawn with replacement, the B
  rows of the first batch are n-sample draws that repeat with probability 1/n per pair, so the batch
  gradient's covariance is C (1 + (B - 1) / n) / B instead of C / B, C = sigma^2 Sigma +
  Sigma w* w*^T Sigma + (w*^T Sigma w*) Sigma the per-example gradient covariance at w_0:

      E_set R_off(1) = R_on(1) + a^2 (B - 1) / (2 B n) tr(Sigma C),

  equal for B = 1 and O(B / n) apart otherwise;
* later steps: the same rows return, the offline run fits the set (L_off falls to its floor) and
  R_off stalls at the risk of the set's least-squares fit (plus SGD's noise), while R_on keeps
  falling to the online noise floor.

:func:`deep_bootstrap` returns these curves for one seeded set, or their mean over ``n_sets`` sets
(seeds ``seed, seed + 1, ...``) with standard errors.

References:
    P. Nakkiran, B. Neyshabur and H. Sedghi, "The Deep Bootstrap Framework: Good Online Learners are
    Good Offline Generalizers", ICLR 2021, Section 2.
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism"
    ("Deep Bootstrap"), University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ._args import BATCH_SIZE, OPTIMIZER, SEED
from ._validate import Instance, Integer, Steps, check_bytes, check_steps, validate
from .finite_regression import MAX_CURVE_STEPS, FiniteLinearRegression
from .linreg import GaussianLinearRegression
from .nqm import check_batch_size
from .schema import attach_attrs

__all__ = ["training_set", "deep_bootstrap"]

MAX_SETS = 10**4  # training sets averaged in one call

_POPULATION = Instance(GaussianLinearRegression, what="a GaussianLinearRegression (the population)")
_N_TRAIN = Integer(1, 2**31)


@validate(population=_POPULATION, n_train=_N_TRAIN, seed=SEED)
def training_set(population: GaussianLinearRegression, n_train: int, *, seed: int = 0) -> FiniteLinearRegression:
    """n rows drawn from ``population`` with ``numpy.random.default_rng(seed)``: X ``(n_train, d)`` with
    rows x ~ N(0, diag(lambda)) (the population's eigenbasis), then y = X w* + sigma N(0, I_n); w_0 = 0.

    Raises:
        ValueError: the data or the d x d moments would exceed the memory limit
            (:data:`toymodels._validate.MAX_BYTES`).
    """
    d = population.dim
    check_bytes("n_train", 8.0 * n_train * d * 2, what=f"the {n_train} x {d} training set")
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_train, d)) * np.sqrt(population.h)
    y = X @ population.w_star + population.noise_std * rng.standard_normal(n_train)
    return FiniteLinearRegression(X, y)


def _offline_curves(data: FiniteLinearRegression, population: GaussianLinearRegression, lr: float,
                    batch_size: float, ks: np.ndarray, wd: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(risk, train_loss)`` at the sorted steps ``ks`` of SGD on ``data`` (constant ``lr``, weight
    decay ``wd``, batches of ``batch_size`` rows with replacement): the exact population excess risk R_off(k) and training
    loss L_off(k) given the set (module docstring), each ``(len(ks),)``; ``inf`` from the first
    step where the moments overflow.  O(n d^2) per step."""
    lam, dlt = population.h, data.w_ls - population.w_star
    e0 = data.w0 - data.w_ls
    m, S = e0.copy(), np.outer(e0, e0)
    risk, train = np.full(ks.size, math.inf), np.full(ks.size, math.inf)
    fixed = float(dlt @ (lam * dlt))
    j = 0
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(int(ks[-1]) + 1):
            if ks[j] == k:
                r = 0.5 * (float(np.sum(lam * np.diag(S))) + 2.0 * float(dlt @ (lam * m)) + fixed)
                t = 0.5 * float(np.sum(data.sigma * S)) + data.min_loss
                if not (math.isfinite(r) and math.isfinite(t)):
                    break
                risk[j], train[j] = r, t
                j += 1
                if j == ks.size:
                    break
            m, S = data._sgd_step(m, S, lr, batch_size, wd)
    return risk, train


@validate(population=_POPULATION, n_train=_N_TRAIN, optimizer=OPTIMIZER, batch_size=BATCH_SIZE,
          steps=Steps(MAX_CURVE_STEPS), n_sets=Integer(1, MAX_SETS), seed=SEED)
def deep_bootstrap(population: GaussianLinearRegression, n_train: int, optimizer, batch_size, steps, *,
                   n_sets: int = 1, seed: int = 0) -> xr.Dataset:
    """Online vs offline SGD in linear regression, both exact (Nakkiran et al. 2021's deep bootstrap).

    Args:
        population: the data distribution (and the test distribution).
        n_train: n, rows of the fixed training set.
        optimizer: :class:`toymodels.SGD` with a constant learning rate a, no preconditioning, and
            optionally ``weight_decay`` wd (coupled L2 decay, the same in both worlds: the online
            curve is the population's with that decay, the offline moments step
            m' = J m + c, J = (1 - a wd) I - a Sigma_hat, c = -a wd w_ls; see
            :class:`toymodels.FiniteLinearRegression`).
        batch_size: B >= 1, rows per step (offline: drawn uniformly with replacement from the set;
            online: fresh).
        steps: a count or an increasing array of step indices, at most 10^7 (every offline step is
            computed, O(n d^2) each).
        n_sets: 1 (default): the curves given the one set drawn by :func:`training_set` with
            ``seed``; more: their mean over the sets of seeds ``seed, ..., seed + n_sets - 1``, with
            standard errors over the sets (``*_sem``).
        seed: seed of the (first) training set.

    Returns:
        Dataset over ``step``: ``online_risk`` R_on(k) and ``offline_risk`` R_off(k) (expected
        population excess risks, label-noise floor sigma^2 / 2 not included), ``offline_train_loss``
        L_off(k) (training loss on the set, its floor included) and ``bootstrap_error``
        R_off - R_on; with ``n_sets`` > 1 also ``offline_risk_sem``, ``offline_train_loss_sem`` and
        ``bootstrap_error_sem``.  Attrs: the population's, ``n_train``, ``lr``, ``batch_size``,
        ``n_sets``, ``seed``, ``weight_decay``, ``noise_floor`` (sigma^2 / 2), ``diverged`` and ``reason`` (a run
        whose moments overflow is ``inf`` from there, never NaN).

    Raises:
        ValueError: ``optimizer`` is not constant-rate SGD without preconditioning.
    """
    FiniteLinearRegression._check_sgd(optimizer)
    lr = optimizer.lr.lr
    bs = check_batch_size(batch_size)
    ks = check_steps(steps, high=MAX_CURVE_STEPS)
    online = population.loss_curve(optimizer, bs, ks).values.astype(np.float64)
    risks, trains = np.empty((n_sets, ks.size)), np.empty((n_sets, ks.size))
    for i in range(n_sets):
        data = training_set(population, n_train, seed=seed + i)
        risks[i], trains[i] = _offline_curves(data, population, lr, bs, ks, optimizer.weight_decay)
    with np.errstate(invalid="ignore"):
        gaps = risks - online[None, :]
    diverged = not (np.all(np.isfinite(risks)) and np.all(np.isfinite(online)))
    reason = "diverges: the second moments overflowed (learning rate above the stable limit)" if diverged else ""
    with np.errstate(invalid="ignore", over="ignore"):
        fields = {"online_risk": online, "offline_risk": risks.mean(0), "offline_train_loss": trains.mean(0),
                  "bootstrap_error": gaps.mean(0)}
        if n_sets > 1:
            for name, v in (("offline_risk", risks), ("offline_train_loss", trains), ("bootstrap_error", gaps)):
                fields[f"{name}_sem"] = v.std(axis=0, ddof=1) / math.sqrt(n_sets)
    ds = xr.Dataset({k: ("step", v) for k, v in fields.items()}, coords={"step": ks})
    for v in ds.data_vars.values():
        v.values[~np.isfinite(v.values)] = math.inf
    attach_attrs(ds, model="linreg_bootstrap", source="exact", optimizer="sgd", lr=lr, batch_size=bs,
                 weight_decay=optimizer.weight_decay, n_train=n_train,
                 n_sets=n_sets, seed=seed, noise_floor=0.5 * population.noise_std**2, diverged=diverged, reason=reason,
                 **population.params)
    return ds
