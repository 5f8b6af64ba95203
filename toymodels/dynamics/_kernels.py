"""Tiny numba helpers shared by the engine's kernels: small-matrix products into preallocated
outputs (no allocation in inner loops) and the (g, s) form of 2x2 powers,
A^k = g_k I + s_k N with N = A - c I, c = tr(A) / 2.
"""

from __future__ import annotations

import math

from numba import njit


@njit(cache=True, nogil=True)
def _sandwich(P, X, out):
    """out = P X P^T for small square matrices."""
    s = P.shape[0]
    for i in range(s):
        for j in range(s):
            acc = 0.0
            for k in range(s):
                pik = P[i, k]
                if pik == 0.0:
                    continue
                for l in range(s):
                    acc += pik * X[k, l] * P[j, l]
            out[i, j] = acc


@njit(cache=True, nogil=True)
def _varying_transition(P0, P1, Q0, Q1, R0, R1, i, lr, c, A, b):
    """Mode i's A = P0 + c P1 + lr (Q0 + c Q1) and b = lr (R0 + c R1) of a time-varying system, into
    the preallocated ``A`` (s, s) and ``b`` (s,)."""
    s = b.size
    for u in range(s):
        b[u] = lr * (R0[i, u] + c * R1[i, u])
        for v in range(s):
            A[u, v] = P0[i, u, v] + c * P1[i, u, v] + lr * (Q0[i, u, v] + c * Q1[i, u, v])


@njit(cache=True, nogil=True)
def _noise(q, b, out):
    """out = q b b^T, one update's noise covariance (``b`` (s,), ``out`` (s, s))."""
    s = b.size
    for u in range(s):
        for v in range(s):
            out[u, v] = q * b[u] * b[v]


@njit(cache=True, nogil=True)
def _matmul(P, R, out):
    s = P.shape[0]
    for i in range(s):
        for j in range(s):
            acc = 0.0
            for k in range(s):
                acc += P[i, k] * R[k, j]
            out[i, j] = acc


@njit(cache=True, nogil=True)
def _set_sum(out, X, Y):
    """out = X + Y for small square matrices, by elements (array expressions with a slice target
    compile numba's shape-mismatch error path, with its string formatting: seconds of compile)."""
    s = out.shape[0]
    for u in range(s):
        for v in range(s):
            out[u, v] = X[u, v] + Y[u, v]


@njit(cache=True, nogil=True)
def _set(out, X):
    """out = X for small square matrices, by elements (see :func:`_set_sum`)."""
    s = out.shape[0]
    for u in range(s):
        for v in range(s):
            out[u, v] = X[u, v]


@njit(cache=True, nogil=True)
def _gs_values(c, w, cplx, k):
    """(g_k, s_k) with w = sqrt(|tr^2/4 - det|); stable for w -> 0 (repeated eigenvalues)."""
    if k == 0:
        return 1.0, 0.0
    if cplx:
        rho = math.sqrt(c * c + w * w)
        phi = math.atan2(w, c)
        rk = rho**k
        return rk * math.cos(k * phi), rk * math.sin(k * phi) / w
    big = c + w if c >= 0 else c - w  # eigenvalue of larger modulus
    small = c - w if c >= 0 else c + w
    g = 0.5 * (big**k + small**k)
    if w == 0.0:
        return g, k * big ** (k - 1)
    if big == 0.0:
        return g, 0.0
    if small * big > 0.0:
        # s_k = big^(k-1) (1 - x^k) / (1 - x), x = small / big in (0, 1), 1 - x = 2 w / |big|
        delta = 2.0 * w / abs(big)
        frac = -math.expm1(k * math.log1p(-delta)) / delta
        return g, big ** (k - 1) * frac
    return g, (big**k - small**k) / (big - small)
