"""An NQM fitted to a network (Zhang et al. 2019's calibration; Grosse's CSC 2541 Lecture 7, "Noisy
Quadratic Model: Empirical Results"), and its predicted steps-to-target curve beside the measured one.

At a point of training, on a batch ``(x, y)``:

* curvature: the top-k Hessian eigenpairs (h_i, v_i) by Lanczos; beyond k a power law
  h_i = h_1 i^-p fitted to the top-k (log-log least squares over ranks) extends the spectrum to
  ``dim`` modes;
* noise: c_i = v_i^T C v_i, C the per-example gradient covariance, along the same directions,
  extended by its own power law;
* initial distance: for a quadratic the full-batch gradient is H theta, so E[theta_i^2] =
  (v_i . g)^2 / h_i^2 along the top directions;
* the tail carries what the top directions leave of the measured totals: the noise power law is
  scaled so that sum_i c_i = tr C (the per-example covariance trace), and the tail's distance is
  one value theta^2 with sum_tail h_i^2 theta^2 = |g|^2 - sum_top (v_i . g)^2, the gradient outside
  the top directions.

The fit quality is reported (R^2 of both log-log fits, the tail's share of tr H, of the gradient
and of the noise).  Predicted steps
come from :func:`toymodels.sweep.batch_size_sweep` on the fitted NQM; ``calibrate=(batch_size,
steps)`` rescales them by one measured point, as the NQM paper does, and reports the factor.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import xarray as xr

from toymodels import NQM
from toymodels.sweep import FAMILIES, batch_size_sweep

from . import _validate as checks
from . import hessian, pergrad
from ._validate import Boolean, Constraint, Instance, Integer, LossFn, Maybe, Module, Options, Real, SequenceOf, validate
from .pergrad import X, Y

MAX_DIM = 10**8  # modes of a fitted NQM
_BYTES_PER_MODE = 128  # float64 arrays of the fit and of the NQM (about 16 of them)

__all__ = ["FittedNQM", "fit_nqm", "fit_linreg", "predict_steps"]


@dataclass
class FittedNQM:
    """The fitted model and how well it fits."""

    nqm: NQM
    curvature_top: np.ndarray
    noise_top: np.ndarray
    init_sq_top: np.ndarray
    report: dict = field(default_factory=dict)


def _power_law(values):
    """(scale, power, R^2) of values_i ~ scale i^-power over ranks i = 1..k (positive values only)."""
    v = np.asarray(values, dtype=np.float64)
    ranks = np.arange(1, v.size + 1)
    ok = v > 0
    if ok.sum() < 2:
        return float(v[ok][0]) if ok.any() else 0.0, 0.0, float("nan")
    X = np.log(ranks[ok])
    Y = np.log(v[ok])
    slope, icpt = np.polyfit(X, Y, 1)
    resid = Y - (icpt + slope * X)
    r2 = 1.0 - float(resid @ resid) / max(float(((Y - Y.mean()) ** 2).sum()), 1e-300)
    return float(np.exp(icpt)), float(-slope), r2


@validate(model=Module(finite=True), loss_fn=LossFn(), x=X, y=Y, k=Integer(1, checks.MAX_WIDTH),
          dim=Maybe(Integer(1, MAX_DIM)), seed=checks.Seed(), tol=Real(0, 1))
def fit_nqm(model, loss_fn, x, y, *, k: int = 20, dim: int | None = None, seed: int = 0, tol: float = 1e-8) -> FittedNQM:
    """Fit an NQM to ``model`` at its current parameters from the batch ``(x, y)``.

    Args:
        k: Hessian eigenpairs measured (fewer than the number of parameters).
        dim: modes of the fitted NQM (default: the number of parameters), at most 10**8 and what
            fits in memory (about 128 bytes per mode, checked first); the modes beyond k follow the
            power laws.
        seed, tol: Lanczos start vector and accuracy.

    Returns:
        :class:`FittedNQM` with ``report``: ``curvature_power``, ``curvature_r2``, ``noise_power``,
        ``noise_r2``, ``tail_share`` (share of tr H in the extrapolated tail), ``tail_gradient_share``
        and ``tail_noise_share`` (shares of |g|^2 and tr C outside the top directions, which the tail
        carries when ``dim`` > k), ``n_negative`` (top eigenvalues <= 0, dropped).
    """
    pergrad.check_inputs(model, loss_fn, x, y, min_batch=2)
    hessian._check_k(model, k)
    n_modes = checks.n_trainable(model) if dim is None else dim
    checks.check_bytes("dim", float(_BYTES_PER_MODE) * n_modes, f"the {n_modes} modes of the fitted NQM",
                  remedy="Give a smaller `dim`.")
    pergrad.check_grad_memory(model, x, copies=3.0)
    h, V = hessian.top_eigenpairs(model, loss_fn, x, y, k, tol=tol, seed=seed)
    dim = n_modes
    keep = h > 0
    n_negative = int((~keep).sum())
    if not keep.any():
        raise ValueError("no positive Hessian eigenvalue among the top k: the point is not near a minimum.")
    h, V = h[keep], V[torch.as_tensor(keep, device=V.device)]
    G = pergrad.flatten(pergrad.per_example_grads(model, loss_fn, x, y)).to(V.dtype)
    g = G.mean(0)
    proj = (G - g) @ V.T
    c = (proj**2).mean(0).cpu().double().numpy()
    init_sq = ((V @ g).cpu().double().numpy() / h) ** 2
    # what the top directions leave of the gradient and of the noise
    g_sq = float(checks.to_float64(g @ g))
    g_rest = max(g_sq - float((checks.to_float64(V @ g) ** 2).sum()), 0.0)
    tr_cov = float(checks.to_float64(((G - g) ** 2).sum(1).mean()))
    c_rest = max(tr_cov - float(c.sum()), 0.0)
    kk = h.size
    if dim > kk:
        h1, ph, r2h = _power_law(h)
        c1, pc, r2c = _power_law(c)
        ranks = np.arange(kk + 1, dim + 1, dtype=np.float64)
        h_tail = h1 * ranks**-ph
        c_shape = np.maximum(c1 * ranks**-pc, 0.0)
        c_tail = c_shape * (c_rest / c_shape.sum()) if c_shape.sum() > 0 else np.full(ranks.size, c_rest / ranks.size)
        h_all = np.concatenate([h, h_tail])
        c_all = np.concatenate([c, c_tail])
        s_all = np.concatenate([init_sq, np.full(ranks.size, g_rest / float(np.sum(h_tail**2)))])
    else:
        h_all, c_all, s_all = h[:dim], c[:dim], init_sq[:dim]
        (_, ph, r2h), (_, pc, r2c) = _power_law(h), _power_law(c)
    report = {"curvature_power": ph, "curvature_r2": r2h, "noise_power": pc, "noise_r2": r2c,
              "tail_share": float(h_all[kk:].sum() / h_all.sum()) if dim > kk else 0.0,
              "tail_gradient_share": g_rest / g_sq if g_sq > 0 else 0.0,
              "tail_noise_share": c_rest / tr_cov if tr_cov > 0 else 0.0, "n_negative": n_negative,
              "k": kk, "dim": dim}
    nqm = NQM(h_all, np.maximum(c_all, 0.0), np.maximum(s_all, 1e-300))
    return FittedNQM(nqm, h, c, init_sq, report)


class _Calibration(Constraint):
    """``(batch_size >= 1, measured_steps > 0)``, both finite."""

    def __call__(self, name, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, np.ndarray)) or len(value) != 2:
            raise TypeError(f"`{name}` must be a pair (batch_size, measured_steps); got {value!r}.")
        b = checks.check_real(name, value[0], low=1.0, high=math.inf, high_open=True)
        s = checks.check_real(name, value[1], low=0.0, high=math.inf, low_open=True, high_open=True)
        return b, s

    def bad_values(self):
        return [None, "12", 5, (1.0,), (0.5, 10.0), (4.0, math.inf), (4.0, math.nan), (4.0, 0.0)]


@validate(fitted=Instance(FittedNQM, what="a FittedNQM (from fit_nqm)"),
          batch_sizes=SequenceOf(Real(1, math.inf, high_open=True), increasing=True, what="increasing batch sizes >= 1"),
          target=Maybe(Real(0, math.inf, low_open=True, high_open=True)),
          target_rel=Maybe(Real(0, 1, low_open=True, high_open=True)), family=Options(*FAMILIES),
          calibrate=Maybe(_Calibration()))
def predict_steps(fitted: FittedNQM, batch_sizes, target: float | None = None, *, target_rel: float | None = None,
                  family: str = "sgd", calibrate=None, **kwargs) -> xr.Dataset:
    """The fitted NQM's tuned steps to ``target`` per batch size (``toymodels.sweep.batch_size_sweep``).

    Args:
        target: an absolute target of the NQM's loss (its excess loss, zero at its minimum).
        target_rel: instead of ``target``, a fraction in (0, 1) of the fitted NQM's initial loss
            (``fitted.nqm.initial_loss``); exactly one of the two.  The sweep's attrs hold the
            absolute ``target`` and, when given, ``target_rel``.
        calibrate: optional ``(batch_size, measured_steps)``: predicted steps are multiplied by
            measured / predicted at that batch size (reported as attr ``calibration``).
        **kwargs: passed on to ``batch_size_sweep`` (e.g. ``precond``, ``progress``).

    Returns:
        The sweep's Dataset (``steps_to_target``, ``lr_opt`` ...) with attrs ``calibration`` and the
        fit report.
    """
    checks.check_one_target(target, target_rel, what="NQM loss")
    if target_rel is not None:
        target = target_rel * fitted.nqm.initial_loss
    kwargs.setdefault("progress", False)
    ds = batch_size_sweep(fitted.nqm, family, batch_sizes, target, **kwargs)
    factor = 1.0
    if calibrate is not None:
        b0, s0 = float(calibrate[0]), float(calibrate[1])
        pred = batch_size_sweep(fitted.nqm, family, [b0], target, **kwargs).steps_to_target.values[0]
        if not (math.isfinite(pred) and pred > 0 and math.isfinite(s0) and s0 > 0):
            raise ValueError(f"cannot calibrate on batch size {b0:g}: predicted {pred}, measured {s0}.")
        factor = s0 / pred
        ds["steps_to_target"] = ds.steps_to_target * factor
    ds.attrs.update({"calibration": factor, **{f"fit_{k}": v for k, v in fitted.report.items()}})
    if target_rel is not None:
        ds.attrs["target_rel"] = target_rel
    return ds


@validate(fitted=Instance(FittedNQM, what="a FittedNQM (from fit_nqm)"),
          initial_loss=Maybe(Real(0, math.inf, high_open=True)), tail=Boolean())
def fit_linreg(fitted: FittedNQM, initial_loss: float | None = None, *, tail: bool = False):
    """Online linear regression with the fitted curvature, teacher distance and a label-noise level
    that explains the measured noise: for a Gaussian linear model the per-example gradient variance
    along eigen-direction i is c_i = lambda_i^2 s_i + 2 L lambda_i + sigma^2 lambda_i (toymodels.linreg),
    so sigma^2 is the median over the measured directions of c_i / lambda_i - lambda_i s_i - 2 L
    (floored at 0).  Its gradient noise shrinks as the risk falls, unlike the NQM's.

    Args:
        fitted: from :func:`fit_nqm`.
        initial_loss: the excess loss L at the fit point (default: the fitted NQM's initial loss).
        tail: keep the NQM's extrapolated power-law modes; by default only the k measured directions
            are used (the tail's total curvature inflates linear regression's batch noise,
            tr(Sigma) E[e^T Sigma e], far beyond what was measured).

    Returns:
        ``(GaussianLinearRegression, sigma)``.
    """
    from toymodels import GaussianLinearRegression

    n = fitted.curvature_top.size
    h, c, s = fitted.curvature_top, fitted.noise_top, fitted.init_sq_top
    L = fitted.nqm.initial_loss if initial_loss is None else float(initial_loss)
    sigma2 = max(0.0, float(np.median(c / h - h * s - 2.0 * L)))
    if tail:
        model = GaussianLinearRegression(fitted.nqm.h, w_star=np.sqrt(fitted.nqm.init_sq), noise_std=math.sqrt(sigma2))
    else:
        model = GaussianLinearRegression(h, w_star=np.sqrt(s), noise_std=math.sqrt(sigma2))
    fitted.report.update(linreg_noise_std=math.sqrt(sigma2), linreg_directions=n)
    return model, math.sqrt(sigma2)
