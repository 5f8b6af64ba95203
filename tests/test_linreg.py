"""Online Gaussian linear regression: exact moments vs Monte Carlo and vs an independent closed form."""

import math

import numpy as np
import pytest

from toymodels import EMA, SGD, Momentum, secular
from toymodels.linreg import GaussianLinearRegression
from toymodels.sweep import batch_size_sweep, default_grid, grid_search

OPTS = [(SGD(0.3), 4), (SGD(0.3, precond=0.5), 4), (Momentum(0.1, 0.8), 4), (EMA(SGD(0.3), 0.9), 2)]
IDS = ["sgd", "precond", "momentum", "ema"]


@pytest.fixture(scope="module")
def noisy():
    return GaussianLinearRegression.power_law(20, 1.0, noise_std=0.3)


@pytest.mark.parametrize("opt, bs", OPTS, ids=IDS)
@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_exact_matches_monte_carlo(opt, bs, noise_std):
    """The exact recursion (Gaussian fourth moments) vs SGD on sampled data: within 4 standard errors."""
    m = GaussianLinearRegression.power_law(12, 1.0, w_star=np.linspace(1.0, 0.5, 12), noise_std=noise_std)
    ks = np.array([0, 1, 3, 10, 30, 100, 200])
    exact = m.loss_curve(opt, bs, ks).values
    mc = m.simulate(opt, bs, ks, n_runs=3000, seed=11)
    assert mc.loss.values[0] == pytest.approx(exact[0], rel=1e-12)  # deterministic start
    z = (mc.loss.values[1:] - exact[1:]) / mc.loss_sem.values[1:]
    assert np.all(np.abs(z) < 4), z
    # the gradient statistics of the simulation follow the exact ones too (|E g|^2 within 4 SE
    # is implied by the loss; here: the same names and a sane value)
    ex = m.gradient_stats(opt, bs, ks)
    assert set(mc.data_vars) >= {"grad_norm_sq", "grad_var", "grad_nvar", "snr", "noise_scale"}
    assert np.all(np.isfinite(ex.grad_var.values))


@pytest.mark.parametrize("spectrum", [np.array([1.0, 0.5, 0.5, 0.25, 0.1]), np.full(6, 0.3), 1.0 / np.arange(1, 41)],
                         ids=["repeated", "isotropic", "power-law"])
@pytest.mark.parametrize("precond", [0.0, 0.5])
def test_closed_form_matches_step_by_step(spectrum, precond):
    """SGD's secular closed form (toymodels.secular) equals the step-by-step propagation, also with
    repeated eigenvalues (merged poles)."""
    m = GaussianLinearRegression(spectrum, w_star=1.0, noise_std=0.2)
    opt = SGD(0.8 * m.stable_lr(SGD(1.0, precond=precond), 3), precond=precond)
    steps = m.loss_curve(opt, 3, 400).values  # step by step (short curve)
    closed = m.modal_form(opt, 3).loss(np.arange(401))
    np.testing.assert_allclose(closed, steps, rtol=1e-11)
    long = m.loss_curve(opt, 3, np.array([0, 1, 399, 25_000]))  # the closed-form path (> 20000 steps)
    np.testing.assert_allclose(long.values[:3], steps[[0, 1, 399]], rtol=1e-11)


