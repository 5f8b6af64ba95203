"""Benchmark: tuning 3-piece learning-rate schedules per batch size on the NQM (``tune_schedule``).

    python benchmarks/schedule_tuning.py [--dim 10000] [--repeat 3]

Times ``toymodels.sweep.tune_schedule`` over batch sizes 2^0..2^20 and, as the reference in the
same process, the same bisection with scipy's Nelder-Mead minimising the same compiled loss
(``toymodels._localmin.schedule_log_loss``) from the same simplex: the compiled search takes the
same path, so the ratio is the interpreter overhead removed.  Prints medians and the ratio, and
checks that both give the same steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
from scipy import optimize

sys.path.insert(0, ".")
from toymodels import NQM, SGD, _localmin  # noqa: E402
from toymodels.sweep import tune, tune_schedule  # noqa: E402


def reference(nqm, bs, target, n_pieces=3):
    """tune_schedule's bisection on the coarsened model with scipy's Nelder-Mead (no full-model check)."""
    small = nqm.coarsen()
    probe = SGD(1.0)
    limit = small.lr_limit(probe)
    _, a1, b1 = probe.affine(small.h)
    base = tune(small, "sgd", bs, target)
    hi, lo = base["steps"], 0
    best = np.concatenate([np.full(n_pieces, math.log(base["lr"] / limit)), np.zeros(n_pieces - 1)])
    for_k = (n_pieces, limit, a1[:, 0, 0].copy(), b1[:, 0].copy(), small.c / bs, small.init_sq.copy(), small.h)
    while hi - lo > 1:
        K = (lo + int(hi)) // 2
        z, fun = best, math.inf
        for _ in range(2):
            steps = np.concatenate([np.where(z[:n_pieces] != 0, 0.05 * z[:n_pieces], 0.00025), np.full(n_pieces - 1, 0.5)])
            res = optimize.minimize(lambda v: _localmin.schedule_log_loss(v, K, *for_k), z, method="Nelder-Mead",
                                    options={"initial_simplex": z + np.vstack([np.zeros(z.size), np.diag(steps)]),
                                             "xatol": 1e-4, "fatol": 1e-10, "maxfev": 400 * n_pieces})
            z, fun = res.x, res.fun
            if fun <= math.log(target):
                break
        if fun <= math.log(target):
            hi, best = float(K), z
        else:
            lo = K
    return hi


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    nqm = NQM.power_law(a.dim)
    target = 0.01 * nqm.initial_loss
    bss = 2.0 ** np.arange(0, 21)
    tune_schedule(nqm, 1.0, target)  # compile
    ours, ref, steps_ours, steps_ref = [], [], None, None
    for _ in range(a.repeat):
        t = time.perf_counter()
        steps_ours = [tune_schedule(nqm.coarsen(), b, target, coarse=False)["steps"] for b in bss]
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        steps_ref = [reference(nqm, b, target) for b in bss]
        ref.append(time.perf_counter() - t)
    same = sum(x == y for x, y in zip(steps_ours, steps_ref))
    print(f"d = {a.dim}, 21 batch sizes, coarsened model: compiled {statistics.median(ours):.2f} s, "
          f"scipy Nelder-Mead on the same loss {statistics.median(ref):.2f} s, "
          f"ratio {statistics.median(ref) / statistics.median(ours):.1f}x; same steps at {same} of {len(bss)}")


if __name__ == "__main__":
    main()
