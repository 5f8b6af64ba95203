"""Measurement: doubling batch-size warm-ups against the tuned constant batch sizes (exact).

    python benchmarks/tuned_warmup.py nqm sgd --finals 7,8,9 --stages 8,32,128,512
    python benchmarks/tuned_warmup.py linreg momentum --finals 6,7 --stages 2,8,32

Problems: ``nqm`` = ``NQM.power_law(1000)``, ``linreg`` = ``GaussianLinearRegression.power_law(100,
noise_std=0.5)``; target 1% of the initial loss; constants 2^0..2^12, each at its tuned learning rate
(momentum at beta = 0.9, its learning rate alone tuned).  Each warm-up doubles the batch size from 1
to 2^n, ``stage`` updates per size (``BatchSizeWarmup(1, 2**n, n * stage, every=stage)``) and, beside
it, the same geometric growth at every update (``every=1``).  For each it prints the exact steps S and
examples E of :func:`toymodels.batch_schedule.compare_tuned`'s two rows, the learning rate following
the batch size ("follow") and the best single learning rate of a 48-point log grid ("fixed"), and
where each sits against the constants: the fewest steps of a constant that draws no more examples,
and the constants that need no more steps and no more examples (dominate it).  The tuned sweeps are
kept in ``--cache`` (resumed by :func:`toymodels.sweep.batch_size_sweep`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from toymodels import NQM, BatchSizeWarmup, GaussianLinearRegression, Momentum, SGD  # noqa: E402
from toymodels.batch_schedule import compare_tuned  # noqa: E402
from toymodels.stats import fit_critical_batch  # noqa: E402
from toymodels.sweep import batch_size_sweep  # noqa: E402

BETA = 0.9


def against(S, E, bss, s, e):
    """(fewest steps of a constant with <= e examples, constants with <= s steps and <= e examples)."""
    s_at_e = min([si for si, ei in zip(S, E) if ei <= e], default=math.inf)
    dom = [int(b) for b, si, ei in zip(bss, S, E) if si <= s and ei <= e]
    return s_at_e, dom


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("problem", choices=("nqm", "linreg"))
    ap.add_argument("family", choices=("sgd", "momentum"))
    ap.add_argument("--finals", default="8", help="n of the final batch size 2^n, comma separated")
    ap.add_argument("--stages", default="8,32,128", help="updates per batch size, comma separated")
    ap.add_argument("--cache", default="/tmp/tuned_warmup")
    args = ap.parse_args(argv)
    prob = NQM.power_law(1000) if args.problem == "nqm" else GaussianLinearRegression.power_law(100, noise_std=0.5)
    target = 0.01 * prob.initial_loss
    bss = 2.0 ** np.arange(13)
    os.makedirs(args.cache, exist_ok=True)
    t0 = time.perf_counter()
    tuned = batch_size_sweep(prob, args.family, bss, target, extra=BETA if args.family == "momentum" else None,
                             progress=False, path=os.path.join(args.cache, f"{args.problem}_{args.family}.nc"))
    S = tuned.steps_to_target.values
    E = S * bss
    fit = fit_critical_batch(bss, S)
    print(f"{args.problem} {args.family} target {target:.5g}: B_crit {fit['critical_batch_size']:.1f}, "
          f"S_min {fit['steps_min']:.1f} (fit); tuned in {time.perf_counter() - t0:.1f} s")
    for b, s, e, lr in zip(bss, S, E, tuned.lr_opt.values):
        print(f"  constant B={int(b):5d}  S={s:8.0f}  E={e:9.0f}  lr*={lr:.4g}")
    make = (lambda lr: SGD(lr)) if args.family == "sgd" else (lambda lr: Momentum(lr, BETA))
    limit = prob.lr_limit(make(1.0))
    grid = np.geomspace(np.nanmin(tuned.lr_opt.values) / 2, 0.999 * limit, 48)
    print("  warm-up                  | follow: S       E   (const S at <=E; dominated by) "
          "| fixed lr:   lr      S       E   (const S at <=E; dominated by)")
    for n in (int(x) for x in args.finals.split(",")):
        for m in (int(x) for x in args.stages.split(",")):
            for every in (m, 1):
                sched = BatchSizeWarmup(1, 2.0**n, n * m, every=every)
                ds = compare_tuned(prob, args.family, sched, bss, target, lrs=grid, momentum=BETA, tuned=tuned,
                                   progress=False)
                a = ds.attrs
                sf, ef = a["schedule_steps"], a["schedule_examples"]
                sx, ex = a["fixed_lr_steps"], a["fixed_lr_examples"]
                cf, df = against(S, E, bss, sf, ef)
                cx, dx = against(S, E, bss, sx, ex)
                print(f"  1->2^{n:<2d} stage {m:4d} every {every:4d} | {sf:7.0f} {ef:9.0f} ({cf:7.0f}; {df}) "
                      f"| {a['fixed_lr']:8.4g} {sx:7.0f} {ex:9.0f} ({cx:7.0f}; {dx})", flush=True)
    print(f"  best constant by steps: B={a['best_steps_batch_size']:g} S={a['best_steps']:g}; by examples: "
          f"B={a['best_examples_batch_size']:g} E={a['best_examples']:g}; total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
