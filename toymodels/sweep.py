"""Batch-size sweeps: steps to a target loss per batch size, each point tuned over the optimizer.

Any *problem* with the methods ``steps_to_target(optimizer, batch_size, target, full_output=True)``,
``modal_form(optimizer, batch_size, lr)`` (an object with ``.loss(ks)``, ``.lower_bound(a, b)``,
``.first_crossing(target, k_max)``), ``loss_at_step(optimizer, batch_size, k)``,
``lr_limit(optimizer)``, ``initial_loss``, ``params`` and a ``model_name`` can be swept; optional
``coarsen()`` and ``family_loss(make, batch_size)`` make tuning faster.

Tuning (:func:`tune`) uses the exchange of minima

    min_theta  min{k : L_k(theta) <= target}  =  min{k : min_theta L_k(theta) <= target},

so it brackets the integer k (regula falsi in log k) while the inner problem, minimising the smooth
L_k(theta) over the learning rate (and momentum or averaging decay), is continuous.  Large NQMs are
first tuned on ``problem.coarsen()`` and refined on the full model.  Schedule-free SGD on an NQM, which has
no closed form, is tuned by a direct search of its crossing step instead (:func:`_tune_schedule_free`).
Every accepted step count comes from
an exact first-crossing search at a concrete theta, so the reported optimum is always achieved.
:func:`grid_search` is the exact minimum over a given grid (each point's exact first crossing,
pruned by the incumbent), used to check the tuner and as the straightforward reference.

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import xarray as xr
from scipy import optimize

from . import _localmin, _schedfree, resume, warmup
from ._args import BATCH_SIZE, TARGET, WEIGHT_DECAY
from ._validate import (MAX_EXACT_INT, MAX_STEPS, Array, Boolean, Constraint, Instance, Integer, Maybe, Options, Real,
                        check_int, check_real, validate)
from .nqm import NQM, check_batch_size
from .optimizers import EMA, SGD, AcceleratedSGD, Momentum, Nesterov, PolyakAverage, ScheduleFree
from .parallel import _Scheduler, check_scheduler, run_tasks
from .schedules import PiecewiseConstant
from .schema import attach_attrs

__all__ = ["FAMILIES", "make_optimizer", "tune", "grid_search", "batch_size_sweep", "family_sweeps", "tune_schedule",
           "default_grid"]

FAMILIES = ("sgd", "precond", "momentum", "ema", "momentum_ema", "nesterov", "asgd", "polyak", "schedule_free")
_EXTRA = {"sgd": None, "precond": None, "momentum": "momentum", "ema": "decay", "momentum_ema": "momentum",
          "nesterov": "momentum", "asgd": "kappa", "polyak": None, "schedule_free": "momentum"}
_EXTRA_NAME = {"momentum": "momentum_opt", "decay": "decay_opt", "kappa": "kappa_opt"}
_ASGD_XI = 10.0  # the statistical advantage xi of the "asgd" family: Kidambi et al.'s default, capped at sqrt(kappa)
_ASGD_C = 0.7  # its small_const c (Kidambi et al.'s)
# the extra of "asgd" where xi reaches its cap (kappa = xi^2): its momentum form is affine in extra on either side
_ASGD_KINK = (_ASGD_XI - 1.0) / (_ASGD_XI + _ASGD_C)


def _asgd_kappa(extra: float) -> float:
    """The "asgd" family's kappa for the tuner's ``extra`` in [0, 1), which is affine in the momentum
    beta = (1 - c u) / (1 + u), u = c xi / kappa, of its momentum form
    (:attr:`toymodels.optimizers.AcceleratedSGD.momentum_form`): extra = (beta - beta_1) / (1 - beta_1),
    beta_1 = 1 - c the momentum at kappa = 1, so 1 - extra = (1 + c) u / (c (1 + u)).  The system is then
    affine in extra on [0, ``_ASGD_KINK``] (xi = sqrt(kappa) <= 10) and on [``_ASGD_KINK``, 1) (xi = 10),
    and extra spans kappa in [1, inf) (the tuner's box, 1 - extra >= 1e-4 / e, reaches kappa = 4.6e5)."""
    c = _ASGD_C
    s = c * (1.0 - extra) / (1.0 + c)  # u / (1 + u)
    u = s / (1.0 - s)
    kappa = (c / u) ** 2 if c / u <= _ASGD_XI else c * _ASGD_XI / u
    return max(1.0, kappa)


def _asgd_extra(kappa: float) -> float:
    """Inverse of :func:`_asgd_kappa`."""
    c = _ASGD_C
    u = c * min(_ASGD_XI, math.sqrt(kappa)) / kappa
    return 1.0 - (1.0 + c) * u / (c * (1.0 + u))


def _extra_value(family, extra):
    """The hyper-parameter reported for a tuned ``extra`` (kappa for "asgd", else extra itself)."""
    return _asgd_kappa(extra) if family == "asgd" and math.isfinite(extra) else extra


def _extra_from_value(family, value):
    """Inverse of :func:`_extra_value` (reading a resumed sweep)."""
    return _asgd_extra(value) if family == "asgd" and math.isfinite(value) else value
_ONE_MINUS_MIN = 1e-4  # beta, decay <= 1 - 1e-4
_X_MIN = math.log(1e-9)  # lr >= 1e-9 * stability limit
_Y_MIN = math.log(_ONE_MINUS_MIN)
_SCAN_CAP = 10**6  # steps searched one by one for problems without a closed form
_SF_WIDTH = 0.5  # schedule-free is tuned on NQM.coarsen(0.5): 23 modes for the d = 10^4 power law
_SF_COARSE_MIN = 200  # ... for NQMs of more modes than this (smaller ones are tuned on themselves)
# ... and its steps are checked on the full model at 3 more settings if that costs <= 2 x 10^6 updates x modes each
# (at 10^7, on the d = 10^4 sweep of benchmarks/optimizer_zoo.py, B >= 512, these 36 scans never crossed first
# and cost 8% of its time; nor did they on its d = 10^3 --quick sweep, where they still run)
_SF_EXACT_MORE = 2 * 10**6
_SF_LOST = 1e-2 * _schedfree.LOST_GROWTH  # the tuner's transient-growth limit: 100 x inside the exact scan's
# its independent scans (a grid row, a window of learning rates) run on two threads from this many updates x
# modes each, where a core is idle when the search starts (load average + 1 <= cores; on a busy machine the
# threads only contend: measured 7% more time)
_SF_PARALLEL_WORK = 10**5


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {FAMILIES}; got {family!r}.")
    return family


class _Problem(Constraint):
    """A model that can be swept (the interface of the module docstring)."""

    needs = ("steps_to_target", "modal_form", "loss_at_step", "lr_limit", "initial_loss", "params", "model_name")

    def __call__(self, name, value):
        missing = [m for m in self.needs if not hasattr(value, m)]
        if missing or isinstance(value, type):
            raise TypeError(f"`{name}` must be a model with {', '.join(self.needs)} (an NQM, GaussianLinearRegression "
                            f"or FiniteLinearRegression); got {type(value).__name__}.")
        return value

    def bad_values(self):
        return [None, "1", 1.5, object()]


_PROBLEM = _Problem()
_FAMILY = Options(*FAMILIES)
_PRECOND = Real(0.0, 1.0)
_DECAY = Real(0.0, 1.0, high_open=True)
_BATCH_SIZES = Array((0, 1), low=1.0, high=float(MAX_EXACT_INT))


def _check_problem_family(problem, family):
    """Families the problem supports (``problem.families``, default all)."""
    allowed = tuple(getattr(problem, "families", FAMILIES))
    if family not in allowed:
        raise ValueError(f"`family` must be one of {allowed} for {type(problem).__name__}; got {family!r}.")


@validate(family=_FAMILY, lr=Real(0.0, math.inf, low_open=True, high_open=True), extra=Maybe(_DECAY),
          precond=_PRECOND, decay=_DECAY, weight_decay=WEIGHT_DECAY)
def make_optimizer(family: str, lr: float, extra: float | None = None, *, precond: float = 0.5, decay: float = 0.99,
                   weight_decay: float = 0.0):
    """The optimizer of a family: ``extra`` is beta for the momentum families (``"momentum"``,
    ``"momentum_ema"``, ``"nesterov"``, and the interpolation beta of ``"schedule_free"``), mu for
    ``"ema"``, and for ``"asgd"`` it sets kappa through 1 - extra = (1 + c) u / (c (1 + u)), u = c xi / kappa
    (an affine function of the momentum of its momentum form; extra = 0 is kappa = 1, extra -> 1 kappa -> inf;
    see :attr:`toymodels.optimizers.AcceleratedSGD.momentum_form`) (xi = min(10, sqrt(kappa)),
    small_const 0.7: Kidambi et al.'s defaults, xi capped at its bound).

    ``"momentum_ema"`` is momentum (beta = ``extra``) with iterate averaging of fixed ``decay``;
    ``"polyak"`` is SGD with uniform iterate averaging.  ``weight_decay`` (wd >= 0, coupled: the
    update's gradient gets wd theta) is given to the optimizer, or to the averaged base optimizer.
    """
    if _EXTRA[family] is not None and extra is None:
        raise ValueError(f"`extra` must be a float in [0, 1) for {family!r}; got None.")
    wd = weight_decay
    if family == "nesterov":
        return Nesterov(lr, extra, weight_decay=wd)
    if family == "asgd":
        kappa = _asgd_kappa(extra)
        return AcceleratedSGD(lr, kappa, min(_ASGD_XI, math.sqrt(kappa)), weight_decay=wd)
    if family == "polyak":
        return PolyakAverage(SGD(lr, weight_decay=wd))
    if family == "schedule_free":
        return ScheduleFree(lr, extra, weight_decay=wd)
    if family == "sgd":
        return SGD(lr, weight_decay=wd)
    if family == "precond":
        return SGD(lr, precond=precond, weight_decay=wd)
    if family == "momentum":
        return Momentum(lr, extra, weight_decay=wd)
    if family == "ema":
        return EMA(SGD(lr, weight_decay=wd), extra)
    return EMA(Momentum(lr, extra, weight_decay=wd), decay)


@dataclass
class _Evaluator:
    """L_k(theta) in tuning coordinates x = log(lr / limit(theta)), y = log(1 - extra).

    ``fixed_extra`` (a beta or mu, for the two-parameter families) holds the extra hyper-parameter
    there: theta is then x alone."""

    problem: object
    family: str
    batch_size: float
    precond: float
    decay: float
    fixed_extra: float | None = None
    n_evals: int = 0
    weight_decay: float = 0.0

    def __post_init__(self):
        # fast path: problems that evaluate a whole family affine in its hyper-parameter (a fixed
        # extra: a family constant in e, so e = 0 of the 1-D search is the fixed value)
        self._fast = None
        if hasattr(self.problem, "family_loss"):
            two_d = _EXTRA[self.family] is not None
            fixed = self.fixed_extra

            def make(e):
                opt = make_optimizer(self.family, 1.0, fixed if fixed is not None else (e if two_d else None),
                                     precond=self.precond, decay=self.decay, weight_decay=self.weight_decay)
                # accelerated SGD through the momentum form of equal loss, affine in e on either side of
                # the kink (its own (w, w_bar) system is not affine in any one hyper-parameter)
                return opt.momentum_form if self.family == "asgd" else opt

            kink = {"kink": _ASGD_KINK} if self.family == "asgd" and fixed is None else {}
            self._fast = self.problem.family_loss(make, self.batch_size, **kink)
        # otherwise a problem's uncompiled family evaluator, if it has one (the same values without
        # the per-call checks); e is None for the families without an extra hyper-parameter
        self._family = None
        if self._fast is None and hasattr(self.problem, "family_evaluator"):
            self._family = self.problem.family_evaluator(
                lambda e: make_optimizer(self.family, 1.0, e, precond=self.precond, decay=self.decay,
                                         weight_decay=self.weight_decay),
                self.batch_size,
            )

    def _probe(self, y):
        """The family's optimizer at lr = 1 and extra = 1 - exp(y) (or the fixed extra), and its
        learning-rate limit."""
        extra = self.fixed_extra if y is None else 1.0 - math.exp(y)
        probe = make_optimizer(self.family, 1.0, extra, precond=self.precond, decay=self.decay,
                               weight_decay=self.weight_decay)
        return probe, self.problem.lr_limit(probe)

    def optimizer(self, x, y=None):
        probe, limit = self._probe(y)
        return probe.with_lr(math.exp(x) * limit)

    def form(self, x, y=None):
        opt = self.optimizer(x, y)
        return opt, self.problem.modal_form(opt, self.batch_size, opt.lr.lr)

    def log_loss(self, k, x, y=None):
        self.n_evals += 1
        if x > 0 or x < _X_MIN - 1 or (y is not None and (y > 0 or y < _Y_MIN - 1)):
            return math.inf
        x = min(x, -1e-9)
        if self._fast is not None:
            e = 0.0 if y is None else 1.0 - math.exp(y)
            v = self._fast.loss(e, math.exp(x) * self._fast.limit(e), k)
        elif self._family is not None:
            extra = (self.fixed_extra if y is None else 1.0 - math.exp(y)) if _EXTRA[self.family] else None
            v = self._family.loss(extra, math.exp(x) * self._family.limit(extra), k)
        else:
            probe, limit = self._probe(y)
            v = self.problem.loss_at_step(probe, self.batch_size, k, lr=math.exp(x) * limit)
        return math.log(v) if v > 0 and math.isfinite(v) else math.inf


def _inner_min(ev, k, start, *, step=0.3, xatol=1e-4, fatol=None):
    """argmin over theta of log L_k(theta), local search from ``start``; returns (theta, value).

    1-D: bounded Brent on a window that follows the minimum.  2-D: Nelder-Mead with an initial
    simplex of size ``step`` (log units), then (for steps > 0.1) a second Nelder-Mead restarted at the
    result with a ten times smaller simplex; ``xatol`` and ``fatol`` as in scipy.  Problems with ``family_loss`` run both searches
    compiled (:mod:`toymodels._localmin`); others call scipy with :meth:`_Evaluator.log_loss`.
    """
    fast = ev._fast
    if fatol is None:
        # one step changes log L_k by about (d log L / d log k) / k, with a slope of order one:
        # resolve the value to a hundredth of a step
        fatol = min(1e-6, 1e-2 / max(k, 1))
    if len(start) == 1:
        x0 = start[0]
        lo, hi = max(_X_MIN, x0 - 2.0), min(-1e-9, x0 + 2.0)
        for _ in range(12):
            if fast is not None:
                xm, fun, n = _localmin.brent(lo, hi, 1e-5, 500, *fast.kernel_args(k), _X_MIN)
                ev.n_evals += n
            else:
                with np.errstate(invalid="ignore"):  # inf (unstable) values in the parabolic steps
                    res = optimize.minimize_scalar(lambda x: ev.log_loss(k, x), bounds=(lo, hi), method="bounded",
                                                   options={"xatol": 1e-5})
                xm, fun = float(res.x), float(res.fun)
            if xm - lo < 0.05 and lo > _X_MIN:
                lo, hi = max(_X_MIN, lo - 4.0), lo + 0.1
            elif hi - xm < 0.05 and hi < -1e-9:
                lo, hi = hi - 0.1, min(-1e-9, hi + 4.0)
            else:
                break
        return (float(xm),), float(fun)
    best_x, best_f = np.asarray(start, dtype=np.float64), math.inf
    for size in (step, 0.1 * step) if step > 0.1 else (step,):
        if fast is not None:
            x, y, fun, n = _localmin.nelder_mead(best_x[0], best_x[1], size, xatol, fatol, 400,
                                                 *fast.kernel_args(k), _X_MIN, _Y_MIN)
            ev.n_evals += n
            x = np.array([x, y])
        else:
            simplex = np.array([best_x, best_x + [size, 0.0], best_x + [0.0, size]])
            res = optimize.minimize(lambda z: ev.log_loss(k, z[0], z[1]), best_x, method="Nelder-Mead",
                                    options={"initial_simplex": simplex, "xatol": xatol, "fatol": fatol,
                                             "maxfev": 400})
            x, fun = res.x, float(res.fun)
        if fun < best_f:
            best_x, best_f = np.asarray(x, dtype=np.float64), fun
    return tuple(float(v) for v in best_x), float(best_f)


def _exact_steps(ev, theta, target, k_max, guess=None):
    """The exact first crossing at ``theta`` if it is <= k_max, else inf (``guess``: where the
    crossing is expected, which speeds up the search)."""
    try:
        opt, mf = ev.form(*theta)
    except NotImplementedError:  # no closed form (e.g. momentum on linear regression): exact stepping
        if k_max < 1:
            return math.inf
        opt = ev.optimizer(*theta)
        return float(ev.problem.steps_to_target(opt, ev.batch_size, target, max_steps=int(min(k_max, _SCAN_CAP))))
    if not mf.stable:
        return math.inf
    if mf.lower_bound(0, k_max) > target:
        return math.inf
    try:
        k = mf.first_crossing(target, k_max) if guess is None else mf.first_crossing(target, k_max, guess=guess)
    except RuntimeError:  # undecidable within budget: treat the setting as unusable
        return math.inf
    return float(k) if k >= 0 else math.inf


def _grid_best(ev, target, thetas, incumbent=math.inf):
    """(steps, theta) of the exact best over ``thetas`` (tuning coordinates); each point's first
    crossing is searched only below the incumbent, so hopeless points cost one bound."""
    best = (incumbent, None)
    for theta in thetas:
        k_max = int(best[0]) - 1 if math.isfinite(best[0]) else 10**12
        if k_max < 0:
            break
        s = _exact_steps(ev, theta, target, k_max)
        if s < best[0]:
            best = (s, theta)
    return best


def _start_point(ev, target, two_d):
    """A coarse exact scan for a first feasible theta: 14 lrs from 0.5 to 1e-6 of the stability
    limit (times beta or mu in {0.9, 0.97, 0.99, 0.997, 0.999})."""
    ys = [None] if not two_d else [math.log(v) for v in (0.1, 0.03, 0.01, 0.003, 0.001)]
    xs = np.log(np.geomspace(0.5, 1e-6, 14))
    return _grid_best(ev, target, [(float(x),) if y is None else (float(x), y) for y in ys for x in xs])


def _basin_check(ev, hi, theta, target, two_d):
    """Look for a better basin than the incumbent's: a coarse scan of L_{hi-1} over the search box,
    then local minimisation from the best point of each momentum / decay row (the landscape of L_k
    is multimodal, e.g. through the phase of momentum's oscillation at small k)."""
    k = int(hi) - 1
    if k < 1:
        return hi, theta
    xs = np.linspace(math.log(1e-6), -0.01, 16)
    ys = [None] if not two_d else [math.log(v) for v in (1.0, 0.5, 0.2, 0.1, 0.03, 0.01, 0.003, 1e-3, 1e-4)]
    pts = [((x,) if y is None else (x, y)) for y in ys for x in xs]
    vals = np.array([ev.log_loss(k, *p) for p in pts]).reshape(len(ys), xs.size)
    log_target = math.log(target)
    # one start per row (per momentum / decay value): basins differ mostly along that axis; rows
    # far above the best (a factor e^2 in loss) are not worth a local search
    row_best = [(float(vals[r].min()), pts[r * xs.size + int(np.argmin(vals[r]))]) for r in range(len(ys))]
    best = min(v for v, _ in row_best)
    starts = [p for v, p in row_best if np.isfinite(v) and v <= best + 2.0]
    # a loose local search from each; the two deepest basins are then searched in full (rows often
    # share one long valley -- momentum at small batch sizes depends mostly on lr / (1 - beta) --
    # so more refinements would find the same point again)
    loose = sorted((val, cand) for cand, val in
                   (_inner_min(ev, k, p, step=0.3, xatol=1e-2, fatol=1e-5) for p in starts))
    for val, cand in loose[:2]:
        if val > log_target + 0.01:
            break
        cand, val = _inner_min(ev, k, cand, step=0.03)
        if val <= log_target:
            s = _exact_steps(ev, cand, target, k)
            if math.isfinite(s) and s < hi:
                hi, theta, k = s, cand, int(s) - 1
    return hi, theta


def _brent(f, a, b, tol):
    """(f(t), t) at the best point Brent's bounded minimisation of f over [a, b] visits, to width ``tol``.

    Golden-section steps with parabolic ones where the last three points are finite and the parabola's
    minimum falls inside the bracket (Brent 1973, "Algorithms for Minimization without Derivatives",
    Chapter 5; scipy's ``fminbound``): a smooth minimum in a few evaluations, and a function that
    falls towards a cliff of ``inf`` (a setting that diverges: schedule-free SGD near its stability
    edge) is still bracketed up to the edge, as by golden sections, since ``inf`` only loses.
    """
    golden = 0.3819660112501051
    x = w = v = a + golden * (b - a)
    fx = fw = fv = f(x)
    seen = [(fx, x)]
    d = e = 0.0
    while True:
        mid = 0.5 * (a + b)
        tol1 = 1.4901161193847656e-08 * abs(x) + tol / 3.0
        tol2 = 2.0 * tol1
        if abs(x - mid) <= tol2 - 0.5 * (b - a):
            break
        parabolic = False
        if abs(e) > tol1 and math.isfinite(fx) and math.isfinite(fv) and math.isfinite(fw):
            r = (x - w) * (fx - fv)
            q = (x - v) * (fx - fw)
            p = (x - v) * q - (x - w) * r
            q = 2.0 * (q - r)
            if q > 0.0:
                p = -p
            q = abs(q)
            if abs(p) < abs(0.5 * q * e) and q * (a - x) < p < q * (b - x):
                e, d = d, p / q
                if (x + d) - a < tol2 or b - (x + d) < tol2:
                    d = tol1 if mid >= x else -tol1
                parabolic = True
        if not parabolic:
            e = (a - x) if x >= mid else (b - x)
            d = golden * e
        u = x + (d if abs(d) >= tol1 else math.copysign(tol1, d))
        fu = f(u)
        seen.append((fu, u))
        if fu <= fx:
            if u >= x:
                a = x
            else:
                b = x
            v, fv, w, fw, x, fx = w, fw, x, fx, u, fu
        else:
            if u < x:
                a = u
            else:
                b = u
            if fu <= fw or w == x:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == x or v == w:
                v, fv = u, fu
    return min(seen, key=lambda s: s[0])


def _side_by_side(scan, thetas, cap_rule, record, pool):
    """``[record(*scan(theta, cap_rule())) for theta in thetas]`` with the scans run side by side on ``pool``.

    ``scan(theta, cap)`` is a first-crossing scan to at most ``cap`` steps returning ``(kappa, extra)``,
    with kappa in (k - 1, k] for a crossing at step k <= cap (k and so kappa unchanged by a larger cap),
    kappa > cap if none, inf if diverged; ``cap_rule()`` is the cap from the best so far, which
    ``record`` updates, so a loop's later scans can have smaller caps.  All scans start with the cap
    before the first; then, in order, a result that the loop's own cap could have changed -- a
    crossing later than one step below that cap, none, or a divergence -- is scanned again with it.
    The values are those of the loop bit for bit (so are the decisions taken from them), at the
    price of the longer scans of the points that do not cross."""
    launch = cap_rule()
    futures = [pool.submit(scan, th, launch) for th in thetas]
    vals = []
    for th, fut in zip(thetas, futures):
        v, extra = fut.result()
        cap = cap_rule()
        if cap < launch and not v + 1.0 <= cap:
            v, extra = scan(th, cap)
        vals.append(record(v, extra))
    return vals


def _tune_schedule_free(problem, bs, target, start, coarse, fixed, weight_decay=0.0):
    """:func:`_tune_schedule_free_on`, its independent scans on two threads where a core is idle (the same
    result either way, bit for bit)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores < 2 or load + 1.0 > cores:
        return _tune_schedule_free_on(problem, bs, target, start, coarse, fixed, weight_decay, None)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        return _tune_schedule_free_on(problem, bs, target, start, coarse, fixed, weight_decay, pool)


def _tune_schedule_free_on(problem, bs, target, start, coarse, fixed, weight_decay, pool):
    """:func:`tune` for ``"schedule_free"`` on an NQM: direct minimisation of the crossing step.

    Schedule-free SGD has no closed form (its averaging weight 1 / (k + 2) changes at every update),
    so every loss value costs a scan over all steps, and the bracketing of :func:`tune` (minimise
    L_k over theta for each of ~20 step counts k) would scan hundreds of thousands of steps per
    point.  Here one scan per point gives the whole objective: kappa(theta), the first crossing of
    the log-loss curve interpolated between steps (:func:`toymodels._schedfree.crossing`; continuous
    in theta, and ceil(kappa) is the exact first crossing), minimised over theta = (x, y),
    lr = exp(x) * limit(beta), beta = 1 - exp(y), limit(beta) = 2 / ((1 - beta) max h) (the full
    model's).  A grid (11 lrs from 0.95 to 1e-5 of the limit x 6 betas from 0 to 0.999; with a warm
    start only the lrs within e^(+-2.5) of its lr, and its lr x e^(+-0.5), and also its beta) picks
    the best beta row; then 5 values of y between
    the neighbouring rows (a warm start whose beta is still the best row: within +-0.5 of it;
    the window moved on, up to 3 times, while its best is at an end), and Brent's search over y
    between the neighbours of the best of them (:func:`_brent`, to 1e-3: 1 - beta to 0.1%; where the best
    of them is the box's edge, beta = 0 or 1 - beta = 1e-4, first one y a tolerance inside it, and
    Brent's search only if that is better: towards an edge it would creep by golden sections), with at
    each y the best of 9 points over x in +-2 around the best x so far (the second y: 5 points over
    +-0.5; later ones 3 points over +-0.1 around the x interpolated from the two nearest y's searched,
    as the best x moves smoothly with y; windows moved on while their best is at an end) and Brent's
    search between its neighbours (to 3e-4: the learning rate to 0.03%).  Brent's search compares values only where they are inf: the
    optimum usually lies on the edge of the region that diverges, where a simplex method crawls,
    and is bracketed there as by golden sections, while a smooth minimum (small batch sizes) takes
    parabolic steps (about half the scans of golden sections to these tolerances, measured on a
    d = 10^4 sweep, with the same tuned steps within one step).
    Points are scanned only to twice the best crossing so far (the grid: to the best), and outside
    the box kappa is taken at the nearest point of the box, times 1 + the distance.  Near the
    stability limit the loss first grows by many orders of magnitude (while the averaging weight is
    large) and the best settings border that region; the exact scan calls a growth past
    ``LOST_GROWTH`` x target divergence (float64 cannot resolve the target after it), the search
    stays 100 times inside that, so that its optimum is not on the cliff (should the full model still
    call it diverged, the learning rate is lowered by 2%, 4%, 8%, ... until it does not, at most 8 times).

    With ``coarse`` and more than 200 modes the search runs on ``problem.coarsen(0.5)`` (23 modes for
    the d = 10^4 power law; at a given setting its crossing is within ~0.5% of the full model's, and
    the tuned steps of a d = 10^4 sweep equal those of a search on ``coarsen(0.2)`` (47 modes) within
    0.4%, measured); the steps reported
    are always the full model's exact first crossing (``problem.steps_to_target``; at beta = 0 from the
    closed form of the Polyak average of SGD, which it then is) at the returned
    hyper-parameters, so only their optimality is approximate.  A grid row's scans, and a window's
    over x, run side by side on ``pool`` (:func:`_side_by_side`: the values of one scan after another
    bit for bit), each long enough to pay for a thread (``_SF_PARALLEL_WORK``).  Where a full-model scan costs at most
    2 x 10^6 updates x modes (200 steps at d = 10^4), the best settings of the three next best
    betas searched are scanned on the full model too and the one that crosses first is returned (the
    coarsened model ranks settings along its flat valley in beta only within its error).
    """
    model = problem.coarsen(_SF_WIDTH) if coarse and problem.dim > _SF_COARSE_MIN else problem
    wd = weight_decay
    limit0 = problem.lr_limit(ScheduleFree(1.0, 0.0, weight_decay=wd))
    h, q, s0 = model.h, model.c / bs, np.asarray(model.init_sq, dtype=np.float64)
    log_target = math.log(target)
    state = {"best": math.inf, "n": 0}

    def point(theta):  # (lr, beta, distance outside the box) of tuning coordinates, clipped to the box
        x = min(max(theta[0], _X_MIN), -1e-9)
        out = abs(theta[0] - x)
        if fixed is not None:
            beta = fixed
        else:
            y = min(max(theta[1], _Y_MIN), 0.0)
            out += abs(theta[1] - y)
            beta = 1.0 - math.exp(y)
        return math.exp(x) * limit0 / (1.0 - beta), beta, out

    def grid_cap():  # a grid point is scanned only as far as the best so far (it can only beat that)
        return int(min(_SCAN_CAP, state["best"] + 1)) if math.isfinite(state["best"]) else None

    def search_cap():
        return _SCAN_CAP if not math.isfinite(state["best"]) else int(min(_SCAN_CAP, 2 * state["best"] + 16))

    def raw(theta, cap):  # (the crossing, the distance outside the box)
        lr, beta, out = point(theta)
        return _schedfree.crossing(*_schedfree.coefficients(h, q, lr, beta, wd), h, s0, int(cap), log_target, True,
                                   _SF_LOST), out

    def record(v, out):
        state["n"] += 1
        state["best"] = min(state["best"], v)
        return v * (1.0 + out)

    def kappa(theta, cap=None):
        return record(*raw(theta, search_cap() if cap is None else cap))

    def kappas(thetas, cap_rule):
        """[kappa(theta, cap_rule()) for theta in thetas], the scans side by side (:func:`_side_by_side`)
        where each is long enough to pay for a thread."""
        if (pool is None or not math.isfinite(state["best"]) or len(thetas) < 2
                or (cap_rule() or _SCAN_CAP) * h.size < _SF_PARALLEL_WORK):
            return [kappa(th, cap_rule()) for th in thetas]
        return _side_by_side(raw, thetas, lambda: cap_rule() or _SCAN_CAP, record, pool)

    ys = [None] if fixed is not None else [math.log(1.0 - b) for b in (0.0, 0.5, 0.9, 0.98, 0.995, 0.999)]
    xs = list(np.log(np.geomspace(0.95, 1e-5, 11)))
    if start is not None:
        state["best"] = kappa(start, _SCAN_CAP)
        xs = [x for x in xs if abs(x - start[0]) <= 2.5] + [start[0] + dx for dx in (-0.5, 0.5)]
        if fixed is None:
            ys.append(start[1])
    # the grid, each point scanned only as far as the best so far (it can only beat that)
    rows = []
    for y in ys:
        pts = [(x,) if y is None else (x, y) for x in xs]
        vals = kappas(pts, grid_cap)
        j = int(np.argmin(vals))
        rows.append((vals[j], pts[j]))
    if start is not None:
        rows.append((kappa(start), tuple(start)))
    if not math.isfinite(min(v for v, _ in rows)):
        return {"steps": math.inf, "lr": math.nan, "extra": math.nan, "theta": None, "n_evals": state["n"], "lo": 0}
    v_best, z = min(rows, key=lambda r: r[0])

    def best_x(y, xc, half=2.0, n=9, moves=3):
        """(kappa, x) at y: n points over x in [xc - half, xc + half] (the window moved on, up to ``moves``
        times, while its best is at an end), then Brent's search between the best one's neighbours."""
        seen = {}

        def f(x):
            if x not in seen:
                seen[x] = kappa((x,) if y is None else (x, y))
            return seen[x]

        for _ in range(moves + 1):
            xs = np.linspace(max(_X_MIN, xc - half), min(-1e-9, xc + half), n)
            new_xs = [x for x in dict.fromkeys(xs) if x not in seen]
            seen.update(zip(new_xs, kappas([(x,) if y is None else (x, y) for x in new_xs], search_cap)))
            j = int(np.argmin([f(x) for x in xs]))
            if 0 < j < n - 1 or not (xs[0] > _X_MIN if j == 0 else xs[-1] < -1e-9):
                break
            xc = xs[j]
        return _brent(f, xs[max(j - 1, 0)], xs[min(j + 1, n - 1)], 3e-4)

    if fixed is not None:
        v_best, x = best_x(None, z[0])
        z = (x,)
    else:
        # Brent's search over y between the grid's beta rows next to the best one; each y's best x
        # starts from the best x so far (the optimum moves little with y, along the stability edge)
        # (the grid's own rows: a warm start's beta lies between two of them)
        y_lo = max([y for y in ys[:6] if y < z[1]], default=_Y_MIN)
        y_hi = min([y for y in ys[:6] if y > z[1]], default=0.0)
        n_y = 5  # (9 values cost 10% more scans on a d = 10^4 sweep, with the same tuned steps: measured)
        if start is not None and z[1] == start[1]:
            # the warm start's beta is still the best row: 5 values within +-0.5 of it (beta moves
            # little from one batch size to the next; the window moves on as below if it did)
            y_lo, y_hi = max(_Y_MIN, z[1] - 0.5), min(0.0, z[1] + 0.5)
        found = {}

        def at_y(y):
            # the first y searches x over +-2, the second +-0.5 around the best x so far; later ones
            # +-0.1 around x interpolated (or extrapolated) from the two nearest y's searched: the
            # best x moves smoothly with y
            near = sorted((u for u in found if math.isfinite(found[u][0])), key=lambda u: abs(u - y))[:2]
            if not found:
                v, x = best_x(y, z[0])
            elif len(near) < 2:
                v, x = best_x(y, min(found.values())[1], half=0.5, n=5)
            else:
                (y1, (_, x1)), (y2, (_, x2)) = ((u, found[u]) for u in near)
                v, x = best_x(y, x1 + (x2 - x1) * (y - y1) / (y2 - y1), half=0.1, n=3, moves=10)
            found[y] = (v, x)
            return v

        for _ in range(4):  # n_y values of y; the window moves on while its best is at an end
            ys_w = np.linspace(y_lo, y_hi, n_y)
            j = int(np.argmin([found[y][0] if y in found else at_y(y) for y in ys_w]))
            span = y_hi - y_lo
            if j == 0 and y_lo > _Y_MIN:
                y_lo, y_hi = max(_Y_MIN, y_lo - span), ys_w[1]
            elif j == n_y - 1 and y_hi < 0.0:
                y_lo, y_hi = ys_w[-2], min(0.0, y_hi + span)
            else:
                break
        edge = {0: _Y_MIN, n_y - 1: 0.0}.get(j)
        if edge is not None and ys_w[j] == edge:
            # the best y is the box's edge (beta = 0, or 1 - beta = 1e-4): Brent's search towards it would
            # only creep up to it by golden sections (some 15 values of y); one value a tolerance inside
            # tells whether the minimum lies inside the box after all
            inside = edge + (1e-3 if j == 0 else -1e-3)
            if at_y(inside) < found[edge][0]:
                edge = None
        if edge is None or ys_w[j] != edge:
            _brent(at_y, ys_w[max(j - 1, 0)], ys_w[min(j + 1, n_y - 1)], 1e-3)
        y, (v, x) = min(found.items(), key=lambda item: item[1][0])
        if v < v_best:
            v_best, z = v, (x, y)
    lr, beta, _ = point(z)
    theta = tuple(float(v) for v in z)
    steps = float(problem.steps_to_target(ScheduleFree(lr, beta, weight_decay=wd), bs, target))
    for j in range(8):
        if math.isfinite(steps):
            break
        theta = (theta[0] - 0.02 * 2**j,) + theta[1:]
        lr = point(theta)[0]
        steps = float(problem.steps_to_target(ScheduleFree(lr, beta, weight_decay=wd), bs, target))
    if fixed is None and 1 < steps < math.inf and steps * problem.dim <= _SF_EXACT_MORE:
        # where full-model scans are cheap, also the best settings of the next best betas searched: the
        # coarsened model ranks the settings along its flat valley in beta only within its ~0.5% error
        runners = sorted(((v, (x, y)) for y, (v, x) in found.items() if (x, y) != tuple(z)), key=lambda r: r[0])
        for _, th in runners[:3]:
            lr_r, beta_r, _ = point(th)
            s = float(problem.steps_to_target(ScheduleFree(lr_r, beta_r, weight_decay=wd), bs, target,
                                              max_steps=int(steps) - 1))
            if s < steps:
                steps, lr, beta, theta = s, lr_r, beta_r, tuple(float(v) for v in th)
    return {"steps": steps, "lr": lr, "extra": beta, "theta": theta if math.isfinite(steps) else None,
            "n_evals": state["n"], "lo": 0}


def _check_fixed_extra(family, extra):
    """``extra`` (a fixed beta or mu) only for the families that have one."""
    if extra is not None and _EXTRA[family] is None:
        raise ValueError(f"`extra` must be None for {family!r} (it has no momentum or averaging decay to fix); "
                         f"got {extra!r}.")
    return extra


@validate(problem=_PROBLEM, family=_FAMILY, batch_size=BATCH_SIZE, target=TARGET, precond=_PRECOND, decay=_DECAY,
          start=Maybe(Array(1, low=-1e3, high=1.0)), coarse=Boolean(), k_floor=Integer(0, MAX_STEPS),
          extra=Maybe(_DECAY), weight_decay=WEIGHT_DECAY)
def tune(problem, family, batch_size, target, *, precond: float = 0.5, decay: float = 0.99, start=None,
         coarse: bool = True, k_floor: int = 0, extra: float | None = None, weight_decay: float = 0.0):
    """Fewest steps to ``target`` at one batch size, over the family's hyper-parameters.

    Args:
        problem: a model (e.g. :class:`toymodels.NQM`).
        family: one of :data:`FAMILIES`.
        batch_size: B >= 1.
        target: loss target > 0.
        precond: gamma for ``"precond"``.
        decay: the averaging decay of ``"momentum_ema"``.
        start: optional warm start in tuning coordinates (see :class:`_Evaluator`).
        coarse: for large problems with a ``coarsen()`` method, first tune on the coarsened problem
            (global basin search included), then refine on the full one from its optimum.  The steps
            reported are always the full problem's exact first crossing.
        k_floor: a step count the target is not expected to be reachable in (a hint that shortens
            the search; checked, and dropped if a setting does reach the target by then).
            :func:`batch_size_sweep` passes what perfect scaling from the previous batch size
            would give, steps(B') B' / B.
        extra: hold beta (``"momentum"``, ``"momentum_ema"``) or mu (``"ema"``) fixed at this value in
            [0, 1) and tune the learning rate alone (None: tune both; must be None for the other
            families).
        weight_decay: the optimizers' weight decay wd >= 0 (fixed, not tuned; :func:`make_optimizer`).

    Returns:
        dict with ``steps`` (float, ``inf`` if no setting reaches the target), ``lr``, ``extra``
        (beta or mu, for ``"asgd"`` the coordinate of :func:`make_optimizer` that sets kappa, NaN for SGD and ``"polyak"``), ``theta`` (warm start for the next batch size), ``n_evals``.
    """
    _check_problem_family(problem, family)
    fixed = _check_fixed_extra(family, extra)
    bs = check_batch_size(batch_size)
    target = check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)
    wd = check_real("weight_decay", weight_decay, low=0.0, high=math.inf, high_open=True)
    two_d = _EXTRA[family] is not None and fixed is None
    if start is not None:
        if len(start) != 1 + two_d:
            raise ValueError(f"`start` must be {1 + two_d} tuning coordinates for {family!r}; got {len(start)}.")
        start = tuple(float(v) for v in start)
    if problem.initial_loss <= target:
        return {"steps": 0.0, "lr": math.nan, "extra": math.nan, "theta": start, "n_evals": 0, "lo": 0}
    if family == "schedule_free" and isinstance(problem, NQM):
        return _tune_schedule_free(problem, bs, target, start, coarse, fixed, wd)
    ev = _Evaluator(problem, family, bs, precond, decay, fixed, weight_decay=wd)
    global_checks = True
    lo_hint = max(0, int(k_floor))
    inner = lambda k, theta, step: _inner_min(ev, k, theta, step=step)  # noqa: E731
    if coarse and hasattr(problem, "coarsen") and problem.dim > 2000:
        surrogate = problem.coarsen(0.05)
        if surrogate.dim <= problem.dim // 4:
            rs = tune(surrogate, family, bs, target, precond=precond, decay=decay, start=start, coarse=False,
                      k_floor=k_floor, extra=fixed, weight_decay=wd)
            if rs["theta"] is not None:
                start, global_checks = rs["theta"], False
                ev_s = _Evaluator(surrogate, family, bs, precond, decay, fixed, weight_decay=wd)

                def inner(k, theta, step):
                    # the optimum of the coarsened loss, valued on the full model: an upper bound of
                    # min_theta L_k within ~1e-8 relative (the two losses differ by ~1e-4 and their
                    # minimisers by as little, so the value error is second order)
                    cand, _ = _inner_min(ev_s, k, theta, step=step)
                    ev.n_evals += ev_s.n_evals
                    ev_s.n_evals = 0
                    return cand, ev.log_loss(k, *cand)

                # the coarsened loss (5% bins: 147 modes for the d = 10^4 power law) is within ~1e-4
                # of the full one, so its infeasible steps are
                # infeasible here too up to a small shift; keep a margin of 0.2% (at least 2 steps)
                lo_hint = max(0, int(rs["lo"] - max(2, 2e-3 * rs["lo"])))
                ev.n_evals += rs["n_evals"]
    hi, theta = math.inf, None
    if start is not None:
        # search just around the coarsened optimum first (measured: the full model crosses 0 to
        # 2.5e-4 k later at the same theta), then everywhere
        if not global_checks and math.isfinite(rs["steps"]):
            k_c = rs["steps"]
            hi = _exact_steps(ev, tuple(start), target, int(k_c * 1.001) + 16, guess=max(0, int(k_c * 0.9995) - 2))
        else:
            hi = math.inf
        if not math.isfinite(hi):
            hi = _exact_steps(ev, tuple(start), target, 10**12)
        theta = tuple(start) if math.isfinite(hi) else None
    if theta is None:
        hi, theta = _start_point(ev, target, two_d)
    if theta is None:
        return {"steps": math.inf, "lr": math.nan, "extra": math.nan, "theta": None, "n_evals": ev.n_evals, "lo": 0}
    if global_checks and start is None:  # a warm start is checked once the bracket has closed
        hi, theta = _basin_check(ev, hi, theta, target, two_d)
    # Bracket [lo, hi]: no setting reaches the target by step lo (as far as the inner minimisation
    # can tell), the setting ``theta`` reaches it exactly at hi.  v(k) = min_theta log L_k(theta) is
    # smooth and roughly linear in log k, so the next k is interpolated in log k (regula falsi),
    # with a bisection whenever the bracket fails to halve.
    log_target = math.log(target)
    lo, v_lo = 0, math.log(problem.initial_loss)
    if 0 < lo_hint < hi - 1:
        lo = lo_hint
        v_lo = inner(lo, theta, 0.05)[1]
        if v_lo <= log_target:  # the hint was wrong: fall back to the full bracket
            lo, v_lo = 0, math.log(problem.initial_loss)
    v_hi = ev.log_loss(int(hi), *theta)
    stalls = 0
    # re-check hi - 1 from a wider start before accepting hi (the coarsened search already did)
    polish = 1 if global_checks else 0
    while hi - lo > 1 or (polish > 0 and hi > 1):
        if hi - lo <= 1:
            # bracket closed: look once more at hi - 1, from a wider step and from every basin
            polish -= 1
            old_hi = hi
            cand, val = _inner_min(ev, int(hi) - 1, theta, step=1.0)
            if val <= log_target:
                s = _exact_steps(ev, cand, target, int(hi) - 1)
                if math.isfinite(s) and s < hi:
                    hi, theta = s, cand
            if polish == 0 and hi == old_hi and global_checks:
                hi, theta = _basin_check(ev, hi, theta, target, two_d)
            if hi < old_hi:
                v_hi = ev.log_loss(int(hi), *theta)
                lo, stalls, polish = min(lo, int(hi) - 1), 0, 1
            continue
        width = hi - lo
        if stalls < 2 and math.isfinite(v_hi) and v_lo > v_hi:
            frac = (v_lo - log_target) / (v_lo - v_hi)
            u = math.log1p(lo) + frac * (math.log1p(hi) - math.log1p(lo))
            mid = int(round(math.expm1(u)))
        else:
            mid = int(math.sqrt(lo * hi)) if lo >= 1 and hi > 4 * lo else (lo + int(hi)) // 2
        mid = min(max(mid, lo + 1), int(hi) - 1)
        cand, val = inner(mid, theta, 0.3 if global_checks and start is None else 0.05)
        moved = False
        if val <= log_target:
            s = _exact_steps(ev, cand, target, mid, guess=lo + 1)
            if math.isfinite(s) and s < hi:
                hi, theta, v_hi = s, cand, ev.log_loss(int(s), *cand)
                moved = True
        if not moved:
            lo, v_lo = mid, val
        stalls = stalls + 1 if (hi - lo) > width / 2 else 0
    opt = ev.optimizer(*theta)
    extra = (fixed if fixed is not None else math.nan) if not two_d else 1.0 - math.exp(theta[1])
    return {"steps": float(hi), "lr": opt.lr.lr, "extra": extra, "theta": theta, "n_evals": ev.n_evals, "lo": lo}


@validate(problem=_PROBLEM, family=_FAMILY, n_lr=Integer(1, 10**6), n_extra=Integer(1, 10**4), precond=_PRECOND,
          decay=_DECAY)
def default_grid(problem, family, *, n_lr: int = 100, n_extra: int = 20, precond: float = 0.5, decay: float = 0.99):
    """The reference grid: ``n_lr`` log-spaced lrs over [1e-6, 1) x the stability limit, and
    ``n_extra`` values of beta or mu with 1 - value log-spaced over [1e-3, 0.5]."""
    _check_family(family)
    fr = np.geomspace(1e-6, 0.99, n_lr)
    extras = [None] if _EXTRA[family] is None else list(1.0 - np.geomspace(1e-3, 0.5, n_extra))
    return fr, extras


@validate(problem=_PROBLEM, family=_FAMILY, batch_size=BATCH_SIZE, target=TARGET,
          lr_fractions=Array(1, low=0.0, high=1.0, low_open=True, high_open=True),
          extras=Instance(list, tuple, np.ndarray, what="a list of extras (None, or betas / decays in [0, 1))"),
          precond=_PRECOND, decay=_DECAY, incumbent=Real(0.0, math.inf), weight_decay=WEIGHT_DECAY)
def grid_search(problem, family, batch_size, target, *, lr_fractions, extras, precond=0.5, decay=0.99, incumbent=math.inf,
                weight_decay=0.0):
    """Exact minimum of steps_to_target over a grid (lr given as fractions of the stability limit).

    Each point's first crossing is exact; points whose lower bound cannot beat the incumbent are
    skipped.  ``weight_decay`` as in :func:`tune`.  Returns dict like :func:`tune`.
    """
    _check_problem_family(problem, family)
    bs = check_batch_size(batch_size)
    target = check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)
    fr = np.asarray(lr_fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(~(fr > 0)) or np.any(fr >= 1):
        raise ValueError("`lr_fractions` must be a non-empty 1-D array of values in (0, 1).")
    for extra in extras:
        if (extra is None) != (_EXTRA[family] is None):
            raise ValueError(f"`extras` must be [None] for {family!r}" if _EXTRA[family] is None
                             else f"`extras` must hold {_EXTRA[family]} values in [0, 1) for {family!r}")
        if extra is not None:
            check_real("extras", extra, low=0.0, high=1.0, high_open=True)
    ev = _Evaluator(problem, family, bs, precond, decay,
                    weight_decay=check_real("weight_decay", weight_decay, low=0.0, high=math.inf, high_open=True))
    ys = [None if extra is None else math.log(1.0 - extra) for extra in extras]
    thetas = [(math.log(f),) if y is None else (math.log(f), y) for y in ys for f in fr]
    best = _grid_best(ev, target, thetas, incumbent)
    if best[1] is None:
        return {"steps": incumbent, "lr": math.nan, "extra": math.nan, "theta": None}
    opt = ev.optimizer(*best[1])
    extra = math.nan if len(best[1]) == 1 else 1.0 - math.exp(best[1][1])
    return {"steps": float(best[0]), "lr": opt.lr.lr, "extra": extra, "theta": best[1]}


def _result_dataset(problem, family, batch_sizes, rows, target, precond, decay, extra=None, weight_decay=0.0):
    extra_name = _EXTRA_NAME.get(_EXTRA[family])
    data = {
        "steps_to_target": ("batch_size", np.array([r["steps"] for r in rows], dtype=np.float64)),
        "lr_opt": ("batch_size", np.array([r["lr"] for r in rows], dtype=np.float64)),
    }
    if extra_name:
        data[extra_name] = ("batch_size", np.array([_extra_value(family, r["extra"]) for r in rows],
                                                   dtype=np.float64))
    if family in ("momentum", "momentum_ema", "nesterov"):  # the effective learning rate, smooth where (lr, beta) jump
        data["lr_eff_opt"] = ("batch_size", data["lr_opt"][1] / (1.0 - data["momentum_opt"][1]))
    data["reason"] = ("batch_size", np.array([r.get("reason", "") for r in rows], dtype=object).astype(str))
    ds = xr.Dataset(data, coords={"batch_size": np.asarray(batch_sizes, dtype=np.float64)})
    attach_attrs(ds, model=problem.model_name, source="exact", optimizer=family, target=target,
                 precond=precond if family == "precond" else 0.0,
                 decay=decay if family == "momentum_ema" else math.nan, **problem.params)
    if weight_decay:
        ds.attrs["weight_decay"] = weight_decay
    if extra is not None:
        ds.attrs["fixed_extra"] = extra
    return ds


@validate(problem=_PROBLEM, family=_FAMILY, batch_sizes=_BATCH_SIZES, target=TARGET, precond=_PRECOND, decay=_DECAY,
          progress=Boolean(), path=Maybe(Instance(str, os.PathLike, what="a path (str or os.PathLike)")),
          extra=Maybe(_DECAY), weight_decay=WEIGHT_DECAY)
def batch_size_sweep(problem, family, batch_sizes, target, *, precond: float = 0.5, decay: float = 0.99,
                     progress: bool = True, path: str | os.PathLike | None = None, extra: float | None = None,
                     weight_decay: float = 0.0):
    """Tuned steps-to-target for each batch size.

    Args:
        problem: a model with ``steps_to_target`` (see the module docstring): an NQM and a
            GaussianLinearRegression take every family, a FiniteLinearRegression (at most 32
            features) ``"sgd"`` only (its ``families``).
        family: ``"sgd"``, ``"precond"`` (P = H^precond), ``"momentum"`` (tunes lr and beta), ``"ema"``
            (SGD with iterate averaging; tunes lr and the decay), ``"momentum_ema"`` (tunes lr and
            beta; averaging decay fixed at ``decay``), ``"nesterov"`` (lr and beta), ``"asgd"``
            (Kidambi et al.'s accelerated SGD: lr and kappa, reported as ``kappa_opt``), ``"polyak"``
            (SGD with uniform iterate averaging: lr) or ``"schedule_free"`` (lr and beta).  The last
            two change at every update.  The Polyak average of SGD has a closed form; schedule-free
            SGD has none: on an NQM it is tuned by one scan per setting on a coarsened model (see
            :func:`_tune_schedule_free`; its reported steps are the full model's exact crossing),
            elsewhere searched one update at a time (at most 10^6 per setting), much slower.
        batch_sizes: increasing batch sizes in [1, 2^53].
        target: loss target > 0.
        progress: tqdm bar over batch sizes.
        path: a netCDF file written (atomically) after every batch size; an existing file with the
            same settings and batch-size grid is resumed (finished batch sizes are not recomputed);
            one that is unreadable, incomplete or of other settings is recomputed with a
            :class:`toymodels.resume.ResumeWarning` naming it.
        extra: hold beta or mu fixed at this value and tune the learning rate alone (see
            :func:`tune`; ``momentum_opt`` / ``decay_opt`` then hold it, and attr ``fixed_extra``).
        weight_decay: every optimizer's weight decay wd >= 0 (fixed, not tuned; attr ``weight_decay``
            when > 0): coupled, the update's gradient gets wd theta (:mod:`toymodels.optimizers`).

    Returns:
        Dataset over ``batch_size`` with ``steps_to_target``, ``lr_opt``, ``momentum_opt`` or
        ``decay_opt`` and ``reason``; attrs ``model``, ``source="exact"``, ``optimizer``, ``target``.
        The families with a tuned beta (``"momentum"``, ``"momentum_ema"``) also give ``lr_eff_opt``
        = ``lr_opt / (1 - momentum_opt)``, heavy ball's effective learning rate: the tuned pair
        (lr, beta) can jump between neighbouring batch sizes along a ridge of nearly equal
        lr / (1 - beta), which is smooth.
        The optimum per batch size is at least as good as the exact optimum over
        :func:`default_grid` (checked in the tests).
    """
    _check_problem_family(problem, family)
    fixed = _check_fixed_extra(family, extra)
    target = check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)
    bss = [check_batch_size(b) for b in np.atleast_1d(batch_sizes)]
    if any(b2 <= b1 for b1, b2 in zip(bss, bss[1:])):
        raise ValueError("`batch_sizes` must be strictly increasing.")
    wd = check_real("weight_decay", weight_decay, low=0.0, high=math.inf, high_open=True)
    warmup.start()  # a fresh numba cache: compile the later kernels in a second process meanwhile
    rows = []
    extra_name = _EXTRA_NAME.get(_EXTRA[family])
    old = None
    if path is not None:
        settings = dict(optimizer=family, target=target, model=problem.model_name, **problem.params)
        if family == "precond":
            settings["precond"] = precond
        if family == "momentum_ema":
            settings["decay"] = decay
        if fixed is not None:
            settings["fixed_extra"] = fixed
        if wd:
            settings["weight_decay"] = wd

        def tuned_both(ds):  # a sweep that tunes beta / mu does not resume one that held it fixed
            if fixed is None and "fixed_extra" in ds.attrs:
                raise ValueError(f"it holds the extra hyper-parameter fixed at {ds.attrs['fixed_extra']}")
            if not wd and ds.attrs.get("weight_decay", 0.0):  # nor one without weight decay one with it
                raise ValueError(f"it has weight_decay {ds.attrs['weight_decay']}")

        old = resume.read(path, settings=settings, prefix={"batch_size": bss}, check=tuned_both,
                          variables=("steps_to_target", "lr_opt", "reason") + ((extra_name,) if extra_name else ()))
    if old is not None:
        for j in range(min(old.batch_size.size, len(bss))):
            rows.append({
                "steps": float(old.steps_to_target[j]), "lr": float(old.lr_opt[j]),
                "extra": _extra_from_value(family, float(old[extra_name][j])) if extra_name else math.nan,
                "reason": str(old.reason.values[j]), "theta": None,
            })
    start, k_floor = None, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(bss), initial=len(rows), desc=f"sweep {family}", unit="B")
    if rows and math.isfinite(rows[-1]["steps"]) and math.isfinite(rows[-1]["lr"]):
        ev = _Evaluator(problem, family, bss[len(rows) - 1], precond, decay, fixed, weight_decay=wd)
        one_d = _EXTRA[family] is None or fixed is not None
        probe = ev.optimizer(0.0, None if one_d else math.log(1 - rows[-1]["extra"]))
        x = math.log(rows[-1]["lr"] / problem.lr_limit(probe))
        start = (x,) if one_d else (x, math.log(1 - rows[-1]["extra"]))
    for j, bs in enumerate(bss[len(rows):], start=len(rows)):
        if j > 0 and math.isfinite(rows[-1]["steps"]):
            k_floor = max(0, int(rows[-1]["steps"] * bss[j - 1] / bs) - 1)
        res = tune(problem, family, bs, target, precond=precond, decay=decay, start=start, k_floor=k_floor,
                   extra=fixed, weight_decay=wd)
        if math.isfinite(res["steps"]):
            start = res["theta"]
            res["reason"] = ""
        else:
            res["reason"] = "no setting reaches the target"
        rows.append(res)
        if path is not None:
            resume.write(_result_dataset(problem, family, bss[: len(rows)], rows, target, precond, decay, fixed, wd),
                         path)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return _result_dataset(problem, family, bss, rows, target, precond, decay, fixed, wd)


def _family_job(args):
    problem, family, batch_sizes, target, kwargs = args
    return family, batch_size_sweep(problem, family, batch_sizes, target, progress=False, **kwargs)


def _parallel_backend(dim: int) -> str:
    """How :func:`family_sweeps` runs families side by side: ``"threads"``, ``"fork"`` or ``"serial"``.

    The kernels release the GIL, so threads work wherever numba's threading layer is thread-safe
    (``omp``, ``tbb``), and always for problems below the parallel threshold, whose kernels are all
    serial (no threading layer is started for them).  The ``workqueue`` layer is not thread-safe, but
    it survives ``fork``, so there the families go to forked processes, which start with this
    process's compiled kernels.
    """
    import multiprocessing as mp

    from .dynamics import _PARALLEL_MIN_MODES, _ensure_threading_layer

    if dim < _PARALLEL_MIN_MODES:
        return "threads"

    layer = _ensure_threading_layer()
    if layer in ("omp", "tbb"):
        return "threads"
    return "fork" if "fork" in mp.get_all_start_methods() else "serial"


@validate(problem=_PROBLEM, families=Instance(list, tuple, what="a list of family names"), batch_sizes=_BATCH_SIZES,
          target=TARGET, n_jobs=Maybe(Integer(1, 1024)), paths=Maybe(Instance(dict, what="a dict family -> path")),
          progress=Boolean(), scheduler=_Scheduler())
def family_sweeps(problem, families, batch_sizes, target, *, n_jobs: int | None = None, paths=None,
                  progress: bool = True, scheduler=None, **kwargs) -> dict:
    """:func:`batch_size_sweep` for several families, run side by side.

    Args:
        problem, batch_sizes, target: as for :func:`batch_size_sweep`.
        families: names from :data:`FAMILIES` (each at most once).
        n_jobs: families run at once (default: ``os.cpu_count()``); 1 runs them one after another.
            Threads where numba's threading layer is thread-safe, else forked processes (see
            :func:`_parallel_backend`); serial where neither is possible.
        paths: optional ``{family: netCDF path}`` for resumable runs (see :func:`batch_size_sweep`).
        progress: a tqdm bar over finished families.
        scheduler: run the families as tasks on dask instead (``"local"`` for a LocalCluster of
            ``n_jobs`` worker processes, a scheduler address, or a ``distributed.Client``; see
            :func:`toymodels.parallel.run_tasks`); the ``paths`` must then be reachable by the workers.
        **kwargs: ``precond``, ``decay`` and ``weight_decay``, passed on.

    Returns:
        ``{family: Dataset}`` in the order of ``families``.
    """
    import multiprocessing as mp

    families = [_check_family(f) for f in families]
    warmup.start()
    for f in families:
        _check_problem_family(problem, f)
    if len(set(families)) != len(families):
        raise ValueError(f"`families` must not repeat a family; got {families}.")
    unknown = set(kwargs) - {"precond", "decay", "weight_decay"}
    if unknown:
        raise TypeError(f"family_sweeps got unexpected keyword arguments {sorted(unknown)}.")
    paths = dict(paths or {})
    n_jobs = check_int("n_jobs", (os.cpu_count() or 1) if n_jobs is None else n_jobs, low=1)
    n_jobs = min(n_jobs, len(families)) if scheduler is None else n_jobs
    backend = _parallel_backend(int(getattr(problem, "dim", 0))) if n_jobs > 1 else "serial"
    jobs = [(problem, f, batch_sizes, target, dict(kwargs, path=paths.get(f))) for f in families]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(families), desc="families", unit="family")
    out = {}

    def record(result):
        out[result[0]] = result[1]
        if bar is not None:
            bar.update(1)

    if scheduler is not None:
        run_tasks(_family_job, jobs, scheduler=check_scheduler(scheduler), on_result=record, n_workers=n_jobs)
    elif backend != "serial":
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

        # two-state families (momentum, averaging) take the longest: start them first
        order = sorted(range(len(jobs)), key=lambda j: _EXTRA[families[j]] is None)
        pool = (ThreadPoolExecutor(n_jobs) if backend == "threads"
                else ProcessPoolExecutor(n_jobs, mp_context=mp.get_context("fork")))
        with pool:
            futures = [pool.submit(_family_job, jobs[j]) for j in order]
            for fut in as_completed(futures):
                record(fut.result())
    else:
        for job in jobs:
            record(_family_job(job))
    if bar is not None:
        bar.close()
    return {f: out[f] for f in families}


@validate(problem=Instance(NQM, what="an NQM (its gradient noise does not depend on the state)"),
          batch_size=BATCH_SIZE, target=TARGET, n_pieces=Integer(1, 10), precond=_PRECOND, coarse=Boolean())
def tune_schedule(problem, batch_size, target, *, n_pieces: int = 3, precond: float = 0.0, coarse: bool = True):
    """Fewest steps to ``target`` over piecewise-constant SGD schedules with ``n_pieces`` pieces.

    The lecture's "fitting optimal learning rate schedules": for a horizon K the schedule is
    ``n_pieces`` learning rates and the fraction of K spent in each; the loss at step K is exact (piece
    by piece in closed form, :func:`toymodels._localmin.schedule_log_loss`), minimised over the
    schedule by a compiled Nelder-Mead, and K is bisected as in :func:`tune`.  Problems
    above 2000 modes are fitted on ``problem.coarsen()`` (``coarse=True``); the steps reported are
    the full problem's exact first crossing for the fitted schedule.

    Returns:
        dict with ``steps`` (the exact first crossing of the returned schedule, at most the tuned
        constant learning rate's), ``schedule`` (a :class:`PiecewiseConstant`), ``lrs`` and
        ``fractions``.
    """

    if not isinstance(problem, NQM):  # the closed form needs noise independent of the state
        raise TypeError(f"`problem` must be an NQM (its gradient noise does not depend on the state); "
                        f"got {type(problem).__name__}.")
    n_pieces = check_int("n_pieces", n_pieces, low=1, high=10)
    if coarse and hasattr(problem, "coarsen") and problem.dim > 2000:
        # fit the schedule on the coarsened model; report the full model's exact steps for it
        res = tune_schedule(problem.coarsen(), batch_size, target, n_pieces=n_pieces, precond=precond, coarse=False)
        if res["schedule"] is not None:
            res["steps"] = float(problem.steps_to_target(SGD(res["schedule"], precond=precond), batch_size, target))
        return res
    bs = check_batch_size(batch_size)
    target = check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)
    probe = SGD(1.0, precond=precond)
    limit = problem.lr_limit(probe)
    _, a1, b1 = probe.affine(problem.h)
    a1, b1 = a1[:, 0, 0].copy(), b1[:, 0].copy()
    q = problem.c / bs
    S0 = np.asarray(problem.init_sq, dtype=np.float64).copy()

    def unpack(z, K):
        lrs = limit * np.exp(np.minimum(z[:n_pieces], -1e-9))
        w = np.exp(np.concatenate([[0.0], z[n_pieces:]]))
        frac = w / w.sum()
        bounds = np.rint(np.cumsum(frac)[:-1] * K).astype(np.int64)
        return lrs, frac, bounds

    base = tune(problem, "precond" if precond else "sgd", bs, target, precond=precond)
    if not math.isfinite(base["steps"]) or base["steps"] == 0:
        return {"steps": base["steps"], "schedule": None, "lrs": np.array([base["lr"]]), "fractions": np.ones(1)}
    hi = base["steps"]
    # start from the tuned constant schedule, which reaches the target at hi
    best_z = np.concatenate([np.full(n_pieces, math.log(base["lr"] / limit)), np.zeros(n_pieces - 1)])
    lo = 0
    log_target = math.log(target)
    while hi - lo > 1:
        K = (lo + int(hi)) // 2
        z, fun = best_z, math.inf
        for _ in range(2):  # a second start from the first one's optimum, with a fresh simplex
            # simplex steps: 5% of each log learning rate (scipy's), half a unit of each log weight
            simplex_steps = np.concatenate([np.where(z[:n_pieces] != 0, 0.05 * z[:n_pieces], 0.00025),
                                            np.full(n_pieces - 1, 0.5)])
            z, fun, _ = _localmin.schedule_nelder_mead(z, simplex_steps, 1e-4, 1e-10, 400 * n_pieces, K, n_pieces, limit, a1,
                                                       b1, q, S0, problem.h)
            if fun <= log_target:
                break
        if fun <= log_target:
            hi, best_z = float(K), z
        else:
            lo = K
    lrs, frac, bounds = unpack(best_z, int(hi))
    edges = np.concatenate([[0], bounds, [int(hi)]])
    kept = [p for p in range(n_pieces) if edges[p + 1] > edges[p]] or [0]
    sched = PiecewiseConstant(tuple(int(edges[p]) for p in kept[1:]), tuple(float(lrs[p]) for p in kept))
    steps = problem.steps_to_target(SGD(sched, precond=precond), bs, target)
    return {"steps": float(steps), "schedule": sched, "lrs": lrs, "fractions": frac}
