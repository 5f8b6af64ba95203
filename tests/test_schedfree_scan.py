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


def _reference_moments(p, r, g, h, s0, k1, uniform):
    """The recursion of the module docstring as written, in NumPy: the moments' updates with every
    product formed afresh at every update (the compiled scan forms p^2, 2 p r, r^2 once per scan and
    the weights' products once per update, which must not change a bit), and the loss after each."""
    zz, zx, xx = s0.copy(), s0.copy(), s0.copy()
    losses = [0.5 * float(np.sum(h * xx))]
    for k in range(k1):
        c = 1.0 / (k + 2.0) if uniform else 1.0
        zxp = p * zx + r * xx
        zzn = p * p * zz + 2.0 * p * r * zx + r * r * xx + g
        xx = (1.0 - c) * (1.0 - c) * xx + 2.0 * c * (1.0 - c) * zxp + c * c * zzn
        zx = (1.0 - c) * zxp + c * zzn
        zz = zzn
        losses.append(0.5 * float(np.sum(h * xx)))
    return (zz, zx, xx), np.array(losses)


@pytest.mark.parametrize("seed", range(4))
def test_scan_steps_the_recursion_as_written(seed):
    """Random models (1 to 40 modes), betas and averaging: the compiled scan's moments are the
    written recursion's bit for bit, and its first crossing is the first step at which the reference
    loss (summed in another order) is at most the target, the target placed away from near ties."""
    rng = np.random.default_rng(seed)
    for _ in range(10):
        d = int(rng.integers(1, 41))
        h = np.exp(rng.uniform(-5.0, 1.0, d))
        q, s0 = np.exp(rng.uniform(-6.0, 1.0, d)), np.exp(rng.uniform(-2.0, 1.0, d))
        beta = float(rng.choice([0.0, rng.uniform(0.0, 0.999)]))
        lr = 2.0 / ((1.0 - beta) * h.max()) * float(rng.uniform(0.05, 0.95))
        uniform = bool(rng.integers(0, 2))
        coef = sf.coefficients(h, q, lr, beta)
        (zz, zx, xx), losses = _reference_moments(*coef, h, s0, 300, uniform)
        m = [s0.copy() for _ in range(3)]
        assert sf._scan(*coef, h, *m, 0, 300, -math.inf, uniform)[0] == -1
        for a, b in zip(m, (zz, zx, xx)):
            np.testing.assert_array_equal(a, b)
        level = float(np.quantile(losses, rng.uniform(0.05, 0.6)))
        if np.any(np.abs(losses / level - 1.0) < 1e-9):
            continue
        k_ref = int(np.argmax(losses <= level)) if np.any(losses <= level) else -1
        k, _ = sf._scan(*coef, h, *[s0.copy() for _ in range(3)], 0, 300, level, uniform)
        assert k == k_ref


def _random_nqm(rng):
    d = int(rng.integers(1, 60))
    h = np.exp(rng.uniform(-6.0, 1.0, d))
    c = np.exp(rng.uniform(-4.0, 2.0, d) if rng.uniform() < 0.7 else rng.uniform(4.0, 14.0, d))
    return NQM(h, c, np.exp(rng.uniform(-2.0, 1.0, d)))


@pytest.mark.parametrize("seed", range(3))
def test_beta_zero_closed_form_is_the_scans_crossing(seed):
    """Schedule-free SGD at beta = 0 is the uniform average of SGD: its first crossing from that
    closed form (O(d log k)) equals the two-state scan's on random models (weight decay, learning
    rates up to and past the limit, targets down to below the noise floor, very noisy gradients
    whose transient growth the scan calls divergence); the closed form declines (None) only where
    the two could differ, and it is taken in most cases (else this test would check nothing)."""
    rng = np.random.default_rng(100 + seed)
    taken = 0
    for _ in range(40):
        nqm = _random_nqm(rng)
        wd = float(rng.choice([0.0, 0.01]))
        lr = nqm.lr_limit(ScheduleFree(1.0, 0.0, weight_decay=wd)) * float(rng.uniform(0.01, 1.05))
        bs = float(rng.choice([1.0, 8.0, 1024.0]))
        target = nqm.initial_loss * float(rng.uniform(0.001, 0.9))
        opt = ScheduleFree(lr, 0.0, weight_decay=wd)
        fast = nqm._schedule_free_polyak(opt, lr, bs, 20_000, target)
        with np.errstate(over="ignore", invalid="ignore"):
            scan, _ = nqm._schedule_free(opt, lr, bs, 0, 20_000, target)
        if fast is not None:
            taken += 1
            assert fast == scan, (fast, scan)
        stepped = scan if scan >= 0 else math.inf
        got = nqm.steps_to_target(opt, bs, target, max_steps=20_000)
        assert got == stepped or (fast is None and scan == -2 and got == math.inf)
    assert taken >= 25


