"""Exact curves against an independent step-by-step recursion; kernels against numpy references."""

import math

import numpy as np
import pytest
from conftest import OPTIMIZERS, reference_curve

from toymodels import NQM, EMA, SGD, Cosine, Exponential, Momentum, PiecewiseConstant, StepDecay, Warmup
from toymodels import dynamics


@pytest.fixture(scope="module")
def nqm():
    return NQM.power_law(40)


def test_exact_curve_matches_recursion(nqm, optimizer):
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, optimizer, 8, 300)
    got = nqm.loss_curve(optimizer, 8, 300).values
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    mf = nqm.modal_form(optimizer, 8)
    np.testing.assert_allclose(mf.loss(np.arange(301)), ref, rtol=1e-11)


@pytest.mark.parametrize(
    "schedule",
    [
        PiecewiseConstant((50, 120), (0.8, 0.3, 0.05)),
        StepDecay(0.8, factor=0.5, every=60, n_decays=3),
        Exponential(0.9, gamma=0.99),
        Cosine(0.9, total_steps=200),
        Warmup(Cosine(0.9, total_steps=200), warmup_steps=30),
    ],
)
@pytest.mark.parametrize("family", ["sgd", "momentum", "ema"])
def test_schedules_match_recursion(nqm, schedule, family):
    opt = OPTIMIZERS[family].with_lr(schedule)
    if family == "momentum":
        opt = Momentum(schedule, 0.5)
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 4, 260)
    np.testing.assert_allclose(nqm.loss_curve(opt, 4, 260).values, ref, rtol=1e-12)
    ks = np.array([0, 7, 50, 51, 119, 120, 259])
    np.testing.assert_allclose(nqm.loss_curve(opt, 4, ks).values, ref[ks], rtol=1e-12)


def test_log_grid_curve_long_horizon(nqm):
    ks = np.unique(np.geomspace(1, 10**7, 60).astype(np.int64))
    curve = nqm.loss_curve(Momentum(0.05, 0.9), 16, ks).values
    mf = nqm.modal_form(Momentum(0.05, 0.9), 16)
    np.testing.assert_allclose(curve, mf.loss(ks), rtol=1e-9)
    np.testing.assert_allclose(curve[-1], mf.loss_inf, rtol=1e-9)


def test_steady_state_per_dimension():
    """Lecture: SGD's loss floor per dimension is alpha c / (2 B (2 - alpha h)) (c per example)."""
    h = np.array([1.0, 0.3, 0.01])
    c = np.array([0.5, 2.0, 1.0])
    for lr, B in [(0.5, 1), (1.5, 7), (0.01, 100)]:
        floors = [NQM(h[i : i + 1], c[i : i + 1]).noise_floor(SGD(lr), B) for i in range(3)]
        np.testing.assert_allclose(floors, lr * c / (2 * B * (2 - lr * h)), rtol=1e-12)


def test_steady_state_formula_direct():
    """Lecture form: E L_i -> alpha c_i / (2 (2 - alpha h_i)) (per-example noise c_i / B)."""
    h, c, lr, B = 0.4, 3.0, 0.7, 5.0
    floor = NQM([h], [c]).noise_floor(SGD(lr), B)
    assert floor == pytest.approx(lr * (c / B) / (2 * (2 - lr * h)), rel=1e-13)


def test_lecture_sgd_closed_form():
    h = np.array([1.0, 0.1, 0.001])
    c = h.copy()
    nqm = NQM(h, c, init_sq=2.0)
    lr, B = 0.9, 3
    k = np.arange(0, 200, 7)
    r = (1 - lr * h) ** 2
    floor = lr * c / B / (2 * (2 - lr * h))
    L0 = 0.5 * h * 2.0
    expect = np.sum(r[None] ** k[:, None] * L0 + (1 - r[None] ** k[:, None]) * floor, axis=1)
    np.testing.assert_allclose(nqm.loss_curve(SGD(lr), B, k).values, expect, rtol=1e-12)


def test_jump_equals_steps():
    rng = np.random.default_rng(1)
    d, s = 5, 3
    A = rng.normal(size=(d, s, s)) * 0.4
    b = rng.normal(size=(d, s))
    q = rng.uniform(0.1, 1, d)
    M = rng.normal(size=(d, s, s))
    S0 = np.einsum("ijk,ilk->ijl", M, M)
    S = S0.copy()
    for _ in range(37):
        S = np.einsum("ijk,ikl,iml->ijm", A, S, A) + q[:, None, None] * np.einsum("ij,ik->ijk", b, b)
    np.testing.assert_allclose(dynamics.jump(A, b, q, S0, 37), S, rtol=1e-10, atol=1e-14)


