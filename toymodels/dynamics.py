"""Exact second-moment dynamics of per-mode linear systems, and an exact first-crossing search.

Every optimizer in :mod:`toymodels.optimizers` is, per eigen-direction i, a linear system
``x' = A_i x + b_i eps`` with ``Var(eps) = q_i`` (q_i = c_i / B for the NQM).  Its second moment
S = E[x x^T] (an ``s x s`` matrix, s <= 3) obeys

    S' = A S A^T + q b b^T,

and the loss is ``L = sum_i h_i / 2 * S_i[r, r]`` with r the readout entry.  This module provides

* :func:`propagate` -- step by step, for any learning-rate sequence (schedules);
* :func:`propagate_varying` -- step by step for systems that change at every update through a weight
  c_k besides the learning rate (uniform iterate averaging, schedule-free SGD):
  A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1);
* :func:`jump` -- k steps at once by binary powering of the pair (A^m, Q_m), exact and stable for
  any small A;
* :class:`ModalForm` -- the closed form for a constant learning rate.  With A = V diag(lam) V^-1,

      L_k = L_inf + Re sum_i sum_{j<=l} C_ijl (lam_ij lam_il)^k,

  a sum of (possibly complex) exponentials, so L_k costs O(d s^2) for any k.  Modes whose
  eigenvectors are ill-conditioned (near-repeated eigenvalues, e.g. critically damped momentum)
  are *flagged* and evaluated by :func:`jump` instead, so no accuracy is lost there.
* :meth:`ModalForm.first_crossing` -- the first k with L_k <= target, exact for non-monotone
  curves (see its docstring for the guarantee).

Shapes: d modes, s state entries per mode; A ``(d, s, s)``, b ``(d, s)``, q ``(d,)``, S ``(d, s, s)``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .schedules import batch_sizes_at, check_batch_values, schedule_segments

__all__ = ["propagate", "propagate_schedule", "propagate_varying", "merged_segments", "schedule_segments", "jump", "ModalForm", "lyapunov",
           "loss_at", "loss_at_parts"]

_COND_LIMIT = 1e4  # eigenvector condition number above which a 1- or 2-state mode is flagged
# 3-state modes have only the loose Henrici bound when flagged, so they stay modal up to a larger
# condition number (measured error of the modal values <= 1e-8 relative, see the tests)
_COND_LIMIT_3 = 1e6
# Below this many modes the serial kernels run: thread start-up eats most of the gain (measured on
# 2 cores: the parallel first crossing is 1.75x faster at 2e4 modes on a quiet machine, no faster
# under load), and the parallel entry points cost about 15 s of extra compile on first use.
_PARALLEL_MIN_MODES = 32768
_WORK_LIMIT = 2e8  # branch-and-bound budget in (nodes x modes) before first_crossing gives up


# --------------------------------------------------------------------------------------------------
# step-by-step and k-at-once propagation (real arithmetic, any small A)
# --------------------------------------------------------------------------------------------------
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
def _matmul(P, R, out):
    s = P.shape[0]
    for i in range(s):
        for j in range(s):
            acc = 0.0
            for k in range(s):
                acc += P[i, k] * R[k, j]
            out[i, j] = acc


@njit(cache=True, nogil=True)
def _propagate_kernel(A0, A1, b1, q, q_self, q_loss, h, r, lrs, bss, record, S, out_loss, out_gsq):
    """Step S through len(lrs) updates; record loss and sum h^2 E[theta^2] at steps in ``record``.

    The noise variance of mode i at a step is q_i + q_self_i E[theta_i^2] + q_loss_i sum_j h_j E[theta_j^2]
    (the last two are zero for the NQM; linear regression's fourth moments give them).  With batch
    sizes ``bss`` (one per update; empty: none) q, q_self and q_loss are per-example and update k
    divides each by bss[k] (the same rounding as dividing them beforehand for a constant B).
    """
    d, s = b1.shape
    n = lrs.size
    A = np.empty((s, s))
    T = np.empty((s, s))
    coupled = False
    for i in range(d):
        if q_self[i] != 0.0 or q_loss[i] != 0.0:
            coupled = True
            break
    j = 0
    n_rec = record.size
    for k in range(n + 1):
        if j < n_rec and record[j] == k:
            loss = 0.0
            gsq = 0.0
            for i in range(d):
                loss += 0.5 * h[i] * S[i, r, r]
                gsq += h[i] * h[i] * S[i, 0, 0]
            out_loss[j] = loss
            out_gsq[j] = gsq
            j += 1
        if k == n:
            break
        lr = lrs[k]
        g2 = 0.0
        if coupled:
            for i in range(d):
                g2 += h[i] * S[i, 0, 0]
        for i in range(d):
            for u in range(s):
                for v in range(s):
                    A[u, v] = A0[i, u, v] + lr * A1[i, u, v]
            if bss.size == 0:
                qi = (q[i] + q_self[i] * S[i, 0, 0] + q_loss[i] * g2) * lr * lr
            else:
                bk = bss[k]
                qi = (q[i] / bk + (q_self[i] / bk) * S[i, 0, 0] + (q_loss[i] / bk) * g2) * lr * lr
            _sandwich(A, S[i], T)
            for u in range(s):
                for v in range(s):
                    S[i, u, v] = T[u, v] + qi * b1[i, u] * b1[i, v]


def propagate(A0, A1, b1, q, h, readout, lrs, record, S, *, q_self=None, q_loss=None, batch=None):
    """Propagate second moments through the updates ``lrs`` (one learning rate per update).

    Args:
        A0, A1, b1: the optimizer's affine per-mode system, shapes ``(d,s,s)``, ``(d,s,s)``, ``(d,s)``.
        q: noise variance per mode and step, ``(d,)``.
        h: curvature ``(d,)``.
        readout: index of the state entry the loss is read at.
        lrs: ``(n,)`` learning rates of updates 0..n-1.
        record: sorted int64 steps in [0, n] at which to record.
        S: ``(d, s, s)`` second moments at step 0; overwritten with those at step n.
        q_self, q_loss: optional ``(d,)``: the noise variance becomes
            q_i + q_self_i E[theta_i^2] + q_loss_i sum_j h_j E[theta_j^2] (state-dependent noise).
        batch: optional ``(n,)`` batch sizes B_k >= 1, one per update: then q, q_self and q_loss are
            per-example (B = 1) and update k uses them divided by B_k.

    Returns:
        ``(loss, grad_sq)``: each ``(len(record),)``; grad_sq = sum_i h_i^2 E[theta_i^2].
    """
    zero = np.zeros(q.shape[0])
    q_self = zero if q_self is None else np.ascontiguousarray(q_self, dtype=np.float64)
    q_loss = zero if q_loss is None else np.ascontiguousarray(q_loss, dtype=np.float64)
    lrs = np.asarray(lrs, np.float64)
    bss = np.empty(0) if batch is None else np.ascontiguousarray(batch, dtype=np.float64)
    if bss.size and bss.size != lrs.size:
        raise ValueError(f"`batch` must have one batch size per update ({lrs.size}); got {bss.size}.")
    out_loss = np.empty(record.size)
    out_gsq = np.empty(record.size)
    _propagate_kernel(A0, A1, b1, q, q_self, q_loss, h, int(readout), lrs, bss, record, S, out_loss, out_gsq)
    return out_loss, out_gsq


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
def _jump_mode(A, b, q, S, k, out):
    """out = A^k S A^kT + q sum_{j<k} A^j b b^T A^jT by binary powering (exact, stable)."""
    s = A.shape[0]
    Pr = np.eye(s)
    Qr = np.zeros((s, s))
    Pb = A.copy()
    Qb = np.empty((s, s))
    for u in range(s):
        for v in range(s):
            Qb[u, v] = q * b[u] * b[v]
    T = np.empty((s, s))
    P2 = np.empty((s, s))
    while k > 0:
        if k & 1:
            _sandwich(Pb, Qr, T)
            _set_sum(Qr, T, Qb)
            _matmul(Pb, Pr, P2)
            _set(Pr, P2)
        k >>= 1
        if k > 0:
            _sandwich(Pb, Qb, T)
            _set_sum(Qb, Qb, T)
            _matmul(Pb, Pb, P2)
            _set(Pb, P2)
    _sandwich(Pr, S, T)
    _set_sum(out, T, Qr)


@njit(cache=True, nogil=True)
def _jump_kernel(A, b, q, S, k, out):
    for i in range(A.shape[0]):
        _jump_mode(A[i], b[i], q[i], S[i], k, out[i])


def jump(A, b, q, S, k):
    """Second moments after k constant-lr steps: ``A^k S A^kT + sum_{j<k} A^j (q b b^T) A^jT``.

    Shapes as in the module docstring; returns a new ``(d, s, s)`` array.
    """
    out = np.empty_like(S)
    _jump_kernel(A, b, q, S, int(k), out)
    return out


MAX_SCAN_UPDATES = 10**9  # step-by-step updates of a schedule that keeps changing (per curve)
MAX_SCAN_WORK = 2e10  # ... and updates x modes (about a minute); beyond either, propagate_schedule refuses
_SCAN_CHUNK = 1 << 16  # learning rates computed at a time (no per-step arrays of the whole curve)
_PROGRESS_MIN = 10**6  # step-by-step updates above which progress=None shows a bar


def merged_segments(schedule, batch, end: int):
    """Split updates 0..end-1 into ``(start, stop, lr, batch_size)`` segments on which the learning-rate
    ``schedule`` and the batch-size schedule ``batch`` are both constant (``lr`` and ``batch_size``
    floats) or on which one of them changes at every update (that one ``None``): the change points of
    the two merged.  Adjacent constant pieces of ``batch`` with the same value are one piece (so a
    constant batch-size schedule splits nothing).  ``batch`` None: ``batch_size`` 1.0 throughout."""
    lsegs = schedule_segments(schedule, end)
    if batch is None:
        return [(a, b, lr, 1.0) for a, b, lr in lsegs]
    bsegs = []
    for a, b, v in schedule_segments(batch, end):
        if v is not None and bsegs and bsegs[-1][2] == v and bsegs[-1][1] == a:
            bsegs[-1] = (bsegs[-1][0], b, v)
        else:
            bsegs.append((a, b, v))
    fixed = [(a, v) for a, _, v in bsegs if v is not None]
    if fixed:
        check_batch_values([v for _, v in fixed], [a for a, _ in fixed])
    out = []
    i = j = 0
    while i < len(lsegs) and j < len(bsegs):
        a = max(lsegs[i][0], bsegs[j][0])
        b = min(lsegs[i][1], bsegs[j][1])
        if b > a:
            out.append((a, b, lsegs[i][2], bsegs[j][2]))
        if lsegs[i][1] <= bsegs[j][1]:
            i += 1
        else:
            j += 1
    return out


def propagate_schedule(A0, A1, b1, q, h, readout, schedule, record, S, *, q_self=None, q_loss=None,
                       progress=None, name: str = "steps", batch=None):
    """:func:`propagate` through a learning-rate schedule without per-step arrays of the whole curve.

    Constant pieces are jumped over in closed form (:func:`jump`, O(log k) per record) when the noise
    does not depend on the state (``q_self``, ``q_loss`` None); the other updates are stepped in
    chunks of 2^16, with a tqdm bar (``progress`` True; None: when more than 10^6 updates are stepped).

    ``batch`` (optional) is a batch-size schedule (any :class:`toymodels.schedules.Schedule` with
    values >= 1): then ``q``, ``q_self`` and ``q_loss`` are per-example (B = 1) and update k uses them
    divided by B_k.  A piece is jumped where both the learning rate and the batch size are constant
    (:func:`merged_segments`); on it the noise is q / B, computed once, so a constant batch-size
    schedule gives bit for bit the result of ``q / B`` without ``batch``.

    Raises:
        ValueError: naming ``name`` (the record steps' argument) when more than
            :data:`MAX_SCAN_UPDATES` updates, or more than :data:`MAX_SCAN_WORK` updates x modes,
            would have to be stepped one at a time; naming ``batch_size`` when a batch size is not in
            [1, 2^53].

    Returns:
        ``(loss, grad_sq)`` at ``record`` as :func:`propagate`; ``S`` is left at step ``record[-1]``.
    """
    record = np.asarray(record, dtype=np.int64)
    end = int(record[-1])
    coupled = q_self is not None or q_loss is not None
    segs = merged_segments(schedule, batch, end)
    n_scan = sum(b - a for a, b, lr, bs in segs if lr is None or bs is None or coupled)
    d = q.shape[0]
    if n_scan > MAX_SCAN_UPDATES or n_scan * d > MAX_SCAN_WORK:
        what = "learning rate" if batch is None else "learning rate or the batch size"
        raise ValueError(
            f"`{name}` must be reached within {MAX_SCAN_UPDATES:.0e} step-by-step updates (and {MAX_SCAN_WORK:.0e} "
            f"updates x modes) where the {what} keeps changing; got {n_scan} updates x {d} modes up to "
            f"step {end}. Use a piecewise-constant schedule or one that becomes constant earlier (its constant "
            f"part is computed in closed form), or fewer steps."
        )
    bar = None
    if progress or (progress is None and n_scan > _PROGRESS_MIN):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_scan, desc="loss curve", unit="step")
    loss = np.empty(record.size)
    gsq = np.empty(record.size)
    j = 0
    k_cur = 0
    r = int(readout)

    def read(m):
        loss[m] = 0.5 * np.sum(h * S[:, r, r])
        gsq[m] = np.sum(h**2 * S[:, 0, 0])

    def per_batch(x, bs):
        return x if x is None or batch is None else x / bs

    try:
        with np.errstate(over="ignore", invalid="ignore"):
            if not segs:  # record == [0]
                read(0)
                return loss, gsq
            for a, stop, lr, bs in segs:
                if bs is not None:  # the noise of this piece (q itself without a batch schedule)
                    qa, qsa, qla = per_batch(q, bs), per_batch(q_self, bs), per_batch(q_loss, bs)
                if lr is not None and bs is not None and not coupled:
                    A, b = A0 + lr * A1, lr * b1
                    while j < record.size and record[j] <= stop:
                        S[:] = jump(A, b, qa, S, int(record[j]) - k_cur)
                        k_cur = int(record[j])
                        read(j)
                        j += 1
                    if k_cur < stop:
                        S[:] = jump(A, b, qa, S, stop - k_cur)
                        k_cur = stop
                    continue
                while k_cur < stop:
                    k1 = min(stop, k_cur + _SCAN_CHUNK)
                    lrs = np.full(k1 - k_cur, lr) if lr is not None else schedule.at(np.arange(k_cur, k1))
                    hi = np.searchsorted(record, k1, side="right")
                    rec = record[j:hi] - k_cur
                    if bs is None:  # the batch size changes at every update: per-example noise / B_k
                        out_l, out_g = propagate(A0, A1, b1, q, h, r, lrs, rec, S, q_self=q_self, q_loss=q_loss,
                                                 batch=batch_sizes_at(batch, np.arange(k_cur, k1)))
                    else:
                        out_l, out_g = propagate(A0, A1, b1, qa, h, r, lrs, rec, S, q_self=qsa, q_loss=qla)
                    loss[j:hi], gsq[j:hi] = out_l, out_g
                    j = hi
                    if bar is not None:
                        bar.update(k1 - k_cur)
                    k_cur = k1
    finally:
        if bar is not None:
            bar.close()
    return loss, gsq


@njit(cache=True, nogil=True)
def _propagate_varying_kernel(P0, P1, Q0, Q1, R0, R1, q, h, r, lrs, cs, bss, record, S, out_loss, out_gsq):
    """Step S through len(lrs) updates of A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1)
    with noise variance q (divided by bss[k] where ``bss`` is not empty); record the loss (read at r)
    and sum h^2 E[x_0^2] at the steps in ``record`` (relative to the first update)."""
    d, s = R0.shape
    n = lrs.size
    A = np.empty((s, s))
    T = np.empty((s, s))
    bk = np.empty(s)
    j = 0
    n_rec = record.size
    for k in range(n + 1):
        if j < n_rec and record[j] == k:
            loss = 0.0
            gsq = 0.0
            for i in range(d):
                loss += 0.5 * h[i] * S[i, r, r]
                gsq += h[i] * h[i] * S[i, 0, 0]
            out_loss[j] = loss
            out_gsq[j] = gsq
            j += 1
        if k == n:
            break
        lr = lrs[k]
        c = cs[k]
        for i in range(d):
            for u in range(s):
                bk[u] = lr * (R0[i, u] + c * R1[i, u])
                for v in range(s):
                    A[u, v] = P0[i, u, v] + c * P1[i, u, v] + lr * (Q0[i, u, v] + c * Q1[i, u, v])
            qi = q[i] if bss.size == 0 else q[i] / bss[k]
            _sandwich(A, S[i], T)
            for u in range(s):
                for v in range(s):
                    S[i, u, v] = T[u, v] + qi * bk[u] * bk[v]


def propagate_varying(parts, coefficients, q, h, readout, schedule, record, S, *, k_start: int = 0, batch=None,
                      progress=None, name: str = "steps"):
    """Second moments of a system that changes at every update, stepped one update at a time.

    Args:
        parts: ``(P0, P1, Q0, Q1, R0, R1)`` (shapes ``(d, s, s)`` x 4, ``(d, s)`` x 2) of
            :meth:`toymodels.optimizers.Optimizer.parts`: update k uses A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1)
            and b_k = lr_k (R0 + c_k R1).
        coefficients: callable, update indices (int64 array) -> c_k (same shape).
        q: ``(d,)`` noise variance per step (per example when ``batch`` is given).
        h: ``(d,)`` curvature; readout: the state entry the loss is read at.
        schedule: the learning-rate :class:`toymodels.schedules.Schedule` (``at(k)``).
        record: sorted int64 steps >= ``k_start`` at which to record.
        S: ``(d, s, s)`` second moments at step ``k_start``; left at step ``record[-1]``.
        k_start: the step S is at.
        batch: optional batch-size schedule (update k divides q by B_k).
        progress: a tqdm bar (None: above 10^6 updates).
        name: the argument named when the work exceeds :data:`MAX_SCAN_UPDATES` / :data:`MAX_SCAN_WORK`.

    Returns:
        ``(loss, grad_sq)`` at ``record``, each ``(len(record),)``.
    """
    record = np.asarray(record, dtype=np.int64)
    end = int(record[-1])
    n_scan = end - k_start
    d = q.shape[0]
    if n_scan > MAX_SCAN_UPDATES or n_scan * d > MAX_SCAN_WORK:
        raise ValueError(
            f"`{name}` must be reached within {MAX_SCAN_UPDATES:.0e} step-by-step updates (and {MAX_SCAN_WORK:.0e} "
            f"updates x modes) for an optimizer whose averaging weight changes at every update; got {n_scan} "
            f"updates x {d} modes."
        )
    parts = tuple(np.ascontiguousarray(x, dtype=np.float64) for x in parts)
    q = np.ascontiguousarray(q, dtype=np.float64)
    bar = None
    if progress or (progress is None and n_scan > _PROGRESS_MIN):
        from tqdm.auto import tqdm

        bar = tqdm(total=n_scan, desc="loss curve", unit="step")
    loss = np.empty(record.size)
    gsq = np.empty(record.size)
    j = 0
    k_cur = k_start
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            while True:
                k1 = min(end, k_cur + _SCAN_CHUNK)
                idx = np.arange(k_cur, k1)
                lrs = np.ascontiguousarray(schedule.at(idx), dtype=np.float64)
                cs = np.ascontiguousarray(coefficients(idx), dtype=np.float64)
                bss = np.empty(0) if batch is None else batch_sizes_at(batch, idx)
                hi = int(np.searchsorted(record, k1, side="right"))
                rec = record[j:hi] - k_cur
                out_l, out_g = np.empty(rec.size), np.empty(rec.size)
                _propagate_varying_kernel(*parts, q, h, int(readout), lrs, cs, bss, rec, S, out_l, out_g)
                loss[j:hi], gsq[j:hi] = out_l, out_g
                j = hi
                if bar is not None:
                    bar.update(k1 - k_cur)
                k_cur = k1
                if k_cur >= end:
                    break
    finally:
        if bar is not None:
            bar.close()
    return loss, gsq


@njit(cache=True, nogil=True)
def _lyapunov_mode(A, b, q, out):
    """Stationary S = A S A^T + q b b^T by doubling (requires spectral radius < 1)."""
    s = A.shape[0]
    P = A.copy()
    Q = np.empty((s, s))
    for u in range(s):
        for v in range(s):
            Q[u, v] = q * b[u] * b[v]
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



# --------------------------------------------------------------------------------------------------
# the (g, s) form of 2x2 powers, for flagged modes:  A^k = g_k I + s_k N,  N = A - c I,  c = tr(A) / 2
# --------------------------------------------------------------------------------------------------
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

# --------------------------------------------------------------------------------------------------
# modal closed form for a constant learning rate
# --------------------------------------------------------------------------------------------------
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


@njit(inline="always")
def _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                         max_nodes, k_split, n_blocks):
    """Depth-first branch and bound over [k_lo, k_hi]; returns the first k with L_k <= target or -1
    (-2: more than ``max_nodes`` nodes).  The root is split at ``k_split`` if it lies inside
    (k_lo, k_hi], else at its midpoint.  Inlined into a serial and a parallel entry point, whose
    ``prange`` loops over modes (bounds, leaf values in ``n_blocks`` blocks) run on one thread or all."""
    stack_a = np.empty(256, dtype=np.int64)
    stack_b = np.empty(256, dtype=np.int64)
    if k_lo < k_split <= k_hi:
        stack_a[0], stack_b[0] = k_split, k_hi
        stack_a[1], stack_b[1] = k_lo, k_split - 1
        top = 2
    else:
        stack_a[0], stack_b[0] = k_lo, k_hi
        top = 1
    vals = np.empty(leaf)
    nodes = 0
    while top > 0:
        nodes += 1
        if nodes > max_nodes:
            return -2
        top -= 1
        a = stack_a[top]
        bb = stack_b[top]
        lb = _bound_sum(lam, C, linf, flag, rho, nu, dnorm, gsq, h, a, bb)
        if lb > target:
            continue
        if bb - a + 1 <= leaf:
            n = bb - a + 1
            _values_range_blocks(lam, C, linf, flag, gsq, A, b, q, h, r, S0, a, vals[:n], n_blocks)
            for m in range(n):
                if vals[m] <= target:
                    return a + m
            continue
        mid = a + (bb - a) // 2
        stack_a[top] = mid + 1
        stack_b[top] = bb
        stack_a[top + 1] = a
        stack_b[top + 1] = mid
        top += 2
    return -1


# Why two entry points and no runtime ``parallel`` switch: a cached function that *calls* a
# ``parallel=True`` function is unsafe in numba (0.58-0.62 at least).  When the caller is compiled in a
# process that loaded the callee from the cache, the callee's library comes back without its
# ``_reload_init`` hooks (they live in the compile result, not the library), so the caller's cache
# entry records none; a later process loads the caller, never starts the threading layer, and the
# first parallel launch segfaults (numba issues #8578 and #4807).  An interrupted first compile
# (callees cached, caller not) leaves exactly that state.  Here every ``parallel=True`` function
# is an entry point called from Python, with its ``prange`` loops inlined into it, so its own cache
# entry carries the hook; serial entry points reach no parallel code, and compile none of it.
@njit(cache=True, nogil=True)
def _first_crossing_serial(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                           max_nodes, k_split):
    return _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi,
                                leaf, max_nodes, k_split, 1)


@njit(cache=True, nogil=True, parallel=True)
def _first_crossing_parallel(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi, leaf,
                             max_nodes, k_split):
    return _first_crossing_body(lam, C, linf, flag, rho, nu, dnorm, gsq, A, b, q, h, r, S0, target, k_lo, k_hi,
                                leaf, max_nodes, k_split, 16)


class ModalForm:
    """Closed-form loss curve of a constant-learning-rate linear system started from ``S0``.

    Args:
        A: ``(d, s, s)`` per-mode transition (s <= 3; the 3x3 case block lower-triangular).
        b: ``(d, s)`` noise loadings.
        q: ``(d,)`` noise variance per step.
        h: ``(d,)`` curvature (the loss is sum_i h_i/2 E[x_i[readout]^2]).
        readout: index of the state entry read by the loss.
        S0: ``(d, s, s)`` second moments at step 0.

    Attributes:
        stable: every mode has spectral radius < 1.
        loss_inf: the stationary loss (noise floor), ``inf`` if unstable.
        n_flagged: modes evaluated by exact powering instead of the closed form.
    """

    def __init__(self, A, b, q, h, readout, S0):
        self.A = np.ascontiguousarray(A, dtype=np.float64)
        self.b = np.ascontiguousarray(b, dtype=np.float64)
        self.q = np.ascontiguousarray(q, dtype=np.float64)
        self.h = np.ascontiguousarray(h, dtype=np.float64)
        self.S0 = np.ascontiguousarray(S0, dtype=np.float64)
        self.readout = int(readout)
        d, s = self.b.shape
        self.lam = np.zeros((d, s), dtype=np.complex128)
        self.C = np.zeros((d, s, s), dtype=np.complex128)
        self.linf = np.zeros(d)
        self.flag = np.zeros(d, dtype=np.bool_)
        self.rho = np.zeros(d)
        self.nu = np.zeros(d)
        self.dnorm = np.zeros(d)
        self.gsq = np.zeros((d, 6))
        _modal_setup_kernel(
            self.A, self.b, self.q, self.h, self.readout, self.S0,
            self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
        )
        self.stable = bool(np.all(self.rho < 1.0))
        self.loss_inf = float(np.sum(self.linf)) if self.stable else math.inf
        self.n_flagged = int(np.sum(self.flag))

    def loss(self, ks) -> np.ndarray:
        """Exact expected loss at the sorted int64 steps ``ks``, shape ``(len(ks),)``."""
        ks = np.ascontiguousarray(ks, dtype=np.int64)
        out = np.empty(ks.size)
        _modal_values_kernel(
            self.lam, self.C, self.linf, self.flag, self.gsq, self.A, self.b, self.q, self.h,
            self.readout, self.S0, ks, out,
        )
        return out

    def lower_bound(self, a: int, b: int | None = None) -> float:
        """A lower bound on L_k for all k in [a, b] (b None: infinity)."""
        bound = _lower_bound if self.h.size >= _PARALLEL_MIN_MODES else _lower_bound_serial
        return float(
            bound(self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
                  self.h, int(a), -1 if b is None else int(b))
        )

    def first_crossing(self, target: float, k_max: int, *, leaf: int = 32, guess: int | None = None) -> int:
        """The first k in [0, k_max] with L_k <= target, or -1 if there is none.

        ``guess`` (optional) is where the crossing is expected: the search first tries to rule out
        all of [0, guess - 1] with one bound, which saves most of the work when the guess is a little
        early.  The answer does not depend on it.

        Exact for non-monotone curves: the loss is a finite sum of exponentials with known rates, so
        for any interval of steps [a, b] :meth:`lower_bound` gives a rigorous lower bound (monotone
        terms at the end that minimises them, oscillating ones at minus their envelope). A
        depth-first branch and bound discards every interval whose bound exceeds ``target`` and
        evaluates the exact loss at every step of the surviving intervals of at most ``leaf`` steps,
        left to right, so the first crossing cannot be skipped, whatever the shape of the curve.
        Requires a stable system (every mode with spectral radius < 1).

        Raises:
            RuntimeError: the search exceeded its budget (about 2e8 mode-bound evaluations), which
                only flagged 3-state modes with their loose Henrici bounds can cause; never a wrong
                answer.
        """
        if not self.stable:
            raise ValueError("first_crossing needs a stable system (spectral radius < 1).")
        kernel = _first_crossing_parallel if self.h.size >= _PARALLEL_MIN_MODES else _first_crossing_serial
        k = int(
            kernel(
                self.lam, self.C, self.linf, self.flag, self.rho, self.nu, self.dnorm, self.gsq,
                self.A, self.b, self.q, self.h, self.readout, self.S0,
                float(target), 0, int(k_max), int(leaf),
                max(10_000, int(_WORK_LIMIT // self.h.size)), -1 if guess is None else int(guess),
            )
        )
        if k == -2:
            raise RuntimeError(
                "first_crossing gave up: the interval bounds of flagged 3-state modes (momentum with "
                "iterate averaging whose decay nearly equals an eigenvalue of the base optimizer) are "
                "too loose to prune; try a decay a little further from the momentum."
            )
        return k


# --------------------------------------------------------------------------------------------------
# fused loss at one step (the tuner's inner loop): closed forms for s <= 2, no eigenvectors
# --------------------------------------------------------------------------------------------------
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


@njit(cache=True, nogil=True, parallel=True)
def _start_threads(x):
    """A trivial parallel kernel: running it starts numba's threading layer."""
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


def _ensure_threading_layer() -> str:
    """The name of numba's threading layer in this process, running a tiny parallel kernel first
    if none has run yet (the layer is chosen at the first parallel launch)."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        _start_threads(np.ones(2))
        return numba.threading_layer()


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
