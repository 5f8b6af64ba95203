"""Measured steps to a target per batch size (Shallue et al. 2019's protocol, at small scale).

For every batch size, learning rate, momentum and seed a fresh model (``model_fn(seed)``) is trained
by SGD with heavy-ball momentum on batches drawn with replacement from a generator seeded with the
seed; every ``eval_every`` steps the metric (training loss on the whole training set, or
validation error) is evaluated, and the run's steps to target is the first evaluated step whose
metric is <= target (``inf`` if none by ``max_steps``, or if the loss diverges).  Per batch size the
result is the best (lr, momentum) by the median over seeds.

Each run is an independent task: run them here one after another, or on a dask cluster
(``executor="dask"`` starts a LocalCluster; a scheduler address uses a real one).  With ``path``
every finished run is written to its own small netCDF file in that folder, and a rerun skips the
finished ones, so an interrupted sweep loses nothing.
"""

from __future__ import annotations

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
from toymodels.stats import fit_critical_batch

from . import _validate as V
from ._validate import Boolean, Function, Instance, Integer, Maybe, Options, Real, SequenceOf, validate
from .data import Dataset

__all__ = ["run_one", "measure_steps"]

METRICS = ("train_loss", "val_error")
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
_RUN = dict(model_fn=Function("a callable model_fn(seed) -> nn.Module"),
            data=Instance(Dataset, what="a deepmodels.data.Dataset"), target=_LR, metric=Options(*METRICS),
            max_steps=Integer(1, V.MAX_STEPS), eval_every=Integer(1, V.MAX_STEPS))


def _metric(model, data, metric):
    with torch.no_grad():
        if metric == "train_loss":
            return float(F.cross_entropy(model(data.x_train), data.y_train))
        return float((model(data.x_test).argmax(1) != data.y_test).float().mean())


