"""Rigorous lower bounds of the closed-form loss over an interval of steps [a, b]: monotone terms at
the end that minimises them, oscillating ones at minus their envelope, flagged modes through the
(g, s) form or Henrici's bound on ||A^k||.  They let the first-crossing search discard intervals.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._kernels import _gs_values


@njit(cache=True, nogil=True)
def _interval_mul(a1, a2, b1, b2):
    p1 = a1 * b1
    p2 = a1 * b2
    p3 = a2 * b1
    p4 = a2 * b2
    return min(min(p1, p2), min(p3, p4)), max(max(p1, p2), max(p3, p4))


@njit(cache=True, nogil=True)
def _cos_range(t1, t2):
    """Range of cos over the angle interval [t1, t2]."""
    if t2 - t1 >= 2 * math.pi:
        return -1.0, 1.0
    lo = min(math.cos(t1), math.cos(t2))
    hi = max(math.cos(t1), math.cos(t2))
    m = math.ceil(t1 / math.pi)
    while m * math.pi <= t2:
        if m % 2 == 0:
            hi = 1.0
        else:
            lo = -1.0
        m += 1
    return lo, hi


@njit(cache=True, nogil=True)
def _gs_box(c, w, cplx, a, bend):
    """Boxes [g1, g2] x [s1, s2] containing (g_k, s_k) for every integer k in [a, bend] (-1: inf)."""
    if cplx:
        rho = math.sqrt(c * c + w * w)
        phi = math.atan2(w, c)
        r_hi = rho**a
        r_lo = rho**bend if bend >= 0 else 0.0
        if bend < 0:
            c1, c2, s1, s2 = -1.0, 1.0, -1.0, 1.0
        else:
            c1, c2 = _cos_range(a * phi, bend * phi)
            s1, s2 = _cos_range(a * phi - 0.5 * math.pi, bend * phi - 0.5 * math.pi)
        g1, g2 = _interval_mul(r_lo, r_hi, c1, c2)
        t1, t2 = _interval_mul(r_lo, r_hi, s1 / w, s2 / w)
        return g1, g2, t1, t2
    big = c + w if c >= 0 else c - w
    small = c - w if c >= 0 else c + w
    if small >= 0.0 and big >= 0.0:
        # g decreasing; s >= 0 and unimodal (a difference of two exponentials), peak near kstar
        ga, sa = _gs_values(c, w, False, a)
        if bend >= 0:
            gb, sb = _gs_values(c, w, False, bend)
        else:
            gb, sb = 0.0, 0.0
        smax = max(sa, sb)
        if big > 0.0:
            if small > 0.0 and w > 0.0:
                la, lb = math.log(big), math.log(small)
                kstar = math.log(lb / la) / (la - lb)
            elif small == 0.0:
                kstar = 1.0
            else:
                kstar = -1.0 / math.log(big)
            for kk in (float(math.floor(kstar)), float(math.floor(kstar)) + 1.0):
                if kk >= a and (bend < 0 or kk <= bend):
                    smax = max(smax, _gs_values(c, w, False, int(kk))[1])
        return gb, ga, min(sa, sb), smax
    # mixed signs or both negative: symmetric boxes from |lam|^k and k |lam|^(k-1)
    m = max(abs(big), abs(small))
    ga = m**a
    if m == 0.0:
        return -1.0, 1.0, -1.0, 1.0
    kpk = -1.0 / math.log(m) if m < 1.0 else 1e18
    best = 0.0
    for kk in (float(a), float(math.floor(kpk)), float(math.floor(kpk)) + 1.0):
        kc = max(kk, float(a))
        if bend >= 0:
            kc = min(kc, float(bend))
        if kc >= 1.0:
            best = max(best, kc * m ** (kc - 1.0))
    return -ga, ga, -best, best


@njit(cache=True, nogil=True)
def _quad_min_1d(aa, bb, cc, x1, x2):
    """min of aa x^2 + 2 bb x + cc over [x1, x2]."""
    v = min(aa * x1 * x1 + 2 * bb * x1 + cc, aa * x2 * x2 + 2 * bb * x2 + cc)
    if aa > 0.0:
        xv = -bb / aa
        if x1 < xv < x2:
            v = min(v, cc - bb * bb / aa)
    return v


@njit(cache=True, nogil=True)
def _quad_min_box(n, m, p, g1, g2, s1, s2):
    """Exact min of n g^2 + 2 m g s + p s^2 over the box [g1, g2] x [s1, s2]."""
    best = np.inf
    for g in (g1, g2):
        best = min(best, _quad_min_1d(p, m * g, n * g * g, s1, s2))
    for t in (s1, s2):
        best = min(best, _quad_min_1d(n, m * t, p * t * t, g1, g2))
    if g1 <= 0.0 <= g2 and s1 <= 0.0 <= s2 and n >= 0.0 and p >= 0.0 and n * p >= m * m:
        best = min(best, 0.0)
    elif n * p < m * m or n < 0.0 or p < 0.0:
        pass  # indefinite: the minimum lies on the boundary, already covered
    return best


@njit(cache=True, nogil=True)
def _apow(logabs, k):
    if k == 0:
        return 1.0
    return math.exp(k * logabs)


@njit(cache=True, nogil=True)
def _henrici_sup(rho, nu, s, a, bend):
    """sup over k in [a, bend] (bend = -1: infinity) of sum_{j<s} C(k,j) rho^(k-j) nu^j >= ||A^k||."""
    total = 0.0
    for j in range(s):
        # term_j(k) = C(k, j) rho^(k-j) nu^j increases while k + 1 < j / (1 - rho)
        if rho == 0.0:
            cands = (float(j), float(a), float(a))
        else:
            kpk = math.floor(j / (1.0 - rho))
            cands = (float(a), kpk, kpk + 1.0)
        best = 0.0
        for kc in cands:
            kk = max(kc, float(a))
            if bend >= 0:
                kk = min(kk, float(bend))
            if kk < j:
                val = 0.0
            else:
                lg = math.lgamma(kk + 1) - math.lgamma(j + 1) - math.lgamma(kk - j + 1)
                val = math.exp(lg) * (rho ** (kk - j) if rho > 0 else (1.0 if kk == j else 0.0)) * nu**j
            best = max(best, val)
        total += best
    return total


@njit(cache=True, nogil=True)
def _mode_lower_bound(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend, i):
    """Lower bound of mode i's loss over [a, bend]; see :func:`_lower_bound`."""
    s = lam.shape[1]
    gs_lb = -np.inf
    if s == 2 and linf[i] < np.inf:
        g1, g2, s1, s2 = _gs_box(gsq[i, 0], gsq[i, 1], gsq[i, 2] > 0.5, a, bend)
        tmin = _quad_min_box(gsq[i, 3], gsq[i, 4], gsq[i, 5], g1, g2, s1, s2)
        gs_lb = linf[i] + 0.5 * h[i] * tmin
        gs_lb = max(0.0, gs_lb - 1e-8 * (abs(linf[i]) + abs(0.5 * h[i] * tmin)))
    if flag[i]:
        if s == 2:
            return gs_lb
        e = _henrici_sup(rho[i], nu[i], s, a, bend)
        return max(0.0, linf[i] - 0.5 * h[i] * dnorm[i] * e * e)
    mode_lb = linf[i]
    mode_slack = abs(linf[i])
    for j in range(s):
        lj = lam[i, j]
        for l in range(j, s):
            c = C[i, j, l]
            if c == 0:
                continue
            mu = lj * lam[i, l]
            amu = abs(mu)
            if mu.imag == 0.0 and mu.real >= 0.0:
                cr = c.real
                if cr > 0.0:
                    if bend >= 0 and amu > 0.0:
                        mode_lb += cr * _apow(math.log(amu), bend)
                    elif bend == 0:
                        mode_lb += cr
                else:
                    v = cr * (_apow(math.log(amu), a) if amu > 0 else (1.0 if a == 0 else 0.0))
                    mode_lb += v
                    mode_slack += -v
            else:
                v = abs(c) * (_apow(math.log(amu), a) if amu > 0 else (1.0 if a == 0 else 0.0))
                mode_lb -= v
                mode_slack += v
    return max(gs_lb, mode_lb - 1e-8 * mode_slack)