def test_beta_zero_closed_form_declines_near_ties_and_other_averaging():
    """A target equal to the loss at the crossing (a tie within the scans' rounding) goes to the scan,
    and so do beta > 0 and averaging='none'."""
    nqm = NQM.power_law(50)
    opt = ScheduleFree(0.5, 0.0)
    k, loss = nqm._schedule_free(opt, 0.5, 4.0, 0, 10**5, 0.1 * nqm.initial_loss)
    assert k > 0 and nqm._schedule_free_polyak(opt, 0.5, 4.0, 10**5, loss) is None
    assert nqm.steps_to_target(opt, 4.0, loss) == k
    assert nqm._schedule_free_polyak(ScheduleFree(0.5, 0.1), 0.5, 4.0, 10**5, 0.1) is None
    assert nqm._schedule_free_polyak(ScheduleFree(0.5, 0.0, averaging="none"), 0.5, 4.0, 10**5, 0.1) is None


@pytest.mark.parametrize("seed", range(2))
def test_interpolated_crossing_is_the_scans_crossing(seed):
    """The tuner's crossing (its modes padded to a multiple of four) on random models of 1 to 9 modes:
    ceil(kappa) is the scan's first crossing and kappa the log-loss interpolation between the scan's
    losses at k - 1 and k, bit for bit; capped and diverged scans as documented."""
    rng = np.random.default_rng(200 + seed)
    for _ in range(15):
        d = int(rng.integers(1, 10))
        h = np.exp(rng.uniform(-3.0, 1.0, d))
        q, s0 = np.exp(rng.uniform(-6.0, -1.0, d)), np.exp(rng.uniform(-1.0, 1.0, d))
        beta = float(rng.uniform(0.0, 0.99))
        lr = 2.0 / ((1.0 - beta) * h.max()) * float(rng.uniform(0.05, 0.9))
        coef = sf.coefficients(h, q, lr, beta)
        target = 0.5 * float(np.sum(h * s0)) * float(rng.uniform(0.05, 0.5))
        lt = math.log(target)
        with np.errstate(over="ignore", invalid="ignore"):
            k_scan, _ = sf._scan(*coef, h, *[s0.copy() for _ in range(3)], 0, 5000, target, True)
        if k_scan == -2:  # transient growth past LOST_GROWTH x L0: diverged for both
            assert sf.crossing(*coef, h, s0, 10**6, lt, True, sf.LOST_GROWTH) == math.inf
            continue
        m = [s0.copy() for _ in range(3)]
        losses = [sf._scan(*coef, h, *m, 0, 0, -math.inf, True)[1]]
        while losses[-1] > target and len(losses) < 5000:
            losses.append(sf._scan(*coef, h, *m, len(losses) - 1, len(losses), -math.inf, True)[1])
        k = len(losses) - 1
        assert losses[-1] <= target and k == k_scan > 0
        expected = (k - 1.0) + (math.log(losses[-2]) - lt) / (math.log(losses[-2]) - math.log(losses[-1]))
        assert sf.crossing(*coef, h, s0, 10**6, lt, True, sf.LOST_GROWTH) == expected
        cap = k // 2
        assert sf.crossing(*coef, h, s0, cap, lt, True, sf.LOST_GROWTH) == cap * (1.0 + math.log(losses[cap]) - lt)
    big = sf.coefficients(h, q, 6.0 / ((1.0 - beta) * h.max()), beta)  # 3 x the stability limit
    tiny = math.log(1e-6 * float(np.sum(h * s0)))
    assert sf.crossing(*big, h, s0, 10**6, tiny, True, sf.LOST_GROWTH) == math.inf
