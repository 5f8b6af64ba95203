"""Step-by-step propagation of second moments, S' = A S A^T + q b b^T, for any learning-rate (and
batch-size) sequence, and k steps at once by binary powering (:func:`jump`).

Shapes: d modes, s <= 3 state entries per mode; A ``(d, s, s)``, b ``(d, s)``, q ``(d,)``, S ``(d, s, s)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..schedules import batch_sizes_at, check_batch_values, schedule_segments
from ._kernels import _matmul, _noise, _sandwich, _set, _set_sum, _varying_transition

__all__ = ["propagate", "jump", "MAX_SCAN_UPDATES", "MAX_SCAN_WORK", "merged_segments", "propagate_schedule",
           "propagate_varying"]


@njit(cache=True, nogil=True)
def _record_moments(S, h, r, out_loss, out_gsq, j):
    """Record the loss sum_i h_i S[i, r, r] / 2 (read at state entry r) and sum_i h_i^2 S[i, 0, 0] at
    slot j."""
    loss = 0.0
    gsq = 0.0
    for i in range(h.size):
        loss += 0.5 * h[i] * S[i, r, r]
        gsq += h[i] * h[i] * S[i, 0, 0]
    out_loss[j] = loss
    out_gsq[j] = gsq


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
            _record_moments(S, h, r, out_loss, out_gsq, j)
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
def _jump_mode(A, b, q, S, k, out):
    """out = A^k S A^kT + q sum_{j<k} A^j b b^T A^jT by binary powering (exact, stable)."""
    s = A.shape[0]
    Pr = np.eye(s)
    Qr = np.zeros((s, s))
    Pb = A.copy()
    Qb = np.empty((s, s))
    _noise(q, b, Qb)
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
def _propagate_varying_kernel(P0, P1, Q0, Q1, R0, R1, q, q_self, q_loss, h, r, lrs, cs, bss, record, S, out_loss,
                              out_gsq):
    """Step S through len(lrs) updates of A_k = P0 + c_k P1 + lr_k (Q0 + c_k Q1), b_k = lr_k (R0 + c_k R1);
    record the loss (read at r) and sum h^2 E[x_0^2] at the steps in ``record`` (relative to the first
    update).

    The noise variance of mode i at update k is q_i + q_self_i E[x_i0^2] + q_loss_i sum_j h_j E[x_j0^2],
    read at the gradient entry 0 before the update (the last two zero for the NQM; linear regression's
    fourth moments give them), each divided by bss[k] where ``bss`` is not empty.
    """
    d, s = R0.shape
    n = lrs.size
    A = np.empty((s, s))
    T = np.empty((s, s))
    bk = np.empty(s)
    coupled = False
    for i in range(d):
        if q_self[i] != 0.0 or q_loss[i] != 0.0:
            coupled = True
            break
    j = 0
    n_rec = record.size
    for k in range(n + 1):
        if j < n_rec and record[j] == k:
            _record_moments(S, h, r, out_loss, out_gsq, j)
            j += 1
        if k == n:
            break
        lr = lrs[k]
        c = cs[k]
        g2 = 0.0
        if coupled:
            for i in range(d):
                g2 += h[i] * S[i, 0, 0]
        for i in range(d):
            _varying_transition(P0, P1, Q0, Q1, R0, R1, i, lr, c, A, bk)
            if bss.size == 0:
                qi = q[i]
                if coupled:
                    qi += q_self[i] * S[i, 0, 0] + q_loss[i] * g2
            else:  # per example / B_k, rounded as propagate does
                bb = bss[k]
                qi = q[i] / bb
                if coupled:
                    qi += (q_self[i] / bb) * S[i, 0, 0] + (q_loss[i] / bb) * g2
            _sandwich(A, S[i], T)
            for u in range(s):
                for v in range(s):
                    S[i, u, v] = T[u, v] + qi * bk[u] * bk[v]


def propagate_varying(parts, coefficients, q, h, readout, schedule, record, S, *, k_start: int = 0, batch=None,
                      progress=None, name: str = "steps", q_self=None, q_loss=None):
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
        q_self, q_loss: optional ``(d,)``: state-dependent noise as in :func:`propagate`, the variance of
            update k being q_i + q_self_i E[x_i0^2] + q_loss_i sum_j h_j E[x_j0^2] with the moments of
            entry 0 (the gradient point) before the update (per example when ``batch`` is given).

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
    zero = np.zeros(d)
    q_self = zero if q_self is None else np.ascontiguousarray(q_self, dtype=np.float64)
    q_loss = zero if q_loss is None else np.ascontiguousarray(q_loss, dtype=np.float64)
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
                _propagate_varying_kernel(*parts, q, q_self, q_loss, h, int(readout), lrs, cs, bss, rec, S, out_l,
                                          out_g)
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
