"""Numba's threading layer: the mode count above which the parallel entry points run, and a way to
start the layer before a caller needs its name.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


# Below this many modes the serial kernels run: thread start-up eats most of the gain (measured on
# 2 cores: the parallel first crossing is 1.75x faster at 2e4 modes on a quiet machine, no faster
# under load), and the parallel entry points cost about 15 s of extra compile on first use.
_PARALLEL_MIN_MODES = 32768


@njit(cache=True, nogil=True, parallel=True)
def _start_threads(x):
    """A trivial parallel kernel: running it starts numba's threading layer."""
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


def _ensure_threading_layer() -> str:
    """The name of numba's threading layer in this process, running a tiny parallel kernel first
    if none has run yet (the layer is chosen at the first parallel launch)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        _start_threads(np.ones(2))
        return numba.threading_layer()
