"""Benchmark: exact PLRF risk against Monte Carlo reaching 1% relative standard error on the same curve.

    python benchmarks/plrf_speed.py             # d = 1000, v = 2000, 10^5 steps
    python benchmarks/plrf_speed.py --quick     # d = 200, v = 400, 10^4 steps

Model: PowerLawRF(alpha=1.0, beta=0.7, v=2d, d), SGD at batch size 1 with half the largest stable
learning rate.  Prints:
1. the setup (SVD of the (v, d) matrix D^(1/2) W) and the exact risk over the whole run: at every
   step 0..n and on a 200-point log grid (closed form: numba compiled, warm, median of 3);
2. the Monte Carlo on the explicit features (what ``PowerLawRF.simulate`` does: B draws of x in
   R^v, z = W^T x, O(v d) per example): time per run-update measured on a short pilot;
3. the runs a Monte Carlo needs for a 1% relative standard error at every point of the log grid,
   R* = max_k (sd_k / mean_k / 0.01)^2, with sd_k the spread over runs of P(theta_k) measured over the
   whole run by the cheap Monte Carlo in K's eigenbasis (``GaussianLinearRegression.simulate``,
   O(d) per example, the same law);
4. the ratios: Monte Carlo time (explicit features, extrapolated to R* runs x n steps from the
   pilot; and the eigenbasis Monte Carlo, scaled to R* runs) over the exact time.
Timing on a shared machine: say its load with the numbers (the script prints os.getloadavg()).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from toymodels import SGD  # noqa: E402
from toymodels.plrf import PowerLawRF  # noqa: E402


def _best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mc-runs", type=int, default=200, help="runs of the eigenbasis Monte Carlo for sd_k")
    args = ap.parse_args()
    d, n = (200, 10**4) if args.quick else (1000, 10**5)
    v, bs = 2 * d, 1
    print(f"load average {os.getloadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    t = time.perf_counter()
    model = PowerLawRF(1.0, 0.7, v, d, seed=0)
    t_setup = time.perf_counter() - t
    opt = SGD(0.5 * model.stable_lr(SGD(1.0), bs))
    grid = np.unique(np.round(np.logspace(0, np.log10(n), 200)).astype(np.int64))
    model.loss_curve(opt, bs, grid[:10])  # compile
    t_all, curve_all = _best(lambda: model.loss_curve(opt, bs, n).values)
    t_grid, curve = _best(lambda: model.loss_curve(opt, bs, grid).values)
    print(f"PLRF alpha=1.0 beta=0.7 v={v} d={d}, SGD B={bs} lr={opt.lr.lr:.4g}, {n} steps; "
          f"risk {curve[0]:.4g} -> {curve[-1]:.4g} (irreducible {model.irreducible_risk:.4g})")
    print(f"setup (SVD)              {t_setup:8.3f} s")
    print(f"exact, every step 0..n   {t_all:8.3f} s")
    print(f"exact, 200-point log grid{t_grid:8.3f} s")

    # Monte Carlo on the explicit features: a pilot for the cost per run-update
    pilot_runs, pilot_steps = 16, 200 if not args.quick else 400
    t = time.perf_counter()
    model.simulate(opt, bs, pilot_steps, n_runs=pilot_runs, seed=1)
    per_run_update = (time.perf_counter() - t) / (pilot_runs * pilot_steps)
    # the spread over runs of P(theta_k), from the same law in K's eigenbasis (O(d) per example)
    t = time.perf_counter()
    mc = model.regression.simulate(opt, bs, grid, n_runs=args.mc_runs, seed=2)
    t_eig = time.perf_counter() - t
    rel_sd = (mc.loss_sem.values * np.sqrt(args.mc_runs)) / (mc.loss.values + model.irreducible_risk)
    z = (mc.loss.values + model.irreducible_risk - curve) / mc.loss_sem.values
    runs_needed = int(np.ceil(np.max(rel_sd / 0.01) ** 2))
    t_mc_explicit = runs_needed * n * per_run_update
    t_mc_eig = t_eig * runs_needed / args.mc_runs
    print(f"eigenbasis MC, {args.mc_runs} runs    {t_eig:8.3f} s   (max |MC - exact| / SE = {np.max(np.abs(z)):.2f})")
    print(f"runs for 1% relative SE at every grid point: R* = {runs_needed} (max relative sd {rel_sd.max():.3f})")
    print(f"explicit-feature MC: {per_run_update * 1e6:.1f} us per run-update -> R* runs x {n} steps "
          f"= {t_mc_explicit:.4g} s (extrapolated)")
    print(f"eigenbasis MC at R* runs: {t_mc_eig:.4g} s (scaled from {args.mc_runs} runs)")
    print(f"ratio explicit MC / exact (log grid): {t_mc_explicit / t_grid:.3g}x; (every step): "
          f"{t_mc_explicit / t_all:.3g}x")
    print(f"ratio eigenbasis MC / exact (log grid): {t_mc_eig / t_grid:.3g}x")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
