"""Does a batch-size schedule save steps, or examples?  Exact answers on the toy models.

A batch-size schedule B_k (update k draws B_k examples; e.g. a warm-up
:class:`toymodels.schedules.BatchSizeWarmup`) reaches a target loss at the exact first step S with
E L_S <= target (:meth:`toymodels.NQM.steps_to_target`, also for
:class:`toymodels.GaussianLinearRegression`), having drawn

    E = sum_{k<S} B_k

examples (:func:`toymodels.schedules.cumulative`; S B for a constant B).  :func:`cost_to_target`
gives both for one batch size or schedule; :func:`compare_with_constant` puts a schedule beside a set
of constant batch sizes at the same optimizer, so a study reads off whether the schedule needs fewer
steps, fewer examples, or both, than the best constant batch size.  The optimizer (its learning
rate or learning-rate schedule) is held fixed across the rows.

:func:`compare_tuned` answers the tuned question (McCandlish et al. 2018; Merrill et al. 2025 on
batch-size warm-up): does a batch-size schedule whose learning rate follows the batch size reach
the target in fewer steps, or fewer examples, than the best constant batch size at *its* best
learning rate?  Each constant B gets its tuned learning rate lr*(B) and exact steps from
:func:`toymodels.sweep.batch_size_sweep` (for momentum at a fixed beta, so that the learning rate
alone follows B); the schedule's update k uses lr*(B_k), lr*(B) interpolated linearly in
(log B, log lr) between the tuned batch sizes and constant beyond them
(:func:`lr_follows_batch`, the rule ``deepmodels.train.NoiseScaleBatch(lr={B: lr})`` applies to
networks), and the schedule at the best single learning rate of a grid is reported beside it (lr*(B)
is tuned for a whole run at B, not for one stage of a warm-up: the second row shows what that
protocol leaves on the table, e.g. on the NQM a fixed large learning rate, whose gradient noise
the growing batch anneals, needs far fewer examples than any tuned constant).  Every
number is an exact first crossing of the expected loss, so "the warm-up saves x steps" carries no
sampling error; it is exact for the tuned constants only up to the tuner's optimum (at least as good
as an exact grid search, see :mod:`toymodels.sweep`).

Example:
    >>> from toymodels import NQM, SGD
    >>> from toymodels.schedules import BatchSizeWarmup
    >>> nqm = NQM.power_law(100)
    >>> cost = cost_to_target(nqm, SGD(0.5), BatchSizeWarmup(4, 64, 200), 0.05)
    >>> cost["steps"], cost["examples"]  # doctest: +SKIP
    >>> ds = compare_tuned(nqm, "sgd", BatchSizeWarmup(1, 64, 60, every=10), 2.0 ** np.arange(8), 0.05,
    ...                    progress=False)
    >>> ds.attrs["steps_saved"], ds.attrs["examples_saved"]  # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ._args import BATCH_SIZES, OPTIMIZER, TARGET
from ._validate import (MAX_EXACT_INT, MAX_STEPS, Array, Boolean, Instance, Integer, Maybe, Options, Real, check_bytes,
                        validate)
from .linreg import GaussianLinearRegression
from .nqm import NQM
from .optimizers import SGD, Momentum
from .schedules import Constant, PiecewiseConstant, Schedule, Tabulated, batch_sizes_at, check_batch_size, cumulative
from .schema import attach_attrs
from .sweep import batch_size_sweep

__all__ = ["cost_to_target", "compare_with_constant", "lr_follows_batch", "compare_tuned"]

_PROBLEM = Instance(NQM, GaussianLinearRegression, what="an NQM or GaussianLinearRegression")
_MAX_STEPS = Maybe(Integer(1, MAX_STEPS))


@validate(problem=_PROBLEM, optimizer=OPTIMIZER, batch_size=BATCH_SIZES, target=TARGET, max_steps=_MAX_STEPS)
def cost_to_target(problem, optimizer, batch_size, target, *, max_steps: int | None = None) -> dict:
    """Steps and examples to reach ``target`` under a batch size or batch-size schedule.

    Args:
        problem: an :class:`~toymodels.NQM` or :class:`~toymodels.GaussianLinearRegression`.
        optimizer: an optimizer spec (its learning rate a number or a schedule).
        batch_size: B >= 1 or a batch-size schedule (values B_k >= 1, need not be whole numbers).
        target: a loss > 0.
        max_steps: give up beyond this step (None: the model's default, see its ``steps_to_target``).

    Returns:
        dict with ``steps`` (the exact first step S with E L_S <= target, a float holding an integer,
        or ``inf``), ``examples`` (sum_{k<S} B_k, ``inf`` when S is), ``reason`` (why ``inf``; empty
        otherwise) and ``noise_floor``.
    """
    kw = {} if max_steps is None else {"max_steps": max_steps}
    steps, info = problem.steps_to_target(optimizer, batch_size, target, full_output=True, **kw)
    if not math.isfinite(steps):
        examples = math.inf
    elif isinstance(batch_size, Schedule):
        examples = float(cumulative(batch_size, np.array([int(steps)]))[0])
    else:
        examples = steps * float(batch_size)
    return {"steps": steps, "examples": examples, "reason": info["reason"], "noise_floor": info["noise_floor"]}


@validate(problem=_PROBLEM, optimizer=OPTIMIZER, schedule=Instance(Schedule),
          batch_sizes=Array(1, low=1.0, high=float(MAX_EXACT_INT)), target=TARGET, max_steps=_MAX_STEPS)
def compare_with_constant(problem, optimizer, schedule, batch_sizes, target, *,
                          max_steps: int | None = None) -> xr.Dataset:
    """A batch-size schedule beside constant batch sizes, at the same optimizer and target.

    Args:
        problem, optimizer, target, max_steps: as in :func:`cost_to_target`.
        schedule: the batch-size schedule (e.g. a warm-up).
        batch_sizes: ``(n,)`` constant batch sizes to compare with, each in [1, 2^53].

    Returns:
        Dataset over ``batch_size`` (the constants) with ``steps_to_target``, ``examples_to_target``
        and ``reason``; attrs ``schedule`` (its repr), ``schedule_steps``, ``schedule_examples``,
        ``schedule_reason``, ``best_steps`` / ``best_steps_batch_size`` (the constant B with the
        fewest steps; ties: the first in ``batch_sizes``) and ``best_examples`` / ``best_examples_batch_size`` (the
        fewest examples), and ``steps_saved`` = best_steps - schedule_steps and ``examples_saved`` =
        best_examples - schedule_examples (> 0: the schedule does better than every constant;
        NaN when both are ``inf``).
    """
    bss = np.asarray(batch_sizes, dtype=np.float64)
    rows = [cost_to_target(problem, optimizer, float(b), target, max_steps=max_steps) for b in bss]
    mine = cost_to_target(problem, optimizer, schedule, target, max_steps=max_steps)
    steps = np.array([r["steps"] for r in rows])
    examples = np.array([r["examples"] for r in rows])
    ds = xr.Dataset(
        {"steps_to_target": ("batch_size", steps), "examples_to_target": ("batch_size", examples),
         "reason": ("batch_size", np.array([r["reason"] for r in rows], dtype=object).astype(str))},
        coords={"batch_size": bss},
    )
    i_s, i_e = int(np.argmin(steps)), int(np.argmin(examples))  # ties: the first
    attach_attrs(ds, model=problem.model_name, source="exact", target=float(target), schedule=repr(schedule),
                 schedule_steps=mine["steps"], schedule_examples=mine["examples"], schedule_reason=mine["reason"],
                 best_steps=float(steps[i_s]), best_steps_batch_size=float(bss[i_s]),
                 best_examples=float(examples[i_e]), best_examples_batch_size=float(bss[i_e]),
                 steps_saved=_saved(steps[i_s], mine["steps"]),
                 examples_saved=_saved(examples[i_e], mine["examples"]), **problem.params,
                 **optimizer.hyperparameters)
    return ds


# ------------------------------------------------------------------------------------------------
# tuned: the learning rate follows the batch size
# ------------------------------------------------------------------------------------------------
_CONSTANTS = Array(1, low=1.0, high=float(MAX_EXACT_INT))
_RATES = Array(1, low=0.0, high=math.inf, low_open=True, high_open=True)
MAX_TABULATED_UPDATES = 10**8  # learning rates tabulated where a batch-size schedule changes at every update


def _lr_of_batch(b, keys, vals):
    """lr*(b): ``vals`` interpolated linearly in (log key, log val), constant beyond the ends; a
    key's own value, and the clamped ends, exactly."""
    b = np.asarray(b, dtype=np.float64)
    out = np.exp(np.interp(np.log(b), np.log(keys), np.log(vals)))
    idx = np.minimum(np.searchsorted(keys, b), keys.size - 1)
    hit = keys[idx] == b
    out = np.where(hit, vals[idx], out)
    out = np.where(b <= keys[0], vals[0], out)
    return np.where(b >= keys[-1], vals[-1], out)


@validate(schedule=Instance(Schedule), batch_sizes=_CONSTANTS, lrs=_RATES)
def lr_follows_batch(schedule, batch_sizes, lrs) -> Schedule:
    """The learning-rate schedule that follows a batch-size schedule: update k uses lr*(B_k).

    lr*(B) interpolates the pairs (``batch_sizes[j]``, ``lrs[j]``) linearly in log B and log lr,

        log lr*(B) = log lr_j + (log B - log B_j) (log lr_(j+1) - log lr_j) / (log B_(j+1) - log B_j)

    for B_j <= B <= B_(j+1), and is lr_0 below B_0 and lr_(n-1) above B_(n-1) (the rule of
    ``deepmodels.train.NoiseScaleBatch(lr={B: lr})``; a tabulated B gets its own lr exactly).

    Args:
        schedule: a batch-size schedule (values in [1, 2^53]) that becomes constant
            (``constant_after`` finite) if it is not piecewise constant.
        batch_sizes: ``(n,)`` strictly increasing batch sizes B_j in [1, 2^53].
        lrs: ``(n,)`` their learning rates lr_j > 0 (e.g. ``lr_opt`` of
            :func:`toymodels.sweep.batch_size_sweep`).

    Returns:
        A :class:`~toymodels.schedules.Constant` when the batch size never changes; for a
        piecewise-constant batch size (e.g. ``BatchSizeWarmup(..., every=m)``) a
        :class:`~toymodels.schedules.PiecewiseConstant` with the same boundaries (the exact engine
        jumps each stage in closed form); otherwise a :class:`~toymodels.schedules.Tabulated` of
        lr*(B_k) for k = 0..``constant_after`` (at most 10^8 updates).
    """
    check_batch_size(schedule, "schedule")
    keys, vals = np.asarray(batch_sizes, dtype=np.float64), np.asarray(lrs, dtype=np.float64)
    if keys.shape != vals.shape:
        raise ValueError(f"`lrs` must have one learning rate per batch size ({keys.size}); got {vals.size}.")
    if np.any(np.diff(keys) <= 0):
        raise ValueError("`batch_sizes` must be strictly increasing.")
    if schedule.piecewise_constant:
        starts, sizes = schedule.pieces()
        rates = _lr_of_batch(sizes, keys, vals)
        if np.all(rates == rates[0]):
            return Constant(float(rates[0]))
        return PiecewiseConstant(tuple(int(a) for a in starts[1:]), tuple(float(r) for r in rates))
    change = schedule.constant_after
    if change is None:
        raise ValueError(f"`schedule` must become constant (a finite constant_after) or be piecewise constant, so "
                         f"that its learning rates can be tabulated; got {schedule!r}, which changes for ever.")
    change = int(change)
    if change + 1 > MAX_TABULATED_UPDATES:
        raise ValueError(f"`schedule` must become constant within {MAX_TABULATED_UPDATES:.0e} updates for its "
                         f"learning rates to be tabulated; got constant_after = {change}.")
    check_bytes("schedule", 40.0 * (change + 1), what=f"{change + 1} tabulated learning rates")
    rates = _lr_of_batch(batch_sizes_at(schedule, np.arange(change + 1), name="schedule"), keys, vals)
    if np.all(rates == rates[0]):
        return Constant(float(rates[0]))
    return Tabulated(rates)


def _check_tuned(tuned, problem, family, bss, target, beta):
    """``tuned`` must be the sweep of these settings (a ValueError naming what differs)."""
    a = tuned.attrs
    fixed = float(a.get("fixed_extra", math.nan))
    want = {"model": problem.model_name, "optimizer": family}
    diffs = [f"{k} {a.get(k)!r} (want {v!r})" for k, v in want.items() if a.get(k) != v]
    diffs += [f"{k} {a.get(k)!r} (want {v!r})" for k, v in problem.params.items()
              if not (isinstance(a.get(k), (int, float, np.number)) and float(a[k]) == float(v))]
    if not float(a.get("target", math.nan)) == target:
        diffs.append(f"target {a.get('target')!r} (want {target!r})")
    if not (fixed == beta or (math.isnan(fixed) and math.isnan(beta))):
        diffs.append(f"fixed beta {fixed!r} (want {beta!r})")
    have = tuned.coords["batch_size"].values if "batch_size" in tuned.coords else np.array([])
    if not np.array_equal(have, bss):
        diffs.append(f"batch sizes {have.tolist()} (want {bss.tolist()})")
    missing = [v for v in ("steps_to_target", "lr_opt", "reason") if v not in tuned]
    if missing:
        diffs.append(f"no {', '.join(missing)}")
    if diffs:
        raise ValueError(f"`tuned` must be the batch_size_sweep of these settings; got one with {'; '.join(diffs)}.")


def _family_optimizer(family, lr, momentum):
    return SGD(lr) if family == "sgd" else Momentum(lr, momentum)


def _saved(best, mine):
    """best - mine as a float (NaN when both are inf, without a warning)."""
    with np.errstate(invalid="ignore"):
        return float(np.float64(best) - mine)


@validate(problem=_PROBLEM, family=Options("sgd", "momentum"), schedule=Instance(Schedule), batch_sizes=_CONSTANTS,
          target=TARGET, lrs=Maybe(Array(1, low=0.0, high=math.inf, low_open=True, high_open=True, min_size=0)),
          momentum=Real(0.0, 1.0, high_open=True), max_steps=_MAX_STEPS, progress=Boolean(),
          tuned=Maybe(Instance(xr.Dataset, what="a Dataset of toymodels.sweep.batch_size_sweep")))
def compare_tuned(problem, family, schedule, batch_sizes, target, *, lrs=None, momentum: float = 0.9,
                  max_steps: int | None = None, progress: bool = True, tuned: xr.Dataset | None = None) -> xr.Dataset:
    """A batch-size schedule whose learning rate follows the batch size, beside the tuned constants.

    For each constant B in ``batch_sizes`` the learning rate is tuned for the fewest exact steps to
    ``target`` (:func:`toymodels.sweep.batch_size_sweep`; for ``"momentum"`` beta is held at
    ``momentum`` and the learning rate alone is tuned), giving S(B), E(B) = S(B) B examples and
    lr*(B).  The schedule's update k then uses lr*(B_k) (:func:`lr_follows_batch`: linear in
    (log B, log lr) between the tuned batch sizes, constant beyond), and reaches the target at the
    exact step S_sched having drawn E_sched = sum_{k < S_sched} B_k examples.  Beside it, the
    schedule at each single learning rate of a grid (``lrs``), the best of them kept (fewest steps,
    hence fewest examples too; ties: the smallest lr).

    Args:
        problem: an :class:`~toymodels.NQM` or :class:`~toymodels.GaussianLinearRegression`.
        family: ``"sgd"`` or ``"momentum"`` (heavy ball at beta = ``momentum``).
        schedule: the batch-size schedule (e.g. ``BatchSizeWarmup(1, 256, 8 * m, every=m)``);
            piecewise constant, or becoming constant after at most 10^8 updates.
        batch_sizes: ``(n,)`` strictly increasing constant batch sizes in [1, 2^53]; also the
            grid lr*(B) is interpolated on (those that reach the target).
        target: a loss > 0.
        lrs: the fixed learning rates the schedule is also run at (None: the tuned lr*(B) of the
            constants; an empty array: no fixed-lr row).
        momentum: beta in [0, 1) of ``"momentum"`` (ignored for ``"sgd"``).
        max_steps: give up on a schedule row beyond this step (None: the model's default, see
            :func:`cost_to_target`); the constants are tuned without a bound.
        progress: tqdm bar over the tuned batch sizes.
        tuned: the constants already tuned, to compare several schedules without tuning again: the
            Dataset ``batch_size_sweep(problem, family, batch_sizes, target, extra=momentum)``
            returns (``extra`` only for ``"momentum"``); its model, family, target, beta, batch sizes
            and the problem's ``params`` are checked against these.

    Returns:
        Dataset over ``batch_size`` (the constants) with ``steps_to_target``, ``examples_to_target``,
        ``lr_opt`` (NaN where no lr reaches the target) and ``reason``; attrs ``model``,
        ``source="exact"``, ``optimizer`` (the family), ``momentum`` (NaN for SGD), ``target``,
        ``schedule`` (its repr), ``lr_schedule`` (the repr of the followed lr schedule), and

        * ``schedule_steps``, ``schedule_examples``, ``schedule_reason``: the lr-follows-B row;
        * ``fixed_lr``, ``fixed_lr_steps``, ``fixed_lr_examples``, ``fixed_lr_reason``: the best
          fixed-lr row (NaN / ``inf`` where the grid is empty or no lr reaches the target);
        * ``best_steps`` / ``best_steps_batch_size`` / ``best_steps_lr`` and ``best_examples`` /
          ``best_examples_batch_size`` / ``best_examples_lr``: the best tuned constant by steps and
          by examples (ties: the first);
        * ``steps_saved`` = best_steps - schedule_steps, ``examples_saved`` = best_examples -
          schedule_examples (> 0: the schedule beats every tuned constant; NaN when both are
          ``inf``), and ``fixed_lr_steps_saved`` / ``fixed_lr_examples_saved`` likewise.
    """
    bss = np.asarray(batch_sizes, dtype=np.float64)
    if np.any(np.diff(bss) <= 0):
        raise ValueError("`batch_sizes` must be strictly increasing.")
    check_batch_size(schedule, "schedule")
    beta = float(momentum) if family == "momentum" else math.nan
    if tuned is None:
        tuned = batch_size_sweep(problem, family, bss, target, extra=None if family == "sgd" else beta,
                                 progress=progress)
    else:
        _check_tuned(tuned, problem, family, bss, target, beta)
    steps = tuned.steps_to_target.values.astype(np.float64)
    lr_opt = tuned.lr_opt.values.astype(np.float64)
    examples = np.where(np.isfinite(steps), steps * bss, math.inf)
    ok = np.isfinite(steps) & np.isfinite(lr_opt)

    # the learning rate follows the batch size
    lr_sched = None
    if ok.any():
        lr_sched = lr_follows_batch(schedule, bss[ok], lr_opt[ok])
        mine = cost_to_target(problem, _family_optimizer(family, lr_sched, beta), schedule, target,
                              max_steps=max_steps)
    elif problem.initial_loss <= target:
        mine = cost_to_target(problem, _family_optimizer(family, 1.0, beta), schedule, target, max_steps=max_steps)
    else:
        mine = {"steps": math.inf, "examples": math.inf,
                "reason": "no constant batch size reaches the target: no tuned learning rate to follow"}

    # the schedule at each fixed learning rate of the grid; a later lr need only beat the best so far
    grid = np.unique(lr_opt[ok] if lrs is None else np.asarray(lrs, dtype=np.float64))
    fixed = {"lr": math.nan, "steps": math.inf, "examples": math.inf,
             "reason": "no fixed learning rate given" if grid.size == 0 else ""}
    for lr in grid:
        bound = max_steps
        if math.isfinite(fixed["steps"]):
            if fixed["steps"] <= 1:
                break
            bound = int(fixed["steps"]) - 1 if max_steps is None else min(max_steps, int(fixed["steps"]) - 1)
        c = cost_to_target(problem, _family_optimizer(family, float(lr), beta), schedule, target, max_steps=bound)
        if c["steps"] < fixed["steps"]:
            fixed = {"lr": float(lr), "steps": c["steps"], "examples": c["examples"], "reason": c["reason"]}
        elif not math.isfinite(fixed["steps"]) and not fixed["reason"]:
            fixed["reason"] = c["reason"]  # the first lr's reason, while none reaches the target
    if not math.isfinite(fixed["steps"]) and grid.size and not fixed["reason"]:
        fixed["reason"] = "no learning rate of the grid reaches the target"

    ds = xr.Dataset(
        {"steps_to_target": ("batch_size", steps), "examples_to_target": ("batch_size", examples),
         "lr_opt": ("batch_size", lr_opt), "reason": ("batch_size", tuned.reason.values.astype(str))},
        coords={"batch_size": bss},
    )
    i_s, i_e = int(np.argmin(steps)), int(np.argmin(examples))  # ties: the first
    attach_attrs(ds, model=problem.model_name, source="exact", optimizer=family, momentum=beta, target=float(target),
                 schedule=repr(schedule), lr_schedule=repr(lr_sched),
                 lr_rule="lr*(B): lr_opt interpolated linearly in (log batch_size, log lr), constant beyond the ends",
                 schedule_steps=mine["steps"], schedule_examples=mine["examples"], schedule_reason=mine["reason"],
                 fixed_lr=fixed["lr"], fixed_lr_steps=fixed["steps"], fixed_lr_examples=fixed["examples"],
                 fixed_lr_reason=fixed["reason"],
                 best_steps=float(steps[i_s]), best_steps_batch_size=float(bss[i_s]), best_steps_lr=float(lr_opt[i_s]),
                 best_examples=float(examples[i_e]), best_examples_batch_size=float(bss[i_e]),
                 best_examples_lr=float(lr_opt[i_e]),
                 steps_saved=_saved(steps[i_s], mine["steps"]), examples_saved=_saved(examples[i_e], mine["examples"]),
                 fixed_lr_steps_saved=_saved(steps[i_s], fixed["steps"]),
                 fixed_lr_examples_saved=_saved(examples[i_e], fixed["examples"]), **problem.params)
    return ds
