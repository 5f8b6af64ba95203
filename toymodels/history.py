"""Gradient-history matrices of the toy models (Xie et al. 2023, Sec. 2 and App. A.1).

A gradient history G ``(T, P)`` holds T mini-batch gradients of P coordinates, one row per
iteration (Xie et al. write the transpose), the input of :func:`toymodels.tails.gradient_history_tests`
and of covariance spectra.  Two ways to collect it:

* at a fixed point (``lr=0``, as Xie do): the rows are i.i.d. draws at the same theta, with mean and
  covariance :func:`gradient_moments`;
* along an SGD trajectory (``lr > 0``): row t is drawn at theta_t and theta_{t+1} = theta_t - lr g_t,
  so the iterates are theta_t = theta_0 - lr sum_{s<t} G[s] (the final one
  ``theta_0 - lr * G.sum(axis=0)``).

The mini-batch gradient of each model, B examples drawn independently:

* :class:`~toymodels.NQM`: g = H theta + eps, eps ~ N(0, diag(c) / B);
  mean H theta, covariance diag(c) / B.
* :class:`~toymodels.GaussianLinearRegression` (sampled data, theta = w in Sigma's eigenbasis):
  g = X^T (X e - n) / B with the B rows of X ~ N(0, Sigma), n ~ N(0, sigma^2 I_B), e = w - w*;
  mean Sigma e, covariance (sigma^2 Sigma + Sigma e e^T Sigma + (e^T Sigma e) Sigma) / B
  (:meth:`~toymodels.GaussianLinearRegression.gradient_covariance`).  Drawn exactly in O(B + d)
  rather than O(B d): with X = Z Sigma^(1/2), u = Sigma^(1/2) e = r u_hat, a = Z u_hat and
  v = r a - n, Z^T v = u_hat (a . v) + Z_perp^T v, and Z_perp = Z (I - u_hat u_hat^T) is independent
  of a, so Z_perp^T v has the law of |v| (I - u_hat u_hat^T) w with w ~ N(0, I_d):
  g = Sigma^(1/2) [u_hat (a . v) + |v| (w - u_hat (u_hat . w))] / B.
* :class:`~toymodels.RandomFeatures` (theta = the second layer theta_2): the mean of the closed-form
  per-example gradients of B training examples drawn with replacement (as its ``train``); mean the
  full-batch gradient, covariance the population covariance of the per-example gradients / B.

Example:
    >>> from toymodels import NQM
    >>> nqm = NQM.power_law(100)
    >>> G = gradient_history(nqm, np.ones(100), batch_size=10, n_iter=500, seed=0)
    >>> G.shape
    (500, 100)

References:
    Z. Xie, Q.-Y. Tang, M. Sun and P. Li, "On the Overlooked Structure of Stochastic Gradients",
    NeurIPS 2023.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import MAX_EXACT_INT, Array, Instance, Integer, Real, check_bytes, check_int, check_real, validate
from .features import RandomFeatures
from .linreg import GaussianLinearRegression
from .nqm import NQM, check_batch_size

__all__ = ["gradient_history", "gradient_moments"]

_MODELS = (NQM, GaussianLinearRegression, RandomFeatures)
_MODEL = Instance(*_MODELS, what="an NQM, GaussianLinearRegression or RandomFeatures")
_BATCH = Real(1.0, float(MAX_EXACT_INT))
MAX_ITER = 10**8  # rows of one gradient history


def _dim(model) -> int:
    return model.student_hidden if isinstance(model, RandomFeatures) else model.dim


def _check(model, theta, batch_size):
    """Validated ``(theta, batch_size)``: theta a finite ``(P,)`` float64 copy; B real >= 1 for the NQM,
    an integer >= 1 for the sampled models."""
    if not isinstance(model, _MODELS):
        raise TypeError(f"`model` must be an NQM, GaussianLinearRegression or RandomFeatures; got {type(model).__name__}.")
    p = _dim(model)
    t = np.array(theta, dtype=np.float64)
    if t.shape != (p,) or not np.all(np.isfinite(t)):
        raise ValueError(f"`theta` must be a finite array of shape ({p},); got shape {t.shape}.")
    bs = check_batch_size(batch_size)
    if not isinstance(model, NQM):
        bs = check_int("batch_size", bs, low=1)
    return t, bs


def _draw_linreg(model, theta, batch_size, rng) -> np.ndarray:
    """X^T (X e - n) / B for B sampled examples, drawn in O(B + d) (module docstring)."""
    root = np.sqrt(model.h)
    u = root * (theta - model.w_star)
    r = float(np.linalg.norm(u))
    u_hat = u / r if r > 0 else np.eye(1, u.size)[0]  # any unit vector when e = 0
    a = rng.standard_normal(batch_size)
    v = r * a - model.noise_std * rng.standard_normal(batch_size)
    w = rng.standard_normal(u.size)
    return root * (u_hat * (a @ v) + np.linalg.norm(v) * (w - u_hat * (u_hat @ w))) / batch_size


def _draw(model, theta, batch_size, rng) -> np.ndarray:
    """One mini-batch gradient ``(P,)`` at ``theta`` (module docstring)."""
    if isinstance(model, NQM):
        return model.h * theta + math.sqrt(1.0 / batch_size) * np.sqrt(model.c) * rng.standard_normal(theta.size)
    if isinstance(model, GaussianLinearRegression):
        return _draw_linreg(model, theta, batch_size, rng)
    idx = rng.integers(0, model.n_train, size=batch_size)
    return model._grad_weights(theta, idx) @ model.phi[idx] / batch_size


@validate(model=_MODEL, theta=Array(1), batch_size=_BATCH, n_iter=Integer(1, MAX_ITER),
          lr=Real(0.0, math.inf, high_open=True), seed=Integer(0, 2**63 - 1))
def gradient_history(model, theta, *, batch_size, n_iter: int, lr: float = 0.0, seed: int = 0) -> np.ndarray:
    """``(T, P)`` mini-batch gradients of a toy model, at a fixed point or along SGD.

    Args:
        model: an :class:`~toymodels.NQM`, :class:`~toymodels.GaussianLinearRegression` or
            :class:`~toymodels.RandomFeatures`.
        theta: ``(P,)`` parameters theta_0 (P = ``model.dim``, or ``student_hidden`` for random features).
        batch_size: B, a real >= 1 for the NQM, an integer >= 1 for the sampled models.
        n_iter: T, the number of rows, in [1, 10^8] (and T x P floats within
            :data:`toymodels._validate.MAX_BYTES`).
        lr: 0 for i.i.d. rows at ``theta``; > 0 for the gradients along SGD from ``theta``
            (theta_{t+1} = theta_t - lr g_t).
        seed: seed of the numpy generator drawing every batch.

    Returns:
        float64 array ``(T, P)``, row t the gradient drawn at theta_t.

    Raises:
        TypeError: an unsupported model, or non-numeric arguments.
        ValueError: ``theta`` of the wrong shape or non-finite; B, T, lr or seed out of range; a
            trajectory that overflows (lower ``lr``).
    """
    theta, bs = _check(model, theta, batch_size)
    n_iter = check_int("n_iter", n_iter, low=1)
    check_bytes("n_iter", 8.0 * n_iter * theta.size, what=f"the {n_iter} x {theta.size} history")
    lr = check_real("lr", lr, low=0.0, high=math.inf, high_open=True)
    rng = np.random.default_rng(check_int("seed", seed, low=0))
    G = np.empty((n_iter, theta.size))
    with np.errstate(over="ignore", invalid="ignore"):  # a divergent trajectory is reported below
        for t in range(n_iter):
            G[t] = _draw(model, theta, bs, rng)
            if lr:
                theta -= lr * G[t]
    if not np.all(np.isfinite(G)):
        raise ValueError(f"the SGD trajectory diverged (non-finite gradients) with `lr`={lr:g}; lower `lr`.")
    return G


@validate(model=_MODEL, theta=Array(1), batch_size=_BATCH)
def gradient_moments(model, theta, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean ``(P,)`` and covariance ``(P, P)`` of one mini-batch gradient at ``theta``.

    The covariance is the per-example one divided by B (independent examples; drawn with replacement
    for random features), see the module docstring.  Arguments as in :func:`gradient_history`.

    Raises:
        TypeError, ValueError: as :func:`gradient_history`.
    """
    theta, bs = _check(model, theta, batch_size)
    check_bytes("theta", 8.0 * theta.size**2 * 3, what=f"the {theta.size} x {theta.size} covariance")
    if isinstance(model, NQM):
        return model.h * theta, np.diag(model.c / bs)
    if isinstance(model, GaussianLinearRegression):
        parts = model.gradient_covariance(theta)
        return parts["mean"], (parts["label"] + parts["batch"]) / bs
    per_example = model.per_example_grads(theta)
    return per_example.mean(axis=0), np.cov(per_example, rowvar=False, bias=True) / bs
