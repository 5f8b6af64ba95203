"""The exact first crossing: the first step k with L_k <= target, by a depth-first branch and bound
over steps that discards intervals whose lower bound exceeds the target and evaluates every step
of the surviving short intervals, so a non-monotone curve's first crossing is never skipped.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .bound import _bound_sum
from .closed_form import _values_range_blocks


_WORK_LIMIT = 2e8  # branch-and-bound budget in (nodes x modes) before first_crossing gives up


@njit(inline="always")
def _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                         max_nodes, k_split, n_blocks):
    """Depth-first branch and bound over [k_lo, k_hi]; returns the first k with L_k <= target or -1
    (-2: more than ``max_nodes`` nodes).  The root is split at ``k_split`` if it lies inside
    (k_lo, k_hi], else at its midpoint.  Inlined into a serial and a parallel entry point, whose
    ``prange`` loops over modes (bounds, leaf values in ``n_blocks`` blocks) run on one thread or all."""
    stack_a = np.empty(256, dtype=np.int64)
    stack_b = np.empty(256, dtype=np.int64)
    if k_lo < k_split <= k_hi:
        stack_a[0], stack_b[0] = k_split, k_hi
        stack_a[1], stack_b[1] = k_lo, k_split - 1
        top = 2
    else:
        stack_a[0], stack_b[0] = k_lo, k_hi
        top = 1
    vals = np.empty(leaf)
    nodes = 0
    while top > 0:
        nodes += 1
        if nodes > max_nodes:
            return -2
        top -= 1
        a = stack_a[top]
        bb = stack_b[top]
        lb = _bound_sum(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bb)
        if lb > target:
            continue
        if bb - a + 1 <= leaf:
            n = bb - a + 1
            _values_range_blocks(lam, C, linf, flag, gsq, A, b, q, h, r, S0, a, vals[:n], n_blocks)
            for m in range(n):
                if vals[m] <= target:
                    return a + m
            continue
        mid = a + (bb - a) // 2
        stack_a[top] = mid + 1
        stack_b[top] = bb
        stack_a[top + 1] = a
        stack_b[top + 1] = mid
        top += 2
    return -1


# Why two entry points and no runtime ``parallel`` switch: a cached function that *calls* a
# ``parallel=True`` function is unsafe in numba (0.58-0.62 at least).  When the caller is compiled in a
# process that loaded the callee from the cache, the callee's library comes back without its
# ``_reload_init`` hooks (they live in the compile result, not the library), so the caller's cache
# entry records none; a later process loads the caller, never starts the threading layer, and the
# first parallel launch segfaults (numba issues #8578 and #4807).  An interrupted first compile
# (callees cached, caller not) leaves exactly that state.  Here every ``parallel=True`` function
# is an entry point called from Python, with its ``prange`` loops inlined into it, so its own cache
# entry carries the hook; serial entry points reach no parallel code, and compile none of it.
@njit(cache=True, nogil=True)
def _first_crossing_serial(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                           max_nodes, k_split):
    return _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi,
                                leaf, max_nodes, k_split, 1)


@njit(cache=True, nogil=True, parallel=True)
def _first_crossing_parallel(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                             max_nodes, k_split):
    return _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi,
                                leaf, max_nodes, k_split, 16)
