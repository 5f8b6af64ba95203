"""Power-law random features: the exact risk against Monte Carlo on the explicit features, and the
reductions to linear regression on x."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toymodels import EMA, SGD, GaussianLinearRegression, Momentum, sweep
from toymodels import schema
from toymodels.plrf import PowerLawRF, compute_optimal_frontier, deterministic_equivalent, plrf_frontier

KS = np.array([0, 1, 4, 12, 40])


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _check_against_mc(model, opt, batch_size, n_runs, seed):
    exact = model.loss_curve(opt, batch_size, KS).values
    mc = model.simulate(opt, batch_size, KS, n_runs=n_runs, seed=seed)
    assert mc.loss.values[0] == pytest.approx(exact[0], rel=1e-12)  # step 0 is deterministic
    z = (mc.loss.values[1:] - exact[1:]) / mc.loss_sem.values[1:]
    assert np.all(np.abs(z) < 4.0), z
    # the per-example gradient statistics: exact (K's eigenbasis) vs the explicit features' per-run values
    stats = model.gradient_stats(opt, batch_size, KS)
    np.testing.assert_allclose(stats.loss.values, exact, rtol=1e-12)
    for name in ("grad_norm_sq", "trace_cov"):
        ex, got, sem = stats[name].values, mc[name].values, mc[f"{name}_sem"].values
        assert got[0] == pytest.approx(ex[0], rel=1e-10)  # theta_0 = 0 in every run
        z = (got[1:] - ex[1:]) / sem[1:]
        assert np.all(np.abs(z) < 4.0), (name, z)
    return exact, mc


@pytest.mark.parametrize("case", ["sgd_v_gt_d", "momentum_v_gt_d", "sgd_d_gt_v", "ema"])
def test_exact_risk_matches_monte_carlo_on_explicit_features(case):
    """MC draws x ~ N(0, D), forms z = W^T x and y = x^T b and runs the optimizer on theta; its mean
    risk is within 4 standard errors of the exact one at every recorded step."""
    if case == "sgd_d_gt_v":
        model, bs = PowerLawRF(1.0, 0.3, 10, 16, seed=2), 1
    else:
        model, bs = PowerLawRF(0.8, 0.4, 24, 10, seed=1), 2
    lr = 0.6 * model.stable_lr(SGD(1.0), bs)
    opt = {"sgd_v_gt_d": SGD(lr), "sgd_d_gt_v": SGD(lr), "momentum_v_gt_d": Momentum(0.4 * lr, 0.6),
           "ema": EMA(SGD(lr), 0.7)}[case]
    exact, mc = _check_against_mc(model, opt, bs, 2000, seed=11)
    if case == "sgd_v_gt_d":
        # the test can fail: leaving out the irreducible risk is many standard errors off
        assert model.irreducible_risk > 20 * mc.loss_sem.values[-1]
    if case == "sgd_d_gt_v":
        assert model.irreducible_risk == 0.0  # d > v: the features span R^v, every target is reachable
        # K has rank v < d, and the per-coordinate variance counts the d parameters, not K's v modes
        stats = model.gradient_stats(opt, bs, KS)
        np.testing.assert_allclose(stats.grad_var.values, stats.trace_cov.values / (bs * model.d), rtol=1e-12)
        assert model.spectrum.size == model.v < model.d


def test_irreducible_risk_is_the_least_squares_residual():
    """sigma^2 / 2 = min_theta P(theta), computed independently by least squares on D^(1/2) W."""
    model = PowerLawRF(1.2, 0.5, 40, 15, seed=3)
    j = np.arange(1, 41.0)
    M = j[:, None] ** -1.2 * model.features
    c = j**-1.2 * model.target
    theta, *_ = np.linalg.lstsq(M, c, rcond=None)
    assert model.irreducible_risk == pytest.approx(model.risk(theta), rel=1e-9)
    assert model.initial_loss == pytest.approx(0.5 * np.sum(j ** (-2.4 - 1.0)), rel=1e-12)
    assert model.features.shape == (40, 15) and model.target.shape == (40,)
    assert np.std(model.features) == pytest.approx(1 / math.sqrt(15), rel=0.1)
    # the eigenvalues of K = W^T D W
    K = model.features.T @ (j[:, None] ** -2.4 * model.features)
    np.testing.assert_allclose(model.spectrum, np.linalg.eigvalsh(K)[::-1], rtol=1e-9)


@pytest.mark.parametrize("opt", [SGD(0.5), Momentum(0.2, 0.7), EMA(SGD(0.5), 0.9)])
def test_orthogonal_features_are_linear_regression_on_x(opt):
    """d = v and W orthogonal: theta -> W theta is an isometry that SGD respects, so the risk curve is
    linear regression on x itself (covariance D, teacher b, no label noise)."""
    v, alpha, beta = 12, 0.9, 0.5
    model = PowerLawRF.from_features(alpha, beta, _orthogonal(v, 0))
    on_x = GaussianLinearRegression.power_law(v, 2 * alpha, w_star=np.arange(1, v + 1.0) ** -beta)
    assert model.irreducible_risk < 1e-14
    ks = np.array([0, 1, 10, 100, 1000])
    np.testing.assert_allclose(model.loss_curve(opt, 3, ks).values, on_x.loss_curve(opt, 3, ks).values, rtol=1e-9)


def test_invertible_features_are_preconditioned_regression_on_x():
    """d = v and W = D^(-gamma/2) Q invertible: w = W theta follows SGD on x preconditioned by
    W W^T = D^-gamma, i.e. GaussianLinearRegression's SGD with precond = gamma."""
    v, alpha, beta, gamma = 10, 1.0, 0.3, 0.5
    j = np.arange(1, v + 1.0)
    W = (j ** (alpha * gamma))[:, None] * _orthogonal(v, 1)
    model = PowerLawRF.from_features(alpha, beta, W)
    on_x = GaussianLinearRegression.power_law(v, 2 * alpha, w_star=j**-beta)
    assert model.irreducible_risk < 1e-12 * model.initial_loss
    ks = np.array([0, 1, 10, 100, 3000])
    lr = 0.3
    np.testing.assert_allclose(model.loss_curve(SGD(lr), 2, ks).values,
                               on_x.loss_curve(SGD(lr, precond=gamma), 2, ks).values, rtol=1e-8)


