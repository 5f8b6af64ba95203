"""Independent tasks here or on a dask cluster, with each result handed back as soon as it finishes.

One place for the choice every sweep makes (toy-model sweeps in :mod:`toymodels.sweep`, training
runs in :mod:`deepmodels.steps`): ``scheduler=None`` runs the tasks one after another in this
process; ``"local"`` starts a dask ``LocalCluster`` of worker processes on this machine; an address
such as ``"tcp://10.0.0.5:8786"`` connects to a running dask scheduler (a real cluster); a
``distributed.Client`` is used as it is.  ``on_result`` sees every result the moment it arrives, so
callers write it to disk and an interrupted sweep loses nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from ._validate import Callable as CallableArg
from ._validate import Constraint, Integer, Maybe, validate

__all__ = ["run_tasks", "check_scheduler"]


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
        n_workers: worker processes of a ``"local"`` cluster (one thread each).
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
    from distributed import Client, LocalCluster, as_completed

    cluster = client = None
    if scheduler == "local":
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    elif isinstance(scheduler, str):
        client = Client(scheduler)
    try:
        futures = (client or scheduler).map(fn, tasks, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        for fut in as_completed(futures):
            i = index[fut.key]
            results[i] = fut.result()
            if on_result is not None:
                on_result(results[i])
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return results
