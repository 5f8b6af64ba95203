"""Monte Carlo simulation of a per-mode linear system with additive Gaussian noise.

The stochastic counterpart of :mod:`toymodels.dynamics`: each run draws theta_0 ~ N(0, init_sq) and
eps_k ~ N(0, q) per mode and step (N(0, q / B_k) under a batch-size schedule; numpy ``Generator`` from an
explicit seed), then iterates ``x' = (A0 + lr_k A1) x + lr_k b1 eps``.  Linear regression draws B_k
actual examples at update k.  The wrapper draws the noise in chunks; the numba kernel only
loops and writes into preallocated arrays.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from numba import njit

from .dynamics._kernels import _varying_transition

__all__ = ["simulate_linear_system", "simulate_varying_system", "simulate_regression", "simulate_finite", "mc_divergence", "mc_stats_dataset"]


@njit(cache=True)
def _record_runs(X, h, r, out_loss, out_gsq, j):
    """Record each run's loss sum_i h_i X[run, i, r]^2 / 2 and |h * X[run, :, 0]|^2 at slot j."""
    n_runs, d, _ = X.shape
    for run in range(n_runs):
        loss = 0.0
        gsq = 0.0
        for i in range(d):
            loss += 0.5 * h[i] * X[run, i, r] ** 2
            g = h[i] * X[run, i, 0]
            gsq += g * g
        out_loss[j, run] = loss
        out_gsq[j, run] = gsq


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
            _record_runs(X, h, r, out_loss, out_gsq, j)
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