def test_secular_modes_match_dense_powers():
    """loss_modes against numpy's matrix powers of diag(a) + u v^T, with another read-out f."""
    rng = np.random.default_rng(3)
    d = 30
    a = rng.uniform(0.0, 0.95, d)
    a[4] = a[7]
    u = rng.uniform(0.0, 0.02, d)
    v = rng.uniform(0.1, 1.0, d)
    delta = rng.normal(size=d)
    M = np.diag(a) + np.outer(u, v)
    for f in (None, v * rng.uniform(0.5, 2.0, d)):
        f_eff = v if f is None else f
        f_eff = f_eff.copy()
        f_eff[7] = f_eff[4] * v[7] / v[4]  # f a multiple of v on the repeated pole
        mu, gamma = secular.loss_modes(a, u, v, delta, f_eff)
        for k in [0, 1, 5, 50, 400]:
            ref = 0.5 * f_eff @ np.linalg.matrix_power(M, k) @ delta
            assert np.sum(gamma * mu**k) == pytest.approx(ref, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("opt, bs", OPTS, ids=IDS)
def test_stationary_risk_closed_form(noisy, opt, bs):
    """The closed-form stationary risk equals the risk after a long exact run."""
    floor = noisy.stationary_loss(opt, bs)
    long = noisy.loss_curve(opt, bs, np.array([0, 40_000])).values[-1]
    assert floor == pytest.approx(long, rel=1e-9)
    assert floor > 0


def test_stable_lr_is_the_stability_edge(noisy):
    """stable_lr: the spectral radius of the second-moment map crosses 1 there."""
    for bs, precond in [(1, 0.0), (8, 0.0), (4, 0.5)]:
        opt = SGD(1.0, precond=precond)
        lr = noisy.stable_lr(opt, bs)
        assert lr < noisy.lr_limit(opt)
        a, u, v, _ = noisy._sgd_system(opt, bs, lr)
        rho = np.max(np.abs(np.linalg.eigvals(np.diag(a) + np.outer(u, v))))
        assert rho == pytest.approx(1.0, abs=1e-9)
        assert math.isfinite(noisy.stationary_loss(SGD(lr * 0.999, precond=precond), bs))
        assert noisy.stationary_loss(SGD(lr * 1.001, precond=precond), bs) == math.inf


@pytest.mark.parametrize("opt, bs", OPTS, ids=IDS)
def test_steps_to_target_exact(noisy, opt, bs):
    """L_{k-1} > target >= L_k, by the closed form (SGD) or by stepping (momentum, averaging)."""
    target = 1.5 * noisy.stationary_loss(opt, bs)
    k = noisy.steps_to_target(opt, bs, target)
    curve = noisy.loss_curve(opt, bs, int(k)).values
    assert curve[-1] <= target < curve[:-1].min()


def test_unreachable_and_divergent_report_reasons(noisy):
    s, info = noisy.steps_to_target(SGD(0.5), 8, 1e-6, full_output=True)
    assert s == math.inf and info["reason"].startswith("unreachable: noise floor")
    s, info = noisy.steps_to_target(SGD(1.9), 1, 1e-3, full_output=True)
    assert s == math.inf and info["reason"].startswith("diverges")
    s, info = noisy.steps_to_target(Momentum(0.9, 0.9), 1, 1e-3, full_output=True, max_steps=500)
    assert s == math.inf and info["reason"].startswith("diverges")
    s, info = noisy.steps_to_target(Momentum(0.05, 0.5), 4, 1e-6, full_output=True, max_steps=500)
    assert s == math.inf and info["reason"].startswith("unreachable")


def test_interpolation_converges_geometrically():
    """Without label noise the risk falls geometrically at the largest secular root's rate."""
    m = GaussianLinearRegression(np.array([1.0, 0.6, 0.3, 0.1]), noise_std=0.0)
    opt = SGD(0.5)
    assert m.stationary_loss(opt, 4) == 0.0
    ks = np.arange(150, 201, 10)  # late enough for the slowest mode to dominate (next one: 0.78^k)
    loss = m.loss_curve(opt, 4, ks).values
    rate = math.exp(np.polyfit(ks, np.log(loss), 1)[0])
    a, u, v, _ = m._sgd_system(opt, 4, 0.5)
    mu, _ = secular.loss_modes(a, u, v, m.init_sq)
    assert rate == pytest.approx(mu.max(), rel=1e-8)
    assert rate < 1
    # and it reaches 1e-12 of the initial risk, which the NQM's O(1/k) floor never allows
    assert math.isfinite(m.steps_to_target(opt, 4, 1e-12 * m.initial_loss))


def test_gradient_covariance_split_matches_samples():
    """Law of total covariance: label noise sigma^2 Sigma plus batch noise that vanishes at w*."""
    m = GaussianLinearRegression(np.array([1.0, 0.4, 0.1]), w_star=np.array([0.5, -1.0, 2.0]), noise_std=0.7)
    w = np.array([0.1, 0.2, 0.3])
    cov = m.gradient_covariance(w)
    rng = np.random.default_rng(5)
    n = 400_000
    x = rng.standard_normal((n, 3)) * np.sqrt(m.h)
    t = x @ m.w_star + 0.7 * rng.standard_normal(n)
    g = x * (x @ w - t)[:, None]
    emp = np.cov(g.T)
    # standard error of each covariance entry from the fourth moments of the samples
    c = g - g.mean(0)
    se = np.sqrt(np.var(c[:, :, None] * c[:, None, :], axis=0) / n)
    assert np.all(np.abs(emp - (cov["label"] + cov["batch"])) < 4 * se)
    assert np.all(np.abs(g.mean(0) - cov["mean"]) < 4 * g.std(0) / math.sqrt(n))
    at_opt = m.gradient_covariance(m.w_star)
    assert np.all(at_opt["batch"] == 0) and np.all(at_opt["mean"] == 0)
    ds = m.gradient_stats(SGD(0.3), 4, 10)
    np.testing.assert_allclose(ds.trace_cov_label.values, 0.49 * 1.5)
    assert ds.trace_cov_batch.values[0] == pytest.approx(np.trace(m.gradient_covariance(np.zeros(3))["batch"]))


def test_batch_size_sweep_scales_then_saturates():
    """Near-linear scaling below the critical batch size tr(Sigma) / lambda_max, saturation above."""
    m = GaussianLinearRegression.power_law(50, 1.0, noise_std=0.0)
    crit = np.sum(m.h) / m.h.max()  # 4.5
    ds = batch_size_sweep(m, "sgd", 2.0 ** np.arange(0, 12), 0.01 * m.initial_loss, progress=False)
    s = ds.steps_to_target.values
    assert s[0] / s[1] > 1.8  # B = 1 -> 2, well below the critical batch size: nearly halves
    assert s[-3] / s[-1] < 1.1  # B = 512 -> 2048, far above: nothing left to gain
    assert ds.attrs["model"] == "linreg"
    assert 2 * crit < 16  # the saturation happens at batch sizes of the order of crit
    assert s[4] / s[-1] < 2.0


@pytest.mark.parametrize("family", ["sgd", "momentum"])
def test_tuned_linreg_at_least_as_good_as_grid(family):
    m = GaussianLinearRegression.power_law(20, 1.0, noise_std=0.05)
    target = 0.05 * m.initial_loss
    fr, extras = default_grid(m, family, n_lr=25, n_extra=4)
    ds = batch_size_sweep(m, family, [1.0, 16.0], target, progress=False)
    for j, b in enumerate([1.0, 16.0]):
        g = grid_search(m, family, b, target, lr_fractions=fr, extras=extras)["steps"]
        assert ds.steps_to_target.values[j] <= g


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spectrum=[1.0, 0.5], w_star=[1.0, 2.0, 3.0]), "`w_star` must be a scalar or have length 2"),
        (dict(spectrum=[1.0, 0.5], noise_std=-0.1), "`noise_std` must be a float in \\[0, inf\\)"),
        (dict(spectrum=[1.0, np.nan]), "`spectrum` must be finite"),
        (dict(spectrum=[]), "`spectrum` must be a non-empty 1-D array"),
        (dict(spectrum=[1.0, 0.0]), "`spectrum` must be > 0"),
        (dict(spectrum=[1.0, 0.5], w_star=[1.0, np.inf]), "`w_star` must be finite"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianLinearRegression(**kwargs)


def test_bad_call_arguments(noisy):
    with pytest.raises(ValueError, match="`batch_size` must be a float in \\[1, 9.0072e\\+15\\]"):
        noisy.loss_curve(SGD(0.1), 0.5, 10)
    with pytest.raises(ValueError, match="`batch_size` must be a whole number"):
        noisy.simulate(SGD(0.1), 2.5, 10)
    with pytest.raises(ValueError, match="`target` must be a float in \\(0, inf\\)"):
        noisy.steps_to_target(SGD(0.1), 1, 0.0)
    with pytest.raises(NotImplementedError, match="closed form for SGD"):
        noisy.modal_form(Momentum(0.1, 0.9), 1)
    with pytest.raises(ValueError, match="`w` must be a finite array of shape \\(20,\\)"):
        noisy.gradient_covariance(np.zeros(3))
