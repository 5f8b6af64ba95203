"""Measured steps to a target per batch size (Shallue et al. 2019's protocol, at small scale).

For every batch size, learning rate, momentum and seed a fresh model (``model_fn(seed)``) is trained
by SGD with heavy-ball momentum on batches drawn with replacement from a generator seeded with the
seed; every ``eval_every`` steps the metric (training loss on the whole training set, or
validation error) is evaluated, and the run stops at the first evaluation whose metric is <= target.
Its steps to target is the crossing interpolated between that evaluation (k1, m1) and the one
before it (k0, m0), linear in log(metric) (:func:`toymodels.stats.crossing_step`):

    k* = k0 + (k1 - k0) (log m0 - log target) / (log m0 - log m1),   k0 < k* <= k1,

a float, not a multiple of ``eval_every`` (``0`` if the metric starts at or below the target; ``inf``
if it is not reached by ``max_steps``, or if the loss diverges).

The target is an absolute value of the metric (``target``) or a fraction of the initial one
(``target_rel``): then each run's target is ``target_rel`` x that run's own metric at step 0 (its
first evaluation, the one the target is checked on).  Each seed starts from its own initialisation,
whose initial loss differs slightly, so every run is asked for the same relative progress; the
absolute target each run used is kept (``target_value``), and a run with ``target_rel=r`` gives
exactly the steps of the same run with ``target = r x`` its initial metric.

Per batch size the result is the best (lr, momentum) by the median over seeds; the critical batch
size of S = S_min (1 + B_crit / B) (McCandlish et al. 2018) is fitted to these and given a percentile bootstrap interval over seeds
(:func:`toymodels.stats.bootstrap_critical_batch`).

Each run is an independent task: run them here one after another, or on a dask cluster
(``executor="dask"`` starts a LocalCluster; a scheduler address uses a real one).  With ``path``
every finished run is written to its own small netCDF file in that folder, and a rerun skips the
finished ones, so an interrupted sweep loses nothing.
"""

from __future__ import annotations

import collections
import itertools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from toymodels import resume
from toymodels._validate import check_int, check_real
from toymodels.parallel import check_scheduler, run_tasks
from toymodels.schema import attach_attrs
from toymodels.stats import bootstrap_critical_batch, crossing_step, fit_critical_batch, tuned_median

from . import _validate as V
from ._validate import Boolean, Function, Instance, Integer, Maybe, Options, Real, SequenceOf, validate
from .data import Dataset

__all__ = ["run_one", "measure_steps", "summarize"]

METRICS = ("train_loss", "val_error")
CROSSING = "log-interpolated"  # how run_one computes a crossing (saved with every run: older files are recomputed)
MAX_RUNS = 10**6  # grid points x seeds of one sweep

class _Executor(V.Constraint):
    """``"serial"``, ``"dask"``, a dask scheduler address, a ``distributed.Client`` (or None: serial)."""

    def __call__(self, name, value):
        if isinstance(value, str) and value not in ("serial", "dask", "local") and ":" not in value:
            raise ValueError(f"`{name}` must be 'serial', 'dask', a dask scheduler address such as "
                             f"'tcp://host:8786' or a distributed.Client; got {value!r}.")
        return check_scheduler(value, name=name)

    def bad_values(self):
        return ["", "cluster", 1.5, 1 + 1j, object()]


_LR = Real(0.0, math.inf, low_open=True, high_open=True)
_MOMENTUM = Real(0.0, 1.0, high_open=True)
_FRACTION = Real(0.0, 1.0, low_open=True, high_open=True)
_WHAT = {"train_loss": "training loss", "val_error": "validation error"}
_RUN = dict(model_fn=Function("a callable model_fn(seed) -> nn.Module"),
            data=Instance(Dataset, what="a deepmodels.data.Dataset"), target=Maybe(_LR), target_rel=Maybe(_FRACTION),
            metric=Options(*METRICS), max_steps=Integer(1, V.MAX_STEPS), eval_every=Integer(1, V.MAX_STEPS))


def _metric(model, data, metric):
    with torch.no_grad():
        if metric == "train_loss":
            return float(F.cross_entropy(model(data.x_train), data.y_train))
        return float((model(data.x_test).argmax(1) != data.y_test).float().mean())


