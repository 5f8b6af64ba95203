"""Independent tasks here or on a dask cluster, with each result handed back as soon as it finishes.

One place for the choice every sweep makes (toy-model sweeps in :mod:`toymodels.sweep`, training
runs in :mod:`deepmodels.steps`): ``scheduler=None`` runs the tasks one after another in this
process; ``"local"`` starts a dask ``LocalCluster`` of worker processes on this machine; an address
such as ``"tcp://10.0.0.5:8786"`` connects to a running dask scheduler (a real cluster); a
``distributed.Client`` is used as it is.  ``on_result`` sees every result the moment it arrives, so
callers write it to disk and an interrupted sweep loses nothing.

A local cluster leaves this process's environment as it found it (:func:`local_cluster`): dask's
nanny sets its workers' variables (one BLAS / OpenMP thread each) in ``os.environ`` of *this*
process and never takes them back, so every process started later (a ``subprocess``, a DDP worker)
would inherit them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterable

from ._validate import Callable as CallableArg
from ._validate import Constraint, Integer, Maybe, validate

__all__ = ["run_tasks", "check_scheduler", "local_cluster"]


class _Tasks(Constraint):
    """An iterable of tasks (not a string); returned as a list."""

    def __call__(self, name, value):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError(f"`{name}` must be an iterable of tasks (a list); got {type(value).__name__}.")
        return list(value)

    def bad_values(self):
        return [None, "1", 1.5, object()]


class _Scheduler(Constraint):
    def __call__(self, name, value):
        return check_scheduler(value, name=name)

    def bad_values(self):
        return ["", 1.5, object()]


def check_scheduler(scheduler, *, name: str = "scheduler"):
    """``None``, ``"local"``, a scheduler address (str) or a ``distributed.Client``; else ValueError
    naming the argument ``name``."""
    if scheduler is None or isinstance(scheduler, str) and scheduler:
        return scheduler
    if type(scheduler).__name__ == "Client" and hasattr(scheduler, "submit"):
        return scheduler
    raise ValueError(f"`{name}` must be None, 'local', a dask scheduler address or a distributed.Client; "
                     f"got {scheduler!r}.")


def _nanny_environ() -> set:
    """The variables dask's nanny writes into this process's ``os.environ`` before it spawns a
    worker: the ``distributed.nanny.pre-spawn-environ`` config and ``PYTHONHASHSEED``."""
    import dask

    return set(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}) | {"PYTHONHASHSEED"}


@validate(n_workers=Integer(1, 1024))
@contextmanager
def local_cluster(n_workers: int = 2):
    """A dask ``LocalCluster`` of ``n_workers`` worker processes (one thread each) on this machine:
    ``with local_cluster(2) as client: ...`` gives its ``distributed.Client``; both are closed on
    exit, and this process's environment is restored.

    Why the restore: before spawning each worker, dask's nanny writes the variables the worker must
    start with (``distributed.nanny.pre-spawn-environ``: ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``
    and ``OPENBLAS_NUM_THREADS`` = 1, ``MALLOC_TRIM_THRESHOLD_``; and ``PYTHONHASHSEED``) into
    ``os.environ`` of *this* process and leaves them there.  This process's libraries read their
    thread counts when they started and keep them, but every process it starts afterwards would run
    its BLAS on one thread, and so sum float32 products in another order than this process (results
    that differ in the last bits from the same computation here).  On exit those variables are
    back to their values before the cluster (unset if they were).
    """
    from distributed import Client, LocalCluster

    keys = _nanny_environ()
    before = {k: os.environ.get(k) for k in keys}
    try:
        with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@validate(fn=CallableArg(), tasks=_Tasks(), scheduler=_Scheduler(), on_result=Maybe(CallableArg()),
          n_workers=Integer(1, 1024))
def run_tasks(fn: Callable, tasks: Iterable, *, scheduler=None, on_result: Callable[[Any], None] | None = None,
              n_workers: int = 2) -> list:
    """``fn(task)`` for every task; returns the results in the order of ``tasks``.

    Args:
        fn: a top-level (picklable) function of one argument.
        tasks: its arguments (picklable).
        scheduler: see the module docstring.
        on_result: called with each result as it finishes (finishing order on a cluster).
        n_workers: worker processes of a ``"local"`` cluster (one thread each; :func:`local_cluster`).
    """
    scheduler = check_scheduler(scheduler)
    tasks = list(tasks)
    results = [None] * len(tasks)
    if scheduler is None or not tasks:
        for i, t in enumerate(tasks):
            results[i] = fn(t)
            if on_result is not None:
                on_result(results[i])
        return results
    if scheduler == "local":
        with local_cluster(n_workers) as client:
            return _gather(client, fn, tasks, results, on_result)
    if isinstance(scheduler, str):
        from distributed import Client

        with Client(scheduler) as client:
            return _gather(client, fn, tasks, results, on_result)
    return _gather(scheduler, fn, tasks, results, on_result)


def _gather(client, fn, tasks, results, on_result) -> list:
    """``fn(task)`` for every task on the cluster of ``client``, into ``results`` (in the order of
    ``tasks``), ``on_result`` called as each finishes."""
    from distributed import as_completed

    futures = client.map(fn, tasks, pure=False)
    index = {f.key: i for i, f in enumerate(futures)}
    for fut in as_completed(futures):
        i = index[fut.key]
        results[i] = fut.result()
        if on_result is not None:
            on_result(results[i])
    return results
