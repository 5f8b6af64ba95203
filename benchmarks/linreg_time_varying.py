"""Benchmark: the exact curves of the time-varying optimizers on linear regression.

    python benchmarks/linreg_time_varying.py            # d = 1000 modes, 20000 updates
    python benchmarks/linreg_time_varying.py --quick    # d = 200, 5000 updates

The Polyak average and schedule-free SGD are stepped one update at a time with linear regression's
state-dependent noise (``toymodels.dynamics.propagate_varying`` with ``q_self``, ``q_loss``).  Each
curve (warm: numba compiled) is timed in the same process as the reference, momentum, whose constant
system is stepped by ``toymodels.dynamics.propagate`` with the same noise (linear regression steps
every optimizer but SGD without weight decay), and reported in ns per update x mode and as a ratio
to it, with the machine's load average (the ratios hold on a loaded machine; the seconds do not).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, ".")
from toymodels import SGD, GaussianLinearRegression, Momentum, PolyakAverage, ScheduleFree  # noqa: E402


def timed(model, opt, n, repeats=3):
    model.loss_curve(opt, 4, [10])  # compile / load the kernels
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model.loss_curve(opt, 4, [n])
        best = min(best, time.perf_counter() - t)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    d, n = (200, 5000) if args.quick else (1000, 20000)
    model = GaussianLinearRegression.power_law(d, 1.0, noise_std=0.1)
    ref = Momentum(0.3, 0.5)
    cases = [("momentum (reference, s = 2)", ref), ("polyak(sgd) (s = 2)", PolyakAverage(SGD(0.5))),
             ("polyak(sgd), weight_decay (s = 3)", PolyakAverage(SGD(0.5, weight_decay=1e-3))),
             ("schedule_free (s = 3)", ScheduleFree(0.5, 0.9)),
             ("schedule_free, weight_decay (s = 4)", ScheduleFree(0.5, 0.9, weight_decay=1e-3))]
    print(f"linear regression, d = {d}, {n} updates, load average {os.getloadavg()[0]:.1f}")
    t_ref = None
    for name, opt in cases:
        t = timed(model, opt, n)
        t_ref = t if t_ref is None else t_ref
        print(f"  {name:38s} {t / (n * d) * 1e9:7.0f} ns / update x mode   ratio {t / t_ref:5.2f}")


if __name__ == "__main__":
    main()