@validate(batch_size=Integer(1, V.MAX_WIDTH), lr=_LR, momentum=_MOMENTUM, seed=V.Seed(), **_RUN)
def run_one(model_fn, data, *, batch_size: int, lr: float, momentum: float, seed: int, target: float | None = None,
            target_rel: float | None = None, metric: str, max_steps: int, eval_every: int) -> float:
    """Steps to target of one training run (see the module docstring).

    The metric is evaluated at steps 0, ``eval_every``, 2 ``eval_every``, ... (and nowhere else) until
    the first value <= the target; the result is ``crossing_step(evaluated steps, metrics, target)``,
    the crossing interpolated in log(metric) between the last two evaluations: a float in
    (k1 - ``eval_every``, k1] for the first evaluation k1 at or below the target, ``0.0`` if the
    initial metric is, ``inf`` if no evaluation up to ``max_steps`` is, or if the training loss or
    the metric stops being finite (divergence).

    Exactly one of ``target`` (an absolute value of the metric) and ``target_rel`` (a fraction in
    (0, 1) of this run's metric at step 0: the target is ``target_rel`` x that evaluation).
    """
    V.check_one_target(target, target_rel, what=_WHAT[metric])
    return _run(model_fn, data, batch_size=batch_size, lr=lr, momentum=momentum, seed=seed, target=target,
                target_rel=target_rel, metric=metric, max_steps=max_steps, eval_every=eval_every)[0]


def _run(model_fn, data, *, batch_size, lr, momentum, seed, target, target_rel, metric, max_steps, eval_every):
    """:func:`run_one`'s ``(steps to target, the absolute target used)`` (NaN target: the initial
    metric was not finite, with ``target_rel``)."""
    torch.manual_seed(seed)  # for models that draw at construction without their own generator
    model = model_fn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = data.x_train.shape[0]
    # the evaluations so far; only the last two can bracket the crossing (every earlier one is finite
    # and above the target), so only they are kept: the same crossing_step as of the whole record
    at, values = collections.deque(maxlen=2), collections.deque(maxlen=2)
    for k in range(max_steps + 1):
        if k % eval_every == 0:
            value = _metric(model, data, metric)
            if not math.isfinite(value):
                return math.inf, (math.nan if target is None else target)
            if target is None:  # the first evaluation (step 0): the relative target's reference
                target = target_rel * value
            at.append(k)
            values.append(value)
            if value <= target:
                return crossing_step(list(at), list(values), target), target
        if k == max_steps:
            break
        idx = torch.randint(0, n, (batch_size,), generator=gen).to(data.x_train.device)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        if not torch.isfinite(loss):
            return math.inf, target
        loss.backward()
        opt.step()
    return math.inf, target



def _task_file(path, bs, lr, mom, seed):
    return os.path.join(path, f"bs{bs}_lr{lr:.6g}_mom{mom:g}_seed{seed}.nc")


def _run_task(args):
    model_fn, data, kw, key = args
    return key, _run(model_fn, data, **kw)


@validate(batch_sizes=SequenceOf(Integer(1, V.MAX_WIDTH), unique=True, what="batch sizes >= 1"),
          lrs=SequenceOf(_LR, unique=True, what="learning rates > 0"),
          momenta=SequenceOf(_MOMENTUM, unique=True, what="momenta in [0, 1)"),
          seeds=SequenceOf(V.Seed(), unique=True, what="seeds >= 0"),
          path=Maybe(Instance(str, os.PathLike, what="a folder path (str or os.PathLike)")),
          executor=_Executor(), n_workers=Integer(1, 1024), progress=Boolean(),
          ci=Real(0.0, 1.0, low_open=True, high_open=True), n_boot=Integer(2, V.MAX_DRAWS), **_RUN)
