"""Benchmark: tuned batch-size sweeps of the optimizer families of issue 16 against momentum's.

    python benchmarks/optimizer_zoo.py                 # d = 10^4, 21 batch sizes 2^0..2^20
    python benchmarks/optimizer_zoo.py --quick         # d = 10^3, 5 batch sizes
    python benchmarks/optimizer_zoo.py --families nesterov asgd

Each family's tuned sweep (``batch_size_sweep``, warm: numba compiled) is timed in the same process
as today's momentum sweep on the same NQM, batch sizes and target (0.01 L0), and reported as a ratio
to it, with the machine's load average (the ratios hold on a loaded machine; the seconds do not),
in wall-clock time and in CPU time (the sweep's process, all threads).
``--budget`` stops a family's sweep after that many seconds (its time is then a lower bound, marked
">=", over the batch sizes it finished): ``polyak`` (SGD with uniform averaging) has a closed form
per mode, ``schedule_free`` none (each setting is one compiled scan over its steps: tuned on a
23-mode coarsened model, its reported steps one exact scan of the full model, or at beta = 0 the
closed form of the Polyak average of SGD, which it then is).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, ".")
from toymodels import NQM  # noqa: E402
from toymodels.sweep import batch_size_sweep  # noqa: E402

NEW = ("nesterov", "asgd", "polyak", "schedule_free")


def _sweep_to_file(nqm, family, bss, target, path):
    batch_size_sweep(nqm, family, bss, target, progress=False, path=path)


def _children_cpu():
    """CPU seconds (user + system) of this process's finished child processes."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed_sweep(nqm, family, bss, target, budget):
    """(seconds, CPU seconds, batch sizes done, steps) of a tuned sweep run in a forked process (which
    starts with this process's compiled kernels) that writes its result after every batch size; with a
    budget the process is stopped once it is spent, and the batch sizes it finished are read back.  The
    CPU time is the child's, all its threads together (on a loaded machine a steadier measure than
    the wall-clock time)."""
    import multiprocessing as mp

    import xarray as xr

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{family}.nc")
        proc = mp.get_context("fork").Process(target=_sweep_to_file, args=(nqm, family, bss, target, path))
        cpu = _children_cpu()
        t = time.perf_counter()
        proc.start()
        proc.join(budget)
        if proc.is_alive():
            proc.terminate()
            proc.join()
        dt = time.perf_counter() - t
        cpu = _children_cpu() - cpu
        if not os.path.exists(path):
            return dt, cpu, 0, np.array([np.nan])
        with xr.open_dataset(path) as ds:
            steps = ds.steps_to_target.values.copy()
    return dt, cpu, steps.size, steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 10^3 and 5 batch sizes")
    p.add_argument("--dim", type=int, default=None, help="NQM dimension (default 10^4, --quick 10^3)")
    p.add_argument("--families", nargs="+", default=list(NEW), choices=NEW)
    p.add_argument("--budget", type=float, default=None, help="seconds per family before it is cut short")
    a = p.parse_args(argv)
    dim = a.dim or (1000 if a.quick else 10_000)
    bss = 2.0 ** (np.arange(0, 17, 4) if a.quick else np.arange(0, 21))
    nqm = NQM.power_law(dim)
    target = 0.01 * nqm.initial_loss
    print(f"NQM d={dim}, h_i = c_i = 1/i, target = 0.01 L0 = {target:.4g}, {bss.size} batch sizes; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    small = NQM.power_law(50)
    for fam in ["momentum"] + a.families:  # compile / load every kernel first
        batch_size_sweep(small, fam, [1.0, 16.0], 0.05, progress=False)
    t_ref, c_ref, _, s_ref = timed_sweep(nqm, "momentum", bss, target, None)
    print(f"  momentum       {t_ref:8.2f} s   steps B=1: {s_ref[0]:.0f}  B=max: {s_ref[-1]:.0f}   (reference; "
          f"CPU {c_ref:.2f} s)")
    for fam in a.families:
        dt, cpu, done, s = timed_sweep(nqm, fam, bss, target, a.budget)
        cut = done < bss.size
        if cut:  # a lower bound: the time spent over the batch sizes finished (at least one more)
            ratio = (dt / (done + 1)) / (t_ref / bss.size)
            print(f"  {fam:14s} >={dt:7.2f} s   stopped after {done}/{bss.size} batch sizes   ratio to momentum "
                  f"(per batch size) >= {ratio:.2f}x" + (f"   steps B=1: {s[0]:.0f}" if done else ""))
            continue
        ratio = dt / t_ref
        print(f"  {fam:14s}   {dt:7.2f} s   ratio to momentum {ratio:.2f}x   steps B=1: {s[0]:.0f}  "
              f"B=max: {s[-1]:.0f}   (CPU {cpu:.2f} s, ratio {cpu / c_ref:.2f}x)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