@njit(inline="always")
def _bound_sum(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend):
    """A lower bound on L_k valid for every integer k in [a, bend] (bend = -1: infinity).

    Per mode, the larger of two rigorous bounds (each also >= 0, since a loss is):
      * modal (well-conditioned modes), term c mu^k with mu = lam_j lam_l: mu real >= 0 is monotone,
        so >= Re(c) mu^bend if Re(c) > 0 (0 at infinity), Re(c) mu^a otherwise; any other term
        (oscillating) >= -|c| |mu|^a;
      * (g, s) form (every stable 2x2 mode): A^k = g_k I + s_k N (N = A - tr(A)/2 I), so the transient
        is the quadratic form n g_k^2 + 2 m g_k s_k + p s_k^2; (g_k, s_k) are boxed over [a, bend]
        (modulus and angle ranges, or monotone / unimodal pieces for real eigenvalues) and the form
        is minimised exactly over the box.  Its coefficients stay O(1) where near-repeated
        eigenvalues make the modal ones huge and cancelling.
    Flagged 3x3 modes: loss_i >= max(0, L_inf,i - h_i/2 ||S0 - S_inf||_F sup ||A^k||^2),
    with the Henrici bound ||A^k||_2 <= sum_{j<s} C(k,j) rho^(k-j) nu^j (nu = departure from
    normality).
    A relative margin of 1e-8 covers rounding in the modal coefficients (measured <= 1e-9).
    """
    total = 0.0
    for i in prange(lam.shape[0]):
        total += _mode_lower_bound(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend, i)
    return total


@njit(cache=True, nogil=True, parallel=True)
def _lower_bound(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend):
    """:func:`_bound_sum` on all threads (called from Python, for many modes)."""
    return _bound_sum(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend)


@njit(cache=True, nogil=True)
def _lower_bound_serial(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend):
    """:func:`_bound_sum` on one thread (small models, where thread start-up dominates)."""
    return _bound_sum(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bend)
