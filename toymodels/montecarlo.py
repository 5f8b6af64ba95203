"""Monte Carlo simulation of a per-mode linear system with additive Gaussian noise.

The stochastic counterpart of :mod:`toymodels.dynamics`: each run draws theta_0 ~ N(0, init_sq) and
eps_k ~ N(0, q) per mode and step (numpy ``Generator`` from an explicit seed), then iterates
``x' = (A0 + lr_k A1) x + lr_k b1 eps``.  The wrapper draws the noise in chunks; the numba kernel only
loops and writes into preallocated arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["simulate_linear_system", "simulate_regression"]


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


@njit(cache=True)
def _regression_chunk(A0, A1, b1, lam, lrs, z, noise, r, record_mask, X, out_loss, out_gsq, out_base, rec_start):
    """Advance X (n_runs, d, s) through len(lrs) SGD-family updates on sampled data.

    z: (n, n_runs, B, d) standard normals (inputs x = sqrt(lam) z); noise: (n, n_runs, B) label noise.
    The gradient at the base iterate theta = X[..., 0] is g = mean_b x_b (x_b.theta - n_b); its
    noise xi = g - lam theta enters as the NQM's eps: x' = (A0 + lr A1) x + lr b1 xi.
    """
    n_runs, d, s = X.shape
    B = z.shape[2]
    y = np.empty(s)
    g = np.empty(d)
    sq = np.sqrt(lam)
    j = rec_start
    for k in range(lrs.size):
        if record_mask[k]:
            for run in range(n_runs):
                loss = 0.0
                gsq = 0.0
                base = 0.0
                for i in range(d):
                    loss += 0.5 * lam[i] * X[run, i, r] ** 2
                    base += 0.5 * lam[i] * X[run, i, 0] ** 2
                    gsq += (lam[i] * X[run, i, 0]) ** 2
                out_loss[j, run] = loss
                out_gsq[j, run] = gsq
                out_base[j, run] = base
            j += 1
        lr = lrs[k]
        for run in range(n_runs):
            for i in range(d):
                g[i] = 0.0
            for bb in range(B):
                res = -noise[k, run, bb]
                for i in range(d):
                    res += sq[i] * z[k, run, bb, i] * X[run, i, 0]
                for i in range(d):
                    g[i] += sq[i] * z[k, run, bb, i] * res
            for i in range(d):
                xi = g[i] / B - lam[i] * X[run, i, 0]
                for u in range(s):
                    acc = 0.0
                    for v in range(s):
                        acc += (A0[i, u, v] + lr * A1[i, u, v]) * X[run, i, v]
                    y[u] = acc + lr * b1[i, u] * xi
                for u in range(s):
                    X[run, i, u] = y[u]
    return j


def simulate_regression(A0, A1, b1, lam, noise_std, batch_size, readout, init, e0, lrs, record, n_runs, rng, *,
                        progress=None):
    """Simulate ``n_runs`` runs of an SGD-family optimizer on online Gaussian linear regression.

    Args:
        A0, A1, b1: the optimizer's affine system on h = lam (as for the NQM).
        lam: ``(d,)`` input covariance eigenvalues.
        noise_std: label noise standard deviation.
        batch_size: B, examples per step.
        readout: state entry the loss is read at.
        init: ``(s,)`` state at step 0 in units of e_0.
        e0: ``(d,)`` the error w_0 - w* (deterministic).
        lrs, record, n_runs, rng, progress: as in :func:`simulate_linear_system`.

    Returns:
        ``(loss, grad_sq, base_loss)``, each ``(len(record), n_runs)``: the excess risk at the
        readout, |Sigma e|^2 and the excess risk at the base iterate.
    """
    d, s = b1.shape
    n = lrs.size
    X = np.ascontiguousarray(np.broadcast_to(e0[None, :, None] * init[None, None, :], (n_runs, d, s)).copy())
    out = [np.empty((record.size, n_runs)) for _ in range(3)]
    mask = np.zeros(n + 1, dtype=np.bool_)
    mask[record] = True
    chunk = max(1, int(4_000_000 // max(1, n_runs * d * batch_size)))
    j = 0
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        z = rng.standard_normal((k1 - k0, n_runs, batch_size, d))
        noise = rng.standard_normal((k1 - k0, n_runs, batch_size)) * noise_std
        j = _regression_chunk(A0, A1, b1, lam, lrs[k0:k1], z, noise, readout, mask[k0:k1], X, *out, j)
        if progress is not None:
            progress(k1 - k0)
    if mask[n]:
        _regression_chunk(A0, A1, b1, lam, np.zeros(1), np.zeros((1, n_runs, batch_size, d)),
                          np.zeros((1, n_runs, batch_size)), readout, np.ones(1, dtype=np.bool_), X, *out, j)
    return tuple(out)
