"""The time-varying optimizers (Polyak average, schedule-free SGD) on linear regression and the PLRF.

Their averaging weight c_k = 1 / (k + 2) changes at every update, and linear regression's gradient
noise follows the state (q_i = (sigma^2 lambda_i + lambda_i^2 E[e_i^2] + lambda_i sum_j lambda_j E[e_j^2]) / B,
E[e^2] at the gradient point): the exact curves are checked against an independent slow moment
recursion, a plain deterministic recursion of the optimizers' own equations, SGD (schedule-free
without averaging), and Monte Carlo within 4 standard errors (on sampled data and on the PLRF's
explicit features); a curve without the state-dependent noise, and one reading schedule-free's noise
at its readout x instead of its gradient point y, are shown to fail the same check.
"""

import math

import numpy as np
import pytest

from toymodels import SGD, GaussianLinearRegression, Momentum, PolyakAverage, PowerLawRF, ScheduleFree, dynamics
from toymodels.schedules import Cosine, Tabulated
from toymodels.sweep import batch_size_sweep

LAM = np.array([1.0, 0.45, 0.2])
W_STAR = np.array([1.0, -0.7, 1.3])
GLR = GaussianLinearRegression(LAM, W_STAR, noise_std=0.3)
OPTS = (PolyakAverage(SGD(0.5)), PolyakAverage(Momentum(0.2, 0.5, weight_decay=0.1)), ScheduleFree(0.9, 0.8),
        ScheduleFree(0.7, 0.5, weight_decay=0.2))


def _slow_loss(model, opt, batch_size, n):
    """Exact expected excess risk at steps 0..n by a plain Python loop over modes and updates (B a
    number, or ``(n,)`` batch sizes B_k, one per update): the (A_k, b_k) of the spec's parts,
    augmented here by the constant entry 1 that carries weight decay's drive wd w*_i b_k, and the
    multiplicative noise read at state entry 0."""
    lam, w, wd = model.h, model.w_star, float(opt.hyperparameters.get("weight_decay", 0.0))
    d, s = lam.size, opt.n_state
    P0, P1, Q0, Q1, R0, R1 = opt.parts(lam)
    S = []
    for i in range(d):
        x0 = np.append(-w[i] * opt.init, 1.0)
        S.append(np.outer(x0, x0))
    r = opt.readout
    out = []
    for k in range(n + 1):
        out.append(sum(0.5 * lam[i] * S[i][r, r] for i in range(d)))
        if k == n:
            break
        c, lr = float(opt.coefficients(np.array([k]))[0]), float(opt.lr.at(np.array([k]))[0])
        loss_part = sum(lam[j] * S[j][0, 0] for j in range(d))
        bs = batch_size[k] if np.ndim(batch_size) else batch_size
        new = []
        for i in range(d):
            A = np.eye(s + 1)
            A[:s, :s] = P0[i] + c * P1[i] + lr * (Q0[i] + c * Q1[i])
            b = np.zeros(s + 1)
            b[:s] = lr * (R0[i] + c * R1[i])
            A[:s, s] = wd * w[i] * b[:s]
            q = (model.noise_std**2 * lam[i] + lam[i] ** 2 * S[i][0, 0] + lam[i] * loss_part) / bs
            new.append(A @ S[i] @ A.T + q * np.outer(b, b))
        S = new
    return np.array(out)


def _deterministic_run(model, opt, n):
    """The noiseless run from the optimizers' own equations (error e = theta - w*, gradient
    (lambda + wd) e + wd w*), written out here without the engine's matrices: the risk at the readout
    and the error at the gradient point (``(n + 1,)``, ``(n + 1, d)``)."""
    lam, w = model.h, model.w_star
    out, at_grad = [], []
    if isinstance(opt, ScheduleFree):
        wd, beta = opt.weight_decay, opt.beta
        z = x = -w.copy()
        for k in range(n + 1):
            y = (1.0 - beta) * z + beta * x
            out.append(0.5 * np.sum(lam * x**2))
            at_grad.append(y)
            z = z - opt.lr.lr * ((lam + wd) * y + wd * w)
            c = 1.0 / (k + 2) if opt.averaging == "uniform" else 1.0
            x = (1.0 - c) * x + c * z
        return np.array(out), np.array(at_grad)
    base = opt.base
    wd, beta = base.weight_decay, getattr(base, "beta", 0.0)
    e, v, avg = -w.copy(), np.zeros_like(w), -w.copy()
    for k in range(n + 1):
        out.append(0.5 * np.sum(lam * avg**2))
        at_grad.append(e)
        v = beta * v - base.lr.lr * ((lam + wd) * e + wd * w)
        e = e + v
        avg = avg + (e - avg) / (k + 2)
    return np.array(out), np.array(at_grad)


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: f"{type(o).__name__}-{o.hyperparameters['weight_decay']}")
def test_exact_curve_equals_slow_recursion(opt):
    n = 40
    ks = np.arange(n + 1)
    for bs in (1.0, 3.0):
        np.testing.assert_allclose(GLR.loss_curve(opt, bs, ks).values, _slow_loss(GLR, opt, bs, n), rtol=1e-12)
        assert GLR.loss_at_step(opt, bs, 17) == pytest.approx(_slow_loss(GLR, opt, bs, 17)[-1], rel=1e-12)