def _mc_start(rng, n_runs, d, init_sq, init, record, n):
    """The shared start of the Monte Carlo loops: the runs' initial states X ``(n_runs, d, s)`` drawn
    from ``rng``, the outputs ``(len(record), n_runs)``, the mask of recorded steps ``(n + 1,)`` and
    the chunk of updates whose noise is drawn at once (about 4e6 numbers)."""
    theta0 = rng.standard_normal((n_runs, d)) * np.sqrt(init_sq)
    X = np.ascontiguousarray(theta0[:, :, None] * init[None, None, :])
    mask = np.zeros(n + 1, dtype=np.bool_)
    mask[record] = True
    chunk = max(1, int(4_000_000 // max(1, n_runs * d)))
    return X, np.empty((record.size, n_runs)), np.empty((record.size, n_runs)), mask, chunk


def simulate_linear_system(A0, A1, b1, q, h, readout, init, init_sq, lrs, record, n_runs, rng, *, progress=None,
                           batch=None):
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
        batch: optional ``(n,)`` batch sizes B_k >= 1: then ``q`` is per-example and update k draws
            noise of variance q / B_k (the same numbers as ``q / B`` without it for a constant B).

    Returns:
        ``(loss, grad_sq)``, each ``(len(record), n_runs)``.
    """
    d, s = b1.shape
    n = lrs.size
    X, out_loss, out_gsq, mask, chunk = _mc_start(rng, n_runs, d, init_sq, init, record, n)
    sq = np.sqrt(q)
    j = 0
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        z = rng.standard_normal((k1 - k0, n_runs, d))
        z *= sq if batch is None else np.sqrt(q[None, :] / batch[k0:k1, None])[:, None, :]
        j = _simulate_chunk(A0, A1, b1, lrs[k0:k1], z, h, readout, mask[k0:k1], X, out_loss, out_gsq, j)
        if progress is not None:
            progress(k1 - k0)
    if mask[n]:
        _simulate_chunk(A0, A1, b1, np.zeros(1), np.zeros((1, n_runs, d)), h, readout,
                        np.ones(1, dtype=np.bool_), X, out_loss, out_gsq, j)
    return out_loss, out_gsq


@njit(cache=True)
def _simulate_varying_chunk(P0, P1, Q0, Q1, R0, R1, lrs, cs, z, h, r, record_mask, X, out_loss, out_gsq, rec_start):
    """:func:`_simulate_chunk` for A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1)."""
    n_runs, d, s = X.shape
    y = np.empty(s)
    A = np.empty((s, s))
    bk = np.empty(s)
    j = rec_start
    for k in range(lrs.size):
        if record_mask[k]:
            _record_runs(X, h, r, out_loss, out_gsq, j)
            j += 1
        lr = lrs[k]
        c = cs[k]
        for i in range(d):
            _varying_transition(P0, P1, Q0, Q1, R0, R1, i, lr, c, A, bk)
            for run in range(n_runs):
                e = z[k, run, i]
                for u in range(s):
                    acc = 0.0
                    for v in range(s):
                        acc += A[u, v] * X[run, i, v]
                    y[u] = acc + bk[u] * e
                for u in range(s):
                    X[run, i, u] = y[u]
    return j


def simulate_varying_system(parts, cs, q, h, readout, init, init_sq, lrs, record, n_runs, rng, *, progress=None,
                            batch=None):
    """:func:`simulate_linear_system` for a system that changes at every update:
    ``parts = (P0, P1, Q0, Q1, R0, R1)`` and ``cs`` ``(n,)`` the weights c_k, so that update k applies
    A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1) and b_k = lr_k (R0 + c_k R1) (see
    :meth:`toymodels.optimizers.Optimizer.parts`).  Same draws, arguments and returns otherwise."""
    parts = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in parts)
    d = q.shape[0]
    n = lrs.size
    X, out_loss, out_gsq, mask, chunk = _mc_start(rng, n_runs, d, init_sq, init, record, n)
    sq = np.sqrt(q)
    j = 0
    cs = np.ascontiguousarray(cs, dtype=np.float64)
    for k0 in range(0, n, chunk):
        k1 = min(n, k0 + chunk)
        z = rng.standard_normal((k1 - k0, n_runs, d))
        z *= sq if batch is None else np.sqrt(q[None, :] / batch[k0:k1, None])[:, None, :]
        j = _simulate_varying_chunk(*parts, lrs[k0:k1], cs[k0:k1], z, h, readout, mask[k0:k1], X, out_loss, out_gsq,
                                    j)
        if progress is not None:
            progress(k1 - k0)
    if mask[n]:
        _simulate_varying_chunk(*parts, np.zeros(1), np.zeros(1), np.zeros((1, n_runs, d)), h, readout,
                                np.ones(1, dtype=np.bool_), X, out_loss, out_gsq, j)
    return out_loss, out_gsq


@njit(cache=True)
def _regression_chunk(P0, P1, Q0, Q1, R0, R1, lam, drive, lrs, cs, offs, z, noise, r, record_mask, X, out_loss,
                      out_gsq, out_base, rec_start):
    """Advance X (n_runs, d, s) through len(lrs) updates of an optimizer on sampled data.

    Update k applies A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1) and b_k = lr_k (R0 + c_k R1) (c_k = cs[k];
    a constant optimizer has P1 = Q1 = R1 = 0, so A_k = A0 + lr_k A1 bit for bit) and draws
    B_k = offs[k + 1] - offs[k] examples per run: z holds standard normals laid out
    as (update k, run, example b, feature i) at offs[k] n_runs d + (run B_k + b) d + i (inputs
    x = sqrt(lam) z), noise the label noise at offs[k] n_runs + run B_k + b (for a constant B this
    is the C order of (n, n_runs, B, d) and (n, n_runs, B)).  The gradient at the gradient point
    theta = X[..., 0] is g = mean_b x_b (x_b.theta - n_b); its noise xi = g - lam theta enters as the
    NQM's eps: x' = A_k x + b_k xi.  ``drive`` (d,) is added to xi: weight decay's wd w*
    (the update's gradient g + wd (e + w*), of which A_k holds the wd e part), zeros without it.
    """
    n_runs, d, s = X.shape
    y = np.empty(s)
    g = np.empty(d)
    A = np.empty((d, s, s))
    bk = np.empty((d, s))
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
        for i in range(d):
            _varying_transition(P0, P1, Q0, Q1, R0, R1, i, lr, cs[k], A[i], bk[i])
        B = offs[k + 1] - offs[k]
        for run in range(n_runs):
            for i in range(d):
                g[i] = 0.0
            zb = (offs[k] * n_runs + run * B) * d
            nb = offs[k] * n_runs + run * B
            for bb in range(B):
                res = -noise[nb + bb]
                for i in range(d):
                    res += sq[i] * z[zb + bb * d + i] * X[run, i, 0]
                for i in range(d):
                    g[i] += sq[i] * z[zb + bb * d + i] * res
            for i in range(d):
                xi = g[i] / B - lam[i] * X[run, i, 0] + drive[i]
                for u in range(s):
                    acc = 0.0
                    for v in range(s):
                        acc += A[i, u, v] * X[run, i, v]
                    y[u] = acc + bk[i, u] * xi
                for u in range(s):
                    X[run, i, u] = y[u]
    return j


def _chunks(sizes, budget):
    """Split updates with ``sizes`` (draws per update, int64) into consecutive chunks of at most
    ``budget`` draws (at least one update each): the list of ``(k0, k1)``."""
    n = sizes.size
    cum = np.concatenate([[0], np.cumsum(sizes)])
    out = []
    k0 = 0
    while k0 < n:
        k1 = int(np.searchsorted(cum, cum[k0] + budget, side="right")) - 1
        k1 = min(n, max(k1, k0 + 1))
        out.append((k0, k1))
        k0 = k1
    return out


def simulate_regression(parts, cs, lam, noise_std, batch_size, readout, init, e0, lrs, record, n_runs, rng, *,
                        progress=None, drive=None):
    """Simulate ``n_runs`` runs of an optimizer on online Gaussian linear regression.

    Args:
        parts, cs: the optimizer's system on h = lam, as :func:`simulate_varying_system`:
            ``(P0, P1, Q0, Q1, R0, R1)`` (:meth:`toymodels.optimizers.Optimizer.parts`; a constant
            optimizer has P1 = Q1 = R1 = 0) and the ``(n,)`` weights c_k (zeros for a constant one).
            The gradient is taken at state entry 0 (e.g. schedule-free SGD's y).
        lam: ``(d,)`` input covariance eigenvalues.
        noise_std: label noise standard deviation.
        batch_size: B, examples per step (an int), or ``(n,)`` ints B_k: update k draws B_k examples.
        readout: state entry the loss is read at.
        init: ``(s,)`` state at step 0 in units of e_0.
        e0: ``(d,)`` the error w_0 - w* (deterministic).
        lrs, record, n_runs, rng, progress: as in :func:`simulate_linear_system`.
        drive: optional ``(d,)`` constant added to every update's gradient (coupled weight decay of
            theta = e + w*: ``parts`` hold wd e, ``drive`` = wd w*).

    Returns:
        ``(loss, grad_sq, base_loss)``, each ``(len(record), n_runs)``: the excess risk at the
        readout, |Sigma e|^2 and the excess risk at the gradient point (state entry 0).
    """
    parts = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in parts)
    cs = np.ascontiguousarray(cs, dtype=np.float64)
    d, s = parts[4].shape
    n = lrs.size
    drive = np.zeros(d) if drive is None else np.ascontiguousarray(drive, dtype=np.float64)
    X = np.ascontiguousarray(np.broadcast_to(e0[None, :, None] * init[None, None, :], (n_runs, d, s)).copy())
    out = [np.empty((record.size, n_runs)) for _ in range(3)]
    mask = np.zeros(n + 1, dtype=np.bool_)
    mask[record] = True
    sizes = np.broadcast_to(np.asarray(batch_size, dtype=np.int64), (n,))
    j = 0
    # chunks of at most 4e6 draws (a constant B: 4e6 // (n_runs d B) updates each, as it always was)
    for k0, k1 in _chunks(sizes * (n_runs * d), 4_000_000):
        offs = np.concatenate([[0], np.cumsum(sizes[k0:k1])])
        z = rng.standard_normal(int(offs[-1]) * n_runs * d)
        noise = rng.standard_normal(int(offs[-1]) * n_runs) * noise_std
        j = _regression_chunk(*parts, lam, drive, lrs[k0:k1], cs[k0:k1], offs, z, noise, readout, mask[k0:k1], X,
                              *out, j)
        if progress is not None:
            progress(k1 - k0)
    if mask[n]:
        _regression_chunk(*parts, lam, drive, np.zeros(1), np.zeros(1), np.array([0, 1], dtype=np.int64),
                          np.zeros(n_runs * d), np.zeros(n_runs), readout, np.ones(1, dtype=np.bool_), X, *out, j)
    return tuple(out)


@njit(cache=True)
def _finite_chunk(X, y, row_sq, W, lrs, idx, kaczmarz, record_mask, w_ls, sigma, out_loss, out_sq, rec_start, wd):
    """Advance the runs' weights W (n_runs, d) through len(lrs) updates on rows idx (n, n_runs, B).

    SGD: w <- w - lr (1 / B sum_b x_b (x_b.w - y_b) + wd w).  Kaczmarz (B = 1): w <- w + (y_r - x_r.w) x_r / |x_r|^2.
    Records the excess loss (w - w_ls)^T sigma (w - w_ls) / 2 and |w - w_ls|^2 before update k if
    record_mask[k].
    """
    n_runs, d = W.shape
    B = idx.shape[2]
    e = np.empty(d)
    g = np.empty(d)
    j = rec_start
    for k in range(lrs.size):
        if record_mask[k]:
            for run in range(n_runs):
                sq = 0.0
                for i in range(d):
                    e[i] = W[run, i] - w_ls[i]
                    sq += e[i] * e[i]
                loss = 0.0
                for i in range(d):
                    acc = 0.0
                    for l in range(d):
                        acc += sigma[i, l] * e[l]
                    loss += 0.5 * e[i] * acc
                out_loss[j, run] = loss
                out_sq[j, run] = sq
            j += 1
        for run in range(n_runs):
            if kaczmarz:
                r = idx[k, run, 0]
                res = y[r]
                for i in range(d):
                    res -= X[r, i] * W[run, i]
                step = res / row_sq[r]
                for i in range(d):
                    W[run, i] += step * X[r, i]
                continue
            for i in range(d):
                g[i] = 0.0
            for b in range(B):
                r = idx[k, run, b]
                res = -y[r]
                for i in range(d):
                    res += X[r, i] * W[run, i]
                for i in range(d):
                    g[i] += X[r, i] * res
            for i in range(d):
                W[run, i] -= lrs[k] / B * g[i] + lrs[k] * wd * W[run, i]
    return j


def simulate_finite(X, y, w0, w_ls, sigma, lrs, record, n_runs, rng, *, batch_size=1, replacement=True,
                    probs=None, kaczmarz=False, weight_decay=0.0):
    """Monte Carlo SGD (or randomized Kaczmarz) on a fixed data set; returns ``(loss, sq_error)``,
    each ``(len(record), n_runs)``.  SGD's update gradient gets ``weight_decay`` x w added (coupled
    L2 decay).

    Rows are drawn by the ``numpy.random.Generator`` ``rng``: uniformly with replacement, as epochs of
    random permutations (``replacement=False``: consecutive batches of the stream of permutations), or
    with probabilities ``probs`` (Kaczmarz).
    """
    n, d = X.shape
    n_steps = lrs.size
    W = np.ascontiguousarray(np.tile(w0, (n_runs, 1)))
    out_loss = np.empty((record.size, n_runs))
    out_sq = np.empty((record.size, n_runs))
    mask = np.zeros(n_steps + 1, dtype=np.bool_)
    mask[record] = True
    row_sq = np.sum(X**2, axis=1)
    B = 1 if kaczmarz else int(batch_size)
    chunk = max(1, int(2_000_000 // max(1, n_runs * B)))
    stream = np.empty((n_runs, 0), dtype=np.int64)
    j = 0
    for k0 in range(0, n_steps, chunk):
        k1 = min(n_steps, k0 + chunk)
        m = k1 - k0
        if probs is not None:
            idx = rng.choice(n, size=(m, n_runs, 1), p=probs)
        elif replacement:
            idx = rng.integers(0, n, size=(m, n_runs, B))
        else:
            while stream.shape[1] < m * B:
                stream = np.concatenate([stream, rng.permuted(np.tile(np.arange(n), (n_runs, 1)), axis=1)], axis=1)
            idx = stream[:, : m * B].reshape(n_runs, m, B).transpose(1, 0, 2)
            stream = stream[:, m * B:]
        j = _finite_chunk(X, y, row_sq, W, lrs[k0:k1], np.ascontiguousarray(idx), kaczmarz, mask[k0:k1], w_ls,
                          sigma, out_loss, out_sq, j, float(weight_decay))
    if mask[n_steps]:
        _finite_chunk(X, y, row_sq, W, np.zeros(1), np.zeros((1, n_runs, B), dtype=np.int64), kaczmarz,
                      np.ones(1, dtype=np.bool_), w_ls, sigma, out_loss, out_sq, j, 0.0)
    return out_loss, out_sq


def mc_divergence(ks, *arrays):
    """Overflowed Monte Carlo runs: every ``(n_records, n_runs)`` array is set to ``inf`` from the
    first recorded step where some run is non-finite on.  Returns ``(first, reason)``: the index of
    that step (None if every run stayed finite) and why."""
    bad = np.zeros(ks.size, dtype=bool)
    for a in arrays:
        bad |= ~np.all(np.isfinite(a), axis=1)
    if not bad.any():
        return None, ""
    first = int(np.argmax(bad))
    for a in arrays:
        a[first:] = np.inf
    return first, f"diverges: a run overflowed by step {int(ks[first])} (learning rate above the stability limit)"


def mc_stats_dataset(ks, loss, stats, n_runs, first):
    """The Monte Carlo dataset: mean ``loss`` and ``loss_sem`` over runs and the statistics; every
    value ``inf`` from index ``first`` on (a divergence, see :func:`mc_divergence`), never NaN."""
    with np.errstate(invalid="ignore", over="ignore"):
        ds = xr.Dataset(
            {"loss": ("step", loss.mean(axis=1)), "loss_sem": ("step", loss.std(axis=1, ddof=1) / math.sqrt(n_runs)),
             **{k: ("step", np.array(v, np.float64)) for k, v in stats.items()}},
            coords={"step": ks},
        )
    for v in ds.data_vars.values():
        if first is not None:
            v.values[first:] = np.inf
        v.values[np.isnan(v.values)] = np.inf
    return ds
