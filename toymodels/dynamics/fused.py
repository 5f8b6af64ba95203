"""The loss after k constant-learning-rate steps, fused over modes without eigenvectors (1- and
2-state systems only): the tuner's inner loop.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._kernels import _gs_values
from .lyapunov import _stein2_scalar
from .threads import _PARALLEL_MIN_MODES

__all__ = ["loss_at_parts", "loss_at"]


@njit(cache=True, nogil=True)
def _loss1(a, b0, q, h, s00, k):
    """Expected loss of a 1-state mode x' = a x + b0 eps after k steps from E x^2 = s00."""
    one_minus_a2 = (1.0 - a) * (1.0 + a)
    if one_minus_a2 <= 0.0:
        return np.inf
    sinf = q * b0 * b0 / one_minus_a2
    ak = abs(a)
    if k == 0:
        decay = 1.0
    else:
        decay = 0.0 if ak == 0.0 else math.exp(2.0 * k * math.log(ak))
    return 0.5 * h * (sinf + (s00 - sinf) * decay)


@njit(cache=True, nogil=True)
def _loss2(a00, a01, a10, a11, b0, b1, q, h, r, s00, s01, s11, k):
    """Expected loss of a 2-state mode after k steps from second moments (s00, s01, s11), read at
    entry r: stationary part by :func:`_stein2_scalar`, transient by the (g, s) form."""
    c = 0.5 * (a00 + a11)
    det = a00 * a11 - a01 * a10
    disc = c * c - det
    w = math.sqrt(abs(disc))
    rho = math.sqrt(det) if disc < 0 else max(abs(c + w), abs(c - w))
    if rho >= 1.0:
        return np.inf
    t00, t01, t11 = _stein2_scalar(a00, a01, a10, a11, b0, b1, q)
    d00 = s00 - t00
    d01 = s01 - t01
    d11 = s11 - t11
    if r == 0:
        nr0, nr1, dr0, dr1, drr, srr = a00 - c, a01, d00, d01, d00, t00
    else:
        nr0, nr1, dr0, dr1, drr, srr = a10, a11 - c, d01, d11, d11, t11
    mm = dr0 * nr0 + dr1 * nr1
    pp = nr0 * (d00 * nr0 + d01 * nr1) + nr1 * (d01 * nr0 + d11 * nr1)
    g, t = _gs_values(c, w, disc < 0, k)
    return 0.5 * h * (srr + drr * g * g + 2.0 * mm * g * t + pp * t * t)


@njit(cache=True, nogil=True)
def _mode_loss_at(A, b, q, h, r, S0, i, k):
    """Expected loss of mode i (1 or 2 states) after k constant-lr steps (inf if unstable)."""
    if A.shape[1] == 1:
        return _loss1(A[i, 0, 0], b[i, 0], q[i], h[i], S0[i, 0, 0], k)
    return _loss2(A[i, 0, 0], A[i, 0, 1], A[i, 1, 0], A[i, 1, 1], b[i, 0], b[i, 1], q[i], h[i], r,
                  S0[i, 0, 0], S0[i, 0, 1], S0[i, 1, 1], k)


@njit(cache=True, nogil=True)
def _mode_loss_parts(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, i, k):
    """Like :func:`_mode_loss_at` with A = P0 + e P1 + lr (Q0 + e Q1), b = lr (R0 + e R1) built here."""
    if P0.shape[1] == 1:
        a = P0[i, 0, 0] + e * P1[i, 0, 0] + lr * (Q0[i, 0, 0] + e * Q1[i, 0, 0])
        return _loss1(a, lr * (R0[i, 0] + e * R1[i, 0]), q[i], h[i], S0[i, 0, 0], k)
    a00 = P0[i, 0, 0] + e * P1[i, 0, 0] + lr * (Q0[i, 0, 0] + e * Q1[i, 0, 0])
    a01 = P0[i, 0, 1] + e * P1[i, 0, 1] + lr * (Q0[i, 0, 1] + e * Q1[i, 0, 1])
    a10 = P0[i, 1, 0] + e * P1[i, 1, 0] + lr * (Q0[i, 1, 0] + e * Q1[i, 1, 0])
    a11 = P0[i, 1, 1] + e * P1[i, 1, 1] + lr * (Q0[i, 1, 1] + e * Q1[i, 1, 1])
    b0 = lr * (R0[i, 0] + e * R1[i, 0])
    b1 = lr * (R0[i, 1] + e * R1[i, 1])
    return _loss2(a00, a01, a10, a11, b0, b1, q[i], h[i], r, S0[i, 0, 0], S0[i, 0, 1], S0[i, 1, 1], k)


@njit(inline="always")
def _loss_at_sum(A, b, q, h, r, S0, k):
    total = 0.0
    for i in prange(b.shape[0]):
        total += _mode_loss_at(A, b, q, h, r, S0, i, k)
    return total


@njit(cache=True, nogil=True, parallel=True)
def _loss_at_parallel(A, b, q, h, r, S0, k):
    return _loss_at_sum(A, b, q, h, r, S0, k)


@njit(cache=True, nogil=True)
def _loss_at_serial(A, b, q, h, r, S0, k):
    return _loss_at_sum(A, b, q, h, r, S0, k)


@njit(inline="always")
def _loss_parts_sum(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k):
    total = 0.0
    for i in prange(q.shape[0]):
        total += _mode_loss_parts(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, i, k)
    return total


@njit(cache=True, nogil=True, parallel=True)
def _loss_parts_parallel(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k):
    return _loss_parts_sum(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k)


@njit(cache=True, nogil=True)
def _loss_parts_serial(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k):
    return _loss_parts_sum(P0, P1, Q0, Q1, R0, R1, e, lr, q, h, r, S0, k)


def loss_at_parts(parts, e, lr, q, h, readout, S0, k) -> float:
    """:func:`loss_at` for systems affine in a hyper-parameter e and the learning rate:
    A = P0 + e P1 + lr (Q0 + e Q1), b = lr (R0 + e R1), ``parts = (P0, P1, Q0, Q1, R0, R1)``.
    Lets a tuner sweep (lr, beta) or (lr, decay) without rebuilding arrays in Python."""
    kernel = _loss_parts_parallel if q.shape[0] >= _PARALLEL_MIN_MODES else _loss_parts_serial
    return float(kernel(*parts, float(e), float(lr), q, h, int(readout), S0, int(k)))


def loss_at(A, b, q, h, readout, S0, k) -> float:
    """Expected loss after k constant-lr steps, fused and parallel over modes (s = 1 or 2 only).

    Same value as ``ModalForm(...).loss([k])`` without eigenvectors: for 2x2 systems
    A^k = g_k I + s_k N and the stationary moments come from :func:`_stein2_scalar`.
    Returns ``inf`` if any mode is unstable.
    """
    if b.shape[1] > 2:
        raise ValueError("loss_at handles 1- and 2-state systems; use ModalForm for 3 states.")
    kernel = _loss_at_parallel if b.shape[0] >= _PARALLEL_MIN_MODES else _loss_at_serial
    return float(kernel(A, b, q, h, int(readout), S0, int(k)))
