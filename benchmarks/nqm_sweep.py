"""Benchmark: the tuned NQM batch-size sweep, and a ratio against a straightforward numpy implementation.

    python benchmarks/nqm_sweep.py            # d = 10^4, batch sizes 2^0..2^20, four families
    python benchmarks/nqm_sweep.py --quick    # d = 10^3, 5 batch sizes

Prints:
1. the full tuned sweep (SGD, preconditioned SGD, momentum, SGD + EMA), warm (numba compiled): each
   family alone, then the four side by side on two workers (``family_sweeps(n_jobs=2)``), the
   median of ``--repeat`` runs;
2. a cold start in a fresh interpreter (numba loading its on-disk cache, one small sweep);
3. the exact grid search of this library vs a straightforward numpy implementation of the same
   closed forms (numpy.linalg.eig per grid point, bisection over steps as in the public 2019
   notebook, with the off-by-one fixed) on the same grid, at a few batch sizes: time ratio and
   whether the optima agree.  The numpy reference is slow, so the grid is the 100-point lr grid for
   SGD and 100 lrs x 4 betas / decays for the others.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, ".")
from toymodels import NQM  # noqa: E402
from toymodels.sweep import _parallel_backend, batch_size_sweep, family_sweeps, grid_search, make_optimizer  # noqa: E402,E501

FAMILIES = ("sgd", "precond", "momentum", "ema")


# ---------------------------------------------------------------------------------------------
# straightforward numpy reference
# ---------------------------------------------------------------------------------------------
def reference_loss(nqm, optimizer, batch_size, k):
    """Closed-form expected loss at step k by numpy eigen-decomposition of every mode's A."""
    A, b = optimizer.transition(nqm.h, optimizer.lr.lr)
    q = nqm.c / batch_size
    lam, V = np.linalg.eig(A)
    W = np.linalg.inv(V)
    bt = np.einsum("ijk,ik->ij", W, b)
    u = W @ optimizer.init
    mu = lam[:, :, None] * lam[:, None, :]
    if np.any(np.abs(lam) >= 1):
        return math.inf
    sinf = q[:, None, None] * bt[:, :, None] * bt[:, None, :] / (1 - mu)
    D = nqm.init_sq[:, None, None] * u[:, :, None] * u[:, None, :] - sinf
    e = V[:, optimizer.readout, :]
    ee = e[:, :, None] * e[:, None, :]
    return float(np.real(np.sum(0.5 * nqm.h[:, None, None] * ee * (sinf + D * mu**k))))


def reference_steps(nqm, optimizer, batch_size, target, k_max=10**9):
    """Bisection over k assuming a monotone curve (first k with L_k <= target), inf if L_kmax > target."""
    if reference_loss(nqm, optimizer, batch_size, k_max) > target:
        return math.inf
    lo, hi = 0, k_max
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if reference_loss(nqm, optimizer, batch_size, mid) <= target:
            hi = mid
        else:
            lo = mid
    return float(hi)


def reference_grid(nqm, family, batch_size, target, fractions, extras):
    best = (math.inf, None)
    for extra in extras:
        probe = make_optimizer(family, 1.0, extra)
        limit = nqm.lr_limit(probe)
        for f in fractions:
            s = reference_steps(nqm, probe.with_lr(f * limit), batch_size, target)
            if s < best[0]:
                best = (s, (f, extra))
    return best