@validate(batch_size=Integer(1, V.MAX_WIDTH), lr=_LR, momentum=_MOMENTUM, seed=V.Seed(), **_RUN)
def run_one(model_fn, data, *, batch_size: int, lr: float, momentum: float, seed: int, target: float, metric: str,
            max_steps: int, eval_every: int) -> float:
    """Steps to target of one training run (see the module docstring); a float holding an int, or inf."""
    torch.manual_seed(seed)  # for models that draw at construction without their own generator
    model = model_fn(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = data.x_train.shape[0]
    for k in range(max_steps + 1):
        if k % eval_every == 0:
            value = _metric(model, data, metric)
            if not math.isfinite(value):
                return math.inf
            if value <= target:
                return float(k)
        if k == max_steps:
            break
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        if not torch.isfinite(loss):
            return math.inf
        loss.backward()
        opt.step()
    return math.inf


def _describe(fn) -> str:
    """A name for the model factory that is the same in every process (no memory addresses)."""
    if hasattr(fn, "__qualname__"):  # a function
        return f"{fn.__module__}.{fn.__qualname__}"
    if type(fn).__repr__ is not object.__repr__:  # e.g. models.Factory
        return repr(fn)
    return f"{type(fn).__module__}.{type(fn).__qualname__}"


def _task_file(path, bs, lr, mom, seed):
    return os.path.join(path, f"bs{bs}_lr{lr:.6g}_mom{mom:g}_seed{seed}.nc")


def _run_task(args):
    model_fn, data, kw, key = args
    return key, run_one(model_fn, data, **kw)


@validate(batch_sizes=SequenceOf(Integer(1, V.MAX_WIDTH), unique=True, what="batch sizes >= 1"),
          lrs=SequenceOf(_LR, unique=True, what="learning rates > 0"),
          momenta=SequenceOf(_MOMENTUM, unique=True, what="momenta in [0, 1)"),
          seeds=SequenceOf(V.Seed(), unique=True, what="seeds >= 0"),
          path=Maybe(Instance(str, os.PathLike, what="a folder path (str or os.PathLike)")),
          executor=_Executor(), n_workers=Integer(1, 1024), progress=Boolean(), **_RUN)
def measure_steps(model_fn, data, *, batch_sizes, lrs, momenta=(0.0,), seeds=(0,), target: float,
                  metric: str = "train_loss", max_steps: int = 2000, eval_every: int = 10, path=None,
                  executor="serial", n_workers: int = 2, progress: bool = True) -> xr.Dataset:
    """Measured steps to ``target`` over a grid; returns every run and the best per batch size.

    Args:
        model_fn: ``model_fn(seed) -> nn.Module`` (a top-level function, so dask can ship it).
        data: a :class:`deepmodels.data.Dataset`.
        batch_sizes, lrs, momenta, seeds: the grid (each run a task): non-empty lists without
            repeats, at most 10**6 runs in all.
        target: metric value to reach.
        metric: ``"train_loss"`` (cross-entropy on the whole training set) or ``"val_error"``.
        max_steps, eval_every: run length (at most 10**7) and evaluation interval (steps are
            multiples of it).
        path: folder for per-run files (resume: a saved run is reused only if its target, metric,
            run length, model factory, data and grid point match); None keeps results in memory only.
        executor: ``"serial"``, ``"dask"`` (a LocalCluster of ``n_workers`` processes), the address
            of a dask scheduler or a ``distributed.Client`` (:func:`toymodels.parallel.run_tasks`).
        progress: tqdm bar over runs.

    Returns:
        Dataset with ``steps_to_target`` over (``batch_size``, ``lr``, ``momentum``, ``seed``), and over
        ``batch_size``: ``steps_best`` (best median over seeds), ``lr_opt``, ``momentum_opt``; attrs
        ``steps_min`` and ``critical_batch_size`` (fit of S = S_min (1 + B_crit / B), when possible).
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
    target = check_real("target", target, low=0.0, high=math.inf, low_open=True, high_open=True)
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}; got {metric!r}.")
    check_scheduler(executor, name="executor")
    max_steps = check_int("max_steps", max_steps, low=1)
    eval_every = check_int("eval_every", eval_every, low=1)
    grid = list(itertools.product(bss, lr_list, moms, seed_list))
    # what a saved run must match to be reused (the file name holds the grid point)
    settings = dict(target=target, metric=metric, max_steps=max_steps, eval_every=eval_every, model=_describe(model_fn),
                    data=f"{data.name} {tuple(data.x_train.shape)}")
    results = {}
    if path is not None:
        os.makedirs(path, exist_ok=True)
        for key in grid:
            b, lr, m, seed = key
            saved = resume.read(_task_file(path, *key), variables=("steps_to_target",),
                                settings=dict(settings, batch_size=b, lr=lr, momentum=m, seed=seed))
            if saved is not None:
                results[key] = float(saved.steps_to_target)
    todo = [key for key in grid if key not in results]
    kw = dict(target=target, metric=metric, max_steps=max_steps, eval_every=eval_every)
    tasks = [(model_fn, data, dict(kw, batch_size=b, lr=lr, momentum=m, seed=s), (b, lr, m, s)) for b, lr, m, s in todo]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(grid), initial=len(grid) - len(todo), desc="steps to target", unit="run")

    def record(key, steps):
        results[key] = steps
        if path is not None:
            b, lr, m, seed = key
            resume.write(xr.Dataset({"steps_to_target": ((), steps)},
                                    attrs=dict(settings, batch_size=b, lr=lr, momentum=m, seed=seed)),
                         _task_file(path, *key))
        if bar is not None:
            bar.update(1)

    scheduler = {"serial": None, "dask": "local"}.get(executor, executor) if isinstance(executor, str) else executor
    run_tasks(_run_task, tasks, scheduler=scheduler, on_result=lambda r: record(*r), n_workers=n_workers)
    if bar is not None:
        bar.close()
    return _assemble(results, bss, lr_list, moms, seed_list, target, metric, max_steps, eval_every)


def _assemble(results, bss, lrs, moms, seeds, target, metric, max_steps, eval_every):
    arr = np.array([[[[results[(b, lr, m, s)] for s in seeds] for m in moms] for lr in lrs] for b in bss])
    ds = xr.Dataset({"steps_to_target": (("batch_size", "lr", "momentum", "seed"), arr)},
                    coords={"batch_size": np.asarray(bss, dtype=np.float64), "lr": lrs, "momentum": moms, "seed": seeds})
    med = np.median(arr, axis=3)  # (B, lr, momentum); inf if half the seeds fail
    flat = med.reshape(len(bss), -1)
    best = np.argmin(flat, axis=1)
    ds["steps_best"] = ("batch_size", flat[np.arange(len(bss)), best])
    ii, jj = np.unravel_index(best, med.shape[1:])
    ds["lr_opt"] = ("batch_size", np.where(np.isfinite(ds.steps_best.values), np.asarray(lrs)[ii], np.nan))
    ds["momentum_opt"] = ("batch_size", np.where(np.isfinite(ds.steps_best.values), np.asarray(moms)[jj], np.nan))
    fit = {}
    try:
        fit = fit_critical_batch(ds.batch_size.values, ds.steps_best.values)
    except ValueError:
        pass
    attach_attrs(ds, model="network", source="measurement", target=target, metric=metric, max_steps=max_steps,
                 eval_every=eval_every, **fit)
    return ds