def test_random_square_features_reach_zero_risk():
    """d = v (W invertible almost surely): no irreducible risk; theta = W^-1 b has P = 0."""
    model = PowerLawRF(1.0, 0.5, 20, 20, seed=5)
    assert model.irreducible_risk < 1e-12 * model.initial_loss
    assert model.risk(np.linalg.solve(model.features, model.target)) < 1e-20


def test_steps_to_target_closed_form_and_unreachable():
    model = PowerLawRF(1.0, 0.5, 60, 20, seed=0)
    opt = SGD(0.5 * model.stable_lr(SGD(1.0), 4))
    curve = model.loss_curve(opt, 4, 400).values
    target = 0.5 * (model.initial_loss + model.irreducible_risk) * 0.3
    k = model.steps_to_target(opt, 4, target)
    assert curve[int(k)] <= target < curve[int(k) - 1]
    steps, info = model.steps_to_target(opt, 4, 0.999 * model.irreducible_risk, full_output=True)
    assert steps == math.inf and info["reason"].startswith("unreachable")
    assert model.steps_to_target(opt, 4, 2 * model.initial_loss) == 0
    # the modal form (what the sweeps tune on) holds the irreducible risk
    mf = model.modal_form(opt, 4)
    np.testing.assert_allclose(mf.loss(np.arange(0, 400, 37)), curve[::37], rtol=1e-10)
    assert mf.loss_inf == pytest.approx(model.stationary_loss(opt, 4), rel=1e-10)
    assert model.loss_at_step(opt, 4, 123) == pytest.approx(curve[123], rel=1e-10)


def test_tuned_sweep_runs_on_the_plrf():
    model = PowerLawRF(1.0, 0.5, 60, 20, seed=0)
    target = model.irreducible_risk + 0.1 * (model.initial_loss - model.irreducible_risk)
    res = sweep.tune(model, "sgd", 4.0, target)
    k = model.steps_to_target(SGD(res["lr"]), 4, target)
    assert math.isfinite(res["steps"]) and k == res["steps"]
    assert model.steps_to_target(SGD(0.7 * res["lr"]), 4, target) >= k


def test_every_step_curve_equals_the_pointwise_closed_form():
    """Consecutive steps use one cumulative product of the rates per block of 1024 steps; a sparse
    grid takes each power on its own: the two agree."""
    model = PowerLawRF(1.0, 0.5, 80, 40, seed=4)
    opt = SGD(0.5 * model.stable_lr(SGD(1.0), 1))
    grid = np.array([0, 1, 7, 1023, 1024, 1025, 2047, 2048, 3000, 4999, 5000])
    np.testing.assert_allclose(model.loss_curve(opt, 1, 5000).values[grid], model.loss_curve(opt, 1, grid).values,
                               rtol=1e-11)


