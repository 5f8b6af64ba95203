"""Benchmark: exact PLRF risk against Monte Carlo reaching 1% relative standard error on the same curve.

    python benchmarks/plrf_speed.py             # d = 1000, v = 2000, 10^5 steps
    python benchmarks/plrf_speed.py --quick     # d = 200, v = 400, 10^4 steps
    python benchmarks/plrf_speed.py --setup-only --repeat 9   # parts 0 and 1 only

Model: PowerLawRF(alpha=1.0, beta=0.7, v=2d, d), SGD at batch size 1 with half the largest stable
learning rate.  Prints:
0. the setup's parts (drawing W from the seed; forming [D^(1/2) W, c]; the QR; the singular values and
   U^T q of the d x d factor by dgebrd + dormbr + dbdsqr, against the previous route's full SVD,
   dgesdd with U) and the total "setup + exact risk at every step" from the seed, the model's route
   and the previous one (``_svd_projection_reference``) alternated in one process: median wall and
   CPU (time.process_time) seconds over ``--repeat`` runs;
1. the exact risk over the whole run: at every step 0..n and on a 200-point log grid (closed form:
   numba compiled, warm, median of 3);
2. the Monte Carlo on the explicit features (what ``PowerLawRF.simulate`` does: B draws of x in
   R^v, z = W^T x, O(v d) per example): time per run-update measured on a short pilot;
3. the runs a Monte Carlo needs for a 1% relative standard error at every point of the log grid,
   R* = max_k (sd_k / mean_k / 0.01)^2, with sd_k the spread over runs of P(theta_k) measured over the
   whole run by the cheap Monte Carlo in K's eigenbasis (``GaussianLinearRegression.simulate``,
   O(d) per example, the same law);
4. the ratios: Monte Carlo time (explicit features, extrapolated to R* runs x n steps from the
   pilot; and the eigenbasis Monte Carlo, scaled to R* runs) over the exact time.
Timing on a shared machine: say its load with the numbers (the script prints os.getloadavg()).  BLAS
threads follow OMP_NUM_THREADS (say which); wall and CPU seconds are both printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import scipy.linalg

sys.path.insert(0, ".")
from toymodels import SGD, plrf  # noqa: E402
from toymodels.plrf import PowerLawRF  # noqa: E402


def _best(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def _clock(fn, repeat=3):
    """Median wall and CPU seconds of ``fn()`` over ``repeat`` calls, and its last output."""
    wall, cpu = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return float(np.median(wall)), float(np.median(cpu)), out


def _setup_parts(d, v, seed=0):
    """The setup's steps one by one (as PowerLawRF's exact spectrum runs them): (name, wall, cpu) rows."""
    model = PowerLawRF(1.0, 0.7, v, d, seed=seed)
    rows = []
    wall, cpu, W = _clock(model._draw)
    rows.append(("draw W (v x d normals)", wall, cpu))

    def form():
        A = np.empty((v, d + 1), order="F")
        np.multiply(model._sqrt_cov[:, None], W, out=A[:, :d])
        A[:, d] = model._c
        return A
    wall, cpu, A = _clock(form)
    rows.append(("form [D^(1/2) W, c]", wall, cpu))
    wall, cpu, R = _clock(lambda: scipy.linalg.qr(A, mode="r", check_finite=False)[0])
    rows.append(("QR of [D^(1/2) W, c]", wall, cpu))
    wall, cpu, _ = _clock(lambda: plrf._singular_values_and_projection(R[:d, :d], R[:d, d]))
    rows.append(("s, U^T q: gebrd+ormbr+bdsqr", wall, cpu))
    wall, cpu, _ = _clock(lambda: scipy.linalg.svd(R[:d, :d], lapack_driver="gesdd", check_finite=False))
    rows.append(("(previous: SVD dgesdd with U)", wall, cpu))
    return rows


def _total(d, v, n, repeat):
    """Setup from the seed + exact risk at every step 0..n, the model's route and the previous one
    alternated: {route: (median wall, median cpu)}."""
    routes = {"new": plrf._svd_projection, "previous": plrf._svd_projection_reference}
    times = {name: ([], []) for name in routes}
    try:
        for _ in range(repeat):
            for name, fn in routes.items():
                plrf._svd_projection = fn
                t, c = time.perf_counter(), time.process_time()
                model = PowerLawRF(1.0, 0.7, v, d, seed=0)
                model.loss_curve(SGD(0.5 * model.stable_lr(SGD(1.0), 1)), 1, n)
                times[name][0].append(time.perf_counter() - t)
                times[name][1].append(time.process_time() - c)
    finally:
        plrf._svd_projection = routes["new"]
    return {name: (float(np.median(w)), float(np.median(c))) for name, (w, c) in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mc-runs", type=int, default=200, help="runs of the eigenbasis Monte Carlo for sd_k")
    ap.add_argument("--repeat", type=int, default=5, help="runs of the setup + risk total (each route)")
    ap.add_argument("--setup-only", action="store_true", help="stop after the setup and risk timings")
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
    print(f"setup (first, cold)      {t_setup:8.3f} s")
    print(f"exact, every step 0..n   {t_all:8.3f} s")
    print(f"exact, 200-point log grid{t_grid:8.3f} s")
    print("setup parts (median of 3)           wall s   cpu s")
    for name, wall, cpu in _setup_parts(d, v):
        print(f"  {name:32s} {wall:8.3f} {cpu:7.3f}")
    total = _total(d, v, n, args.repeat)
    for name, (wall, cpu) in total.items():
        print(f"setup + risk at every step, {name:8s} route: wall {wall:.3f} s, cpu {cpu:.3f} s "
              f"(median of {args.repeat}, alternated)")
    print(f"ratio previous / new (setup + risk): wall {total['previous'][0] / total['new'][0]:.2f}x, "
          f"cpu {total['previous'][1] / total['new'][1]:.2f}x; load average {os.getloadavg()}")
    if args.setup_only:
        return

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
