"""Compile the exact engine's kernels ahead, in a second process, the first time they are needed.

numba compiles a kernel the first time it is called and caches it on disk; a fresh install meets
about half a minute of compiling before its first sweep's results (see ``benchmarks/cold_start.py``).
The compile is single-threaded, and a sweep needs its kernels one after the other, so on a
machine with a second core :func:`start` spawns a process that compiles (and caches) the kernels a
sweep needs *later* (the exact first crossing, the bounds, the schedule search) through a tiny run
of the public API, while this process compiles the ones it needs first.  When this process reaches
a kernel the other has cached, it loads it instead of compiling it.  Nothing depends on the warm-up
finishing: a kernel not cached yet is compiled here as usual.  Every function cached this way is a
serial one or a parallel entry point called from Python (see :mod:`toymodels.dynamics`), so a
cache written by two processes is safe.

With a warm cache :func:`start` does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

__all__ = ["start", "cold"]

# a tiny run of the public API that compiles what a tuned sweep and a schedule sweep need after the
# tuner's own kernels: the exact first crossing and its bounds, the loss curve, the schedule search,
# schedule-free SGD's exact scan
_SCRIPT = """
from toymodels import NQM, SGD, Momentum
from toymodels.sweep import tune_schedule
nqm = NQM.power_law(64)
t = 0.2 * nqm.initial_loss
for opt in (SGD(0.5), Momentum(0.2, 0.8)):
    mf = nqm.modal_form(opt, 8)
    mf.lower_bound(0, 100)
    mf.first_crossing(t, 10**6)
    mf.loss([0, 1, 2])
tune_schedule(nqm, 8.0, t, n_pieces=3, coarse=False)
import numpy as np
from toymodels import _schedfree as sf  # schedule-free's exact scans, serial and threaded (a sweep's last)
a = np.ones(4)
sf._scan(a, a, a, a, a.copy(), a.copy(), a.copy(), 0, 1, 1.0, True)
sf._advance(a, a, a, a, a.copy(), a.copy(), a.copy(), 0, 1, True, np.empty(1))
"""


def cold() -> bool:
    """Whether the first-crossing kernel has no cache entry on disk yet (a fresh install or cache)."""
    from . import dynamics

    try:
        index = dynamics._first_crossing_serial._cache._cache_file._index_path
    except AttributeError:  # another numba's internals: assume warm, do nothing
        return False
    return not os.path.exists(index)


_started = False


def start() -> subprocess.Popen | None:
    """Start the warm-up process (once per process) if the cache is cold and there is a second
    core; returns it (or ``None``).  Its output is discarded; it ends by itself within a minute.
    ``TOYMODELS_NO_WARMUP=1`` turns it off."""
    global _started
    if _started or (os.cpu_count() or 1) < 2 or os.environ.get("TOYMODELS_NO_WARMUP") or not cold():
        return None
    _started = True
    return subprocess.Popen([sys.executable, "-c", _SCRIPT], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, TOYMODELS_NO_WARMUP="1"))