def test_deterministic_equivalent_conserves_count_and_target_mass():
    """r = min(v, d) modes, decreasing; the target's weights and the irreducible risk add up to
    |D^(1/2) b|^2; the irreducible risk is that of the random features (seed mean) to within the
    seed-to-seed spread."""
    v, d = 120, 60
    lam, rho, sigma2 = deterministic_equivalent(1.0, 0.5, v, d)
    j = np.arange(1, v + 1.0)
    assert lam.shape == rho.shape == (d,) and np.all(np.diff(lam) < 0) and np.all(rho >= 0)
    assert rho.sum() + sigma2 == pytest.approx(np.sum(j ** (-2.0 - 1.0)), rel=1e-12)
    # first moments: E tr K = sum_j D_j and E c^T M M^T c = sum_j c_j^2 D_j (M = D^(1/2) W)
    assert lam.sum() == pytest.approx(np.sum(j**-2.0), rel=1e-2)
    assert (rho * lam).sum() == pytest.approx(np.sum(j ** (-4.0 - 1.0)), rel=1e-2)
    lam_sq, rho_sq, sigma2_sq = deterministic_equivalent(1.0, 0.5, 50, 50)  # v = d: the spectrum reaches 0
    assert sigma2_sq == 0.0 and lam_sq.size == 50 and lam_sq.sum() == pytest.approx(np.sum(j[:50] ** -2.0), rel=1e-2)
    seeds = [PowerLawRF(1.0, 0.5, v, d, seed=s) for s in range(8)]
    irr = [m.irreducible_risk for m in seeds]
    assert abs(sigma2 / 2 - np.mean(irr)) < 3 * np.std(irr)
    top = [m.spectrum[0] for m in seeds]  # the top eigenvalue of K, near D_1 = 1
    assert abs(lam[0] - np.mean(top)) < 3 * np.std(top)
    model = PowerLawRF(1.0, 0.5, v, d, spectrum="deterministic")
    assert model.irreducible_risk == sigma2 / 2 and model.params["spectrum"] == "deterministic"
    assert model.features.shape == (v, d)  # drawn on demand, for the Monte Carlo
    assert PowerLawRF(1.0, 0.5, 30, 20).method == "exact"


@pytest.mark.slow
def test_deterministic_equivalent_matches_the_seed_mean_of_the_exact_risk():
    """The deterministic equivalent is the large-(v, d) limit of the seed average: at v = 600, d = 300
    its SGD risk curve (10^5 steps, 40 log-spaced points) lies within 4 standard errors of the mean of
    16 exact curves (different features) at every point (measured: 0.63 SE and 2.4% at most, where
    one seed differs from another by up to 21%)."""
    v, d, n_seeds = 600, 300, 16
    de = PowerLawRF(1.0, 0.7, v, d, spectrum="deterministic")
    opt = SGD(0.5 * de.stable_lr(SGD(1.0), 1))
    ks = np.unique(np.round(np.logspace(0, 5, 40)).astype(np.int64))
    curves = np.array([PowerLawRF(1.0, 0.7, v, d, seed=s, spectrum="exact").loss_curve(opt, 1, ks).values
                       for s in range(n_seeds)])
    mean, se = curves.mean(axis=0), curves.std(axis=0, ddof=1) / math.sqrt(n_seeds)
    z = (de.loss_curve(opt, 1, ks).values - mean) / se
    assert np.all(np.abs(z) < 4.0), z


def test_frontier_recovers_the_closed_form_exponents():
    """L(d; F) = (F / d)^-a + d^-b has d* = (b / a)^(1 / (a + b)) F^(a / (a + b)) exactly:
    xi = a / (a + b) and eta = a b / (a + b) are recovered from a 25-size grid."""
    ds = np.unique(np.round(np.logspace(1, 4, 25)))
    fs = np.logspace(5, 9, 12)
    a, b = 0.8, 1.5
    L = (fs[None, :] / ds[:, None]) ** -a + ds[:, None] ** -b
    out = compute_optimal_frontier(L, ds, fs)
    assert out.attrs["n_fit"] == 12 and not out.at_grid_end.any()
    assert out.attrs["xi"] == pytest.approx(a / (a + b), rel=1e-3)
    assert out.attrs["eta"] == pytest.approx(a * b / (a + b), rel=1e-3)
    np.testing.assert_allclose(out.d_opt, (b / a) ** (1 / (a + b)) * fs ** (a / (a + b)), rtol=0.02)


def test_plrf_frontier_is_the_minimum_of_exact_risks():
    ds, fs = np.array([10, 20, 40]), np.array([2e3, 2e4])
    out = plrf_frontier(1.0, 0.3, ds, fs, v=80)
    schema.validate(out)
    model = PowerLawRF(1.0, 0.3, 80, 20)
    opt = SGD(0.5 * model.stable_lr(SGD(1.0), 1))
    assert out.loss.sel(n_features=20, flops=2e4) == pytest.approx(model.loss_at_step(opt, 1, 1000), rel=1e-10)
    assert np.all(out.loss_opt <= out.loss.min("n_features") * (1 + 1e-12))
    assert out.attrs["xi_theory"] == pytest.approx(1 / 3)  # 2 beta < 1: 1 / (2 alpha + 1)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (20, 20)])
