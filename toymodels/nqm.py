"""The noisy quadratic model (NQM) of Grosse's lecture (CSC 2541 Lecture 7, "Noisy Quadratic Model").

Loss L(theta) = 1/2 sum_i h_i theta_i^2; a mini-batch gradient of size B is H theta + eps with
Cov(eps) = diag(c) / B, independent across steps; E[theta_i^2] = init_sq_i at step 0.  With H and C
co-diagonal every coordinate evolves on its own, so the expected loss of any optimizer in
:mod:`toymodels.optimizers` follows exactly from the per-mode second moments
(:mod:`toymodels.dynamics`).  For SGD the per-mode loss is the lecture's

    E L_i(k) = (1 - a h_i)^(2k) E L_i(0) + (1 - (1 - a h_i)^(2k)) a c_i / (2 B (2 - a h_i)).

Example:
    >>> from toymodels import NQM, SGD
    >>> nqm = NQM.power_law(1000)
    >>> k = nqm.steps_to_target(SGD(0.5), batch_size=64, target=0.1)

References:
    R. Grosse, "CSC 2541: Neural Net Training Dynamics", Lecture 7 "Stochasticity and Parallelism",
    University of Toronto, Winter 2022.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from . import _polyak, _schedfree, dynamics
from ._args import (BATCH_SIZE, BATCH_SIZES, MAYBE_LR, MC_STEPS, N_RUNS, OPTIMIZER, POSITIVE_ARRAY, PROGRESS, SEED,
                    STEP, STEPS, TARGET)
from ._validate import (MAX_EXACT_INT, MAX_STEPS, Array, Boolean, Callable, Integer, Maybe, Real, check_bytes,
                        check_int, check_real, check_spectrum, check_steps, validate)
from .montecarlo import mc_divergence, mc_stats_dataset, simulate_linear_system, simulate_varying_system
from .optimizers import SGD, Optimizer, PolyakAverage, ScheduleFree
from .schedules import Constant, Schedule, batch_sizes_at, constant_from, cumulative
from .schedules import check_batch_size as check_batch_sizes
from .schema import attach_attrs
from .spectra import power_law
from .stats import gradient_statistics

__all__ = ["NQM", "check_batch_size", "batch_at_steps"]

_SCAN_LIMIT = 10**7  # step-by-step updates for schedules that never become constant


def check_batch_size(batch_size) -> float:
    """Batch size: a real number in [1, 2^53] (large powers of two are common, so floats are accepted;
    above 2^53 a float is no longer a count)."""
    return check_real("batch_size", batch_size, low=1.0, high=float(MAX_EXACT_INT))


def _check_optimizer(optimizer):
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"`optimizer` must be an optimizer spec (toymodels.optimizers); got {type(optimizer).__name__}.")
    return optimizer


def _no_closed_form(optimizer):
    """Refuse a closed form for an optimizer that changes at every update."""
    if optimizer.time_varying:
        raise NotImplementedError(f"{type(optimizer).__name__} has no closed form for a constant learning rate (its "
                                  f"averaging weight changes at every update); its curves are computed step by step.")


def checked_trajectory(model, optimizer, batch_size, steps, progress=None):
    """Validate the arguments of ``gradient_stats`` and run ``model._trajectory``; overflowed
    entries become ``inf``.  Returns ``(batch, steps, loss, grad_sq, diverged_mask)``, ``batch`` the
    checked batch size (a float) or batch-size schedule."""
    _check_optimizer(optimizer)
    batch = check_batch_sizes(batch_size)
    ks = check_steps(steps)
    loss, gsq = model._trajectory(optimizer, batch, ks, progress=progress)
    bad = ~np.isfinite(loss) | ~np.isfinite(gsq)
    loss[bad] = np.inf
    gsq[bad] = np.inf
    return batch, ks, loss, gsq, bad


def batch_at_steps(batch, ks):
    """The batch size the statistics at steps ``ks`` use: ``batch`` itself (a float), or for a
    schedule B_k at each step k, that of the mini-batch drawn there (for the update k -> k + 1)."""
    return batch_sizes_at(batch, ks) if isinstance(batch, Schedule) else batch


def batch_fields(batch, ks, bs):
    """The extra coordinates of a curve under a batch-size schedule (none for a constant batch size):
    ``batch_size`` (B_k, ``bs``) and ``examples`` (sum_{j<k} B_j, examples drawn before step k) over
    ``step``; and the ``batch_size`` attribute (the number, or the schedule's repr)."""
    if not isinstance(batch, Schedule):
        return {}, batch
    coords = {"batch_size": ("step", np.asarray(bs, np.float64)), "examples": ("step", cumulative(batch, ks))}
    return coords, repr(batch)


def mc_setup(optimizer, batch_size, steps, n_runs, seed, progress):
    """The checked arguments of a Monte Carlo ``simulate`` and its generator and optional tqdm bar:
    ``(batch, steps, n_runs, seed, rng, bar)`` (``batch`` a float or a batch-size schedule)."""
    _check_optimizer(optimizer)
    bs = check_batch_sizes(batch_size)
    ks = check_steps(steps)
    n_runs = check_int("n_runs", n_runs, low=2)
    seed = check_int("seed", seed, low=0)
    check_bytes("n_runs", 3 * 8.0 * ks.size * n_runs, what=f"{ks.size} recorded steps x {n_runs} runs")
    per_step = 16.0 if isinstance(bs, Schedule) else 8.0
    check_bytes("steps", per_step * (int(ks[-1]) + 1), what=f"{int(ks[-1])} learning rates (and batch sizes)")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=int(ks[-1]), desc="simulate", unit="step")
    return bs, ks, n_runs, seed, np.random.default_rng(seed), bar