def _audit(nqm, family, batch_size, ref):
    """Check the reference's claimed crossing with exact powering (dynamics.jump)."""
    from toymodels import dynamics

    k, (f, extra) = int(ref[0]), ref[1]
    probe = make_optimizer(family, 1.0, extra)
    opt = probe.with_lr(f * nqm.lr_limit(probe))
    A, b = opt.transition(nqm.h, opt.lr.lr)
    S = dynamics.jump(A, b, nqm.c / batch_size, nqm._S0(opt), k)
    exact = 0.5 * np.sum(nqm.h * S[:, opt.readout, opt.readout])
    return (f"numpy's eig gives L_{k} = {reference_loss(nqm, opt, batch_size, k):.4g}, exact powering "
            f"{exact:.4g} vs target {0.01 * nqm.initial_loss:.4g}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="d = 10^3 and 5 batch sizes")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow) numpy comparison")
    p.add_argument("--repeat", type=int, default=5, help="timed repeats of the two-worker sweep")
    a = p.parse_args(argv)
    dim = 1000 if a.quick else 10_000
    bss = 2.0 ** (np.arange(0, 17, 4) if a.quick else np.arange(0, 21))
    nqm = NQM.power_law(dim)
    target = 0.01 * nqm.initial_loss
    print(f"NQM d={dim}, h_i = c_i = 1/i, target = 0.01 L0 = {target:.4g}, {bss.size} batch sizes")

    # warm-up (compiles or loads the numba cache), then the timed full sweep
    batch_size_sweep(NQM.power_law(50), "momentum", [1.0, 16.0], 0.05, progress=False)
    batch_size_sweep(NQM.power_law(40000), "sgd", [1.0], 0.05, progress=False)  # the parallel kernels
    total = 0.0
    for fam in FAMILIES:
        t = time.perf_counter()
        ds = batch_size_sweep(nqm, fam, bss, target, progress=False)
        dt = time.perf_counter() - t
        total += dt
        s = ds.steps_to_target.values
        print(f"  tuned sweep {fam:9s} {dt:7.2f} s   steps B=1: {s[0]:.0f}  B=max: {s[-1]:.0f}")
    print(f"  one family after another: {total:.2f} s")
    family_sweeps(nqm, FAMILIES, bss[:2], target, n_jobs=2, progress=False)  # warm the workers' path
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        family_sweeps(nqm, FAMILIES, bss, target, n_jobs=2, progress=False)
        times.append(time.perf_counter() - t)
    print(f"full tuned sweep (4 families x {bss.size} batch sizes), warm, family_sweeps(n_jobs=2, "
          f"{_parallel_backend(nqm.dim)}): median {np.median(times):.2f} s of {a.repeat} (min {min(times):.2f})   "
          f"[target: < 2 s]")

    code = ("import time; t=time.perf_counter(); from toymodels import NQM; from toymodels.sweep import batch_size_sweep; "
            "batch_size_sweep(NQM.power_law(200), 'momentum', [1.0, 64.0], 0.05, progress=False); "
            "print(time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    print(f"cold start (new interpreter, import + small momentum sweep, numba cache): {float(out.stdout):.2f} s   [target: < 15 s]")

    if a.no_reference:
        return
    # grid: ours vs the numpy reference
    fractions = np.geomspace(1e-6, 0.99, 100)
    check_bs = [1.0, 64.0, 4096.0] if not a.quick else [1.0, 256.0]
    print("exact grid search vs straightforward numpy (same grid):")
    ratios = []
    for fam in FAMILIES:
        extras = [None] if fam in ("sgd", "precond") else list(1 - np.geomspace(1e-3, 0.5, 4))
        for bs in check_bs:
            t = time.perf_counter()
            ours = grid_search(nqm, fam, bs, target, lr_fractions=fractions, extras=extras)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            ref = reference_grid(nqm, fam, bs, target, fractions, extras)
            t_ref = time.perf_counter() - t
            ratios.append(t_ref / t_ours)
            same = "same optimum" if ours["steps"] == ref[0] else f"DIFFER (ref {ref[0]:.0f}: {_audit(nqm, fam, bs, ref)})"
            print(f"  {fam:9s} B={bs:<7g} ours {t_ours:6.2f} s  numpy {t_ref:7.2f} s  ratio {t_ref / t_ours:6.1f}x  "
                  f"steps {ours['steps']:.0f}  {same}")
    print(f"median speed-up of the exact grid search over numpy: {np.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
