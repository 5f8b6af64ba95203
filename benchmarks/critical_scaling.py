"""The compute-optimal sweep of issue 16: 8 model sizes x 20 batch sizes of the power-law random
features (Paquette, Paquette, Xiao and Pennington 2024), steps to a target tuned over the learning
rate at every point, with B_crit fitted per size (:func:`toymodels.critical.critical_batch_scaling`).

Target: under 30 s on 2 cores.  Reports the wall time of the whole sweep (model construction, i.e.
one SVD per size, included), with the sizes in two threads and in one, and the machine's load.

    python benchmarks/critical_scaling.py
"""

from __future__ import annotations

import os
import time

import numpy as np

from toymodels import PowerLawRF
from toymodels.critical import critical_batch_scaling

SIZES = np.geomspace(32, 1024, 8).round()
BATCH_SIZES = np.geomspace(1, 4096, 20)
V, TARGET = 2048, 5e-3


def factory(d):
    """The PLRF of the sweep at size d (alpha = 1, beta = 0.7, v = 2048)."""
    return PowerLawRF(1.0, 0.7, V, d, seed=0)


def main():
    """Time the sweep (after one warm-up call that compiles the kernel) and print the result."""
    critical_batch_scaling(factory, [32], [TARGET], BATCH_SIZES[:2])  # compile
    for n_jobs in (2, 1):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        ds = critical_batch_scaling(factory, SIZES, [TARGET], BATCH_SIZES, n_jobs=n_jobs)
        dt = time.perf_counter() - t0
        print(f"8 sizes x 20 batch sizes, tuned, n_jobs={n_jobs}: {dt:.1f} s (target 30 s; load average "
              f"{load:.1f} on {os.cpu_count()} cores at the start)")
    print("B_crit per size:", np.round(ds.b_crit.values[:, 0], 1))
    print("S_min per size: ", np.round(ds.s_min.values[:, 0], 1))


if __name__ == "__main__":
    main()