def test_schedules_of_learning_rate_and_batch_size():
    """A learning-rate schedule and a batch-size schedule (one B_k per update) on the slow recursion;
    Monte Carlo with whole-number B_k within 4 SE."""
    n = 30
    sizes = [1.0, 1.0, 2.0, 2.0, 3.0, 5.0] + [4.0] * (n - 6)
    batch = Tabulated(sizes)
    for opt in (PolyakAverage(SGD(Cosine(0.8, 30), weight_decay=0.1)), ScheduleFree(Cosine(1.2, 30), 0.7)):
        np.testing.assert_allclose(GLR.loss_curve(opt, batch, np.arange(n + 1)).values,
                                   _slow_loss(GLR, opt, np.array(sizes), n), rtol=1e-12)
        ks = np.array([5, 30])
        mc = GLR.simulate(opt, batch, ks, n_runs=3000, seed=3)
        assert np.max(np.abs(_z_scores(GLR.loss_curve(opt, batch, ks).values, mc))) < 4.0


@pytest.mark.parametrize("opt", OPTS, ids=lambda o: f"{type(o).__name__}-{o.hyperparameters['weight_decay']}")
def test_noiseless_large_batch_is_the_deterministic_recursion(opt):
    """Zero label noise and B = 10^12: the batch noise (O(1/B)) vanishes and the second moments are
    the square of the deterministic run; the gradient statistics are those at the gradient point
    (schedule-free's y, not its readout x): |E g|^2 = sum lambda^2 e^2 and the batch trace
    sum lambda^2 e^2 + (sum lambda e^2) tr Sigma."""
    quiet = GaussianLinearRegression(LAM, W_STAR, noise_std=0.0)
    ks = np.arange(60)
    ds = quiet.gradient_stats(opt, 1e12, ks)
    loss, e = _deterministic_run(quiet, opt, 59)
    np.testing.assert_allclose(ds.loss.values, loss, rtol=1e-9)
    gsq = np.sum((LAM * e) ** 2, axis=1)
    np.testing.assert_allclose(ds.grad_norm_sq.values, gsq, rtol=1e-9)
    np.testing.assert_allclose(ds.trace_cov_batch.values, gsq + np.sum(LAM * e**2, axis=1) * LAM.sum(), rtol=1e-9)
    assert np.all(ds.trace_cov_label.values == 0.0)


def test_schedule_free_without_averaging_is_sgd():
    """averaging="none" (c_k = 1, so x = y = z) is SGD exactly, with and without weight decay, also in
    steps_to_target; beta = 0 (y = z) is the Polyak average of SGD."""
    ks = np.arange(0, 200, 7)
    for wd in (0.0, 0.15):
        sgd = GLR.loss_curve(SGD(0.8, weight_decay=wd), 2.0, ks).values
        sf = GLR.loss_curve(ScheduleFree(0.8, 0.9, weight_decay=wd, averaging="none"), 2.0, ks).values
        np.testing.assert_allclose(sf, sgd, rtol=1e-12)
        pol = GLR.loss_curve(PolyakAverage(SGD(0.8, weight_decay=wd)), 2.0, ks).values
        sf0 = GLR.loss_curve(ScheduleFree(0.8, 0.0, weight_decay=wd), 2.0, ks).values
        np.testing.assert_allclose(sf0, pol, rtol=1e-12)
    target = 2.0 * GLR.stationary_loss(SGD(0.8), 2.0)
    k = GLR.steps_to_target(SGD(0.8), 2.0, target)
    assert math.isfinite(k) and GLR.steps_to_target(ScheduleFree(0.8, 0.5, averaging="none"), 2.0, target) == k
    assert GLR.stationary_loss(ScheduleFree(0.8, 0.5, averaging="none"), 2.0) == GLR.stationary_loss(SGD(0.8), 2.0)


