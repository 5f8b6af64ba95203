"""Schedule-free SGD on the NQM stepped in two states per mode, with an early exit at the target.

Per mode, with y = (1 - beta) z + beta x the gradient point, schedule-free SGD (Defazio et al. 2024,
Section 2) is

    z' = p z + r x - lr eps,   p = 1 - lr (h + wd)(1 - beta),   r = -lr (h + wd) beta,
    x' = (1 - c_k) x + c_k z',  c_k = 1 / (k + 2) (uniform averaging) or 1 (none),

so the second moments (zz, zx, xx) step as (g = q lr^2, the noise of z')

    E[z' x] = p zx + r xx,   zz' = p^2 zz + 2 p r zx + r^2 xx + g,
    zx' = (1 - c) E[z' x] + c zz',   xx' = (1 - c)^2 xx + 2 c (1 - c) E[z' x] + c^2 zz',

three numbers per mode instead of the nine of the general (y, z, x) system; y is not a state since it
is a fixed combination of z and x.  The weight c_k = 1 / (k + 2) enters the gradient point through
x = (z_0 + ... + z_k) / (k + 1): with the running sum in place of x the system keeps a 1 / (k + 1), so
unlike the Polyak average there is no constant system and the loss is computed one update at a time.

References:
    A. Defazio, X. A. Yang, H. Mehta, K. Mishchenko, A. Khaled, A. Cutkosky, "The Road Less
    Scheduled", NeurIPS 2024, Section 2, equations (1)-(3).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit

# A scan with a positive target stops as diverged once the loss exceeds LOST_GROWTH x target (or x the
# initial loss, if larger, so that a small target does not stop it at step 0): the
# moments' rounding errors are ~1e-16 of the largest loss seen, and past this growth they exceed
# ~1e-6 of the target, so a later "crossing" cannot be trusted (near the stability limit the loss can
# grow by 10^38 in the first hundred updates, while the averaging weight is large, and fall back to a
# spurious value below the target through cancellation).
LOST_GROWTH = 1e-6 / 2.220446049250313e-16

# :func:`scan` steps the moments on all threads from this many modes (below, thread start-up and the
# parallel kernel's compile outweigh the gain), ``PARALLEL_CHUNK`` updates per launch (the first chunk
# serially: a short scan pays no thread start-up), and re-checks serially a chunk whose summed loss
# comes within ``TIE`` (relative) of the target or the divergence limit: a loss of d non-negative terms
# summed in two orders differs by less than d x 2^-52 relative (1e-8 covers d up to ~4 x 10^7).
PARALLEL_MIN_MODES = 4096
PARALLEL_CHUNK = 512
TIE = 1e-8


@njit(cache=True, nogil=True)
def coefficients(h, q, lr, beta, weight_decay=0.0):
    """``(p, r, g)`` of the recursion above for every mode: curvatures ``h`` ``(d,)``, noise variances
    ``q`` ``(d,)`` of one update's gradient (c / B on the NQM), a constant ``lr`` and ``beta``
    (compiled: the tuner forms them thousands of times for a few dozen modes, where NumPy's eight
    array operations cost as long as a scan of a few hundred steps)."""
    hu = h + weight_decay
    return 1.0 - lr * hu * (1.0 - beta), -lr * hu * beta, q * lr * lr


@njit(cache=True, nogil=True, inline="always")
def _loss(h, xx):
    """L = 1/2 sum_i h_i xx_i, summed in four interleaved partial sums (i mod 4) added as
    (s0 + s1) + (s2 + s3): independent additions that the processor overlaps (a single running sum
    waits for each addition in turn; the scans of a d = 10^4 model take 30% less time); a fixed
    order, so the value is reproducible (it differs from the sequential sum in the last bits)."""
    d = h.shape[0]
    s0 = s1 = s2 = s3 = 0.0
    m = d - d % 4
    for i in range(0, m, 4):
        s0 += h[i] * xx[i]
        s1 += h[i + 1] * xx[i + 1]
        s2 += h[i + 2] * xx[i + 2]
        s3 += h[i + 3] * xx[i + 3]
    for i in range(m, d):
        s0 += h[i] * xx[i]
    return 0.5 * ((s0 + s1) + (s2 + s3))


@njit(cache=True, nogil=True)
def _squares(p, r):
    """``(p^2, 2 p r, r^2)`` of every mode: the coefficients of zz' in :func:`_update`, computed once per
    scan (each rounded as in p * p * zz, 2 p r zx and r * r * xx evaluated left to right, so the
    moments are bit for bit those of the products formed at every update)."""
    return p * p, 2.0 * p * r, r * r


@njit(cache=True, nogil=True, inline="always")
def _update(p, r, g, pp, tpr, rr, zz, zx, xx, c):
    """One update of every mode's moments (in place), averaging weight c (the recursion above);
    ``pp, tpr, rr`` from :func:`_squares`."""
    a = (1.0 - c) * (1.0 - c)
    b = 2.0 * c * (1.0 - c)
    cc = c * c
    oc = 1.0 - c
    for i in range(p.shape[0]):
        zxp = p[i] * zx[i] + r[i] * xx[i]
        zzn = pp[i] * zz[i] + tpr[i] * zx[i] + rr[i] * xx[i] + g[i]
        xx[i] = a * xx[i] + b * zxp + cc * zzn
        zx[i] = oc * zxp + c * zzn
        zz[i] = zzn


@njit(cache=True, nogil=True)
def _lost_limit(h, xx, target):
    """The loss above which a scan with this ``target`` stops as diverged, from the moments at its
    first step: ``LOST_GROWTH`` x max(target, L), or inf without a positive target."""
    if target > 0.0:
        return LOST_GROWTH * max(target, _loss(h, xx))
    return math.inf


@njit(cache=True, nogil=True)
def _scan(p, r, g, h, zz, zx, xx, k0, k1, target, uniform):
    """Step the moments ``zz, zx, xx`` ((d,) each, at step k0, updated in place) to step k1 and return
    ``(k, loss)``: k the first step in [k0, k1] with loss <= target (the moments are then at k), -1
    if none (the loss at k1), or -2 if the loss overflowed or (a target > 0) exceeded
    ``LOST_GROWTH`` x max(target, loss at k0) before crossing it."""
    return _scan_below(p, r, g, h, zz, zx, xx, k0, k1, target, uniform, _lost_limit(h, xx, target))


@njit(cache=True, nogil=True)
def _scan_below(p, r, g, h, zz, zx, xx, k0, k1, target, uniform, lost):
    """:func:`_scan` with its divergence limit ``lost`` given (a scan resumed at k0 keeps its first one)."""
    pp, tpr, rr = _squares(p, r)
    k = k0
    while True:
        loss = _loss(h, xx)
        if not math.isfinite(loss) or loss > lost:
            return -2, math.inf
        if loss <= target:
            return k, loss
        if k == k1:
            return -1, loss
        _update(p, r, g, pp, tpr, rr, zz, zx, xx, 1.0 / (k + 2.0) if uniform else 1.0)
        k += 1


@njit(cache=True, nogil=True)
def _advance(p, r, g, h, zz, zx, xx, k0, n, uniform, out):
    """Step the moments (in place) n updates from step k0 (:func:`_update`), the loss at step k0 + j + 1
    in ``out[j]`` (:func:`_loss`); on a block of modes, called with slices."""
    pp, tpr, rr = _squares(p, r)
    for j in range(n):
        _update(p, r, g, pp, tpr, rr, zz, zx, xx, 1.0 / (k0 + j + 2.0) if uniform else 1.0)
        out[j] = _loss(h, xx)


def scan(p, r, g, h, zz, zx, xx, k0, k1, target, uniform, chunk=PARALLEL_CHUNK, n_blocks=None):
    """:func:`_scan`, its moments stepped on all threads for a model of at least ``PARALLEL_MIN_MODES``
    modes (non-negative curvatures) once it runs past its first ``chunk`` updates; same arguments
    and result.

    The threaded part steps blocks of modes side by side, ``chunk`` updates at a time (:func:`_advance`
    releases the GIL; a block's moments stay in its core's cache for the whole chunk).  The moments
    are those of the serial scan bit for bit (every mode's update is the same operations), but the
    loss is the blocks' losses added, another order than :func:`_loss`: a relative difference below
    d x 2^-52 for a loss of non-negative terms.  A chunk in which any step's loss comes within ``TIE``
    (relative) of the target or of the divergence limit, or is not finite, is stepped again serially
    from its start up to that step (the threaded scan going on from there if it was no event), so the
    result is exactly the serial scan's: the same first crossing, the same loss at it (and at k1), the
    same divergence.  ``n_blocks``: threads (default: numba's thread count, at
    most the cores, at least 2048 modes each)."""
    d = h.shape[0]
    if n_blocks is None:
        n_blocks = min(numba.get_num_threads(), os.cpu_count() or 1, d // 2048)
    if d < PARALLEL_MIN_MODES or n_blocks < 2 or k1 - k0 <= chunk or not np.all(h >= 0.0):
        return _scan(p, r, g, h, zz, zx, xx, k0, k1, target, uniform)
    lost = _lost_limit(h, xx, target)
    k, loss = _scan_below(p, r, g, h, zz, zx, xx, k0, k0 + chunk, target, uniform, lost)  # short scans: serial
    if k != -1:
        return k, loss
    k = k0 + chunk
    bounds = np.linspace(0, d, n_blocks + 1).astype(np.int64)
    blocks = [tuple(a[lo:hi] for a in (p, r, g, h, zz, zx, xx)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    out = np.empty((n_blocks, chunk))
    low, high = target * (1.0 + TIE), lost * (1.0 - TIE)
    with ThreadPoolExecutor(n_blocks - 1) as pool:
        while k < k1:
            n = min(chunk, k1 - k)
            start = (zz.copy(), zx.copy(), xx.copy())
            others = [pool.submit(_advance, *blocks[b], k, n, uniform, out[b]) for b in range(1, n_blocks)]
            _advance(*blocks[0], k, n, uniform, out[0])  # the first block on this thread
            for f in others:
                f.result()
            total = out[:, :n].sum(axis=0)
            flagged = np.flatnonzero(~((total > low) & (total < high)))
            if flagged.size:  # an event (or a near tie) at step k + j + 1: serially from k up to it
                zz[:], zx[:], xx[:] = start
                n = int(flagged[0]) + 1
                k_hit, loss = _scan_below(p, r, g, h, zz, zx, xx, k, k + n, target, uniform, lost)
                if k_hit != -1:
                    return k_hit, loss
            k += n
    return _scan_below(p, r, g, h, zz, zx, xx, k1, k1, target, uniform, lost)


@njit(cache=True, nogil=True)
def _padded(a, n):
    """``a`` followed by zeros to length n."""
    out = np.zeros(n)
    out[: a.shape[0]] = a
    return out


@njit(cache=True, nogil=True)
def crossing(p, r, g, h, s0, k_cap, log_target, uniform, lost_growth):
    """The first crossing of the target, as a continuous function of the hyper-parameters (for tuners).

    Steps the moments of :func:`_scan` from zz = zx = xx = ``s0`` (step 0) and returns, with
    l_k = log L_k and the first k <= ``k_cap`` with l_k <= ``log_target``,

        kappa = (k - 1) + (l_{k-1} - log_target) / (l_{k-1} - l_k)      in (k - 1, k]

    (0 if L_0 <= target): the crossing of the log-loss curve interpolated linearly between steps,
    continuous where the curve crosses the target transversally, and ceil(kappa) = k, the exact first
    crossing.  Not reached by ``k_cap``: ``k_cap (1 + l_cap - log_target)``, which joins the crossings
    continuously as L_cap falls to the target and grows with the gap.  ``inf`` if the loss overflows
    or exceeds ``lost_growth`` x max(target, L_0) (:func:`_scan` uses ``LOST_GROWTH``; a tuner passes
    less, to stay clear of the settings that a scan of another model, e.g. the full one, calls diverged).
    Costs min(k, k_cap) updates of the ``(d,)`` modes, stepped as d + (-d mod 4) modes (zeros after
    the d given: the update's vectorised loop then has no scalar remainder, 10% less time on a
    23-mode model) of which the loss sums the first d as :func:`_scan` does, bit for bit.
    """
    d = h.shape[0]
    n = d + (-d) % 4
    p, r, g = _padded(p, n), _padded(r, n), _padded(g, n)
    zz = _padded(s0, n)
    zx = zz.copy()
    xx = zz.copy()
    xs = xx[:d]
    pp, tpr, rr = _squares(p, r)
    target = math.exp(log_target)
    prev = math.inf
    lost = math.inf
    k = 0
    while True:  # logarithms only at the end: a scan of a few modes spends as long on a log as on them
        loss = _loss(h, xs)
        if k == 0:
            lost = lost_growth * max(target, loss)
        if not math.isfinite(loss) or loss <= 0.0 or loss > lost:
            return math.inf
        if loss <= target:
            if k == 0:
                return 0.0
            cur = math.log(loss)
            return (k - 1.0) + (math.log(prev) - log_target) / (math.log(prev) - cur)
        if k >= k_cap:
            return k_cap * (1.0 + math.log(loss) - log_target)
        prev = loss
        _update(p, r, g, pp, tpr, rr, zz, zx, xx, 1.0 / (k + 2.0) if uniform else 1.0)
        k += 1
