"""Stationary second moments: the solution of the discrete Lyapunov (Stein) equation
S = A S A^T + q b b^T per mode, and its scalar closed form for 2x2 systems.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._kernels import _matmul, _noise, _sandwich, _set, _set_sum

__all__ = ["lyapunov"]


@njit(cache=True, nogil=True)
def _lyapunov_mode(A, b, q, out):
    """Stationary S = A S A^T + q b b^T by doubling (requires spectral radius < 1)."""
    s = A.shape[0]
    P = A.copy()
    Q = np.empty((s, s))
    _noise(q, b, Q)
    T = np.empty((s, s))
    P2 = np.empty((s, s))
    for _ in range(200):
        _sandwich(P, Q, T)
        _set_sum(Q, Q, T)
        _matmul(P, P, P2)
        _set(P, P2)
        nrm = 0.0
        for u in range(s):
            for v in range(s):
                nrm += P[u, v] * P[u, v]
        if nrm < 1e-40:
            break
    _set(out, Q)


@njit(cache=True, nogil=True)
def _stein2_scalar(a00, a01, a10, a11, b0, b1, q):
    """Stationary S = A S A^T + q b b^T of a stable 2x2 system in closed form, stable at repeated
    eigenvalues: S = Q G2 + (N Q + Q N^T) GS + N Q N^T S2 with A^j = g_j I + s_j N and
    G2 = sum g_j^2, GS = sum g_j s_j, S2 = sum s_j^2 written through tr A and det A.
    Returns (S00, S01, S11)."""
    tau = a00 + a11
    det = a00 * a11 - a01 * a10
    c = 0.5 * tau
    uv = (1.0 + det - tau) * (1.0 + det + tau)  # (1 - lam1^2)(1 - lam2^2)
    pp = 1.0 - det  # 1 - lam1 lam2
    g2 = 0.25 * ((2.0 - tau * tau + 2.0 * det) / uv + 2.0 / pp)
    gs = 0.5 * tau / uv
    s2 = (1.0 + det) / (uv * pp)
    nb0 = (a00 - c) * b0 + a01 * b1  # N b
    nb1 = a10 * b0 + (a11 - c) * b1
    s00 = q * (b0 * b0 * g2 + 2.0 * nb0 * b0 * gs + nb0 * nb0 * s2)
    s01 = q * (b0 * b1 * g2 + (nb0 * b1 + b0 * nb1) * gs + nb0 * nb1 * s2)
    s11 = q * (b1 * b1 * g2 + 2.0 * nb1 * b1 * gs + nb1 * nb1 * s2)
    return s00, s01, s11


def lyapunov(A, b, q):
    """Stationary second moments ``S = A S A^T + q b b^T`` per mode, ``(d, s, s)``."""
    out = np.empty(A.shape)
    for i in range(A.shape[0]):
        _lyapunov_mode(A[i], b[i], q[i], out[i])
    return out