def _z_scores(exact, mc):
    return (mc.loss.values - exact) / mc.loss_sem.values


@pytest.mark.parametrize("opt", OPTS[::2] + (OPTS[3],), ids=["polyak", "schedule_free", "schedule_free-wd"])
def test_monte_carlo_on_sampled_data(opt):
    """Sampled data (B fresh Gaussian inputs per update) agrees with the exact curve within 4 SE."""
    ks = np.array([4, 15, 40])
    exact = GLR.loss_curve(opt, 2, ks).values
    mc = GLR.simulate(opt, 2, ks, n_runs=3000, seed=11)
    assert np.max(np.abs(_z_scores(exact, mc))) < 4.0


def test_monte_carlo_rejects_the_curve_without_state_dependent_noise():
    """The check can fail: the same moment recursion with the label noise alone (no q_self, q_loss)
    is many standard errors below the Monte Carlo."""
    opt = ScheduleFree(0.9, 0.8)
    ks = np.array([4, 15, 40])
    mc = GLR.simulate(opt, 2, ks, n_runs=3000, seed=11)
    q, _, _ = GLR._noise(2.0)
    S = GLR._S0(opt)
    additive, _ = dynamics.propagate_varying(GLR._parts(opt), opt.coefficients, q, GLR.h, opt.readout, opt.lr, ks, S)
    assert np.max(np.abs(_z_scores(additive, mc))) > 10.0


def test_monte_carlo_rejects_the_noise_read_at_the_readout():
    """Schedule-free SGD's noise follows E[e^2] at its gradient point y: the same recursion reading it
    at the readout x (the state reordered so that x is entry 0) is many SE off the Monte Carlo, the
    exact curve within 4 (no label noise: the batch noise is all there is)."""
    m = GaussianLinearRegression(np.array([1.0, 0.3]), 1.0, noise_std=0.0)
    opt = ScheduleFree(1.0, 0.5)
    ks = np.array([12, 25])
    mc = m.simulate(opt, 4, ks, n_runs=6000, seed=1)
    assert np.max(np.abs(_z_scores(m.loss_curve(opt, 4, ks).values, mc))) < 4.0
    perm = [2, 1, 0]
    parts = [p[:, perm][:, :, perm] if p.ndim == 3 else p[:, perm] for p in m._parts(opt)]
    S = m._S0(opt)[:, perm][:, :, perm].copy()
    q, q_self, q_loss = m._noise(4.0)
    at_x, _ = dynamics.propagate_varying(parts, opt.coefficients, q, m.h, 0, opt.lr, ks, S, q_self=q_self,
                                         q_loss=q_loss)
    assert np.max(np.abs(_z_scores(at_x, mc))) > 10.0


@pytest.mark.parametrize("opt", (PolyakAverage(SGD(1.5)), ScheduleFree(2.5, 0.8, weight_decay=0.05)),
                         ids=["polyak", "schedule_free-wd"])
def test_monte_carlo_on_plrf_features(opt):
    """The PLRF's explicit features (z = W^T x, y = x^T b) agree with its exact risk within 4 SE."""
    m = PowerLawRF(1.0, 0.6, 10, 5)
    ks = np.array([3, 10, 30])
    exact = m.gradient_stats(opt, 2, ks)
    mc = m.simulate(opt, 2, ks, n_runs=2000, seed=5)
    assert np.max(np.abs(_z_scores(exact.loss.values, mc))) < 4.0
    for name in ("grad_norm_sq", "trace_cov"):  # at the gradient point (schedule-free's y)
        z = (mc[name].values - exact[name].values) / mc[f"{name}_sem"].values
        assert np.max(np.abs(z)) < 4.0