def test_svd_projection_equals_a_plain_svd(shape):
    """The QR route of the model's setup against numpy's SVD of the same matrix: singular values,
    |P^T c| and the squared residual, also when the matrix is rank-deficient (rank 5 here)."""
    from toymodels.plrf import _svd_projection

    rng = np.random.default_rng(7)
    v, d = shape
    for M in (rng.standard_normal(shape) * np.arange(1, v + 1.0)[:, None] ** -2.0,
              rng.standard_normal((v, 5)) @ rng.standard_normal((5, d))):
        c = rng.standard_normal(v)
        s, pc, resid_sq = _svd_projection(M, c)
        P, s_ref, _ = np.linalg.svd(M, full_matrices=False)
        r = int(np.sum(s_ref > s_ref[0] * max(v, d) * np.finfo(float).eps))
        assert s.size == r
        np.testing.assert_allclose(s, s_ref[:r], rtol=1e-12)
        np.testing.assert_allclose(np.abs(pc), np.abs(P[:, :r].T @ c), rtol=1e-9, atol=1e-12)
        ref = c - P[:, :r] @ (P[:, :r].T @ c)
        assert resid_sq == pytest.approx(ref @ ref, rel=1e-9, abs=1e-24)


@pytest.mark.parametrize("alpha, v, d", [(1.0, 600, 300), (3.0, 600, 300), (1.0, 200, 400)])
def test_setup_matches_the_full_svd_route(alpha, v, d, monkeypatch):
    """The setup (singular values and U^T q by bidiagonalisation, no singular vectors formed) against
    the previous route (a full SVD, U formed, of the same QR factor) on the same features: spectrum,
    projections P^T c, irreducible risk and the every-step risk curve (condition numbers of
    D^(1/2) W about 7e2, 9e7 and 4e2 here).

    Both routes are backward stable: each is exact for some M + E, |E| of order sqrt(n) eps |M|
    (Householder reductions, n = min(v, d), with the usual sqrt(n) growth of rounding errors).  So,
    by Weyl's bound, |s_i - s_i'| <= 4 sqrt(n) eps s_1, and by Wedin's, the i-th singular vectors of
    the two differ by an angle at most 4 sqrt(n) eps s_1 / g_i (g_i the gap from s_i to the nearest
    other singular value), so ||P^T c|_i - |P'^T c|_i| <= |c| 4 sqrt(n) eps s_1 / g_i.  The risk curve
    may differ by what a perturbation of that size moves it: the tolerance is twice the change that
    a relative n eps perturbation of W causes (measured here, about 5e-14 of the risk).
    """
    from toymodels import plrf

    eps, n = np.finfo(float).eps, min(v, d)
    new = PowerLawRF(alpha, 0.7, v, d, seed=3)
    W = new.features
    noise = np.random.default_rng(1).standard_normal(W.shape)
    perturbed = PowerLawRF.from_features(alpha, 0.7, W * (1 + n * eps * noise))
    monkeypatch.setattr(plrf, "_svd_projection", plrf._svd_projection_reference)
    ref = PowerLawRF(alpha, 0.7, v, d, seed=3)
    perturbed_ref = PowerLawRF.from_features(alpha, 0.7, perturbed.features)
    s, s_ref = np.sqrt(new.spectrum), np.sqrt(ref.spectrum)
    assert s.size == s_ref.size == n
    bound = 4 * math.sqrt(n) * eps * s_ref[0]
    np.testing.assert_array_less(np.abs(s - s_ref), bound)
    pc, pc_ref = (np.abs(m.regression.w_star) * np.sqrt(m.spectrum) for m in (new, ref))  # |P^T c|
    gaps = np.abs(s_ref[:, None] - s_ref[None, :]) + np.diag(np.full(n, np.inf))
    np.testing.assert_array_less(np.abs(pc - pc_ref), np.linalg.norm(new._c) * bound / gaps.min(axis=1))
    assert new.irreducible_risk == pytest.approx(ref.irreducible_risk, rel=1e-12, abs=1e-300)
    assert np.all(new.regression.w_star >= 0)  # the sign convention p_i^T c >= 0
    opt = SGD(0.5 * ref.stable_lr(SGD(1.0), 1))
    curve, curve_ref, curve_perturbed = (m.loss_curve(opt, 1, 10**4).values for m in (new, ref, perturbed_ref))
    sensitivity = np.max(np.abs(curve_perturbed - curve_ref) / curve_ref)
    assert 0 < sensitivity < 1e-12
    assert np.max(np.abs(curve - curve_ref) / curve_ref) <= 2 * sensitivity
