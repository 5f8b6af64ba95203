"""The modal closed form of a constant-learning-rate loss curve: with A = V diag(lam) V^-1,

    L_k = L_inf + Re sum_i sum_{j<=l} C_ijl (lam_ij lam_il)^k,

its setup (eigenpairs, coefficients, bounds per mode) and its values at chosen steps or over a
range of steps.  Modes with ill-conditioned eigenvectors are flagged and evaluated by exact
powering (or the (g, s) form of 2x2 powers) instead.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._kernels import _gs_values, _sandwich
from .lyapunov import _lyapunov_mode, _stein2_scalar
from .stepwise import _jump_mode


_COND_LIMIT = 1e4  # eigenvector condition number above which a 1- or 2-state mode is flagged

# 3-state modes have only the loose Henrici bound when flagged, so they stay modal up to a larger
# condition number (measured error of the modal values <= 1e-8 relative, see the tests)
_COND_LIMIT_3 = 1e6


@njit(cache=True, nogil=True)
def _eig2(a00, a01, a10, a11, lam, V, off):
    """Eigenpairs of [[a00, a01], [a10, a11]] into lam[off:off+2], V[0:2, off:off+2] (complex)."""
    tau = a00 + a11
    det = a00 * a11 - a01 * a10
    disc = tau * tau - 4.0 * det
    if disc >= 0.0:
        sq = math.sqrt(disc)
        big = 0.5 * (tau + sq) if tau >= 0 else 0.5 * (tau - sq)
        small = det / big if big != 0.0 else 0.0
        l1 = complex(big, 0.0)
        l2 = complex(small, 0.0)
    else:
        sq = math.sqrt(-disc)
        l1 = complex(0.5 * tau, 0.5 * sq)
        l2 = complex(0.5 * tau, -0.5 * sq)
    lam[off] = l1
    lam[off + 1] = l2
    for m in range(2):
        lm = lam[off + m]
        # two candidate eigenvectors; take the larger one
        x0 = complex(a01, 0.0)
        x1 = lm - a00
        y0 = lm - a11
        y1 = complex(a10, 0.0)
        nx = abs(x0) + abs(x1)
        ny = abs(y0) + abs(y1)
        if nx >= ny:
            V[0, off + m] = x0
            V[1, off + m] = x1
        else:
            V[0, off + m] = y0
            V[1, off + m] = y1
        if nx == 0.0 and ny == 0.0:  # A is a multiple of the identity
            V[0, off + m] = 1.0 if m == 0 else 0.0
            V[1, off + m] = 0.0 if m == 0 else 1.0


@njit(cache=True, nogil=True)
def _inverse(V, W):
    """Inverse of a complex 1x1, 2x2 or 3x3 matrix by cofactors; returns False if singular."""
    s = V.shape[0]
    if s == 1:
        if V[0, 0] == 0:
            return False
        W[0, 0] = 1.0 / V[0, 0]
        return True
    if s == 2:
        det = V[0, 0] * V[1, 1] - V[0, 1] * V[1, 0]
        if det == 0:
            return False
        W[0, 0] = V[1, 1] / det
        W[0, 1] = -V[0, 1] / det
        W[1, 0] = -V[1, 0] / det
        W[1, 1] = V[0, 0] / det
        return True
    c00 = V[1, 1] * V[2, 2] - V[1, 2] * V[2, 1]
    c01 = V[1, 2] * V[2, 0] - V[1, 0] * V[2, 2]
    c02 = V[1, 0] * V[2, 1] - V[1, 1] * V[2, 0]
    det = V[0, 0] * c00 + V[0, 1] * c01 + V[0, 2] * c02
    if det == 0:
        return False
    W[0, 0] = c00 / det
    W[1, 0] = c01 / det
    W[2, 0] = c02 / det
    W[0, 1] = (V[0, 2] * V[2, 1] - V[0, 1] * V[2, 2]) / det
    W[1, 1] = (V[0, 0] * V[2, 2] - V[0, 2] * V[2, 0]) / det
    W[2, 1] = (V[0, 1] * V[2, 0] - V[0, 0] * V[2, 1]) / det
    W[0, 2] = (V[0, 1] * V[1, 2] - V[0, 2] * V[1, 1]) / det
    W[1, 2] = (V[0, 2] * V[1, 0] - V[0, 0] * V[1, 2]) / det
    W[2, 2] = (V[0, 0] * V[1, 1] - V[0, 1] * V[1, 0]) / det
    return True


@njit(cache=True, nogil=True)
def _eig_mode(A, lam, V):
    """Eigen-decomposition of a 1x1, 2x2 or block lower-triangular 3x3 ([[B, 0], [g, mu]]) matrix."""
    s = A.shape[0]
    if s == 1:
        lam[0] = A[0, 0]
        V[0, 0] = 1.0
        return
    _eig2(A[0, 0], A[0, 1], A[1, 0], A[1, 1], lam, V, 0)
    if s == 3:
        mu = A[2, 2]
        lam[2] = mu
        for m in range(2):
            denom = lam[m] - mu
            num = A[2, 0] * V[0, m] + A[2, 1] * V[1, m]
            V[2, m] = num / denom if denom != 0 else complex(np.inf, 0.0)
        V[0, 2] = 0.0
        V[1, 2] = 0.0
        V[2, 2] = 1.0


@njit(cache=True, nogil=True)
def _gs_setup(A, b, q, S0, r, h, row):
    """Fill row = (c, w, complex?, n, m, p) of a stable 2x2 mode; returns its stationary loss."""
    a00, a01, a10, a11 = A[0, 0], A[0, 1], A[1, 0], A[1, 1]
    cc = 0.5 * (a00 + a11)
    det = a00 * a11 - a01 * a10
    disc = cc * cc - det
    s00, s01, s11 = _stein2_scalar(a00, a01, a10, a11, b[0], b[1], q)
    d00 = S0[0, 0] - s00
    d01 = S0[0, 1] - s01
    d11 = S0[1, 1] - s11
    if r == 0:
        nr0, nr1, dr0, dr1, drr, srr = a00 - cc, a01, d00, d01, d00, s00
    else:
        nr0, nr1, dr0, dr1, drr, srr = a10, a11 - cc, d01, d11, d11, s11
    row[0] = cc
    row[1] = math.sqrt(abs(disc))
    row[2] = 1.0 if disc < 0 else 0.0
    row[3] = drr  # e^T D e
    row[4] = dr0 * nr0 + dr1 * nr1  # e^T D N^T e
    row[5] = nr0 * (d00 * nr0 + d01 * nr1) + nr1 * (d01 * nr0 + d11 * nr1)  # e^T N D N^T e
    return 0.5 * h * srr


@njit(cache=True, nogil=True)
def _modal_setup_kernel(A, b, q, h, r, S0, lam, C, linf, flag, rho, nu, dnorm, gsq):
    """Fill the modal form per mode; flag modes whose eigenvectors are ill-conditioned."""
    d, s = b.shape
    V = np.empty((s, s), dtype=np.complex128)
    W = np.empty((s, s), dtype=np.complex128)
    bt = np.empty(s, dtype=np.complex128)
    Sinf = np.empty((s, s), dtype=np.complex128)
    Dt = np.empty((s, s), dtype=np.complex128)
    Sreal = np.empty((s, s))
    for i in range(d):
        lv = lam[i]
        _eig_mode(A[i], lv, V)
        rr = 0.0
        fro = 0.0
        lsq = 0.0
        for j in range(s):
            rr = max(rr, abs(lv[j]))
            lsq += abs(lv[j]) ** 2
            for k in range(s):
                fro += A[i, j, k] ** 2
        rho[i] = rr
        nu[i] = math.sqrt(max(fro - lsq, 0.0))
        # normalise eigenvector columns, then invert and estimate the condition number
        ok = True
        for j in range(s):
            nrm = 0.0
            for k in range(s):
                nrm += abs(V[k, j]) ** 2
            nrm = math.sqrt(nrm)
            if not (nrm > 0.0 and nrm < np.inf):
                ok = False
                break
            for k in range(s):
                V[k, j] /= nrm
        if ok:
            ok = _inverse(V, W)
        if ok:
            wn = 0.0
            for j in range(s):
                for k in range(s):
                    wn += abs(W[j, k]) ** 2
            ok = math.sqrt(wn * s) < (_COND_LIMIT if s < 3 else _COND_LIMIT_3)
        if rr >= 1.0:
            ok = False
        flag[i] = not ok
        linf_gs = np.inf
        if s == 2 and rr < 1.0:
            linf_gs = _gs_setup(A[i], b[i], q[i], S0[i], r, h[i], gsq[i])
        if not ok:
            # real-arithmetic fallback data: stationary moments (closed form for 2x2, doubling else)
            if rr < 1.0:
                if s == 2:
                    linf[i] = linf_gs
                    dnorm[i] = 0.0
                else:
                    _lyapunov_mode(A[i], b[i], q[i], Sreal)
                    linf[i] = 0.5 * h[i] * Sreal[r, r]
                    dn = 0.0
                    for j in range(s):
                        for k in range(s):
                            dn += (S0[i, j, k] - Sreal[j, k]) ** 2
                    dnorm[i] = math.sqrt(dn)
            else:
                linf[i] = np.inf
                dnorm[i] = np.inf
            for j in range(s):
                for k in range(s):
                    C[i, j, k] = 0.0
            continue
        for j in range(s):
            acc = 0.0 + 0.0j
            for k in range(s):
                acc += W[j, k] * b[i, k]
            bt[j] = acc
        for j in range(s):
            for k in range(s):
                Sinf[j, k] = q[i] * bt[j] * bt[k] / (1.0 - lv[j] * lv[k])
        # Dt = W S0 W^T - Sinf
        for j in range(s):
            for k in range(s):
                acc = 0.0 + 0.0j
                for u in range(s):
                    for v in range(s):
                        acc += W[j, u] * S0[i, u, v] * W[k, v]
                Dt[j, k] = acc - Sinf[j, k]
        li = 0.0 + 0.0j
        for j in range(s):
            for k in range(s):
                li += V[r, j] * V[r, k] * Sinf[j, k]
        linf[i] = 0.5 * h[i] * li.real
        for j in range(s):
            for k in range(s):
                if k < j:
                    C[i, j, k] = 0.0
                else:
                    f = 1.0 if j == k else 2.0
                    C[i, j, k] = f * 0.5 * h[i] * V[r, j] * V[r, k] * Dt[j, k]


@njit(cache=True, nogil=True)
def _cpow(z, k):
    if k == 0:
        return 1.0 + 0.0j
    if z == 0:
        return 0.0 + 0.0j
    return np.exp(k * np.log(z))


@njit(cache=True, nogil=True)
def _gs_mode_loss(gsq, linf, h, i, k):
    """Loss of flagged 2x2 mode i at step k from its (g, s) data: L_inf + h/2 (n g^2 + 2 m g s + p s^2)."""
    g, t = _gs_values(gsq[i, 0], gsq[i, 1], gsq[i, 2] > 0.5, k)
    return linf[i] + 0.5 * h[i] * (gsq[i, 3] * g * g + 2.0 * gsq[i, 4] * g * t + gsq[i, 5] * t * t)


@njit(cache=True, nogil=True)
def _modal_mode_loss(C, linf, i, pw):
    """Loss of modal mode i given the eigenvalue powers pw[j] = lam_j^k."""
    s = pw.size
    acc = linf[i]
    for j in range(s):
        for l in range(j, s):
            acc += (C[i, j, l] * pw[j] * pw[l]).real
    return acc


@njit(cache=True, nogil=True)
def _modal_values_kernel(lam, C, linf, flag, gsq, A, b, q, h, r, S0, ks, out):
    """out[m] = L_{ks[m]} for sorted ks; good modes by the closed form, flagged ones by jumping."""
    d, s = lam.shape
    n = ks.size
    for m in range(n):
        out[m] = 0.0
    pw = np.empty(s, dtype=np.complex128)
    T = np.empty((s, s))
    for i in range(d):
        if flag[i]:
            if s == 2 and linf[i] < np.inf:  # stable (g, s) closed form
                for m in range(n):
                    out[m] += _gs_mode_loss(gsq, linf, h, i, ks[m])
            else:
                for m in range(n):
                    _jump_mode(A[i], b[i], q[i], S0[i], ks[m], T)
                    out[m] += 0.5 * h[i] * T[r, r]
            continue
        for m in range(n):
            for j in range(s):
                pw[j] = _cpow(lam[i, j], ks[m])
            out[m] += _modal_mode_loss(C, linf, i, pw)


@njit(cache=True, nogil=True)
def _values_range_modes(lam, C, linf, flag, gsq, A, b, q, h, r, S0, k0, i_lo, i_hi, out):
    """out[m] += sum over modes i_lo <= i < i_hi of their loss at step k0 + m, advancing each mode
    by one multiplication per step: eigenvalue powers (modal), the recurrence
    (g, s) <- (c g + disc s, g + c s) of A^k = g I + s N with N^2 = disc I (flagged 2x2), or one
    exact step of the moments (flagged 3x3)."""
    s = lam.shape[1]
    n = out.size
    pw = np.empty(s, dtype=np.complex128)
    T = np.empty((s, s))
    T2 = np.empty((s, s))
    for i in range(i_lo, i_hi):
        if flag[i]:
            if s == 2 and linf[i] < np.inf:
                c, w = gsq[i, 0], gsq[i, 1]
                disc = -w * w if gsq[i, 2] > 0.5 else w * w
                g, t = _gs_values(c, w, gsq[i, 2] > 0.5, k0)
                for m in range(n):
                    out[m] += linf[i] + 0.5 * h[i] * (gsq[i, 3] * g * g + 2.0 * gsq[i, 4] * g * t + gsq[i, 5] * t * t)
                    g, t = c * g + disc * t, g + c * t
            else:  # jump to k0 once, then exact single steps
                _jump_mode(A[i], b[i], q[i], S0[i], k0, T)
                for m in range(n):
                    out[m] += 0.5 * h[i] * T[r, r]
                    _sandwich(A[i], T, T2)
                    for u in range(s):
                        for v in range(s):
                            T[u, v] = T2[u, v] + q[i] * b[i, u] * b[i, v]
            continue
        for j in range(s):
            pw[j] = _cpow(lam[i, j], k0)
        for m in range(n):
            out[m] += _modal_mode_loss(C, linf, i, pw)
            for j in range(s):
                pw[j] *= lam[i, j]


@njit(inline="always")
def _values_range_blocks(lam, C, linf, flag, gsq, A, b, q, h, r, S0, k0, out, n_blocks):
    """out[m] = L_{k0 + m} (consecutive steps), the modes split into ``n_blocks`` blocks, each summed
    on its own row (a ``prange``: parallel inside a ``parallel=True`` caller, a plain loop otherwise;
    one block sums the modes in order)."""
    d = lam.shape[0]
    rows = np.zeros((n_blocks, out.size))
    for blk in prange(n_blocks):
        _values_range_modes(lam, C, linf, flag, gsq, A, b, q, h, r, S0, k0,
                            blk * d // n_blocks, (blk + 1) * d // n_blocks, rows[blk])
    for m in range(out.size):
        out[m] = np.sum(rows[:, m])


@njit(cache=True, nogil=True, parallel=True)
def _modal_values_range_parallel(lam, C, linf, flag, gsq, A, b, q, h, r, S0, k0, out):
    """:func:`_values_range_blocks` over 16 blocks of modes, on all threads (called from Python)."""
    _values_range_blocks(lam, C, linf, flag, gsq, A, b, q, h, r, S0, k0, out, 16)
