"""Eigenvalues of a diagonal plus a rank-one matrix, and the modal form of a loss driven by one.

Online linear regression under SGD moves the vector of per-mode second moments by

    s' = M s + c,    M = diag(a) + u v^T,    u_i v_i >= 0,

(:mod:`toymodels.linreg`).  Scaling by t_i = sqrt(v_i / u_i) makes M similar to the symmetric
N = diag(a) + w w^T with w_i^2 = u_i v_i, so its eigenvalues mu are real, and those that move the
loss L = v^T s / 2 are the roots of the secular equation

    sum_j W_j / (mu - b_j) = 1

over the distinct poles b_j (equal a_i merged, their weights W_j = sum u_i v_i added): exactly one
root between consecutive poles and one above the largest (Golub 1973; LAPACK's dlaed4).  With
z = (mu - diag(a))^-1 w, the loss contribution of a root is

    L_k - L_inf = 1/2 sum_mu mu^k (v^T r_mu)(l_mu^T Delta) / (l_mu^T r_mu)
                = 1/2 sum_mu mu^k [sum_i v_i Delta_i / (mu - a_i)] / [sum_i u_i v_i / (mu - a_i)^2],

Delta = s_0 - s_inf.  Roots are found by Newton's method safeguarded by bisection in a variable
shifted to the nearer pole, so mu - b_j keeps full relative accuracy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._validate import Array, Maybe, validate

__all__ = ["loss_modes"]


@njit(cache=True, nogil=True)
def _secular_f(tau, delta, W):
    """f = sum_j W_j / (tau - delta_j) - 1 and its derivative, with tau = mu - origin."""
    f = -1.0
    df = 0.0
    for j in range(W.size):
        r = 1.0 / (tau - delta[j])
        f += W[j] * r
        df -= W[j] * r * r
    return f, df


@njit(cache=True, nogil=True)
def _roots_kernel(b, W, mu, origin, tau_out):
    """Root m of sum_j W_j / (mu - b_j) = 1 in (b_m, b_{m+1}) (the last in (b_n, b_n + sum W]).

    b sorted increasing and distinct, W > 0.  mu[m] = origin[m] + tau_out[m]; origin is the pole
    nearer the root, so mu - b_j = tau - (b_j - origin) without cancellation.
    """
    n = b.size
    total = 0.0
    for j in range(n):
        total += W[j]
    delta = np.empty(n)
    for m in range(n):
        lo_pole = b[m]
        hi_pole = b[m + 1] if m + 1 < n else b[n - 1] + total
        # which end is nearer the root: the sign of f at the midpoint
        for j in range(n):
            delta[j] = b[j] - lo_pole
        mid = 0.5 * (hi_pole - lo_pole)
        fmid, _ = _secular_f(mid, delta, W)
        if fmid < 0.0 and m + 1 < n:  # root in (lo, mid): measure from the lower pole
            org = lo_pole
            a, c = 0.0, mid
        elif m + 1 < n:  # root in [mid, hi): measure from the upper pole
            org = hi_pole
            for j in range(n):
                delta[j] = b[j] - org
            a, c = -(hi_pole - lo_pole) + mid, 0.0
        else:
            org = lo_pole
            a, c = 0.0, total
        # f is decreasing on (a, c): +inf (or f(a) > 0) at a, <= 0 at c
        tau = 0.5 * (a + c)
        for _ in range(200):
            f, df = _secular_f(tau, delta, W)
            if f > 0.0:
                a = tau
            else:
                c = tau
            step = f / df if df < 0.0 else 0.0
            t_new = tau - step
            if not (a < t_new < c) or step == 0.0:
                t_new = 0.5 * (a + c)
            # converged to full relative accuracy in tau (so mu - b_j is accurate too)
            if abs(t_new - tau) <= 4e-16 * abs(t_new) or c - a <= 4e-16 * max(abs(a), abs(c)):
                tau = t_new
                break
            tau = t_new
        mu[m] = org + tau
        origin[m] = org
        tau_out[m] = tau


@njit(cache=True, nogil=True)
def _coeffs_kernel(b, FU, VD, W, origin, tau, out):
    """out[m] = 1/2 [sum_j FU_j / (mu_m - b_j)] [sum_j VD_j / (mu_m - b_j)] / [sum_j W_j / (mu_m - b_j)^2]."""
    n = b.size
    for m in range(tau.size):
        fu = 0.0
        num = 0.0
        den = 0.0
        for j in range(n):
            r = 1.0 / (tau[m] - (b[j] - origin[m]))
            fu += FU[j] * r
            num += VD[j] * r
            den += W[j] * r * r
        out[m] = 0.5 * fu * num / den


def _merge_poles(a, uv, *weights):
    """Sort the diagonal, merge equal entries (adding each weight array); drop zero ``uv``."""
    order = np.argsort(a, kind="stable")
    a, uv = a[order], uv[order]
    scale = max(1.0, float(np.max(np.abs(a))))
    new = np.concatenate([[True], np.diff(a) > 4e-16 * scale])
    idx = np.flatnonzero(new)
    keep = np.add.reduceat(uv, idx) > 0
    merged = [np.ascontiguousarray(np.add.reduceat(x, idx)[keep]) for x in (uv,) + tuple(w[order] for w in weights)]
    return (np.ascontiguousarray(a[idx][keep]), *merged)


@validate(a=Array(1), u=Array(1), v=Array(1), delta=Array(1), f=Maybe(Array(1)))
def loss_modes(a, u, v, delta, f=None):
    """Rates and coefficients of f^T (s_k - s_inf) / 2 = sum_m gamma_m mu_m^k for
    s' = (diag(a) + u v^T) s + c; f defaults to v (the loss v^T s / 2).

    Args:
        a, u, v: ``(d,)`` with u_i v_i >= 0.
        delta: ``(d,)`` s_0 - s_inf.
        f: optional ``(d,)`` read-out weights.

    Returns:
        ``(mu, gamma)``, each ``(n,)`` with n <= d.  Eigen-directions of the matrix that u and v do
        not see (equal a_i) are left out; they move s but not v^T s, and f must be a multiple
        of v on each group of equal a_i for the result to be complete (true for f = v and for
        f_i = g(a_i) v_i).
    """
    a = np.asarray(a, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    f = v if f is None else np.asarray(f, dtype=np.float64)
    for name, x in (("u", u), ("v", v), ("delta", delta), ("f", f)):
        if x.shape != a.shape:
            raise ValueError(f"`{name}` must be of the shape of `a` {a.shape}; got {x.shape}.")
    if np.any(u * v < 0):
        raise ValueError("`u` must be of the sign of `v` in every entry (u_i v_i >= 0).")
    mu, (gamma,) = _modes_of_readouts(a, u, v, np.asarray(delta, dtype=np.float64), (f,))
    return mu, gamma


def _modes_of_readouts(a, u, v, delta, reads):
    """:func:`loss_modes` for several read-outs f at once, the roots mu found once: ``(mu, gammas)``
    with one ``(n,)`` gamma per entry of ``reads`` (each ``(d,)``).  Arrays as float64, unchecked."""
    b, W, VD, *FUs = _merge_poles(a, u * v, v * delta, *(f * u for f in reads))
    mu, origin, tau = np.empty(b.size), np.empty(b.size), np.empty(b.size)
    _roots_kernel(b, W, mu, origin, tau)
    gammas = []
    for FU in FUs:
        gammas.append(np.empty(b.size))
        _coeffs_kernel(b, FU, VD, W, origin, tau, gammas[-1])
    return mu, gammas
