"""The shared gradient statistics (numpy in, numpy out).

Defined once here and used by the toy models and by the deep-net probes, so that theory and
measurement mean the same thing by the same name (the names of :mod:`toymodels.schema`).

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

from ._validate import MAX_EXACT_INT, Array, Integer, Real, validate

__all__ = ["gradient_statistics", "two_batch_estimates", "fit_critical_batch", "bootstrap_critical_batch",
           "tuned_median", "crossing_step", "STAT_NAMES"]

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
    return _two_batch(sq_small, b_small, sq_big, b_big)


def _two_batch(sq_small, b_small, sq_big, b_big):
    """The formulas of :func:`two_batch_estimates`, unchecked, on floats or arrays (a training loop
    calls it once per step: numpy's conversions and checks of four scalars cost more than these)."""
    g2 = (b_big * sq_big - b_small * sq_small) / (b_big - b_small)
    tr = (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)
    return g2, tr


def _fit_rows(b: np.ndarray, s: np.ndarray) -> dict:
    """:func:`fit_critical_batch` for many step curves at once (no argument checks).

    ``b`` is ``(n,)`` (> 0, finite), ``s`` is ``(m, n)`` (> 0 or +inf).  Returns float64 arrays of
    shape ``(m,)``: ``steps_min``, ``critical_batch_size``, ``rms_relative_error``, ``n_points``
    (finite entries of the row) and ``ok`` (at least 2 of them: a fit was possible; where not, the
    other entries are NaN).
    """
    s = np.atleast_2d(s)
    finite = np.isfinite(s)
    with np.errstate(divide="ignore"):
        u = np.where(finite, 1.0 / s, 0.0)  # rows of an unreached target weigh nothing
    v = u / b
    rhs = finite.astype(np.float64)
    n_points = finite.sum(axis=1)
    ok = n_points >= 2
    # unconstrained least squares of a u_i + c v_i = 1 (S = a + c / B, relative error), by QR
    q, r = np.linalg.qr(np.stack([u, v], axis=-1))
    y = np.einsum("mnk,mn->mk", q, rhs)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = y[:, 1] / r[:, 1, 1]
        a = (y[:, 0] - r[:, 0, 1] * c) / r[:, 0, 0]
        # constrained to a >= 0 and c >= 0: an unconstrained optimum outside the quadrant violates
        # one of them only (both negative predicts S < 0 everywhere), and the optimum on that
        # boundary lies inside the other constraint, so it is the constrained optimum
        rising = c < 0  # steps rise with B: no benefit from larger batches, a constant
        a = np.where(rising, u.sum(axis=1) / (u**2).sum(axis=1), a)
        c = np.where(rising, 0.0, c)
        no_floor = ~rising & (a <= 0)  # steps fall like 1/B or faster: no levelling off measured
        c = np.where(no_floor, v.sum(axis=1) / (v**2).sum(axis=1), c)
        a = np.where(no_floor, 0.0, a)
        crit = np.where(no_floor, math.inf, c / np.where(no_floor, 1.0, a))
        pred = a[:, None] + c[:, None] / b
        rms = np.sqrt(np.sum(np.where(finite, (pred * u - 1.0) ** 2, 0.0), axis=1) / np.maximum(n_points, 1))
    nan = np.full(a.shape, np.nan)
    return {"steps_min": np.where(ok, a, nan), "critical_batch_size": np.where(ok, crit, nan),
            "rms_relative_error": np.where(ok, rms, nan), "n_points": n_points, "ok": ok}


@validate(batch_sizes=Array(1, low=0.0, high=float(MAX_EXACT_INT), low_open=True),
          steps=Array(1, low=0.0, low_open=True, posinf=True))
def fit_critical_batch(batch_sizes, steps) -> dict:
    """Fit S(B) = S_min (1 + B_crit / B) to steps-to-target per batch size (McCandlish et al. 2018,
    "An Empirical Model of Large-Batch Training").

    S = a + c / B is linear in (a, c) = (S_min, S_min B_crit); it is fitted by least squares on the
    relative error (rows (1 / S, 1 / (B S)), right-hand side 1), so short and long runs count alike.
    Infinite steps (the target not reached) are left out; batch sizes must be finite and > 0, steps
    > 0 and never NaN.  The fit is constrained to a >= 0 and c >= 0:

    * steps that do not fall with the batch size give B_crit = 0 (no benefit from larger batches),
      S_min the best constant sum(1/S) / sum(1/S^2), never a negative B_crit;
    * steps that keep falling like 1/B (or faster) over the whole measured range, so that the
      unconstrained S_min would be <= 0, give S_min = 0 and B_crit = inf (no levelling off
      measured: the critical batch size lies beyond the largest batch size), S = c / B with
      c = sum(v) / sum(v^2), v = 1 / (B S).

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
    if np.unique(b[np.isfinite(s)]).size < 2:
        raise ValueError("need at least 2 batch sizes with finite steps to fit a critical batch size.")
    if np.any(b <= 0) or np.any(s <= 0):
        raise ValueError("`batch_sizes` and `steps` must be > 0.")
    fit = _fit_rows(b, s[None, :])
    return {"steps_min": float(fit["steps_min"][0]), "critical_batch_size": float(fit["critical_batch_size"][0]),
            "rms_relative_error": float(fit["rms_relative_error"][0]), "n_points": int(fit["n_points"][0])}


MAX_BOOT = 10**6  # bootstrap resamples of one call
_CHUNK_BYTES = 2**26  # resampled steps held at once (64 MiB)


@validate(steps=Array(3, low=0.0, posinf=True))
def tuned_median(steps) -> tuple[np.ndarray, np.ndarray]:
    """Per batch size, the median over seeds of the best hyper-parameter setting (Shallue et al.'s
    "best over the grid", each setting judged by its median over seeds).

    ``steps``: ``(n_batch_sizes, n_settings, n_seeds)``.  Returns ``(best, index)``, both
    ``(n_batch_sizes,)``: the least median over settings (``inf`` when no setting's median is finite;
    the median is ``inf`` when at least half the seeds never reach the target) and the setting it
    belongs to (the first of equal ones).
    """
    med = np.median(steps, axis=-1)
    idx = np.argmin(med, axis=1)
    return med[np.arange(med.shape[0]), idx], idx


@validate(batch_sizes=Array(1, low=0.0, high=float(MAX_EXACT_INT), low_open=True),
          steps=Array((2, 3), low=0.0, low_open=True, posinf=True),
          level=Real(0.0, 1.0, low_open=True, high_open=True), n_boot=Integer(2, MAX_BOOT),
          seed=Integer(0, 2**63 - 1))
def bootstrap_critical_batch(batch_sizes, steps, *, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> dict:
    """B_crit and S_min of S = S_min (1 + B_crit / B) with percentile bootstrap intervals over seeds.

    The S(B) form is McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"; the fit is
    :func:`fit_critical_batch` of the tuned steps (see :func:`tuned_median`): per batch size the least
    median over seeds among the hyper-parameter settings.  Each of ``n_boot`` resamples draws
    ``n_seeds`` seeds with replacement, the same draw for every batch size and every setting (a seed
    is one draw of the data order and initialisation, shared by all runs of that seed), re-chooses
    the best setting per batch size on the resampled medians and refits.  The interval is the
    percentile interval (Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 13): the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled estimates, each an
    order statistic (no interpolation, so an infinite B_crit in a resample is kept as such).

    Infinite steps (a seed that never reached the target, or diverged) enter the medians as ``inf``:
    a batch size whose tuned median is infinite is left out of that fit.  A resample in which fewer
    than 2 batch sizes keep a finite tuned median cannot be fitted: it is counted in ``n_failed`` and
    the quantiles are taken over the other resamples (the interval is conditional on a fit; a large
    ``n_failed`` says the data hardly pin B_crit down).  A resample whose steps keep falling like 1/B
    has B_crit = inf and S_min = 0, one whose steps rise with B has B_crit = 0 (see
    :func:`fit_critical_batch`), so ``b_crit_hi`` may be ``inf``.

    With few seeds the interval is coarse and its coverage approximate: n seeds give at most
    C(2n - 1, n) distinct resamples (3 seeds: 10, of which the three all-one-seed resamples have
    probability 1/9 together); the percentile interval's spread is too small by about sqrt((n-1)/n)
    and it uses normal rather than t quantiles (under-coverage), while the bootstrap over-states the
    spread of a median of few seeds (over-coverage).  On synthetic S(B) with lognormal seed noise and
    10 seeds a nominal 80% interval covered the true B_crit in 89% and S_min in 79% of 400
    replications (``tests/test_critical_batch_ci.py``).

    Args:
        batch_sizes: ``(n_batch_sizes,)`` distinct batch sizes > 0.
        steps: steps to target, ``(n_batch_sizes, n_settings, n_seeds)`` (settings: learning rate x
            momentum x ..., flattened) or ``(n_batch_sizes, n_seeds)`` (one setting); > 0 or
            ``inf``, never NaN; at least 2 seeds.
        level: the interval's coverage, in (0, 1).
        n_boot: resamples, 2 to 10**6.
        seed: of the resampling generator (``numpy.random.default_rng``).

    Returns:
        dict: ``b_crit``, ``s_min`` (the point estimates from all seeds, as :func:`fit_critical_batch`
        of ``steps_best``), ``b_crit_lo``, ``b_crit_hi``, ``s_min_lo``, ``s_min_hi`` (NaN when every
        resample failed), ``steps_best`` ``(n_batch_sizes,)``, ``best_setting`` ``(n_batch_sizes,)``
        (index into ``n_settings``), ``level``, ``n_boot``, ``n_failed``, ``n_seeds``.

    Raises:
        ValueError: one seed (no interval: use :func:`fit_critical_batch` for the point estimate),
            mismatched shapes, repeated batch sizes, or fewer than 2 batch sizes with a finite tuned
            median in the full data.
    """
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    if s.ndim == 2:
        s = s[:, None, :]
    if s.shape[0] != b.size:
        raise ValueError(f"`steps` must have one row per batch size (shape (n_batch_sizes, [n_settings,] n_seeds)); "
                         f"got shape {np.shape(steps)} for {b.size} batch sizes.")
    if np.unique(b).size != b.size:
        raise ValueError("`batch_sizes` must be distinct; got a repeated value.")
    n_seeds = s.shape[-1]
    if n_seeds < 2:
        raise ValueError("`steps` must hold at least 2 seeds (its last axis) for a bootstrap interval; got 1 "
                         "(fit_critical_batch gives the point estimate).")
    best, which = tuned_median(s)
    point = fit_critical_batch(b, best)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    chunk = max(1, int(_CHUNK_BYTES // (8 * s.size)))
    crit, smin = np.empty(n_boot), np.empty(n_boot)
    for i in range(0, n_boot, chunk):
        resampled = s[:, :, idx[i:i + chunk]]  # (n_batch_sizes, n_settings, chunk, n_seeds)
        med = np.median(resampled, axis=-1).min(axis=1)  # re-tuned per batch size in each resample
        fit = _fit_rows(b, med.T)
        crit[i:i + chunk], smin[i:i + chunk] = fit["critical_batch_size"], fit["steps_min"]
    good = np.isfinite(smin)  # NaN: the fit failed (B_crit may be inf where S_min = 0)
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    if good.any():
        b_lo, b_hi = np.quantile(crit[good], q, method="inverted_cdf")
        s_lo, s_hi = np.quantile(smin[good], q, method="inverted_cdf")
    else:
        b_lo = b_hi = s_lo = s_hi = math.nan
    return {"b_crit": point["critical_batch_size"], "b_crit_lo": float(b_lo), "b_crit_hi": float(b_hi),
            "s_min": point["steps_min"], "s_min_lo": float(s_lo), "s_min_hi": float(s_hi), "steps_best": best,
            "best_setting": which, "level": float(level), "n_boot": int(n_boot), "n_failed": int(n_boot - good.sum()),
            "n_seeds": int(n_seeds)}


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
