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
rate or learning-rate schedule) is held fixed across the rows: a tuned comparison calls these per
learning rate, e.g. over the tuned optima of :func:`toymodels.sweep.batch_size_sweep`.

Example:
    >>> from toymodels import NQM, SGD
    >>> from toymodels.schedules import BatchSizeWarmup
    >>> nqm = NQM.power_law(100)
    >>> cost = cost_to_target(nqm, SGD(0.5), BatchSizeWarmup(4, 64, 200), 0.05)
    >>> cost["steps"], cost["examples"]  # doctest: +SKIP
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr

from ._args import BATCH_SIZES, OPTIMIZER, TARGET
from ._validate import MAX_EXACT_INT, MAX_STEPS, Array, Instance, Integer, Maybe, validate
from .linreg import GaussianLinearRegression
from .nqm import NQM
from .schedules import Schedule, cumulative
from .schema import attach_attrs

__all__ = ["cost_to_target", "compare_with_constant"]

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
    with np.errstate(invalid="ignore"):
        saved_s = float(np.float64(steps[i_s]) - mine["steps"])
        saved_e = float(np.float64(examples[i_e]) - mine["examples"])
    attach_attrs(ds, model=problem.model_name, source="exact", target=float(target), schedule=repr(schedule),
                 schedule_steps=mine["steps"], schedule_examples=mine["examples"], schedule_reason=mine["reason"],
                 best_steps=float(steps[i_s]), best_steps_batch_size=float(bss[i_s]),
                 best_examples=float(examples[i_e]), best_examples_batch_size=float(bss[i_e]),
                 steps_saved=saved_s, examples_saved=saved_e, **problem.params, **optimizer.hyperparameters)
    return ds