def test_steps_to_target_is_the_first_crossing_of_the_curve():
    for opt in (PolyakAverage(SGD(0.6)), ScheduleFree(0.9, 0.8, weight_decay=0.05)):
        curve = GLR.loss_curve(opt, 2, 3000).values
        target = float(curve[0] * 0.02 + curve[-1])
        k = GLR.steps_to_target(opt, 2, target)
        assert curve[int(k)] <= target < curve[: int(k)].min()
        # below the curve so far: the limit (the ridge risk under weight decay) decides the reason
        k2, info = GLR.steps_to_target(opt, 2, curve[-1] * 0.5, max_steps=3000, full_output=True)
        floor = GLR.stationary_loss(opt, 2)
        assert k2 == math.inf and info["noise_floor"] == floor
        assert ("unreachable: noise floor" if floor > curve[-1] * 0.5 else "max_steps") in info["reason"]
        m = PowerLawRF(1.0, 0.6, 10, 5)
        assert m.steps_to_target(opt, 2, m.loss_at_step(opt, 2, 50) * (1 + 1e-12)) == 50


def test_stationary_loss_is_the_limit():
    """The averaging weight goes to 0: L_k tends to the ridge risk (0 without weight decay), the
    excess over it shrinking as 1 / k; inf above the stable learning rate."""
    for opt in (PolyakAverage(SGD(0.6, weight_decay=0.1)), ScheduleFree(0.9, 0.5, weight_decay=0.1),
                PolyakAverage(SGD(0.6))):
        lim = GLR.stationary_loss(opt, 2)
        wd = opt.hyperparameters["weight_decay"]
        assert lim == pytest.approx(0.5 * np.sum(LAM * (wd * W_STAR / (LAM + wd)) ** 2), rel=1e-14)
        a, b = GLR.loss_curve(opt, 2, [20000, 40000]).values - lim
        assert 0.0 < b and b / a == pytest.approx(0.5, abs=0.02)
    too_fast = 1.01 * GLR.stable_lr(SGD(1.0), 2)
    assert GLR.stationary_loss(PolyakAverage(SGD(too_fast)), 2) == math.inf
    assert GLR.stationary_loss(ScheduleFree(too_fast / 0.5, 0.5), 2) == math.inf
    assert math.isfinite(GLR.stationary_loss(ScheduleFree(0.99 * too_fast / 0.5, 0.5), 2))


def _check_sweep(family, make, target=None):
    """A small sweep on linear regression: every tuned point reaches the target exactly at its steps
    and no earlier than the exact optimum over a grid of learning rates."""
    m = GaussianLinearRegression.power_law(4, 1.0, noise_std=0.1)
    target = 0.2 * m.initial_loss
    ds = batch_size_sweep(m, family, [1.0, 4.0], target, progress=False)
    extras = ds.momentum_opt.values if family == "schedule_free" else [None, None]
    for bs, steps, lr, extra in zip(ds.batch_size.values, ds.steps_to_target.values, ds.lr_opt.values, extras):
        assert math.isfinite(steps)
        assert m.steps_to_target(make(lr, extra), bs, target) == steps
        limit = m.lr_limit(make(1.0, extra))
        grid = min(m.steps_to_target(make(f * limit, extra), bs, target) for f in np.geomspace(0.02, 0.9, 12))
        assert steps <= grid


def test_batch_size_sweep_of_the_polyak_average():
    _check_sweep("polyak", lambda lr, e: PolyakAverage(SGD(lr)))


@pytest.mark.slow
def test_batch_size_sweep_of_schedule_free():
    _check_sweep("schedule_free", lambda lr, e: ScheduleFree(lr, e))


@pytest.mark.slow
def test_family_sweeps_of_the_time_varying_families():
    """family_sweeps runs both families on linear regression and the PLRF, each equal to its own
    batch_size_sweep."""
    from toymodels.sweep import family_sweeps

    for m in (GaussianLinearRegression.power_law(4, 1.0, noise_std=0.1), PowerLawRF(1.0, 0.6, 12, 6)):
        target = m.initial_loss - 0.7 * (m.initial_loss - getattr(m, "irreducible_risk", 0.0))
        out = family_sweeps(m, ["polyak", "schedule_free"], [1.0, 4.0], target, n_jobs=1, progress=False)
        for family, ds in out.items():
            one = batch_size_sweep(m, family, [1.0, 4.0], target, progress=False)
            np.testing.assert_array_equal(ds.steps_to_target.values, one.steps_to_target.values)
            assert np.all(np.isfinite(ds.steps_to_target.values))