def test_near_degenerate_modes_are_accurate():
    """Critically damped momentum modes (repeated eigenvalues) are flagged and stay exact."""
    beta = 0.81
    lr = (1 - math.sqrt(beta)) ** 2  # a h = (1 - sqrt(beta))^2 at h = 1: a double eigenvalue
    nqm = NQM(np.array([1.0, 1.0 + 1e-13, 1.0 + 1e-6, 0.5]), init_sq=1.0)
    opt = Momentum(lr, beta)
    mf = nqm.modal_form(opt, 2)
    assert mf.n_flagged >= 2
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 2, 400)
    # modal modes near the flagging limit (condition 1e4) carry ~eps * 1e8 relative error
    np.testing.assert_allclose(mf.loss(np.arange(401)), ref, rtol=1e-8)


def test_lower_bound_is_valid(nqm, optimizer):
    mf = nqm.modal_form(optimizer, 2)
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, optimizer, 2, 400)
    for a, b in [(0, 400), (0, 10), (13, 77), (200, 400), (399, 400)]:
        assert mf.lower_bound(a, b) <= ref[a : b + 1].min()
    assert mf.lower_bound(300) <= min(ref[300:].min(), mf.loss_inf)


@pytest.mark.parametrize(
    "opt",
    [Momentum(1e-7, 0.99999), Momentum(0.1, 0.81), Momentum(0.1 * (1 + 1e-9), 0.81), EMA(SGD(0.1), 0.99)],
    ids=["overdamped", "critical", "near-critical-complex", "ema"],
)
def test_flagged_modes_values_and_bounds(opt):
    """Modes with ill-conditioned eigenvectors use the (g, s) form: exact values, valid bounds."""
    nqm = NQM.power_law(40)
    mf = nqm.modal_form(opt, 1)
    assert mf.n_flagged >= 1
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 1, 3000)
    np.testing.assert_allclose(mf.loss(np.arange(3001)), ref, rtol=1e-9)
    for a, b in [(0, 3000), (0, 5), (10, 400), (1000, 1100), (2999, 3000)]:
        assert mf.lower_bound(a, b) <= ref[a : b + 1].min() * (1 + 1e-12)
    target = 0.5 * (ref[1500] + ref[0])
    assert mf.first_crossing(target, 10**9) == int(np.argmax(ref <= target))


def test_closed_form_stein_matches_doubling():
    """The 2x2 closed-form stationary moments equal the doubling solution, also at repeated eigenvalues."""
    rng = np.random.default_rng(4)
    mats = [rng.normal(size=(2, 2)) * 0.45 for _ in range(5)]
    mats.append(np.array([[0.9, 1.0], [0.0, 0.9]]))  # defective: a double eigenvalue
    x, beta = (1 - math.sqrt(0.81)) ** 2, 0.81
    mats.append(np.array([[1 - x, beta], [-x, beta]]))  # critically damped momentum
    for A in mats:
        if np.max(np.abs(np.linalg.eigvals(A))) >= 1:
            continue
        b = rng.normal(size=2)
        ref = dynamics.lyapunov(A[None], b[None], np.array([0.7]))[0]
        s00, s01, s11 = dynamics._stein2_scalar(A[0, 0], A[0, 1], A[1, 0], A[1, 1], b[0], b[1], 0.7)
        np.testing.assert_allclose([s00, s01, s11], [ref[0, 0], ref[0, 1], ref[1, 1]], rtol=1e-10, atol=1e-14)
        # and it is stationary: S = A S A^T + q b b^T
        S = np.array([[s00, s01], [s01, s11]])
        np.testing.assert_allclose(A @ S @ A.T + 0.7 * np.outer(b, b), S, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("opt", [Momentum(0.3, 0.9), EMA(SGD(0.5), 0.95), Momentum(0.1, 0.81), SGD(1.2)],
                         ids=["momentum", "ema", "critical", "sgd"])
def test_first_crossing_guess_and_parallel_leaves(opt, monkeypatch):
    """The answer does not depend on the split hint, and the parallel leaf values (one
    multiplication per step, the (g, s) recurrence for flagged modes) equal the closed form."""
    monkeypatch.setattr(dynamics.modal, "_PARALLEL_MIN_MODES", 4096)  # the parallel kernels at a test size
    nqm = NQM.power_law(5000)
    mf = nqm.modal_form(opt, 4)
    ref = mf.loss(np.arange(2001))
    for k0, n in [(0, 32), (777, 17), (1968, 32)]:
        out = np.empty(n)
        dynamics._modal_values_range_parallel(mf.lam, mf.C, mf.linf, mf.flag, mf.gsq, mf.A, mf.b, mf.q, mf.h,
                                              mf.readout, mf.S0, k0, out)
        np.testing.assert_allclose(out, ref[k0 : k0 + n], rtol=1e-11)
    target = 0.5 * (ref[1200] + ref[1199])
    first = int(np.argmax(ref <= target))
    for guess in [None, 0, 1, first - 40, first - 1, first, first + 1, 5000, 10**9]:
        assert mf.first_crossing(target, 10**9, guess=guess) == first