def measure_steps(model_fn, data, *, batch_sizes, lrs, momenta=(0.0,), seeds=(0,), target: float | None = None,
                  target_rel: float | None = None, metric: str = "train_loss", max_steps: int = 2000,
                  eval_every: int = 10, path=None, executor="serial", n_workers: int = 2, progress: bool = True,
                  ci: float = 0.95, n_boot: int = 1000) -> xr.Dataset:
    """Measured steps to ``target`` over a grid; returns every run and the best per batch size.

    Args:
        model_fn: ``model_fn(seed) -> nn.Module`` (a top-level function, so dask can ship it).
        data: a :class:`deepmodels.data.Dataset`.
        batch_sizes, lrs, momenta, seeds: the grid (each run a task): non-empty lists without
            repeats, at most 10**6 runs in all.
        target: the value of the metric to reach (an absolute training loss with the default metric).
        target_rel: instead of ``target``, a fraction in (0, 1) of each run's own initial metric (its
            evaluation at step 0; each seed's initialisation has its own): see the module docstring.
            Exactly one of ``target`` and ``target_rel``.
        metric: ``"train_loss"`` (cross-entropy on the whole training set) or ``"val_error"``.
        max_steps, eval_every: run length (at most 10**7) and evaluation interval; a run's steps to
            target is interpolated in log(metric) between the evaluations around the crossing
            (see the module docstring), so it is a float, not a multiple of ``eval_every``.
        path: folder for per-run files (resume: a saved run is reused only if its target (or
            ``target_rel``), metric, run length, model factory, data, grid point and crossing rule
            (``crossing`` attribute, "log-interpolated"; files of the former first-evaluated-step rule
            lack it) match);
            None keeps results in memory only.
        executor: ``"serial"``, ``"dask"`` (a LocalCluster of ``n_workers`` processes), the address
            of a dask scheduler or a ``distributed.Client`` (:func:`toymodels.parallel.run_tasks`).
        progress: tqdm bar over runs.
        ci: level of the bootstrap intervals of ``b_crit`` and ``s_min``, in (0, 1).
        n_boot: bootstrap resamples (2 to 10**6), drawn with a fixed generator seed (0), so a
            rerun gives the same interval.

    Returns:
        Dataset with ``steps_to_target`` over (``batch_size``, ``lr``, ``momentum``, ``seed``) (with
        ``target_rel`` also ``target_value`` there: the absolute target of each run, NaN where its
        initial metric was not finite); over ``batch_size``: ``steps_best`` (the least median over
        seeds among the (lr, momentum) settings), ``lr_opt``, ``momentum_opt`` and ``lr_eff_opt`` =
        ``lr_opt / (1 - momentum_opt)``, the effective learning rate of heavy-ball momentum (smooth in
        the batch size where the tuned pair (lr, momentum) jumps along a ridge of equal
        lr / (1 - momentum)) (NaN where ``steps_best`` is inf); over
        (``batch_size``, ``seed``): ``steps_per_seed``, each seed's steps at its batch size's tuned
        (``lr_opt``, ``momentum_opt``) (inf where ``steps_best`` is inf); scalars ``b_crit``,
        ``s_min`` (:func:`toymodels.stats.fit_critical_batch` of ``steps_best``: S = S_min (1 + B_crit / B),
        McCandlish et al. 2018) and ``b_crit_lo``, ``b_crit_hi``, ``s_min_lo``, ``s_min_hi``, their
        percentile bootstrap interval over seeds at level ``ci``
        (:func:`toymodels.stats.bootstrap_critical_batch`: seeds resampled together for every batch
        size and setting, the best setting re-chosen in each resample).  Attrs ``target`` (absolute)
        or ``target_rel`` and ``target_of`` (what it is a fraction of), ``ci_level``,
        ``n_boot``, ``n_boot_failed`` (resamples with fewer than 2 finite tuned batch sizes, left out
        of the quantiles), ``ci_note`` (why an interval or estimate is NaN, else ""), and, when the fit
        is possible, ``steps_min`` and ``critical_batch_size`` (equal to ``s_min``, ``b_crit``),
        ``rms_relative_error``, ``n_points``.

        With one seed there is no interval: ``b_crit`` and ``s_min`` are the point estimates and the
        four bounds NaN (``ci_note`` "one seed: no interval").  When fewer than 2 batch sizes have a
        finite ``steps_best`` (or a crossing is at step 0), no S(B) can be fitted: all six are NaN
        and ``ci_note`` says why.  With few seeds (e.g. 3) the interval is coarse (at most 10
        distinct resamples of 3 seeds).
    """
    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`path` must be a folder (one file per run); got {str(path)!r}, an existing file.")
    n_runs = len(batch_sizes) * len(lrs) * len(momenta) * len(seeds)
    if n_runs > MAX_RUNS:
        raise ValueError(f"`batch_sizes`, `lrs`, `momenta` and `seeds` must make at most {MAX_RUNS} runs; got {n_runs}.")
    V.check_model_fn(model_fn, data, seeds[0], F.cross_entropy)
    bss = [check_int("batch_sizes", b, low=1) for b in batch_sizes]
    lr_list = [check_real("lrs", v, low=0.0, high=math.inf, low_open=True, high_open=True) for v in lrs]
    moms = [check_real("momenta", v, low=0.0, high=1.0, high_open=True) for v in momenta]
    seed_list = [check_int("seeds", s, low=0) for s in seeds]
    V.check_one_target(target, target_rel, what=_WHAT[metric])
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}; got {metric!r}.")
    check_scheduler(executor, name="executor")
    max_steps = check_int("max_steps", max_steps, low=1)
    eval_every = check_int("eval_every", eval_every, low=1)
    grid = list(itertools.product(bss, lr_list, moms, seed_list))
    # what a saved run must match to be reused (the file name holds the grid point); a run of a relative
    # target also holds the absolute target it used (attr `target`, variable `target_value`)
    goal = dict(target=target) if target_rel is None else dict(target_rel=target_rel)
    settings = dict(goal, metric=metric, max_steps=max_steps, eval_every=eval_every, model=V.describe(model_fn),
                    data=f"{data.name} {tuple(data.x_train.shape)}", crossing=CROSSING)
    results, targets = {}, {}
    if path is not None:
        os.makedirs(path, exist_ok=True)
        for key in grid:
            b, lr, m, seed = key
            saved = resume.read(_task_file(path, *key),
                                variables=("steps_to_target",) + (() if target_rel is None else ("target_value",)),
                                settings=dict(settings, batch_size=b, lr=lr, momentum=m, seed=seed))
            if saved is not None:
                results[key] = float(saved.steps_to_target)
                targets[key] = target if target_rel is None else float(saved.target_value)
    todo = [key for key in grid if key not in results]
    kw = dict(target=target, target_rel=target_rel, metric=metric, max_steps=max_steps, eval_every=eval_every)
    tasks = [(model_fn, data, dict(kw, batch_size=b, lr=lr, momentum=m, seed=s), (b, lr, m, s)) for b, lr, m, s in todo]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="steps to target", unit="run")

    def record(key, out):
        results[key], targets[key] = out
        if path is not None:
            b, lr, m, seed = key
            run = xr.Dataset({"steps_to_target": ((), out[0])},
                             attrs=dict(settings, batch_size=b, lr=lr, momentum=m, seed=seed))
            if target_rel is not None:
                run["target_value"] = ((), out[1])
                run.attrs["target"] = out[1]
            resume.write(run, _task_file(path, *key))
        if bar is not None:
            bar.update(1)

    scheduler = {"serial": None, "dask": "local"}.get(executor, executor) if isinstance(executor, str) else executor
    run_tasks(_run_task, tasks, scheduler=scheduler, on_result=lambda r: record(*r), n_workers=n_workers)
    if bar is not None:
        bar.close()
    return _assemble(results, bss, lr_list, moms, seed_list, target, metric, max_steps, eval_every, ci=ci,
                     n_boot=n_boot, target_rel=target_rel, targets=None if target_rel is None else targets)


