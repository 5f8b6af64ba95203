"""Compiled local minimisation of log L_k over a family's hyper-parameters (used by :mod:`.sweep`).

The tuner minimises log L_k(x, y) thousands of times per batch size, where x = log(lr / limit(e)),
y = log(1 - e) and e is beta (momentum, Nesterov), the averaging decay (EMA) or the coordinate of
accelerated SGD's momentum form (affine on either side of a kink, hence two sets of parts).  Calling
scipy's Nelder-Mead with a Python objective costs more in interpreter overhead than in evaluating the loss of a
coarsened model, so the 2-D search lives here, next to the loss kernel it calls.

The loss is :func:`toymodels.dynamics.loss_at_parts` for systems A = P0 + e P1 + lr (Q0 + e Q1),
b = lr (R0 + e R1); ``parts = (P0, P1, Q0, Q1, R0, R1)`` with shapes ``(d, s, s)`` and ``(d, s)``
(``parts_hi`` for e above ``kink``; ``kink = inf`` and ``parts_hi = parts`` for an affine family).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .dynamics import _loss_parts_serial


@njit(cache=True, nogil=True)
def family_log_loss(x, y, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min):
    """log L_k at lr = exp(x) (l0 + e l1) / (1 + e l2), e = 1 - exp(y) (the family's stability limit
    times exp(x): affine in e for most families, l2 = 0), with ``parts`` and ``lims`` = (l0, l1, l2)
    for e <= ``kink`` and ``parts_hi``, ``lims_hi`` above it (a family affine in e on either side);
    ``inf`` outside the search box (x in [x_min - 1, 0], y in [y_min - 1, 0]) or where the system is
    unstable."""
    if x > 0.0 or x < x_min - 1.0 or y > 0.0 or y < y_min - 1.0:
        return np.inf
    x = min(x, -1e-9)
    e = 1.0 - math.exp(y)
    if e > kink:
        parts, lims = parts_hi, lims_hi
    lr = math.exp(x) * (lims[0] + e * lims[1]) / (1.0 + e * lims[2])
    P0, P1, Q0, Q1, R0, R1 = parts
    # serial only: a cached function must not call a parallel one (see toymodels.dynamics), and
    # the tuner works on coarsened models of a few hundred modes (sweep.tune's ``coarse``)
    v = _loss_parts_serial(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k)
    if v > 0.0 and v < np.inf:
        return math.log(v)
    return np.inf


@njit(cache=True, nogil=True)
def nelder_mead(x0, y0, step, xatol, fatol, maxfev, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min):
    """Nelder-Mead on :func:`family_log_loss` from the simplex (x0, y0) + {0, step e_x, step e_y}.

    Standard coefficients (reflect 1, expand 2, contract 1/2, shrink 1/2) and scipy's stopping rule:
    every vertex within ``xatol`` of the best in each coordinate and every value within ``fatol``
    of the best, or ``maxfev`` evaluations.  Returns ``(x, y, value, n_evals)``.
    """
    sim = np.empty((3, 2))
    f = np.empty(3)
    sim[0, 0], sim[0, 1] = x0, y0
    sim[1, 0], sim[1, 1] = x0 + step, y0
    sim[2, 0], sim[2, 1] = x0, y0 + step
    for j in range(3):
        f[j] = family_log_loss(sim[j, 0], sim[j, 1], parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
    nfev = 3
    while nfev < maxfev:
        # order the vertices: 0 best, 2 worst
        for a in range(2):
            for b in range(2 - a):
                if f[b + 1] < f[b]:
                    f[b], f[b + 1] = f[b + 1], f[b]
                    for c in range(2):
                        sim[b, c], sim[b + 1, c] = sim[b + 1, c], sim[b, c]
        spread_x = max(abs(sim[1, 0] - sim[0, 0]), abs(sim[2, 0] - sim[0, 0]),
                       abs(sim[1, 1] - sim[0, 1]), abs(sim[2, 1] - sim[0, 1]))
        spread_f = max(abs(f[1] - f[0]), abs(f[2] - f[0]))
        if (spread_x <= xatol and spread_f <= fatol) or f[0] == np.inf:
            break  # converged, or started where every vertex is infeasible (nothing to follow)
        cx = 0.5 * (sim[0, 0] + sim[1, 0])
        cy = 0.5 * (sim[0, 1] + sim[1, 1])
        rx, ry = 2.0 * cx - sim[2, 0], 2.0 * cy - sim[2, 1]
        fr = family_log_loss(rx, ry, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
        nfev += 1
        if fr < f[0]:
            ex, ey = 3.0 * cx - 2.0 * sim[2, 0], 3.0 * cy - 2.0 * sim[2, 1]
            fe = family_log_loss(ex, ey, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
            nfev += 1
            if fe < fr:
                sim[2, 0], sim[2, 1], f[2] = ex, ey, fe
            else:
                sim[2, 0], sim[2, 1], f[2] = rx, ry, fr
            continue
        if fr < f[1]:
            sim[2, 0], sim[2, 1], f[2] = rx, ry, fr
            continue
        if fr < f[2]:  # outside contraction
            zx, zy = 1.5 * cx - 0.5 * sim[2, 0], 1.5 * cy - 0.5 * sim[2, 1]
            fz = family_log_loss(zx, zy, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
            nfev += 1
            if fz <= fr:
                sim[2, 0], sim[2, 1], f[2] = zx, zy, fz
                continue
        else:  # inside contraction
            zx, zy = 0.5 * cx + 0.5 * sim[2, 0], 0.5 * cy + 0.5 * sim[2, 1]
            fz = family_log_loss(zx, zy, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
            nfev += 1
            if fz < f[2]:
                sim[2, 0], sim[2, 1], f[2] = zx, zy, fz
                continue
        for j in range(1, 3):  # shrink towards the best vertex
            sim[j, 0] = sim[0, 0] + 0.5 * (sim[j, 0] - sim[0, 0])
            sim[j, 1] = sim[0, 1] + 0.5 * (sim[j, 1] - sim[0, 1])
            f[j] = family_log_loss(sim[j, 0], sim[j, 1], parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, y_min)
        nfev += 2
    j = 0
    for i in range(1, 3):
        if f[i] < f[j]:
            j = i
    return sim[j, 0], sim[j, 1], f[j], nfev


@njit(cache=True, nogil=True)
def brent(a, b, xatol, maxfev, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min):
    """Brent's bounded minimisation of x -> log L_k(x, y = 0) on [a, b] (golden section with
    parabolic steps, tolerance ``xatol``).  Returns ``(x, value, n_evals)``."""
    golden = 0.3819660112501051
    v = w = xm = a + golden * (b - a)
    fv = fw = fx = family_log_loss(xm, 0.0, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, 0.0)
    nfev = 1
    d = e = 0.0
    while nfev < maxfev:
        mid = 0.5 * (a + b)
        tol1 = 1.4901161193847656e-08 * abs(xm) + xatol / 3.0
        tol2 = 2.0 * tol1
        if abs(xm - mid) <= tol2 - 0.5 * (b - a):
            break
        parabolic = False
        if abs(e) > tol1 and fx < np.inf and fv < np.inf and fw < np.inf:
            rr = (xm - w) * (fx - fv)
            qq = (xm - v) * (fx - fw)
            pp = (xm - v) * qq - (xm - w) * rr
            qq = 2.0 * (qq - rr)
            if qq > 0.0:
                pp = -pp
            qq = abs(qq)
            if abs(pp) < abs(0.5 * qq * e) and pp > qq * (a - xm) and pp < qq * (b - xm):
                e = d
                d = pp / qq
                u = xm + d
                if u - a < tol2 or b - u < tol2:
                    d = tol1 if mid >= xm else -tol1
                parabolic = True
        if not parabolic:
            e = (a - xm) if xm >= mid else (b - xm)
            d = golden * e
        u = xm + (d if abs(d) >= tol1 else (tol1 if d > 0 else -tol1))
        fu = family_log_loss(u, 0.0, parts, lims, parts_hi, lims_hi, kink, q, h, r, S0, k, x_min, 0.0)
        nfev += 1
        if fu <= fx:
            if u >= xm:
                a = xm
            else:
                b = xm
            v, fv, w, fw, xm, fx = w, fw, xm, fx, u, fu
        else:
            if u < xm:
                a = u
            else:
                b = u
            if fu <= fw or w == xm:
                v, fv, w, fw = w, fw, u, fu
            elif fu <= fv or v == xm or v == w:
                v, fv = u, fu
    return xm, fx, nfev


@njit(cache=True, nogil=True)
def schedule_log_loss(z, K, n_pieces, limit, a1, b1, q, S0, h):
    """log L_K of SGD (1-state modes, A = 1 + lr a1, b = lr b1) under the piecewise-constant schedule
    ``z`` = (log(lr_p / limit) for the n_pieces pieces, log weights of pieces 2..n_pieces relative to
    the first); each piece of n steps in closed form, S' = A^2n S + q b^2 (1 - A^2n) / (1 - A^2).
    ``inf`` outside the search box: a log learning rate above 0 or a log weight beyond +-30."""
    for p in range(n_pieces):
        if z[p] > 0.0:
            return np.inf
    for p in range(n_pieces, z.size):
        if abs(z[p]) > 30.0:  # a piece weighted e^30 times another: outside the box
            return np.inf
    w = np.empty(n_pieces)
    w[0] = 1.0
    for p in range(1, n_pieces):
        w[p] = math.exp(z[n_pieces + p - 1])
    total = w.sum()
    S = S0.copy()
    start, cum = 0, 0.0
    for p in range(n_pieces):
        cum += w[p] / total
        end = K if p == n_pieces - 1 else int(np.rint(cum * K))
        n = end - start
        start = end
        if n <= 0:
            continue
        lr = limit * math.exp(min(z[p], -1e-9))
        for i in range(S.size):
            A2 = (1.0 + lr * a1[i]) ** 2
            An = A2 ** n
            bb = q[i] * (lr * b1[i]) ** 2
            S[i] = An * S[i] + (bb * (1.0 - An) / (1.0 - A2) if abs(1.0 - A2) > 1e-15 else n * bb)
    v = 0.5 * np.sum(h * S)
    if v > 0.0 and v < np.inf:
        return math.log(v)
    return np.inf  # overflow or NaN: never taken for a point that reaches the target


@njit(cache=True, nogil=True)
def _set_row(m, j, x):
    """m[j] = x by elements (a row assignment compiles numba's shape-mismatch error path: seconds)."""
    for c in range(x.shape[0]):
        m[j, c] = x[c]


@njit(cache=True, nogil=True)
def schedule_nelder_mead(z0, steps, xatol, fatol, maxfev, K, n_pieces, limit, a1, b1, q, S0, h):
    """Nelder-Mead on :func:`schedule_log_loss` from the simplex z0 + {0, steps[k] e_k}, step for step
    scipy's otherwise (non-adaptive coefficients, stable ordering, the same stopping rule).  Returns
    ``(z, value, n_evals)``."""
    N = z0.size
    sim = np.empty((N + 1, N))
    f = np.empty(N + 1)
    _set_row(sim, 0, z0)
    for k in range(N):
        _set_row(sim, k + 1, z0)
        sim[k + 1, k] = z0[k] + steps[k]
    for j in range(N + 1):
        f[j] = schedule_log_loss(sim[j], K, n_pieces, limit, a1, b1, q, S0, h)
    nfev = N + 1
    xbar = np.empty(N)
    xr, xe, xc, xcc = np.empty(N), np.empty(N), np.empty(N), np.empty(N)
    while True:
        for a in range(1, N + 1):  # stable insertion sort by value
            j = a
            while j > 0 and f[j] < f[j - 1]:
                f[j], f[j - 1] = f[j - 1], f[j]
                for c in range(N):
                    sim[j, c], sim[j - 1, c] = sim[j - 1, c], sim[j, c]
                j -= 1
        if nfev >= maxfev:
            break
        done = True
        for j in range(1, N + 1):
            if not abs(f[j] - f[0]) <= fatol:
                done = False
            for c in range(N):
                if not abs(sim[j, c] - sim[0, c]) <= xatol:
                    done = False
        if done:
            break
        for c in range(N):
            acc = 0.0
            for j in range(N):
                acc += sim[j, c]
            xbar[c] = acc / N
            xr[c] = 2.0 * xbar[c] - sim[N, c]
        fr = schedule_log_loss(xr, K, n_pieces, limit, a1, b1, q, S0, h)
        nfev += 1
        shrink = False
        if fr < f[0]:
            for c in range(N):
                xe[c] = 3.0 * xbar[c] - 2.0 * sim[N, c]
            fe = schedule_log_loss(xe, K, n_pieces, limit, a1, b1, q, S0, h)
            nfev += 1
            if fe < fr:
                _set_row(sim, N, xe)
                f[N] = fe
            else:
                _set_row(sim, N, xr)
                f[N] = fr
        elif fr < f[N - 1]:
            _set_row(sim, N, xr)
            f[N] = fr
        elif fr < f[N]:  # outside contraction
            for c in range(N):
                xc[c] = 1.5 * xbar[c] - 0.5 * sim[N, c]
            fc = schedule_log_loss(xc, K, n_pieces, limit, a1, b1, q, S0, h)
            nfev += 1
            if fc <= fr:
                _set_row(sim, N, xc)
                f[N] = fc
            else:
                shrink = True
        else:  # inside contraction
            for c in range(N):
                xcc[c] = 0.5 * xbar[c] + 0.5 * sim[N, c]
            fcc = schedule_log_loss(xcc, K, n_pieces, limit, a1, b1, q, S0, h)
            nfev += 1
            if fcc < f[N]:
                _set_row(sim, N, xcc)
                f[N] = fcc
            else:
                shrink = True
        if shrink:
            for j in range(1, N + 1):
                for c in range(N):
                    sim[j, c] = sim[0, c] + 0.5 * (sim[j, c] - sim[0, c])
                f[j] = schedule_log_loss(sim[j], K, n_pieces, limit, a1, b1, q, S0, h)
                nfev += 1
    return sim[0].copy(), f[0], nfev
