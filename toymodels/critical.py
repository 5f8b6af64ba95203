"""The critical batch size predicted from ONE reference run at a small batch size.

Two predictors, both written in numpy on arrays so that they take a measured trajectory (a
network's probe rows, :mod:`deepmodels.predict`) and an exact one (a toy model's
``gradient_stats``) alike.  Each returns the same Dataset: ``steps_to_target`` over ``batch_size``,
the scalars ``b_crit`` and ``s_min`` of S(B) = S_min (1 + B_crit / B) fitted to it
(:func:`toymodels.stats.fit_critical_batch`, the fit used for measured curves), ``source="theory"``
and a ``predictor`` attribute.

**Noise scale** (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", Sec. 2.2,
and App. D on a noise scale that changes during training).  At the best learning rate, a short
stretch of training that needs dS_min steps at an infinite batch size needs
dS = dS_min (1 + B_noise / B) at batch size B.  Summed over the run,

    S(B) = integral (1 + B_noise(s) / B) dS_min(s) = S_min (1 + B_crit / B),
    B_crit = integral B_noise dS_min / S_min,

the average of the noise scale weighted by the *minimal* steps each stretch needs (not by the
steps the reference run spent there, which over-weight the noisy stretches).  The reference run
at batch size B_ref took dk = dS_min (1 + B_noise(k) / B_ref) steps, so with
w(k) = 1 / (1 + B_noise(k) / B_ref):

    S_min = integral_0^S_ref w(k) dk,    S_min B_crit = integral_0^S_ref B_noise(k) w(k) dk,
    S(B) = integral_0^S_ref (1 + B_noise(k) / B) w(k) dk,      so S(B_ref) = S_ref exactly.

B_noise(k) is the measured B_simple = tr Sigma / |G|^2 (McCandlish et al.'s simple estimate, equal
to B_noise when the Hessian is a multiple of the identity), linear in k between probe steps and
held after the last.  An infinite B_simple (or an unbiased estimate whose |G|^2 came out <= 0:
noise dominates) gives w = 0, B_noise w = B_ref.

**Piecewise NQM** (Zhang et al. 2019, "Which Algorithmic Choices Matter at Which Batch Sizes?",
applied along training).  A quadratic model is fitted at checkpoints of the reference run; the one
fitted at checkpoint j predicts the steps n_j(B, lr) its loss segment needs, the segment's loss
*ratio* L(c_(j+1)) / L(c_j) of the reference run applied to the quadratic's own initial loss (the
network's loss is read as an excess loss: its minimum taken to be 0).  Each segment's speed is
calibrated once at the reference batch size, f_j = dS_j / n_j(B_ref) (dS_j the reference run's
steps in the segment), and

    S(B) = min over lr of sum_j f_j n_j(B, lr),        or
    S(B) = sum_j f_j min over lr of n_j(B, lr),

the first with ``lr="per_run"`` (one learning rate per run, the measurement protocol), the second
with ``lr="per_segment"`` (a lower bound).

For ``"per_segment"`` n_j(B_ref) is each quadratic's steps at its own best learning rate; for
``"per_run"`` it is the steps at the one learning rate that minimises sum_j f_j n_j(B_ref, lr),
found by iterating f -> lr -> f to a fixed point (from the per-segment f), so that the prediction
reproduces the reference run at B_ref: S(B_ref) = S_ref.

With one segment both are the single fit calibrated at B_ref (:func:`deepmodels.bridge.predict_steps`).
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from numba import njit
from scipy import optimize

from ._validate import MAX_EXACT_INT, Array, Callable, Integer, Options, Real, validate
from .schema import attach_attrs
from .stats import fit_critical_batch

__all__ = ["noise_scale_prediction", "piecewise_prediction", "tune_lr", "critical_batch_scaling"]

_BATCH_SIZES = Array(1, low=1.0, high=float(MAX_EXACT_INT))
_POSITIVE = Real(0.0, math.inf, low_open=True, high_open=True)


def _result(batch_sizes, steps, predictor, **attrs) -> xr.Dataset:
    """The common Dataset of every predictor (fit of S = S_min (1 + B_crit / B) to ``steps``)."""
    b = np.asarray(batch_sizes, dtype=np.float64)
    s = np.asarray(steps, dtype=np.float64)
    ds = xr.Dataset({"steps_to_target": ("batch_size", s)}, coords={"batch_size": b})
    try:
        fit = fit_critical_batch(b, s)
        ds["b_crit"], ds["s_min"] = fit["critical_batch_size"], fit["steps_min"]
        attrs.update(fit_rms_relative_error=fit["rms_relative_error"])
    except ValueError as err:  # fewer than two finite points
        ds["b_crit"], ds["s_min"] = math.inf, math.inf
        attrs.setdefault("reason", str(err))
    attach_attrs(ds, model="network", source="theory", predictor=predictor, **attrs)
    return ds


def _weights(noise_scale, b_ref):
    """w = 1 / (1 + B / B_ref) and B w, with the limits at B = inf (B_noise w = B_ref)."""
    B = np.asarray(noise_scale, dtype=np.float64)
    big = ~np.isfinite(B) | (B < 0)  # inf, or an unbiased estimate with |G|^2 <= 0: noise dominates
    Bf = np.where(big, 0.0, B)
    w = np.where(big, 0.0, 1.0 / (1.0 + Bf / b_ref))
    return w, np.where(big, b_ref, Bf * w)


def _integrals(steps, noise_scale, b_ref, s_ref, n_grid=4097):
    """(S_min, S_min B_crit) of the reference run: trapezoids on a fine grid of [0, s_ref]."""
    k = np.asarray(steps, dtype=np.float64)
    B = np.asarray(noise_scale, dtype=np.float64)
    keep = ~np.isnan(B)
    k, B = k[keep], B[keep]
    grid = np.union1d(np.linspace(0.0, s_ref, n_grid), k[k <= s_ref])
    # linear interpolation in k (np.interp holds the end values); inf / negative entries stay "noise
    # dominated" on the whole interval next to them
    finite = np.isfinite(B) & (B >= 0)
    Bi = np.interp(grid, k[finite], B[finite]) if finite.any() else np.full(grid.shape, np.inf)
    if (~finite).any():
        j = np.searchsorted(k, grid, side="right") - 1
        bad_left = ~finite[np.clip(j, 0, k.size - 1)]
        bad_right = ~finite[np.clip(j + 1, 0, k.size - 1)]
        Bi = np.where(bad_left | bad_right, np.inf, Bi)
    w, bw = _weights(Bi, b_ref)
    return float(np.trapezoid(w, grid)), float(np.trapezoid(bw, grid))


@validate(steps=Array(1, low=0.0), noise_scale=Array(1, low=-math.inf, posinf=True),
          reference_batch_size=Real(1.0, float(MAX_EXACT_INT)), steps_to_target=_POSITIVE, batch_sizes=_BATCH_SIZES)
def noise_scale_prediction(steps, noise_scale, reference_batch_size: float, steps_to_target: float, batch_sizes, *,
                           noise_scale_lo=None, noise_scale_hi=None, estimate: str = "") -> xr.Dataset:
    """Steps to target per batch size from the noise scale measured along one reference run.

    Args:
        steps: ``(n,)`` increasing steps of the reference run where the noise scale was measured.
        noise_scale: ``(n,)`` B_simple there (``inf`` allowed: a stationary point; negative: an
            unbiased estimate whose |G|^2 came out <= 0, read as noise-dominated).
        reference_batch_size: B_ref of the reference run.
        steps_to_target: S_ref, the reference run's steps to the target (its crossing step).
        batch_sizes: ``(m,)`` batch sizes to predict at.
        noise_scale_lo, noise_scale_hi: optional ``(n,)`` interval ends of each measurement; the
            prediction is monotone in B_noise, so the interval of B_crit comes from the lower ends
            everywhere and the upper ends everywhere (errors taken as fully correlated along the
            run: conservative).
        estimate: a label stored in the attrs (e.g. "unbiased").

    Returns:
        The common Dataset (module docstring): ``steps_to_target`` (m,), ``b_crit`` (the closed form
        integral above, equal to the fit), ``s_min``; with the interval also ``b_crit_lo``,
        ``b_crit_hi``, ``s_min_lo``, ``s_min_hi``.
    """
    k = np.asarray(steps, dtype=np.float64)
    if np.any(np.diff(k) <= 0):
        raise ValueError("`steps` must be strictly increasing.")
    B = np.asarray(noise_scale, dtype=np.float64)
    if B.shape != k.shape:
        raise ValueError(f"`noise_scale` must have the shape of `steps` {k.shape}; got {B.shape}.")
    b_ref, s_ref = float(reference_batch_size), float(steps_to_target)
    bs = np.asarray(batch_sizes, dtype=np.float64)

    def predict(Bk):
        s_min, area = _integrals(k, Bk, b_ref, s_ref)
        return s_min, area, s_min + area / bs

    s_min, area, pred = predict(B)
    ds = _result(bs, pred, "noise_scale", estimate=estimate, reference_batch_size=b_ref, reference_steps=s_ref)
    # the closed form (the fit reproduces it to rounding, but say it exactly)
    ds["s_min"] = s_min
    ds["b_crit"] = area / s_min if s_min > 0 else math.inf
    if (noise_scale_lo is None) != (noise_scale_hi is None):
        raise ValueError("give both `noise_scale_lo` and `noise_scale_hi`, or neither.")
    if noise_scale_lo is not None:
        ends = []
        for name, arr in (("noise_scale_lo", noise_scale_lo), ("noise_scale_hi", noise_scale_hi)):
            a = np.asarray(arr, dtype=np.float64)
            if a.shape != k.shape or np.isnan(a).any():
                raise ValueError(f"`{name}` must be a real array of the shape of `steps` {k.shape}.")
            lo_min, lo_area, _ = predict(a)
            ends.append((lo_min, lo_area / lo_min if lo_min > 0 else math.inf))
        # more noise: more B_crit and fewer S_min
        ds["b_crit_lo"], ds["b_crit_hi"] = ends[0][1], ends[1][1]
        ds["s_min_lo"], ds["s_min_hi"] = ends[1][0], ends[0][0]
    return ds


# ----------------------------------------------------------------------------------------------------
def _steps(problem, make, batch_size, target, lr):
    try:
        return float(problem.steps_to_target(make(lr), batch_size, target))
    except ValueError:  # an lr outside what the problem accepts
        return math.inf


@validate(make=Callable(), batch_size=Real(1.0, float(MAX_EXACT_INT)), n_grid=Integer(3, 10**4))
def tune_lr(problems, weights, make, batch_size: float, target, *, n_grid: int = 40, search=None):
    """One learning rate for several problems: minimise sum_j weights_j n_j(B, lr) over lr.

    ``n_j`` is ``problems[j].steps_to_target(make(lr), batch_size, target[j])``.  The search runs on
    ``search`` (cheaper stand-ins, e.g. ``[p.coarsen() for p in problems]``; default the problems
    themselves): a log grid of ``n_grid`` points from 1e-4 to 1 times the smallest stability limit
    (``problems[j].lr_limit(make(1.0))``), then Brent's method in log lr around the best grid point;
    the steps reported are the problems' own exact ones at the chosen lr.

    Returns:
        ``(lr, weighted steps, [n_j])``; ``(nan, inf, [inf...])`` when no lr of the range reaches
        every target.
    """
    targets = np.broadcast_to(np.asarray(target, dtype=np.float64), (len(problems),))
    search = problems if search is None else search
    top = min(p.lr_limit(make(1.0)) for p in problems)
    if not (math.isfinite(top) and top > 0):
        raise ValueError(f"the problems have no stable learning rate (limit {top}).")
    w = np.asarray(weights, dtype=np.float64)

    def cost(x, probs):
        lr = top * math.exp(x)
        total = 0.0
        for p, wj, tj in zip(probs, w, targets):
            n = _steps(p, make, batch_size, tj, lr)
            if not math.isfinite(n):
                return math.inf
            total += wj * n
        return total

    xs = np.linspace(math.log(1e-4), math.log(0.999), n_grid)
    vals = np.array([cost(x, search) for x in xs])
    if not np.isfinite(vals).any():
        return math.nan, math.inf, [math.inf] * len(problems)
    i = int(np.argmin(vals))
    lo, hi = xs[max(i - 1, 0)], xs[min(i + 1, n_grid - 1)]
    if hi > lo:
        res = optimize.minimize_scalar(lambda x: min(cost(x, search), 1e300), bounds=(lo, hi), method="bounded",
                                       options={"xatol": 1e-3})  # (Brent's parabolas need finite values)
        x_best = res.x if res.fun <= vals[i] else xs[i]
    else:
        x_best = xs[i]
    lr = top * math.exp(x_best)
    n = [_steps(p, make, batch_size, tj, lr) for p, tj in zip(problems, targets)]
    return lr, float(np.dot(w, n)), n


@validate(make=Callable(), reference_batch_size=Real(1.0, float(MAX_EXACT_INT)), batch_sizes=_BATCH_SIZES,
          lr=Options("per_run", "per_segment"))
def piecewise_prediction(problems, segment_steps, segment_ratios, make, reference_batch_size: float, batch_sizes, *,
                         lr: str = "per_run", coarse: bool = True, predictor: str = "piecewise_nqm") -> xr.Dataset:
    """Steps to target per batch size from quadratic models fitted along the reference run.

    Args:
        problems: the fitted models, one per segment (e.g. :class:`toymodels.NQM`), in order.
        segment_steps: ``(m,)`` steps the reference run spent in each segment (> 0; they sum to its
            steps to target).
        segment_ratios: ``(m,)`` loss ratios L_end / L_start of the segments, in (0, 1).
        make: ``make(lr)`` -> an optimizer spec (e.g. ``lambda lr: Momentum(lr, 0.9)``).
        reference_batch_size: B_ref.
        batch_sizes: ``(n,)`` batch sizes to predict at.
        lr: ``"per_run"`` (one learning rate per batch size for the whole run, as the measurement
            tunes it) or ``"per_segment"`` (each segment at its own best learning rate).
        coarse: search the learning rate on ``problem.coarsen()`` stand-ins (exact steps at the
            chosen learning rate always come from the full models).
        predictor: the ``predictor`` attribute.

    Returns:
        The common Dataset (module docstring) with ``lr_opt`` over ``batch_size`` (the per-run
        learning rate; NaN for ``"per_segment"``) and attrs ``calibration`` (the factors f_j).
        Segments that no learning rate can finish make the prediction ``inf`` with a ``reason``.
    """
    m = len(problems)
    ds_steps = np.asarray(segment_steps, dtype=np.float64)
    ratios = np.asarray(segment_ratios, dtype=np.float64)
    if m < 1 or ds_steps.shape != (m,) or ratios.shape != (m,):
        raise ValueError(f"`segment_steps` and `segment_ratios` must have one entry per problem ({m}); got "
                         f"shapes {ds_steps.shape} and {ratios.shape}.")
    if not (np.all(np.isfinite(ds_steps)) and np.all(ds_steps > 0)):
        raise ValueError(f"`segment_steps` must be finite and > 0; got {ds_steps}.")
    if not (np.all(ratios > 0) and np.all(ratios < 1)):
        raise ValueError(f"`segment_ratios` must lie in (0, 1); got {ratios}.")
    bs = np.asarray(batch_sizes, dtype=np.float64)
    b_ref = float(reference_batch_size)
    targets = np.array([r * p.initial_loss for r, p in zip(ratios, problems)])
    search = [p.coarsen(0.05) if coarse and hasattr(p, "coarsen") else p for p in problems]
    # calibration: each segment at its own best lr at B_ref
    n_ref = np.array([tune_lr([p], [1.0], make, b_ref, [t], search=[s])[1]
                      for p, s, t in zip(problems, search, targets)])
    attrs = dict(reference_batch_size=b_ref, reference_steps=float(ds_steps.sum()), lr_protocol=lr,
                 segment_steps=ds_steps.tolist(), segment_ratios=ratios.tolist())
    if not np.all(np.isfinite(n_ref)):
        bad = np.flatnonzero(~np.isfinite(n_ref)).tolist()
        ds = _result(bs, np.full(bs.shape, np.inf), predictor,
                     reason=f"the quadratic of segment(s) {bad} cannot reach its target at any learning rate", **attrs)
        ds["lr_opt"] = ("batch_size", np.full(bs.shape, np.nan))
        return ds
    f = ds_steps / n_ref
    iterations = 0
    if lr == "per_run":  # calibrate at the one learning rate that is best at B_ref (a fixed point)
        for iterations in range(1, 21):
            lr_ref, _, n_at = tune_lr(problems, f, make, b_ref, targets, search=search)
            if not np.all(np.isfinite(n_at)):
                break
            f_new = ds_steps / np.asarray(n_at)
            done = np.max(np.abs(f_new / f - 1.0)) < 1e-6
            f = f_new
            if done:
                break
    out, lrs = np.empty(bs.size), np.full(bs.size, np.nan)
    for i, b in enumerate(bs):
        if lr == "per_run":
            lrs[i], out[i], _ = tune_lr(problems, f, make, b, targets, search=search)
        else:
            out[i] = sum(fj * tune_lr([p], [1.0], make, b, [t], search=[s])[1]
                         for fj, p, s, t in zip(f, problems, search, targets))
    ds = _result(bs, out, predictor, calibration=f.tolist(), calibration_iterations=iterations, **attrs)
    ds["lr_opt"] = ("batch_size", lrs)
    return ds


# ----------------------------------------------------------------------------------------------------
# critical batch size over model size and data: the exact tuned steps of SGD, fitted per (d, target)
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _sgd_first_crossings(h, s0, q, kappa, rho, lrs, batch_size, threshold, k_max):
    """First step k <= ``k_max`` with 1/2 h.s_k <= ``threshold`` for each learning rate, stepping all of
    them together and stopping at the first k where any crosses (so only the best of the grid is
    exact; the others are -1 or larger).  s' = a s + u (h.s) + c with, for lr r and batch B,
    a = (1 - r h)^2 + kappa r^2 h^2 / B, u = rho r^2 h / B, c = r^2 q / B."""
    n, d = lrs.size, h.size
    s = np.empty((n, d))
    out = np.full(n, -1, dtype=np.int64)
    alive = np.ones(n, dtype=np.bool_)
    m0 = 0.0
    for i in range(d):
        m0 += h[i] * s0[i]
    if 0.5 * m0 <= threshold:
        out[:] = 0
        return out
    m = np.full(n, m0)
    for j in range(n):
        for i in range(d):
            s[j, i] = s0[i]
    for k in range(1, k_max + 1):
        found = False
        for j in range(n):
            if not alive[j]:
                continue
            r2 = lrs[j] * lrs[j] / batch_size
            mj = 0.0
            for i in range(d):
                g = 1.0 - lrs[j] * h[i]
                v = (g * g + kappa * r2 * h[i] * h[i]) * s[j, i] + rho * r2 * h[i] * m[j] + r2 * q[i]
                s[j, i] = v
                mj += h[i] * v
            m[j] = mj
            if 0.5 * mj <= threshold:
                out[j] = k
                found = True
            elif not (mj < 1e30 * m0):  # diverging (or NaN)
                alive[j] = False
        if found:
            return out
    return out


def _moment_system(problem):
    """(h, s0, q, kappa, rho, floor, lr_top) of SGD's exact second-moment recursion on ``problem``:
    an :class:`toymodels.NQM` (kappa = rho = 0, q = c: noise independent of the state), a
    :class:`toymodels.GaussianLinearRegression` (kappa = rho = 1, q = sigma^2 h: the Gaussian fourth
    moment), or a model holding one as ``.regression`` with a constant ``irreducible_risk`` (the
    :class:`toymodels.PowerLawRF`).  ``lr_top(B)`` is the largest stable learning rate."""
    from .linreg import GaussianLinearRegression
    from .nqm import NQM
    from .optimizers import SGD

    floor = 0.0
    reg = problem
    if hasattr(problem, "regression") and isinstance(problem.regression, GaussianLinearRegression):
        reg, floor = problem.regression, float(problem.irreducible_risk)
    if isinstance(reg, GaussianLinearRegression):
        h = np.ascontiguousarray(reg.h, dtype=np.float64)
        return (h, np.ascontiguousarray(reg.init_sq, dtype=np.float64), reg.noise_std**2 * h, 1.0, 1.0, floor,
                lambda b: reg.stable_lr(SGD(1.0), b))
    if isinstance(reg, NQM):
        lim = reg.lr_limit(SGD(1.0))
        return reg.h, reg.init_sq, reg.c, 0.0, 0.0, 0.0, lambda b: lim
    raise TypeError(f"`model_factory` must build an NQM, a GaussianLinearRegression or a PowerLawRF for "
                    f"tuner='grid'; got {type(problem).__name__} (use tuner='sweep').")


def _grid_tuned_steps(system, batch_size, target, *, k_max=10**7, n_grid=32, n_refine=16, n_rounds=2):
    """Fewest steps of SGD to ``target`` at one batch size over the learning rate: the best of a log
    grid of ``n_grid`` fractions in [1e-4, 0.999] of the stable limit, refined ``n_rounds`` times
    by ``n_refine`` points between the best point's neighbours (the grid reaches lower where the
    noise needs it).  Returns ``(steps, lr)``;
    ``(inf, nan)`` if no rate reaches the target within ``k_max`` steps."""
    h, s0, q, kappa, rho, floor, lr_top = system
    thr = target - floor
    if thr <= 0:
        return math.inf, math.nan
    top = lr_top(batch_size)
    # the grid reaches down to rates whose noise floor (about lr sum(q) / (4 B)) is a tenth of the
    # threshold, so that very noisy problems (tiny best rates) are on it; spacing at most that of
    # ``n_grid`` points over [1e-4, 0.999]
    noise = float(np.sum(q))
    low = min(1e-4, 0.4 * batch_size * thr / (noise * top)) if noise > 0 else 1e-4
    n = max(n_grid, int(math.ceil((n_grid - 1) * math.log(0.999 / low) / math.log(0.999e4))) + 1)
    lrs = top * np.geomspace(low, 0.999, n)
    best_k, best_lr = math.inf, math.nan
    for _ in range(n_rounds + 1):
        limit = int(min(k_max, best_k)) if math.isfinite(best_k) else k_max
        ks = _sgd_first_crossings(h, s0, q, kappa, rho, lrs, float(batch_size), thr, limit)
        hit = ks >= 0
        if hit.any():
            j = int(np.argmin(np.where(hit, ks, np.iinfo(np.int64).max)))
            if ks[j] <= best_k:
                best_k, best_lr = float(ks[j]), float(lrs[j])
        if not math.isfinite(best_k):
            return math.inf, math.nan
        lo = best_lr / (lrs[1] / lrs[0])
        hi = min(best_lr * (lrs[1] / lrs[0]), top * 0.9999)
        lrs = np.geomspace(lo, hi, n_refine)
    return best_k, best_lr


def _fit_interval(batch_sizes, steps, level):
    """:func:`toymodels.stats.fit_critical_batch` plus an interval of B_crit from the fit's
    residuals: the least-squares rows (1/S, 1/(B S)) . (S_min, S_min B_crit) = 1 give the
    covariance s^2 (X^T X)^-1 of (a, c) with s^2 = RSS / (n - 2), and B_crit = c / a a delta-method
    standard error; the interval is +- t_(n-2) quantile times it.  The steps are exact, so this
    says how well the hyperbola S = S_min (1 + B_crit / B) describes the curve, not a sampling error.
    Returns dict ``b_crit``, ``b_crit_fit_lo``, ``b_crit_fit_hi``, ``s_min``, ``e_min`` (S_min B_crit)
    and ``rms``; ``inf`` with a ``reason`` when there is nothing to fit."""
    from scipy import stats as sstats

    b, s = np.asarray(batch_sizes, dtype=np.float64), np.asarray(steps, dtype=np.float64)
    ok = np.isfinite(s) & (s > 0)
    try:
        fit = fit_critical_batch(b[ok], s[ok]) if ok.sum() >= 2 else None
    except ValueError:
        fit = None
    if fit is None:
        return dict(b_crit=math.inf, b_crit_fit_lo=math.inf, b_crit_fit_hi=math.inf, s_min=math.inf,
                    e_min=math.inf, rms=math.nan, reason="fewer than two batch sizes reach the target")
    bc, sm = fit["critical_batch_size"], fit["steps_min"]
    lo = hi = bc
    n = int(ok.sum())
    if n > 2 and math.isfinite(bc) and sm > 0:
        X = np.stack([1.0 / s[ok], 1.0 / (b[ok] * s[ok])], axis=1)
        a, c = sm, sm * bc
        res = X @ np.array([a, c]) - 1.0
        cov = float(res @ res) / (n - 2) * np.linalg.inv(X.T @ X)
        grad = np.array([-c / a**2, 1.0 / a])
        se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
        half = float(sstats.t.ppf(0.5 + level / 2.0, n - 2)) * se
        lo, hi = max(bc - half, 0.0), bc + half
    return dict(b_crit=bc, b_crit_fit_lo=lo, b_crit_fit_hi=hi, s_min=sm, e_min=sm * bc if math.isfinite(bc) else
                math.inf, rms=fit["rms_relative_error"], reason="")


def _size_job(args):
    """All targets of one model size (a thread's task)."""
    model_factory, size, targets, batch_sizes, tuner, family = args
    model = model_factory(size)
    steps = np.full((len(targets), len(batch_sizes)), np.inf)
    lrs = np.full(steps.shape, np.nan)
    if tuner == "grid":
        system = _moment_system(model)
        for t, target in enumerate(targets):
            for j, b in enumerate(batch_sizes):
                steps[t, j], lrs[t, j] = _grid_tuned_steps(system, b, target)
    else:
        from .sweep import batch_size_sweep

        for t, target in enumerate(targets):
            if target <= getattr(model, "irreducible_risk", 0.0):
                continue
            sw = batch_size_sweep(model, family, batch_sizes, float(target), progress=False)
            steps[t], lrs[t] = sw.steps_to_target.values, sw.lr_opt.values
    return (steps, lrs, float(model.initial_loss), float(getattr(model, "irreducible_risk", 0.0)),
            getattr(model, "model_name", "toy"), getattr(model, "params", {}))


@validate(model_factory=Callable(), sizes=Array(1, low=1.0), targets=Array(1, low=0.0, low_open=True),
          batch_sizes=_BATCH_SIZES, tuner=Options("grid", "sweep"), level=Real(0.0, 1.0, low_open=True, high_open=True),
          n_jobs=Integer(1, 256))
def critical_batch_scaling(model_factory, sizes, targets, batch_sizes, *, tuner: str = "grid", family: str = "sgd",
                           level: float = 0.95, n_jobs: int = 1) -> xr.Dataset:
    """The critical batch size as a function of model size and data (the target loss), exactly.

    Zhang et al. 2024 ("How Does Critical Batch Size Scale in Pre-training?", Sec. 3 and 4) define
    B_crit through S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018, "An Empirical Model of
    Large-Batch Training", Sec. 2.2) fitted to the tuned steps to a target loss, and find that it
    grows with the data (a lower target needs more examples, E_min = S_min B_crit) and hardly with
    the model size.  Here, for every model size d and target, the exact tuned steps S(B) of SGD are
    fitted, so the answer has no seed noise.

    The steps at each batch size are minimised over the learning rate.  ``tuner="grid"`` (SGD on an
    NQM, a linear regression or a :class:`toymodels.PowerLawRF`): the exact second-moment recursion
    of SGD stepped for 32 log-spaced learning rates in [1e-4, 0.999] of the stable limit at once,
    stopped at the first crossing, then twice refined by 16 rates between the best point's
    neighbours (final spacing 0.1% in lr); each run's crossing is exact, the minimum over the
    learning rate is that of the grid.  ``tuner="sweep"``:
    :func:`toymodels.sweep.batch_size_sweep` of ``family`` (any model and family it takes; slower).

    Args:
        model_factory: ``model_factory(d)`` -> a model of size d (e.g.
            ``lambda d: PowerLawRF(1.0, 0.7, 2000, d)``); called once per size.
        sizes: ``(n_sizes,)`` model sizes d (the ``n_features`` coordinate).
        targets: ``(n_targets,)`` target losses (absolute).  A target at or below a model's
            irreducible risk gives ``inf`` steps and B_crit = inf with a ``reason``.
        batch_sizes: ``(n_batch,)`` batch sizes of each sweep.
        tuner: ``"grid"`` or ``"sweep"`` (see above).
        family: the optimizer family of ``tuner="sweep"`` (``"sgd"`` for ``"grid"``).
        level: coverage of the fit interval (see below).
        n_jobs: model sizes run side by side in threads (the kernel releases the GIL).

    Returns:
        Dataset over (``n_features``, ``target``): ``b_crit`` (the fit of
        :func:`toymodels.stats.fit_critical_batch`), ``b_crit_fit_lo`` / ``b_crit_fit_hi`` (the fit
        interval: +- the t quantile times the delta-method standard error of c / a from the
        least-squares residuals; the steps are exact, so it measures how well the hyperbola fits),
        ``s_min``, ``e_min`` = S_min B_crit (examples at a small batch size: the data),
        ``fit_rms`` (rms relative error of the fit), ``reason``; and over (``n_features``,
        ``target``, ``batch_size``) ``steps_to_target`` and ``lr_opt``; coordinate
        ``initial_loss`` and ``irreducible_risk`` over ``n_features``.
    """
    if tuner == "grid" and family != "sgd":
        raise ValueError(f"`family` must be 'sgd' for tuner='grid'; got {family!r}.")
    ds_ = np.asarray(sizes, dtype=np.float64)
    if np.any(ds_ != np.round(ds_)):
        raise ValueError("`sizes` must be whole numbers.")
    tg = np.asarray(targets, dtype=np.float64)
    bs = np.sort(np.asarray(batch_sizes, dtype=np.float64))
    jobs = [(model_factory, int(d), tg, bs, tuner, family) for d in ds_]
    if n_jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(n_jobs, len(jobs))) as pool:
            parts = list(pool.map(_size_job, jobs))
    else:
        parts = [_size_job(j) for j in jobs]
    steps = np.stack([p[0] for p in parts])
    lrs = np.stack([p[1] for p in parts])
    names = ("b_crit", "b_crit_fit_lo", "b_crit_fit_hi", "s_min", "e_min", "rms")
    out = {k: np.empty((ds_.size, tg.size)) for k in names}
    reason = np.empty((ds_.size, tg.size), dtype=object)
    for i in range(ds_.size):
        for t in range(tg.size):
            fit = _fit_interval(bs, steps[i, t], level)
            for k in names:
                out[k][i, t] = fit[k]
            reason[i, t] = fit["reason"]
    dims = ("n_features", "target")
    ds = xr.Dataset({**{k: (dims, out[k]) for k in names if k != "rms"}, "fit_rms": (dims, out["rms"]),
                     "reason": (dims, reason.astype(str)),
                     "steps_to_target": (dims + ("batch_size",), steps), "lr_opt": (dims + ("batch_size",), lrs)},
                    coords={"n_features": ds_, "target": tg, "batch_size": bs,
                            "initial_loss": ("n_features", [p[2] for p in parts]),
                            "irreducible_risk": ("n_features", [p[3] for p in parts])})
    shared = {k: v for k, v in parts[0][5].items() if k not in ("d", "dim", "initial_loss", "irreducible_risk")
              and all(p[5].get(k) == v for p in parts)}  # the parameters every size shares
    attach_attrs(ds, model=parts[0][4], source="exact", tuner=tuner, optimizer=family, level=level, **shared)
    return ds