@validate(runs=Instance(xr.DataArray, what="a DataArray over (batch_size, lr, momentum, seed), e.g. the "
                                            "`steps_to_target` of measure_steps"),
          target=Maybe(_LR), target_rel=Maybe(_FRACTION), metric=Options(*METRICS), max_steps=Integer(1, V.MAX_STEPS),
          eval_every=Integer(1, V.MAX_STEPS), ci=Real(0.0, 1.0, low_open=True, high_open=True),
          n_boot=Integer(2, V.MAX_DRAWS))
def summarize(runs: xr.DataArray, *, target: float | None = None, target_rel: float | None = None,
              metric: str = "train_loss", max_steps: int, eval_every: int, ci: float = 0.95,
              n_boot: int = 1000) -> xr.Dataset:
    """The Dataset of :func:`measure_steps` from its runs' steps (e.g. grids measured in parts and
    concatenated over ``batch_size``): the best per batch size, ``steps_per_seed``, B_crit and S_min
    with their bootstrap intervals.  The runs' ``target`` (absolute) or ``target_rel`` (exactly one;
    no ``target_value`` then: the runs' absolute targets are not in ``runs``), ``max_steps`` and
    ``eval_every`` are recorded in the attrs."""
    V.check_one_target(target, target_rel, what=_WHAT[metric])
    dims = ("batch_size", "lr", "momentum", "seed")
    if tuple(runs.dims) != dims:
        raise ValueError(f"`runs` must have the dims {dims}; got {tuple(runs.dims)}.")
    if np.isnan(runs.values).any():
        raise ValueError("`runs` must not hold NaN (a run that does not reach the target is inf).")
    bss, lrs, moms, seeds = (runs[d].values.tolist() for d in dims)
    results = {key: float(runs.values[idx]) for idx, key in
               zip(itertools.product(*(range(len(v)) for v in (bss, lrs, moms, seeds))),
                   itertools.product(bss, lrs, moms, seeds))}
    return _assemble(results, bss, lrs, moms, seeds, target, metric, max_steps, eval_every, ci=ci, n_boot=n_boot,
                     target_rel=target_rel)


