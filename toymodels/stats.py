"""The shared gradient statistics (numpy in, numpy out).

Defined once here and used by the toy models and by the deep-net probes, so that theory and
measurement mean the same thing by the same name (names as in DESIGN.md / :mod:`toymodels.schema`).

Conventions, for a mini-batch gradient g_B = mean of B per-example gradients, P parameters:

* ``grad_norm_sq``  |E g|^2, the squared norm of the full-batch (expected) gradient;
* ``grad_var``      tr Cov(g_B) / P = tr Sigma / (B P), the average per-coordinate variance of the
  mini-batch gradient (Faghri et al. Sec. 4 "average variance"), Sigma the per-example covariance;
* ``grad_nvar``     tr Cov(g_B) / E|g_B|^2 = (tr Sigma / B) / (|E g|^2 + tr Sigma / B), variance over
  the second non-central moment (Faghri et al. Sec. 4 "normalized variance");
* ``snr``           |E g|^2 / tr Cov(g_B), the inverse of the noise-to-signal power ratio;
* ``noise_scale``   B_simple = tr Sigma / |E g|^2 (McCandlish et al. 2018), independent of B.

Variances are population (biased) variances of the per-example distribution.
"""

from __future__ import annotations

import math

import numpy as np

from ._validate import MAX_EXACT_INT, Array, Real, validate

__all__ = ["gradient_statistics", "two_batch_estimates", "fit_critical_batch", "crossing_step", "STAT_NAMES"]

STAT_NAMES = ("grad_norm_sq", "grad_var", "grad_nvar", "snr", "noise_scale")

_ANY = (0, 1, 2, 3, 4)


@validate(grad_norm_sq=Array(_ANY, low=0.0, posinf=True, min_size=0),
          trace_cov=Array(_ANY, low=0.0, posinf=True, min_size=0), n_params=Array(_ANY, low=0.0, low_open=True),
          batch_size=Array(_ANY, low=1.0, high=float(MAX_EXACT_INT)))
def gradient_statistics(grad_norm_sq, trace_cov, n_params, batch_size) -> dict:
    """The five statistics from |E g|^2 and the per-example covariance trace.

    Args:
        grad_norm_sq: |E g|^2, array-like (any shape), >= 0 (``inf`` after a divergence; never NaN).
        trace_cov: tr Sigma of the per-example gradient covariance, broadcastable, >= 0 (or ``inf``).
        n_params: P, the number of coordinates (> 0), broadcastable (e.g. per layer).
        batch_size: B (>= 1), broadcastable.

    Returns:
        dict name -> float64 array (broadcast shape).  Ratios with a zero denominator are ``inf``
        (e.g. ``noise_scale`` at a stationary point), never NaN unless both parts are zero.
    """
    g2 = np.asarray(grad_norm_sq, dtype=np.float64)
    tr = np.asarray(trace_cov, dtype=np.float64)
    bs = np.asarray(batch_size, dtype=np.float64)
    if np.any(g2 < 0) or np.any(tr < 0):
        raise ValueError("`grad_norm_sq` and `trace_cov` must be >= 0.")
    if np.any(bs < 1):
        raise ValueError("`batch_size` must be >= 1.")
    if np.any(np.asarray(n_params) <= 0):
        raise ValueError(f"`n_params` must be > 0; got {n_params}.")
    cov_b = tr / bs
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "grad_norm_sq": g2 * np.ones_like(cov_b),
            "grad_var": cov_b / n_params * np.ones_like(g2),
            "grad_nvar": cov_b / (g2 + cov_b),
            "snr": np.where(cov_b > 0, g2 / np.where(cov_b > 0, cov_b, 1.0), np.inf),
            "noise_scale": np.where(g2 > 0, tr / np.where(g2 > 0, g2, 1.0), np.inf) * np.ones_like(bs),
        }
    return out


@validate(sq_small=Array(_ANY, low=0.0), b_small=Array(_ANY, low=1.0, high=float(MAX_EXACT_INT)),
          sq_big=Array(_ANY, low=0.0), b_big=Array(_ANY, low=1.0, high=float(MAX_EXACT_INT)))
def two_batch_estimates(sq_small, b_small, sq_big, b_big):
    """Unbiased |E g|^2 and tr Sigma from squared norms of mean gradients at two batch sizes
    (McCandlish et al. 2018, App. A): with E|G_B|^2 = |E g|^2 + tr Sigma / B,

        |E g|^2 = (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small),
        tr Sigma = (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big).

    Per-example gradients give b_small = 1 (|G_small|^2 = mean |g_i|^2) and b_big = B.
    Returns ``(grad_norm_sq, trace_cov)`` (arrays; either may come out negative from noise).
    """
    sq_small, sq_big = np.asarray(sq_small, dtype=np.float64), np.asarray(sq_big, dtype=np.float64)
    if not (np.all(np.asarray(b_small) >= 1) and np.all(np.asarray(b_big) > np.asarray(b_small))):
        raise ValueError("`b_big` must be larger than `b_small` >= 1.")
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    tr = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


