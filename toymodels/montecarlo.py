"""Monte Carlo simulation of a per-mode linear system with additive Gaussian noise.

The stochastic counterpart of :mod:`toymodels.dynamics`: each run draws theta_0 ~ N(0, init_sq) and
eps_k ~ N(0, q) per mode and step (numpy ``Generator`` from an explicit seed), then iterates
``x' = (A0 + lr_k A1) x + lr_k b1 eps``.  The wrapper draws the noise in chunks; the numba kernel only
loops and writes into preallocated arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["simulate_linear_system"]


@njit(cache=True)
def _simulate_chunk(A0, A1, b1, lrs, z, h, r, record_mask, X, out_loss, out_gsq, rec_start):
    """Advance X (n_runs, d, s) through len(lrs) updates with noise z (n, n_runs, d).

    record_mask[k] says whether to record *before* update k (i.e. at step k0 + k).
    """
    n_runs, d, s = X.shape
    y = np.empty(s)
    j = rec_start
    for k in range(lrs.size):
        if record_mask[k]:
            for run in range(n_runs):
                loss = 0.0
                gsq = 0.0
                for i in range(d):
                    loss += 0.5 * h[i] * X[run, i, r] ** 2
                    g = h[i] * X[run, i, 0]
                    gsq += g * g
                out_loss[j, run] = loss
                out_gsq[j, run] = gsq
            j += 1
        lr = lrs[k]
        for run in range(n_runs):
            for i in range(d):
                e = lr * z[k, run, i]
                for u in range(s):
                    acc = 0.0
                    for v in range(s):
                        acc += (A0[i, u, v] + lr * A1[i, u, v]) * X[run, i, v]
                    y[u] = acc + b1[i, u] * e
                for u in range(s):
                    X[run, i, u] = y[u]
    return j


def simulate_linear_system(A0, A1, b1, q, h, readout, init, init_sq, lrs, record, n_runs, rng, *, progress=None):
    """Simulate ``n_runs`` independent runs; return per-run loss and |H theta|^2 at ``record``.

    Args:
        A0, A1, b1: the optimizer's affine system, ``(d,s,s)``, ``(d,s,s)``, ``(d,s)``.
        q: per-mode noise variance per step ``(d,)``.
        h: curvature ``(d,)``.
        readout: state entry the loss is read at.
        init: ``(s,)`` state at step 0 in units of theta_0.
        init_sq: ``(d,)`` variance of theta_0.
        lrs: ``(n,)`` learning rates of updates 0..n-1.
        record: sorted int64 steps in [0, n].
        n_runs: number of independent runs.
        rng: ``numpy.random.Generator``.
        progress: optional callable(n_steps_done) for a progress bar.

    Returns:
        ``(loss, grad_sq)``, each ``(len(record), n_runs)``.
    """
    d, s = b1.shape
    n = lrs.size
    theta0 = rng.standard_normal((n_runs, d)) * np.sqrt(init_sq)
    X = np.ascontiguousarray(theta0[:, :, None] * init[None, None, :])
    out_loss = np.empty((record.size, n_runs))
    out_gsq = np.empty((record.size, n_runs))
    mask = np.zeros(n + 1, dtype=np.bool_)
    mask[record] = True
    sq = np.sqrt(q)
    chunk = max(1, int(4_000_000 // max(1, n_runs * d)))
    j = 0
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        z = rng.standard_normal((k1 - k0, n_runs, d)) * sq
        j = _simulate_chunk(A0, A1, b1, lrs[k0:k1], z, h, readout, mask[k0:k1], X, out_loss, out_gsq, j)
        if progress is not None:
            progress(k1 - k0)
    if mask[n]:
        _simulate_chunk(A0, A1, b1, np.zeros(1), np.zeros((1, n_runs, d)), h, readout,
                        np.ones(1, dtype=np.bool_), X, out_loss, out_gsq, j)
    return out_loss, out_gsq