def _check_target(target):
    return check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)


class _FamilyLoss:
    """L_k(lr, e) of an optimizer family affine in e (on either side of ``kink``: piecewise affine),
    evaluated without building optimizer objects."""

    def __init__(self, pieces, q, h, readout, S0, kink=math.inf):
        # pieces: one or two (parts, lims); parts = (A0(0), dA0/de, A1(0), dA1/de, b1(0), db1/de) and
        # lims = (l0, l1, l2), the limit (l0 + e l1) / (1 + e l2); the second piece holds for e > kink
        self.pieces, self.kink = pieces if len(pieces) == 2 else pieces * 2, float(kink)
        self.q, self.h, self.readout, self.S0 = q, h, readout, S0

    def _piece(self, e):
        return self.pieces[1] if e > self.kink else self.pieces[0]

    def limit(self, e):
        l0, l1, l2 = self._piece(e)[1]
        return (l0 + e * l1) / (1.0 + e * l2)

    def loss(self, e, lr, k):
        return dynamics.loss_at_parts(self._piece(e)[0], e, lr, self.q, self.h, self.readout, self.S0, k)

    def kernel_args(self, k):
        """The arguments of :func:`toymodels._localmin.family_log_loss` after (x, y), up to k."""
        (p_lo, l_lo), (p_hi, l_hi) = self.pieces
        return p_lo, l_lo, p_hi, l_hi, self.kink, self.q, self.h, int(self.readout), self.S0, int(k)


class _FamilyEvaluator:
    """L_k(lr, e) of any optimizer family ``make(e)`` through :meth:`NQM._loss_at` (see
    :meth:`NQM.family_evaluator`)."""

    def __init__(self, model, make, batch_size):
        self.model, self.make, self.batch_size = model, make, batch_size
        self._cache = {}

    def _at(self, e):
        got = self._cache.get(e)
        if got is None:
            opt = self.make(e)
            got = (opt, float(opt._lr_limit(self.model.h)))
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[e] = got
        return got

    def limit(self, e):
        return self._at(e)[1]

    def loss(self, e, lr, k):
        return self.model._loss_at(self._at(e)[0], self.batch_size, int(k), lr)