@validate(batch_sizes=Array(1, low=0.0, high=float(MAX_EXACT_INT), low_open=True),
          steps=Array(1, low=0.0, low_open=True, posinf=True))
def fit_critical_batch(batch_sizes, steps) -> dict:
    """Fit S(B) = S_min (1 + B_crit / B) to steps-to-target per batch size (McCandlish et al. 2018).

    S = a + b / B is linear in (a, b) = (S_min, S_min B_crit); it is fitted by least squares on the
    relative error (weights 1 / S), so short and long runs count alike.  Infinite steps (the target
    not reached) are left out; batch sizes must be finite and > 0, steps > 0 and never NaN.  When
    the steps do not fall with the batch size the fit is constrained to B_crit = 0 (no benefit from
    larger batches), never negative.

    Returns:
        dict with ``steps_min`` (S_min), ``critical_batch_size`` (B_crit), ``rms_relative_error`` of the
        fit and ``n_points``.

    Raises:
        ValueError: fewer than 2 finite points, non-positive batch sizes or steps, or mismatched shapes.
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"`batch_sizes` and `steps` must be 1-D of the same length; got {b.shape} and {s.shape}.")
    keep = np.isfinite(s)
    b, s = b[keep], s[keep]
    if b.size < 2:
        raise ValueError("need at least 2 batch sizes with finite steps to fit a critical batch size.")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("`batch_sizes` and `steps` must be > 0.")
    A = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    coef, *_ = np.linalg.lstsq(A, np.ones_like(s), rcond=None)
    s_min, slope = coef
    if slope < 0:  # steps rise with B: no benefit from larger batches, the best fit is constant
        s_min = float(np.sum(1.0 / s) / np.sum(1.0 / s**2))  # least relative error of a constant
        slope = 0.0
    pred = s_min + slope / b
    crit = float(slope / s_min) if s_min > 0 else math.inf
    return {"steps_min": float(s_min), "critical_batch_size": crit,
            "rms_relative_error": float(np.sqrt(np.mean((pred / s - 1.0) ** 2))), "n_points": int(b.size)}


@validate(steps=Array(1, low=0.0), target=Real(0.0, math.inf, high_open=True))
def crossing_step(steps, values, target) -> float:
    """The step at which a curve sampled at ``steps`` first reaches ``target`` (values <= target).

    Between the last sample above the target, (k0, m0), and the first at or below it, (k1, m1), the
    curve is taken linear in log(metric) (losses fall roughly exponentially between close samples):

        k* = k0 + (k1 - k0) (log m0 - log target) / (log m0 - log m1).

    Where the log is undefined (m1 = 0, or target = 0) the interpolation is linear in the metric:
    k* = k0 + (k1 - k0) (m0 - target) / (m0 - m1).  A curve that starts at or below the target
    crosses at ``steps[0]``.

    Args:
        steps: ``(n,)`` strictly increasing evaluation steps >= 0.
        values: ``(n,)`` the metric at those steps (loss or error, >= 0).  A value that is not finite
            before the crossing is a divergence.
        target: the value to reach, >= 0.

    Returns:
        The crossing step (a float, not rounded), or ``inf`` when the curve never reaches the target
        or is not finite (NaN / inf) before it does.
    """
    k = np.asarray(steps, dtype=np.float64)
    m = np.asarray(values)
    if m.dtype.kind not in "iuf" or m.ndim != 1:
        raise TypeError(f"`values` must be a 1-D array of reals (NaN and inf allowed); got dtype {m.dtype}, "
                        f"shape {m.shape}.")
    m = m.astype(np.float64)
    t = float(target)
    if k.shape != m.shape:
        raise ValueError(f"`steps` and `values` must have the same length; got {k.size} and {m.size}.")
    if np.any(np.diff(k) <= 0):
        raise ValueError("`steps` must be strictly increasing.")
    bad = ~np.isfinite(m)
    hit = np.flatnonzero(np.isfinite(m) & (m <= t))
    if hit.size == 0:
        return math.inf
    j = int(hit[0])
    if bad[: j + 1].any():
        return math.inf
    if j == 0:
        return float(k[0])
    k0, k1, m0, m1 = k[j - 1], k[j], m[j - 1], m[j]
    if m1 > 0 and t > 0:
        frac = (math.log(m0) - math.log(t)) / (math.log(m0) - math.log(m1))
    else:
        frac = (m0 - t) / (m0 - m1)
    return float(k0 + (k1 - k0) * min(max(frac, 0.0), 1.0))


# the heavy-tail and Gaussianity tests (Xie et al.) live in their own module; exported here too
from .tails import (davis_kahan_bound, eigengaps, gradient_history_tests, normality_test, power_law_fit,  # noqa: E402
                    rank_fit)

__all__ += ["power_law_fit", "rank_fit", "normality_test", "gradient_history_tests", "eigengaps", "davis_kahan_bound"]