def _assemble(results, bss, lrs, moms, seeds, target, metric, max_steps, eval_every, *, ci=0.95, n_boot=1000,
              target_rel=None, targets=None):
    dims = ("batch_size", "lr", "momentum", "seed")
    arr = np.array([[[[results[(b, lr, m, s)] for s in seeds] for m in moms] for lr in lrs] for b in bss])
    ds = xr.Dataset({"steps_to_target": (dims, arr)},
                    coords={"batch_size": np.asarray(bss, dtype=np.float64), "lr": lrs, "momentum": moms, "seed": seeds})
    if targets is not None:
        ds["target_value"] = (dims, np.array([[[[targets[(b, lr, m, s)] for s in seeds] for m in moms] for lr in lrs]
                                              for b in bss], dtype=np.float64))
    flat = arr.reshape(len(bss), len(lrs) * len(moms), len(seeds))  # settings (lr, momentum), lr major
    best, which = tuned_median(flat)  # median over seeds: inf if half the seeds fail
    reached = np.isfinite(best)
    ds["steps_best"] = ("batch_size", best)
    ii, jj = np.unravel_index(which, (len(lrs), len(moms)))
    ds["lr_opt"] = ("batch_size", np.where(reached, np.asarray(lrs)[ii], np.nan))
    ds["momentum_opt"] = ("batch_size", np.where(reached, np.asarray(moms)[jj], np.nan))
    ds["lr_eff_opt"] = ds.lr_opt / (1.0 - ds.momentum_opt)  # heavy ball's effective learning rate
    per_seed = flat[np.arange(len(bss)), which]  # (batch_size, seed) at the tuned setting
    ds["steps_per_seed"] = (("batch_size", "seed"), np.where(reached[:, None], per_seed, np.inf))
    fit, note, n_failed = {}, "", 0
    est = dict.fromkeys(("b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi"), math.nan)
    try:
        fit = fit_critical_batch(ds.batch_size.values, best)
    except ValueError as err:
        note = f"no fit of S(B): {err}"
    if fit:
        est["b_crit"], est["s_min"] = fit["critical_batch_size"], fit["steps_min"]
        if len(seeds) == 1:
            note = "one seed: no interval"
        else:
            try:
                boot = bootstrap_critical_batch(ds.batch_size.values, flat, level=ci, n_boot=n_boot, seed=0)
            except ValueError as err:  # a run that starts at the target (steps 0) in a resample's reach
                note = f"no interval: {err}"
            else:
                est.update({k: boot[k] for k in ("b_crit_lo", "b_crit_hi", "s_min_lo", "s_min_hi")})
                n_failed = boot["n_failed"]
                if math.isnan(boot["b_crit_lo"]):
                    note = f"no interval: all {n_boot} resamples had fewer than 2 batch sizes with finite steps"
    for k, v in est.items():
        ds[k] = ((), float(v))
    goal = dict(target=target) if target_rel is None else dict(
        target_rel=target_rel, target_of=f"each run's own initial {metric} (its evaluation at step 0)")
    attach_attrs(ds, model="network", source="measurement", **goal, metric=metric, max_steps=max_steps,
                 eval_every=eval_every, crossing=CROSSING, ci_level=ci, n_boot=n_boot, n_boot_failed=n_failed,
                 ci_note=note, **fit)
    return ds
