"""Closed form of the uniform (Polyak-Ruppert) average of SGD on the NQM, and its exact first crossing.

Per mode, SGD is theta' = a theta + b eps with a = 1 - x, x = lr h^-gamma (h + wd) in (0, 2), b = -lr h^-gamma
and Var(eps) = q = c / B.  The running sum sigma_k = theta_0 + ... + theta_k has (impulse response
f(n) = 1 + a + ... + a^(n-1) = (1 - a^n) / x)

    E[sigma_k^2] = s0 f(k + 1)^2 + q b^2 W_k,     W_k = f(1)^2 + ... + f(k)^2,

(the noise drawn at update m enters sigma_k with weight b f(k - m)), and the average's loss is
1/2 sum_i h_i E[sigma_k^2] / (k + 1)^2.  Closed forms:

    f(n) = -expm1(n log(1 - x)) / x  (0 < x < 1),   (1 - a^n) / x  (1 <= x < 2),
    W_k  = (k - 2 a f(k) + a^2 (1 - a^(2k)) / (1 - a^2)) / x^2.

The bracket of W_k cancels to ~k^3 x^2 / 3 when k x is small (relative error ~3 eps / (k x)^2); there
(k x < 0.05, 0 < x < 1) W_k comes instead from binary powering of blocks of updates, whose combination
rule for n then m updates has only positive terms:

    f(n + m) = f(n) + a^n f(m),   F(n + m) = F(n) + m f(n) + a^n F(m)   (F(n) = f(1) + ... + f(n)),
    W(n + m) = W(n) + m f(n)^2 + 2 a^n f(n) F(m) + a^(2n) W(m).

Lower bound on steps k in [k1, k2] (the first crossing's pruning): W_k is nondecreasing (a sum of
squares) and f(k + 1) = (1 - a^(k+1)) / x >= (1 - |a|^(k1+1)) / x, so

    L_k >= 1/2 sum_i h_i (s0 ((1 - |a|^(k1+1)) / x)^2 + q b^2 W_k1) / (k2 + 1)^2.

References:
    B. T. Polyak, A. B. Juditsky, "Acceleration of stochastic approximation by averaging", SIAM J.
    Control Optim. 30(4), 1992.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_SMALL_KX = 0.05  # below this k x (and x < 1) W_k comes from binary powering, not the closed form


@njit(cache=True, nogil=True)
def _doubling(a, k):
    """(a^k, f(k), W_k) by binary powering of update blocks (positive terms only for 0 < a < 1)."""
    rp, rf, rF, rW, rn = 1.0, 0.0, 0.0, 0.0, 0.0  # the empty block
    bp, bf, bF, bW, bn = a, 1.0, 1.0, 1.0, 1.0  # one update
    while k > 0:
        if k & 1:
            # block r then block b
            rW = rW + bn * rf * rf + 2.0 * rp * rf * bF + rp * rp * bW
            rF = rF + bn * rf + rp * bF
            rf = rf + rp * bf
            rp = rp * bp
            rn = rn + bn
        k >>= 1
        if k > 0:
            bW = bW + bn * bf * bf + 2.0 * bp * bf * bF + bp * bp * bW
            bF = bF + bn * bf + bp * bF
            bf = bf + bp * bf
            bp = bp * bp
            bn = bn + bn
    return rp, rf, rW


@njit(cache=True, nogil=True)
def _mode_terms(x, k):
    """(f(k + 1), its lower bound over later steps (1 - |a|^(k+1)) / x, W_k) of one mode, 0 < x < 2."""
    a = 1.0 - x
    if x < 1.0 and k * x < _SMALL_KX:
        ak, fk, w = _doubling(a, k)
        m = fk + ak
        return m, m, w
    if x < 1.0:
        lg = math.log1p(-x)
        m = -math.expm1((k + 1) * lg) / x
        fk = -math.expm1(k * lg) / x
        f2 = -math.expm1(2 * k * lg) / (x * (2.0 - x))
        w = (k - 2.0 * a * fk + a * a * f2) / (x * x)
        return m, m, w
    ak = a**k
    m = (1.0 - ak * a) / x
    mlb = (1.0 - abs(ak * a)) / x
    fk = (1.0 - ak) / x
    f2 = (1.0 - ak * ak) / (x * (2.0 - x))
    w = (k + 2.0 * abs(a) * fk + a * a * f2) / (x * x)
    return m, mlb, w


@njit(cache=True, nogil=True)
def _loss(x, bb, s0, h, k):
    """Expected loss of the uniform average after k updates: x, bb = q b^2, s0, h of shape (d,)."""
    total = 0.0
    for i in range(x.shape[0]):
        m, _, w = _mode_terms(x[i], k)
        total += h[i] * (s0[i] * m * m + bb[i] * w)
    return 0.5 * total / ((k + 1.0) * (k + 1.0))


@njit(cache=True, nogil=True)
def _lower_bound(x, bb, s0, h, k1, k2):
    """A lower bound of the loss at every step in [k1, k2] (module docstring)."""
    total = 0.0
    for i in range(x.shape[0]):
        _, mlb, w = _mode_terms(x[i], k1)
        total += h[i] * (s0[i] * mlb * mlb + bb[i] * w)
    return 0.5 * total / ((k2 + 1.0) * (k2 + 1.0))


@njit(cache=True, nogil=True)
def _leaf(x, bb, s0, h, target, k1, k2, m, w):
    """The first k in [k1, k2] with loss <= target (or -1), stepping f(k + 1) = 1 + a f(k) and
    W_{k+1} = W_k + f(k + 1)^2 from the closed form at k1."""
    d = x.shape[0]
    for i in range(d):
        mi, _, wi = _mode_terms(x[i], k1)
        m[i] = mi
        w[i] = wi
    for k in range(k1, k2 + 1):
        total = 0.0
        for i in range(d):
            total += h[i] * (s0[i] * m[i] * m[i] + bb[i] * w[i])
        if 0.5 * total / ((k + 1.0) * (k + 1.0)) <= target:
            return k
        for i in range(d):
            w[i] += m[i] * m[i]
            m[i] = 1.0 + (1.0 - x[i]) * m[i]
    return -1


@njit(cache=True, nogil=True)
def _first_crossing(x, bb, s0, h, target, k_lo, k_hi, leaf):
    """The first step k in [k_lo, k_hi] with expected loss <= target, or -1: depth first from the
    left, discarding an interval only where its rigorous lower bound exceeds the target (by a margin
    of 1e-10 relative, above rounding) and checking every step of the intervals of <= ``leaf``
    steps left."""
    m = np.empty(x.shape[0])
    w = np.empty(x.shape[0])
    lo_st = np.empty(200, dtype=np.int64)
    hi_st = np.empty(200, dtype=np.int64)
    lo_st[0], hi_st[0] = k_lo, k_hi
    n = 1
    while n > 0:
        n -= 1
        a, b = lo_st[n], hi_st[n]
        if b - a < leaf:
            k = _leaf(x, bb, s0, h, target, a, b, m, w)
            if k >= 0:
                return k
            continue
        if _lower_bound(x, bb, s0, h, a, b) * (1.0 - 1e-10) > target:
            continue
        mid = a + (b - a) // 2
        lo_st[n], hi_st[n] = mid + 1, b  # the right half waits under the left one
        lo_st[n + 1], hi_st[n + 1] = a, mid
        n += 2
    return -1