class NQM:
    """Noisy quadratic model with curvature ``h``, per-example noise variance ``c`` and E[theta_0^2].

    Args:
        h: ``(d,)`` curvatures, finite and > 0.
        c: ``(d,)`` per-example gradient-noise variances, finite and >= 0 (default: ``h``, i.e. H = C).
        init_sq: E[theta_i^2] at step 0, scalar or ``(d,)``, > 0.
    """

    model_name = "nqm"

    @validate(h=POSITIVE_ARRAY, c=Maybe(Array(1, low=0.0)), init_sq=Array((0, 1), low=0.0, low_open=True))
    def __init__(self, h, c=None, init_sq=1.0):
        self.h = check_spectrum("h", h)
        d = self.h.size
        self.c = self.h.copy() if c is None else check_spectrum("c", c, dim=d, positive=False)
        self.init_sq = check_spectrum("init_sq", init_sq, dim=d)

    @classmethod
    @validate(dim=Integer(1, 2**40), hessian_power=Real(0.0, 50.0), noise_power=Real(0.0, 50.0),
              init_sq=Real(0.0, math.inf, low_open=True, high_open=True))
    def power_law(cls, dim: int, hessian_power: float = 1.0, noise_power: float = 1.0, init_sq: float = 1.0):
        """h_i = i^-hessian_power, c_i = i^-noise_power (the lecture's choice is both = 1)."""
        return cls(power_law(dim, hessian_power), power_law(dim, noise_power), init_sq)

    # ------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of modes d (eigen-directions of H)."""
        return self.h.size

    @property
    def initial_loss(self) -> float:
        """L_0 = 1/2 sum_i h_i init_sq_i."""
        return float(0.5 * np.sum(self.h * self.init_sq))

    @property
    def params(self) -> dict:
        """The attrs of the model's results: ``dim`` and ``initial_loss``."""
        return {"dim": self.dim, "initial_loss": self.initial_loss}

    def _S0(self, optimizer):
        """Second moments at step 0, ``(d, s, s)``; cached per state layout (treat as read-only)."""
        u = optimizer.init
        key = tuple(u)
        cache = self.__dict__.setdefault("_s0_cache", {})
        if key not in cache:
            cache[key] = np.ascontiguousarray(self.init_sq[:, None, None] * np.outer(u, u)[None])
        return cache[key]

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, lr=MAYBE_LR)
    def modal_form(self, optimizer, batch_size, lr: float | None = None) -> dynamics.ModalForm:
        """The closed form of the expected loss for a constant learning rate (default: the spec's)."""
        _check_optimizer(optimizer)
        _no_closed_form(optimizer)
        bs = check_batch_size(batch_size)
        if lr is None:
            sched = optimizer.lr
            if not isinstance(sched, Constant):
                raise ValueError("`optimizer` must have a constant learning rate here.")
            lr = sched.lr
        A, b = optimizer.transition(self.h, lr)
        return dynamics.ModalForm(A, b, self.c / bs, self.h, optimizer.readout, self._S0(optimizer))

    @validate(rel_width=Real(0.0, 1.0, low_open=True))
    def coarsen(self, rel_width: float = 0.02) -> "NQM":
        """A smaller NQM for fast approximate searches: modes binned by curvature.

        Modes whose curvatures lie in one log-bin of relative width ``rel_width`` merge into one mode
        with the loss-weighted geometric mean curvature and the *summed* noise variance and initial
        second moment.  The loss is linear in (init_sq, c) at fixed h, so the merged mode reproduces
        the bin's loss exactly when the curvatures coincide and to second order in the bin width
        otherwise.  Used by :func:`toymodels.sweep.tune` to locate optima; exact answers always come
        from the full model.
        """
        rel_width = check_real("rel_width", rel_width, low=0.0, high=1.0, low_open=True)
        order = np.argsort(-self.h, kind="stable")
        h, c, s0 = self.h[order], self.c[order], self.init_sq[order]
        logh = np.log(h)
        group = np.floor((logh[0] - logh) / math.log1p(rel_width)).astype(np.int64)
        idx = np.flatnonzero(np.diff(group, prepend=-1))
        w = s0 * h
        hb = np.exp(np.add.reduceat(w * logh, idx) / np.add.reduceat(w, idx))
        return NQM(hb, np.add.reduceat(c, idx), np.add.reduceat(s0, idx))

    @validate(optimizer=OPTIMIZER)
    def lr_limit(self, optimizer) -> float:
        """Largest stable constant learning rate of ``optimizer`` on this spectrum."""
        return float(_check_optimizer(optimizer).lr_limit(self.h))

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE, k=STEP, lr=MAYBE_LR)
    def loss_at_step(self, optimizer, batch_size, k: int, lr: float | None = None) -> float:
        """Exact expected loss at step k (an integer in [0, 10^15]) for a constant learning rate
        (the spec's, or ``lr``): the tuner's inner loop."""
        if lr is None:
            if not isinstance(optimizer.lr, Constant):
                raise ValueError("`optimizer` must have a constant learning rate here (or pass `lr`).")
            lr = optimizer.lr.lr
        return self._loss_at(optimizer, batch_size, int(k), lr)

    def _loss_at(self, optimizer, batch_size, k, lr):
        """:meth:`loss_at_step` without the checks (the tuner's inner loop)."""
        fast = self._polyak_sgd(optimizer, lr, batch_size)
        if fast is not None:  # Polyak average of SGD: closed form, O(d)
            return float(_polyak._loss(*fast, int(k)))
        if hasattr(optimizer, "sum_affine"):  # Polyak: the running sum is a constant system, O(log k)
            a0, a1, b1 = optimizer.sum_affine(self.h)
            with np.errstate(over="ignore", invalid="ignore"):
                S = dynamics.jump(a0 + lr * a1, lr * b1, self.c / batch_size, self._S0(optimizer), k)
                r = optimizer.readout
                v = 0.5 * float(np.sum(self.h * S[:, r, r])) / float(k + 1) ** 2
            return v if math.isfinite(v) else math.inf
        if isinstance(optimizer, ScheduleFree):  # k updates one at a time, two states per mode
            if k > dynamics.MAX_SCAN_UPDATES or k * self.dim > dynamics.MAX_SCAN_WORK:
                raise ValueError(f"`k` must be reached within {dynamics.MAX_SCAN_UPDATES:.0e} step-by-step updates "
                                 f"(and {dynamics.MAX_SCAN_WORK:.0e} updates x modes) for an optimizer whose "
                                 f"averaging weight changes at every update; got {k} updates x {self.dim} modes.")
            k_hit, v = self._schedule_free(optimizer, lr, batch_size, 0, int(k), -math.inf)
            return v if k_hit != -2 else math.inf
        if optimizer.time_varying:  # k updates one at a time
            S = self._S0(optimizer).copy()
            loss, _ = dynamics.propagate_varying(optimizer.parts(self.h), optimizer.coefficients, self.c / batch_size,
                                                 self.h, optimizer.readout, Constant(lr), np.array([k]), S,
                                                 progress=False, name="k")
            return float(loss[0]) if np.isfinite(loss[0]) else math.inf
        a0, a1, b1 = optimizer._affine(self.h)
        A, b = a0 + lr * a1, lr * b1
        if optimizer.n_state <= 2:
            return dynamics.loss_at(A, b, self.c / batch_size, self.h, optimizer.readout, self._S0(optimizer), k)
        mf = dynamics.ModalForm(A, b, self.c / batch_size, self.h, optimizer.readout, self._S0(optimizer))
        return float(mf.loss(np.array([k]))[0])

    def _affine_piece(self, make, lo, hi):
        """``(parts, lims)`` of the family ``make(e)`` on [lo, hi) (see :meth:`family_loss`), or None."""
        w = hi - lo
        es = (lo, lo + 0.25 * w, lo + 0.5 * w)
        opts = [make(e) for e in es]
        if opts[0].n_state > 2 or opts[0].time_varying:
            return None
        aff = [o.affine(self.h) for o in opts]
        parts = []
        for j in range(3):
            z0, zq, z1 = aff[0][j], aff[1][j], aff[2][j]
            slope = (z1 - z0) / (0.5 * w)
            if not np.allclose(z0 + 0.25 * w * slope, zq, rtol=1e-12, atol=1e-15):
                return None
            parts += [np.ascontiguousarray(z0 - lo * slope), np.ascontiguousarray(slope)]
        lim = [self.lr_limit(o) for o in opts]
        if abs(lim[0] + 0.25 * (lim[2] - lim[0]) / 0.5 - lim[1]) <= 1e-12 * abs(lim[1]):
            l1 = (lim[2] - lim[0]) / (0.5 * w)
            return tuple(parts), (float(lim[0] - lo * l1), float(l1), 0.0)
        # a limit (l0 + e l1) / (1 + e l2), fitted at lo + (0, 0.5, 0.9) w: l0 + e l1 - e lim(e) l2 = lim(e)
        e3 = np.array([lo, lo + 0.5 * w, lo + 0.9 * w])
        l3 = np.array([lim[0], lim[2], self.lr_limit(make(e3[2]))])
        l0, l1, l2 = np.linalg.solve(np.stack([np.ones(3), e3, -e3 * l3], axis=1), l3)
        if abs((l0 + es[1] * l1) / (1.0 + es[1] * l2) - lim[1]) > 1e-12 * abs(lim[1]) or 1.0 + hi * l2 <= 0.0:
            return None
        return tuple(parts), (float(l0), float(l1), float(l2))

    @validate(make=Callable(), batch_size=BATCH_SIZE, kink=Maybe(Real(0.0, 1.0, low_open=True, high_open=True)))
    def family_loss(self, make, batch_size, kink: float | None = None):
        """Fast L_k for a family of optimizers ``make(e)`` (lr = 1) affine in a hyper-parameter e in [0, 1)
        (with ``kink``: affine on [0, kink] and on [kink, 1) apart, as accelerated SGD's
        :attr:`~toymodels.optimizers.AcceleratedSGD.momentum_form` where its xi reaches its cap).

        Returns an object with ``limit(e)`` (stable lr limit) and ``loss(e, lr, k)``, or None when the
        family has more than 2 states, changes at every update, or is not affine in e (checked at e = 0,
        0.25, 0.5 of each piece), or its stability limit is neither affine in e nor (l0 + e l1) / (1 + e l2)
        (Nesterov's, fitted at 0, 0.5, 0.9 of the piece and checked at 0.25).
        """
        bounds = (0.0, 1.0) if kink is None else (0.0, kink, 1.0)
        pieces = [self._affine_piece(make, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        if any(p is None for p in pieces):
            return None
        o = make(0.0)
        return _FamilyLoss(pieces, self.c / batch_size, self.h, o.readout, self._S0(o),
                           kink=math.inf if kink is None else kink)

    @validate(make=Callable(), batch_size=BATCH_SIZE)
    def family_evaluator(self, make, batch_size):
        """L_k(lr, e) of any family of optimizers ``make(e)`` (lr = 1), for tuners: an object with
        ``limit(e)`` (the stable lr limit) and ``loss(e, lr, k)`` (:meth:`loss_at_step` of ``make(e)`` at
        ``lr``, the same value), which builds each e's optimizer and limit once (the last 64 kept) and
        skips the argument checks of the public calls.  Unlike :meth:`family_loss` it is not compiled:
        it serves the families that one does not (the Polyak average, schedule-free SGD)."""
        return _FamilyEvaluator(self, make, check_batch_size(batch_size))

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZE)
    def noise_floor(self, optimizer, batch_size) -> float:
        """Stationary expected loss for the spec's constant learning rate (``inf`` if unstable)."""
        return self.modal_form(optimizer, batch_size).loss_inf

    # ------------------------------------------------------------------------------------------
    def _trajectory(self, optimizer, batch_size, ks, progress=None):
        """Exact expected loss and sum h^2 E[theta^2] at sorted steps ``ks``: pieces where the learning
        rate and the batch size (a float or a schedule) are both constant in closed form, the rest
        step by step (:func:`toymodels.dynamics.propagate_schedule`)."""
        sched = batch_size if isinstance(batch_size, Schedule) else None
        q = self.c if sched is not None else self.c / batch_size
        S = self._S0(optimizer).copy()
        if optimizer.time_varying:
            return dynamics.propagate_varying(optimizer.parts(self.h), optimizer.coefficients, q, self.h,
                                              optimizer.readout, optimizer.lr, ks, S, batch=sched, progress=progress)
        a0, a1, b1 = optimizer.affine(self.h)
        return dynamics.propagate_schedule(a0, a1, b1, q, self.h, optimizer.readout, optimizer.lr, ks, S,
                                           progress=progress, batch=sched)

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def loss_curve(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.DataArray:
        """Exact expected loss over steps.

        Args:
            optimizer: an optimizer spec (its ``lr`` a number or a schedule).
            batch_size: B >= 1 (a real number: only the noise variance c / B enters), or a batch-size
                schedule (:class:`toymodels.schedules.Schedule` with values B_k in [1, 2^53], e.g.
                :class:`~toymodels.schedules.BatchSizeWarmup` or ``PiecewiseConstant``): update k
                (step k -> k + 1) has noise variance c / B_k.  Pieces where the learning rate and
                the batch size are both constant are jumped in closed form; where either changes at
                every update, the updates are computed one at a time (bounded as below).
            steps: a count n (the curve at 0..n) or a strictly increasing array of step indices
                <= 10^15; where the learning rate is constant (piecewise-constant schedules, and the
                constant tail of the others) the cost grows with log(step), so a 10^7-step curve on a
                log grid is cheap.  Where it keeps changing (``Cosine``, ``Exponential``, warm-up)
                every update is computed, at most 10^9 of them (and 2e10 updates x modes:
                :data:`toymodels.dynamics.MAX_SCAN_UPDATES`, ``MAX_SCAN_WORK``), else ValueError.
            progress: a tqdm bar over the updates computed one at a time (None: when there are more
                than 10^6).

        Returns:
            ``DataArray`` named ``loss`` over ``step``; ``inf`` where the run has overflowed
            (``attrs["diverged"]`` says whether it did).  Under a batch-size schedule it has the
            coordinates ``batch_size`` (B_k) and ``examples`` (sum_{j<k} B_j, the examples drawn
            before step k) over ``step``, and ``attrs["batch_size"]`` is the schedule's repr.
        """
        ds = self.gradient_stats(optimizer, batch_size, steps, progress=progress)
        return ds["loss"]

    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=STEPS, progress=PROGRESS)
    def gradient_stats(self, optimizer, batch_size, steps, *, progress: bool | None = None) -> xr.Dataset:
        """Loss and the gradient statistics along the exact expected trajectory.

        At step k the expected squared norm of the full-batch gradient is sum_i h_i^2 E[theta_i^2]
        (taken at the base iterate theta, also under iterate averaging), the per-example noise
        covariance trace is sum_i c_i; the statistics follow :func:`toymodels.stats.gradient_statistics`
        with the batch size of step k: under a batch-size schedule B_k, that of the mini-batch drawn
        at step k (for the update k -> k + 1).

        Args and limits as :meth:`loss_curve` (``progress``: a tqdm bar over updates computed one at
        a time).

        Returns:
            Dataset over ``step`` with ``loss``, ``grad_norm_sq``, ``grad_var``, ``grad_nvar``, ``snr``
            and ``noise_scale``; ``source="exact"``; ``inf`` from an overflow on (``attrs["diverged"]``);
            under a batch-size schedule the coordinates ``batch_size`` and ``examples`` (as
            :meth:`loss_curve`).
        """
        batch, ks, loss, gsq, bad = checked_trajectory(self, optimizer, batch_size, steps, progress)
        bs = batch_at_steps(batch, ks)
        stats = gradient_statistics(gsq, np.sum(self.c), self.dim, bs)
        coords, bs_attr = batch_fields(batch, ks, bs)
        ds = xr.Dataset(
            {"loss": ("step", loss), **{k: ("step", np.asarray(v, np.float64)) for k, v in stats.items()}},
            coords={"step": ks, **coords},
        )
        for v in ds.data_vars.values():
            v.values[np.isnan(v.values)] = np.inf
        attach_attrs(ds, model=self.model_name, source="exact", batch_size=bs_attr, diverged=bool(bad.any()),
                     **self.params, **optimizer.hyperparameters)
        for v in ds.data_vars.values():
            v.attrs.update(ds.attrs)
        return ds

    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, target=TARGET, max_steps=Integer(1, MAX_STEPS),
              full_output=Boolean())
    def steps_to_target(self, optimizer, batch_size, target, *, max_steps: int = 10**15, full_output: bool = False):
        """The first step k with expected loss L_k <= target.

        Exact, also for the non-monotone curves of momentum and iterate averaging: per piece where the
        learning rate and the batch size are both constant the loss is a finite sum of exponentials,
        and :meth:`toymodels.dynamics.ModalForm.first_crossing` discards only step intervals whose
        rigorous lower bound exceeds the target and checks every step of the rest, so
        L_{k-1} > target >= L_k and no earlier step crosses.  Where the learning rate or the batch
        size changes at every update the search steps one update at a time (up to ``max_steps``;
        at most 10^7 updates where a schedule never becomes constant).  Time-varying averaging at a
        constant learning rate and batch size: the Polyak average of SGD in closed form (a doubling
        horizon, then intervals discarded only by a rigorous lower bound of the loss and every step of
        the rest checked: the first crossing, although its loss can rise and fall), schedule-free SGD
        by a compiled scan that stops at the target (at most 10^7 updates; at beta = 0, where it is
        the Polyak average of SGD, by that closed form, which gives the scan's crossing).

        Args:
            optimizer: an optimizer spec.
            batch_size: B >= 1, or a batch-size schedule (as in :meth:`loss_curve`).
            target: a loss > 0.
            max_steps: give up (``inf``) beyond this step, an integer in [1, 10^15].
            full_output: also return a dict with ``reason`` (why inf), ``noise_floor`` and the spec.

        Returns:
            ``float`` holding an integer, or ``math.inf`` when the target is below the noise floor,
            the run diverges (a mode with spectral radius >= 1 after step 0), or it is not reached
            by ``max_steps``.  The examples drawn until then are
            ``toymodels.schedules.cumulative(batch_size, [k])`` (k B for a constant B).
        """
        _check_optimizer(optimizer)
        batch = check_batch_sizes(batch_size)
        target = _check_target(target)
        max_steps = check_int("max_steps", max_steps, low=1)
        k, reason, floor = self._first_crossing(optimizer, batch, target, max_steps)
        steps = float(k) if k >= 0 else math.inf
        if full_output:
            return steps, {"reason": reason, "noise_floor": floor}
        return steps

    def _first_crossing(self, optimizer, batch, target, max_steps):
        """``(k, reason, noise_floor)``: the exact first crossing over the segments of updates on
        which the learning rate and the batch size (a float or a schedule) are both constant
        (closed form) or one of them changes at every update (stepped)."""
        if self.initial_loss <= target:
            return 0, "", math.nan
        sched = optimizer.lr
        bsched = batch if isinstance(batch, Schedule) else Constant(batch)
        S = self._S0(optimizer).copy()
        if optimizer.time_varying:
            if isinstance(sched, Constant) and isinstance(bsched, Constant):
                fast = self._polyak_sgd(optimizer, sched.lr, bsched.lr)
                if fast is not None:
                    return self._polyak_first_crossing(fast, target, max_steps)
            return self._scan_varying(optimizer, S, bsched, min(max_steps, _SCAN_LIMIT), target, max_steps)
        a0, a1, b1 = optimizer.affine(self.h)
        r = optimizer.readout
        ends = (sched.constant_after, constant_from(bsched))
        change = None if None in ends else max(int(e) for e in ends)  # both constant from here on
        segs = dynamics.merged_segments(sched, bsched, max_steps)
        floor = math.nan
        stepped_last = False
        for p, (start, stop, lr, bs) in enumerate(segs):
            length = stop - start
            final = p + 1 == len(segs)
            if lr is None or bs is None:  # step by step while a schedule changes at every update
                endless = final and change is None
                n_scan = min(length, _SCAN_LIMIT) if endless else length
                k, reason = self._scan(a0, a1, b1, r, S, sched, bsched, start, start + n_scan, target)
                if k >= 0 or reason.startswith("diverges"):
                    return k, reason, math.nan
                if endless:
                    return -1, (f"not reached within {start + n_scan} step-by-step updates (the schedule keeps "
                                f"changing)"), math.nan
                stepped_last = final
                continue
            last = final and change is not None and start >= change  # this piece lasts for ever
            if last and lr <= 0.0:
                return -1, "unreachable: the learning rate decays to 0 before the target", math.nan
            q = self.c / bs
            A, b = a0 + lr * a1, lr * b1
            mf = dynamics.ModalForm(A, b, q, self.h, r, S)
            floor = mf.loss_inf
            if not mf.stable:
                if last:
                    return -1, "diverges: spectral radius >= 1 (learning rate above the stability limit)", math.inf
                k, reason = self._scan(a0, a1, b1, r, S, Constant(lr), Constant(bs), start,
                                       start + min(length, _SCAN_LIMIT), target)
                if k >= 0:
                    return k, "", floor
                if reason.startswith("diverges"):
                    return -1, reason, math.inf
                if length > _SCAN_LIMIT:  # a long unstable piece: searched step by step up to a bound only
                    return -1, (f"diverges: spectral radius >= 1 on a piece of {length} steps (searched step by "
                                f"step for its first {_SCAN_LIMIT})"), math.inf
                continue  # _scan has advanced S to the end of the piece
            k_hi = self._horizon(mf, target, length)
            if k_hi >= 0:
                k = mf.first_crossing(target, k_hi)
                if k >= 0:
                    return start + k, "", floor
            if last:
                if floor > target:
                    return -1, f"unreachable: noise floor {floor:.6g} > target {target:.6g}", floor
                return -1, f"not reached within max_steps={max_steps}", floor
            S = dynamics.jump(A, b, q, S, length)
        if stepped_last:
            return -1, f"not reached within {max_steps} step-by-step updates (the schedule keeps changing)", math.nan
        return -1, f"not reached within max_steps={max_steps}", floor

    def _polyak_sgd(self, optimizer, lr, batch_size):
        """``(x, q b^2, s0, h)`` of :mod:`toymodels._polyak` for the uniform average of SGD at a stable
        constant ``lr`` (x = lr h^-gamma (h + wd) < 2 in every mode) and a constant batch size, else None."""
        if not (isinstance(optimizer, PolyakAverage) and isinstance(optimizer.base, SGD)):
            return None
        a0, a1, b1 = optimizer.base.affine(self.h)
        x = -lr * a1[:, 0, 0]
        if not np.all(x < 2.0):  # unstable: stepped (the loss may cross before it overflows)
            return None
        bb = (self.c / batch_size) * (lr * b1[:, 0]) ** 2
        return x, bb, self.init_sq, self.h

    @staticmethod
    def _polyak_first_crossing(fast, target, max_steps):
        """``(k, reason, nan)`` of the Polyak average of SGD (:func:`toymodels._polyak._first_crossing`):
        a horizon K by doubling (the first 2^j with L <= target, or max_steps), then the exact first
        crossing in [1, K]: intervals are discarded only where a rigorous lower bound of the loss exceeds
        the target and every step of the others is checked, so L_k <= target and no earlier step crosses
        (the loss of an average need not decrease monotonically: this is the first crossing, not any)."""
        k = 1
        while k < max_steps and _polyak._loss(*fast, k) > target:
            k *= 2
        k = _polyak._first_crossing(*fast, target, 1, min(k, max_steps), 32)
        if k >= 0:
            return int(k), "", math.nan
        return -1, f"not reached within max_steps={max_steps}", math.nan

    @staticmethod
    def _horizon(mf, target, length):
        """A step K <= length such that no crossing is possible after K, or -1 if none before."""
        if mf.loss_inf <= target:
            k = 1
            while k < length and mf.loss(np.array([k]))[0] > target:
                k *= 2
            return min(k, length)
        k = 1
        while k < length and mf.lower_bound(k) <= target:
            k *= 2
        return min(k, length)

    def _scan(self, a0, a1, b1, r, S, schedule, batch, k_start, k_stop, target):
        """Step-by-step search over updates k_start..k_stop-1 (chunks of 4096) with the learning rates
        of ``schedule`` and the batch sizes of the schedule ``batch`` at those updates; S goes from
        step k_start to k_stop.  Returns ``(k, reason)``, k the first step with L_k <= target or -1."""
        k0 = k_start
        chunk = 4096
        while k0 < k_stop:
            idx = np.arange(k0, min(k_stop, k0 + chunk))
            part = schedule.at(idx)
            bss = batch_sizes_at(batch, idx)
            rec = np.arange(part.size + 1, dtype=np.int64)
            if np.all(bss == bss[0]):  # q = c / B once, as for a constant batch size
                loss, _ = dynamics.propagate(a0, a1, b1, self.c / bss[0], self.h, r, part, rec, S)
            else:
                loss, _ = dynamics.propagate(a0, a1, b1, self.c, self.h, r, part, rec, S, batch=bss)
            if not np.all(np.isfinite(loss)):
                return -1, "diverges: the loss overflowed"
            hit = np.nonzero(loss <= target)[0]
            if hit.size:
                return k0 + int(hit[0]), ""
            k0 += part.size
        return -1, f"not reached within max_steps={k_stop}"

    def _schedule_free(self, optimizer, lr, batch_size, k0, k1, target):
        """:func:`toymodels._schedfree.scan` of ``optimizer`` (a ScheduleFree) at a constant
        ``lr`` and batch size from step 0 over [k0, k1]: ``(first k with L_k <= target or -1 or -2, loss)``."""
        p, r, g = _schedfree.coefficients(self.h, self.c / batch_size, lr, optimizer.beta, optimizer.weight_decay)
        zz, zx, xx = (self.init_sq.astype(np.float64) for _ in range(3))
        uniform = optimizer.averaging == "uniform"
        if k0 > 0:
            _schedfree.scan(p, r, g, self.h, zz, zx, xx, 0, k0, -math.inf, uniform)
        with np.errstate(over="ignore", invalid="ignore"):
            return _schedfree.scan(p, r, g, self.h, zz, zx, xx, k0, k1, target, uniform)

    def _schedule_free_polyak(self, optimizer, lr, batch_size, k_stop, target):
        """The first crossing of schedule-free SGD at beta = 0 (uniform averaging) from the closed form of
        the Polyak average of SGD, or None where that could differ from :meth:`_schedule_free`'s scan.

        At beta = 0 the gradient point y is z, so z is SGD and x the uniform average of z_0..z_k: the
        same expected loss as ``PolyakAverage(SGD(lr))`` (Defazio et al. 2024, Section 2), whose first
        crossing costs O(d log k) instead of the scan's O(d k).  The two sum the loss in other orders
        (relative differences far below ``_schedfree.TIE``), so the closed form is searched for the first
        k with L_k <= target (1 + TIE): every earlier step is then above the target in the scan too,
        and k is the scan's crossing if L_k <= target (1 - TIE) (else, a near tie: None, and the scan
        decides).  None also where the scan could stop otherwise: SGD unstable (x >= 2 in a mode; the
        scan may cross before it overflows), or the loss could pass the scan's divergence limit
        ``LOST_GROWTH`` x max(target, L_0): on a stable mode f(n) <= min(n, 2 / x), so E[sigma_k^2] / (k + 1)^2
        <= s0 + q b^2 W_k / (k + 1)^2 <= s0 + q b^2 2 / (sqrt(3) x), an upper bound of every L_k.
        Returns the step, or -1 if not reached by ``k_stop``."""
        if optimizer.beta != 0.0 or optimizer.averaging != "uniform":
            return None
        fast = self._polyak_sgd(PolyakAverage(SGD(lr, weight_decay=optimizer.weight_decay)), lr, batch_size)
        if fast is None:
            return None
        x, bb, s0, h = fast
        l0 = self.initial_loss
        peak = l0 + float(np.sum(h * bb / (math.sqrt(3.0) * x)))
        if not peak < _schedfree.LOST_GROWTH * max(target, l0) * (1.0 - _schedfree.TIE):
            return None
        k, _, _ = self._polyak_first_crossing(fast, target * (1.0 + _schedfree.TIE), k_stop)
        if k >= 0 and not _polyak._loss(*fast, k) <= target * (1.0 - _schedfree.TIE):
            return None
        return k

    def _scan_varying(self, optimizer, S, batch, k_stop, target, max_steps):
        """``(k, reason, nan)``: the first step k <= k_stop with L_k <= target for an optimizer that
        changes at every update (stepped in chunks of 4096 from step 0; S at step 0; schedule-free SGD
        at a constant learning rate and batch size in one compiled scan of two states per mode)."""
        if isinstance(optimizer, ScheduleFree) and isinstance(optimizer.lr, Constant) and isinstance(batch, Constant):
            k = self._schedule_free_polyak(optimizer, optimizer.lr.lr, batch.lr, k_stop, target)
            if k is None:
                k, _ = self._schedule_free(optimizer, optimizer.lr.lr, batch.lr, 0, k_stop, target)
            if k == -2:
                return -1, ("diverges: the loss overflowed, or grew past 4.5e9 x the target (float64 cannot resolve "
                            "the target after that)"), math.inf
            if k >= 0:
                return k, "", math.nan
            if k_stop < max_steps:
                return -1, (f"not reached within {k_stop} step-by-step updates (the averaging weight changes at "
                            f"every update)"), math.nan
            return -1, f"not reached within max_steps={max_steps}", math.nan
        parts = optimizer.parts(self.h)
        constant_b = isinstance(batch, Constant)
        q = self.c / batch.lr if constant_b else self.c
        k0, chunk = 0, 4096
        while k0 < k_stop:
            k1 = min(k_stop, k0 + chunk)
            rec = np.arange(k0, k1 + 1, dtype=np.int64)
            loss, _ = dynamics.propagate_varying(parts, optimizer.coefficients, q, self.h, optimizer.readout,
                                                 optimizer.lr, rec, S, k_start=k0,
                                                 batch=None if constant_b else batch, progress=False)
            if not np.all(np.isfinite(loss)):
                return -1, "diverges: the loss overflowed", math.inf
            hit = np.nonzero(loss <= target)[0]
            if hit.size:
                return k0 + int(hit[0]), "", math.nan
            k0 = k1
        if k_stop < max_steps:
            return -1, (f"not reached within {k_stop} step-by-step updates (the averaging weight changes at every "
                        f"update)"), math.nan
        return -1, f"not reached within max_steps={max_steps}", math.nan

    # ------------------------------------------------------------------------------------------
    @validate(n_samples=Array((0, 1), low=0.0, min_size=0))
    def lower_bound_loss(self, n_samples) -> np.ndarray:
        """Information-theoretic lower bound on the expected loss after ``n_samples`` gradient samples.

        Any algorithm that has seen n noisy gradients g = H(theta - theta*) + eps, eps ~ N(0, C),
        knows theta*_i at best up to the Bayes posterior variance 1 / (1 / init_sq_i + n h_i^2 / c_i)
        (the prior being theta*_i ~ N(0, init_sq_i)), so

            L(n) >= sum_i h_i / 2 / (1 / init_sq_i + n h_i^2 / c_i)

        ("exact optimum for the training data so far", the lecture's dotted line).
        """
        n = np.asarray(n_samples, dtype=np.float64)
        check_bytes("n_samples", 8.0 * n.size * self.dim, what=f"{n.size} sample counts x {self.dim} modes")
        with np.errstate(divide="ignore"):
            prec = 1.0 / self.init_sq + np.multiply.outer(n, self.h**2 / self.c)
        return np.sum(0.5 * self.h / prec, axis=-1)

    @validate(batch_size=BATCH_SIZE, target=TARGET)
    def lower_bound_steps(self, batch_size, target) -> float:
        """Fewest steps any algorithm needs with batch size B: ceil(n* / B) for the bound above."""
        bs = check_batch_size(batch_size)
        target = _check_target(target)
        if self.initial_loss <= target:
            return 0.0
        hi = 1
        while self.lower_bound_loss(hi) > target:
            hi *= 2
            if hi > 2**62:
                return math.inf
        lo = hi // 2  # loss(lo) > target (or lo == 0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.lower_bound_loss(mid) > target:
                lo = mid
            else:
                hi = mid
        return float(math.ceil(hi / bs))

    # ------------------------------------------------------------------------------------------
    @validate(optimizer=OPTIMIZER, batch_size=BATCH_SIZES, steps=MC_STEPS, n_runs=N_RUNS, seed=SEED,
              progress=Boolean())
    def simulate(self, optimizer, batch_size, steps, *, n_runs: int = 100, seed: int = 0, progress: bool = False) -> xr.Dataset:
        """Monte Carlo runs of the stochastic NQM: Gaussian theta_0 and gradient noise.

        Args:
            optimizer, batch_size: as in :meth:`loss_curve`; under a batch-size schedule update k
                draws its gradient noise with variance c / B_k (B_k need not be a whole number).
            steps: as in :meth:`loss_curve`, at most 10^8.
            n_runs: independent runs, in [2, 10^6].
            seed: seed of the ``numpy.random.Generator``.
            progress: show a tqdm bar.

        Returns:
            Dataset over ``step``: ``loss`` (mean over runs), ``loss_sem`` (its standard error) and the
            gradient statistics of the mean |H theta|^2 (at step k with B_k); ``source="simulation"``;
            the coordinates ``batch_size`` and ``examples`` under a batch-size schedule.  A run that
            overflows makes every value ``inf`` from the first recorded step where it has, with
            ``attrs["diverged"]`` and ``attrs["reason"]`` (never NaN).
        """
        check_bytes("n_runs", 8.0 * n_runs * self.dim * (optimizer.n_state + 1),
                    what=f"the state and one step's noise of {n_runs} runs x {self.dim} modes")
        batch, ks, n_runs, seed, rng, bar = mc_setup(optimizer, batch_size, steps, n_runs, seed, progress)
        n = int(ks[-1])
        scheduled = isinstance(batch, Schedule)
        q = self.c if scheduled else self.c / batch
        common = dict(progress=None if bar is None else bar.update,
                      batch=batch_sizes_at(batch, np.arange(n)) if scheduled else None)
        if optimizer.time_varying:
            loss, gsq = simulate_varying_system(optimizer.parts(self.h), optimizer.coefficients(np.arange(n)), q, self.h,
                                                optimizer.readout, optimizer.init, self.init_sq, optimizer.lr.values(n),
                                                ks, n_runs, rng, **common)
        else:
            a0, a1, b1 = optimizer.affine(self.h)
            loss, gsq = simulate_linear_system(a0, a1, b1, q, self.h, optimizer.readout, optimizer.init, self.init_sq,
                                               optimizer.lr.values(n), ks, n_runs, rng, **common)
        if bar is not None:
            bar.close()
        first, reason = mc_divergence(ks, loss, gsq)
        bs = batch_at_steps(batch, ks)
        with np.errstate(over="ignore", invalid="ignore"):
            g2 = gsq.mean(axis=1)
            stats = gradient_statistics(g2, np.sum(self.c), self.dim, bs)
        ds = mc_stats_dataset(ks, loss, stats, n_runs, first)
        coords, bs_attr = batch_fields(batch, ks, bs)
        ds = ds.assign_coords(coords)
        attach_attrs(ds, model=self.model_name, source="simulation", batch_size=bs_attr, n_runs=n_runs, seed=seed,
                     diverged=first is not None, reason=reason, **self.params, **optimizer.hyperparameters)
        return ds
