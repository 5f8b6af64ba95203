"""The threaded exact scan of schedule-free SGD (``toymodels._schedfree.scan``) against the serial one.

The threaded scan steps blocks of modes side by side and adds the blocks' losses in another order
than the serial scan; its result must still be the serial scan's exactly (the first crossing, the
loss there, the moments, the divergence), also where the crossing falls at a chunk boundary or its
loss ties the target.  Small chunks (16 updates) keep every case to a few thousand updates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from toymodels import NQM, ScheduleFree
from toymodels import _schedfree as sf

D = sf.PARALLEL_MIN_MODES  # the smallest model the threaded scan runs on
NQM_D = NQM.power_law(D)
TARGET = 0.2 * NQM_D.initial_loss


def _moments():
    return [NQM_D.init_sq.astype(np.float64) for _ in range(3)]


def _coefficients(lr, beta, bs=4.0):
    return sf.coefficients(NQM_D.h, NQM_D.c / bs, lr, beta)


def _both(coef, k0, k1, target, chunk=16, n_blocks=2, uniform=True):
    """(serial, threaded) results and moments of a scan from step k0 (both started from step 0's moments
    stepped serially to k0)."""
    runs = []
    for threaded in (False, True):
        m = _moments()
        if k0 > 0:
            sf._scan(*coef, NQM_D.h, *m, 0, k0, -math.inf, uniform)
        with np.errstate(over="ignore", invalid="ignore"):
            if threaded:
                res = sf.scan(*coef, NQM_D.h, *m, k0, k1, target, uniform, chunk=chunk, n_blocks=n_blocks)
            else:
                res = sf._scan(*coef, NQM_D.h, *m, k0, k1, target, uniform)
        runs.append((res, m))
    return runs


def _assert_same(runs):
    (a, ma), (b, mb) = runs
    assert a == b  # (k, loss) bit for bit, also inf
    for x, y in zip(ma, mb):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("n_blocks, uniform", [(2, True), (3, True), (2, False)])
def test_threaded_scan_equals_serial(n_blocks, uniform):
    """A crossing inside a chunk, past the serial first chunk: the same step, loss and moments."""
    runs = _both(_coefficients(0.5, 0.9), 0, 10**6, TARGET, n_blocks=n_blocks, uniform=uniform)
    assert runs[0][0][0] > 3 * 16
    _assert_same(runs)


def test_threaded_scan_crossing_at_a_chunk_boundary():
    """The crossing as the last step of a threaded chunk and as the first step after one."""
    coef = _coefficients(0.5, 0.9)
    k_star = _both(coef, 0, 10**6, TARGET)[0][0][0]
    assert k_star > 100
    for k0 in (k_star % 16, (k_star - 1) % 16):  # chunks end at k0 + 16 m
        _assert_same(_both(coef, k0, 10**6, TARGET))


def test_threaded_scan_ties_the_target():
    """A target equal to the loss at the crossing (crossed there) or just below it (crossed later):
    the near tie is decided by the serial sum, as in the serial scan."""
    coef = _coefficients(0.5, 0.9)
    (k, loss), _ = _both(coef, 0, 10**6, TARGET)[0]
    for target in (loss, np.nextafter(loss, 0.0), loss * (1 + 1e-12)):
        runs = _both(coef, 0, 10**6, target)
        _assert_same(runs)
    assert _both(coef, 0, 10**6, loss)[1][0][0] == k


def test_threaded_scan_not_reached_and_diverged():
    """Not reached by k1 (-1 and the loss at k1, also for a k1 inside a chunk), a target below the
    noise floor, and divergence (-2, inf): as the serial scan."""
    coef = _coefficients(0.5, 0.9)
    for k1 in (200, 16 * 20):
        runs = _both(coef, 0, k1, 1e-3 * TARGET)
        assert runs[0][0][0] == -1
        _assert_same(runs)
    big = _coefficients(3.0 * NQM_D.lr_limit(ScheduleFree(1.0, 0.5)), 0.5)
    runs = _both(big, 0, 10**4, TARGET)
    assert runs[0][0] == (-2, math.inf)
    _assert_same(runs)


def test_steps_to_target_uses_the_threaded_scan_with_the_same_answer(monkeypatch):
    """steps_to_target with the threaded scan (d at the threshold) equals it with the serial one,
    including the reason of inf."""
    opt = ScheduleFree(0.5, 0.9)
    cases = [(TARGET, 10**6), (1e-3 * TARGET, 1200)]
    threaded = [NQM_D.steps_to_target(opt, 4.0, t, max_steps=m, full_output=True) for t, m in cases]
    monkeypatch.setattr(sf, "PARALLEL_MIN_MODES", 10**9)
    serial = [NQM_D.steps_to_target(opt, 4.0, t, max_steps=m, full_output=True) for t, m in cases]
    assert threaded == serial
    assert math.isfinite(serial[0][0]) and serial[1][0] == math.inf and serial[1][1]["reason"]
