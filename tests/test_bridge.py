"""deepmodels.bridge: an NQM fitted to a quadratic recovers its spectrum and predicts its steps."""

import math

import numpy as np
import pytest
import torch

from deepmodels import bridge, models, pergrad
from toymodels import SGD, GaussianLinearRegression
from toymodels.schema import validate


@pytest.fixture(scope="module")
def quadratic():
    rng = np.random.default_rng(0)
    d, n = 12, 4000
    lam = 1.0 / np.arange(1, d + 1)
    x = rng.standard_normal((n, d)) * np.sqrt(lam)
    t = x @ rng.standard_normal(d) + 0.3 * rng.standard_normal(n)
    net = models.linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.zero_()

    def loss_fn(out, target):
        return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()

    return net, loss_fn, torch.tensor(x), torch.tensor(t)


def test_fitted_nqm_recovers_the_quadratic(quadratic):
    net, loss_fn, x, t = quadratic
    fit = bridge.fit_nqm(net, loss_fn, x, t, k=11, dim=11)
    X, T = x.numpy(), t.numpy()
    sigma = X.T @ X / X.shape[0]
    lam, vecs = np.linalg.eigh(sigma)
    lam, vecs = lam[::-1][:11], vecs[:, ::-1][:, :11]
    np.testing.assert_allclose(fit.curvature_top, lam, rtol=1e-7)  # the Hessian of the squared loss is Sigma_hat
    G = X * (X @ np.zeros(12) - T)[:, None]  # per-example gradients at w = 0
    C = np.cov(G.T, bias=True)
    np.testing.assert_allclose(fit.noise_top, np.einsum("pi,pq,qi->i", vecs, C, vecs), rtol=1e-6)
    w_ls = np.linalg.lstsq(X, T, rcond=None)[0]
    np.testing.assert_allclose(fit.init_sq_top, (vecs.T @ (0 - w_ls)) ** 2, rtol=1e-6)
    assert fit.report["curvature_r2"] > 0.99 and fit.report["tail_share"] == 0.0


def test_predicted_steps_match_linreg_in_the_deterministic_limit(quadratic):
    """At a huge batch size both models are gradient descent on the same quadratic: the fitted NQM's
    tuned steps equal the exact toymodels.linreg ones (the same 11 modes and starting point)."""
    net, loss_fn, x, t = quadratic
    fit = bridge.fit_nqm(net, loss_fn, x, t, k=11, dim=11)
    lr_model = GaussianLinearRegression(fit.curvature_top, w_star=np.sqrt(fit.init_sq_top), noise_std=0.0)
    target = 0.05 * lr_model.initial_loss
    big = 2.0**30
    pred = bridge.predict_steps(fit, [big], target)
    validate(pred)
    lr = float(pred.lr_opt.values[0])
    exact_linreg = lr_model.steps_to_target(SGD(lr), big, target)
    exact_nqm = fit.nqm.steps_to_target(SGD(lr), big, target)
    assert exact_nqm == pred.steps_to_target.values[0]
    assert abs(exact_linreg - exact_nqm) <= 1
    cal = bridge.predict_steps(fit, [big, 2 * big], target, calibrate=(big, 2 * exact_nqm))
    assert cal.attrs["calibration"] == pytest.approx(2.0)
    np.testing.assert_allclose(cal.steps_to_target.values[0], 2 * exact_nqm)


def test_tail_extrapolation_and_errors(quadratic):
    net, loss_fn, x, t = quadratic
    fit = bridge.fit_nqm(net, loss_fn, x, t, k=6, dim=40)
    assert fit.nqm.dim == 40 and 0 < fit.report["tail_share"] < 1
    # the tail carries the measured totals: the noise trace and the gradient outside the top directions
    G = pergrad.flatten(pergrad.per_example_grads(net, loss_fn, x, t)).double()
    g = G.mean(0)
    nqm = fit.nqm
    np.testing.assert_allclose(nqm.c.sum(), float(((G - g) ** 2).sum(1).mean()), rtol=1e-6)
    np.testing.assert_allclose(np.sum(nqm.h**2 * nqm.init_sq), float(g @ g), rtol=1e-6)
    assert 0 < fit.report["tail_gradient_share"] < 1 and 0 < fit.report["tail_noise_share"] < 1
    assert math.isfinite(fit.report["curvature_power"])
    with pytest.raises(ValueError, match="`k` must be an int"):
        bridge.fit_nqm(net, loss_fn, x, t, k=12)


def test_fit_linreg_recovers_the_label_noise():
    """On Gaussian data whose per-example covariance follows toymodels.linreg's law, the label-noise
    level is recovered from the measured noise along the eigen-directions."""
    rng = np.random.default_rng(1)
    d, n, sigma = 8, 200_000, 0.3
    lam = np.linspace(1.0, 0.2, d)
    w_star = rng.standard_normal(d)
    x = rng.standard_normal((n, d)) * np.sqrt(lam)
    t = x @ w_star + sigma * rng.standard_normal(n)
    net = models.linear(d, 1, bias=False).double()
    with torch.no_grad():
        net.weight.zero_()

    def loss_fn(out, target):
        return 0.5 * ((out.squeeze(-1) - target) ** 2).mean()

    fit = bridge.fit_nqm(net, loss_fn, torch.tensor(x), torch.tensor(t), k=7, dim=7)
    lr_model, sigma_hat = bridge.fit_linreg(fit, initial_loss=float(0.5 * np.sum(lam * w_star**2)))
    assert sigma_hat == pytest.approx(sigma, rel=0.15)
    assert lr_model.dim == 7 and fit.report["linreg_noise_std"] == sigma_hat
