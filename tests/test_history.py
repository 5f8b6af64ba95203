"""Tests of toymodels.history: gradient histories of the toy models against their exact moments.

Each sample moment is compared with the exact one through its standard error: for a statistic f of
the rows, mean_t f(g_t) has standard error std_t f(g_t) / sqrt(T); all z-scores must be below 5
(about 50 z-scores per case, so a false alarm has probability ~3e-5 at a fixed seed).
"""

import numpy as np
import pytest
from scipy import stats

from toymodels import NQM, GaussianLinearRegression, RandomFeatures
from toymodels.history import gradient_history, gradient_moments

P = 8
T = 6000


def _models():
    """(model, theta) pairs with P = 8 coordinates, theta away from the optimum."""
    rng = np.random.default_rng(1)
    return {
        "nqm": (NQM.power_law(P), rng.standard_normal(P)),
        "linreg": (GaussianLinearRegression.power_law(P, noise_std=0.5), 0.3 * rng.standard_normal(P)),
        "rf": (RandomFeatures(60, input_dim=5, teacher_hidden=3, student_hidden=P, seed=0), rng.standard_normal(P)),
    }


MODELS = _models()


def z_scores(samples, expected):
    """|mean - expected| / standard error of the mean, over the first axis of ``samples``."""
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    return np.abs(samples.mean(axis=0) - expected) / se


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch_size", [1, 4])
def test_rows_have_the_exact_mean_and_covariance(name, batch_size):
    model, theta = MODELS[name]
    G = gradient_history(model, theta, batch_size=batch_size, n_iter=T, seed=3)
    mean, cov = gradient_moments(model, theta, batch_size)
    assert G.shape == (T, P) and mean.shape == (P,) and cov.shape == (P, P)
    assert np.max(z_scores(G, mean)) < 5.0
    centred = G - mean  # centred at the exact mean, so the outer products estimate cov without bias
    upper = np.triu_indices(P)
    products = (centred[:, :, None] * centred[:, None, :])[:, upper[0], upper[1]]
    assert np.max(z_scores(products, cov[upper])) < 5.0


@pytest.mark.parametrize("name", list(MODELS))
def test_covariance_scales_as_one_over_batch_size(name):
    model, theta = MODELS[name]
    np.testing.assert_allclose(gradient_moments(model, theta, 4)[1] * 4, gradient_moments(model, theta, 1)[1], rtol=1e-12)


def test_nqm_covariance_is_diag_c_over_b():
    nqm, theta = MODELS["nqm"]
    mean, cov = gradient_moments(nqm, theta, 2.5)  # the NQM accepts a real batch size
    np.testing.assert_allclose(mean, nqm.h * theta)
    np.testing.assert_allclose(cov, np.diag(nqm.c / 2.5))


def test_random_features_mean_is_the_full_gradient():
    rf, theta = MODELS["rf"]
    mean, _ = gradient_moments(rf, theta, 3)
    np.testing.assert_allclose(mean, rf.per_example_grads(theta).mean(axis=0))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("lr", [0.0, 0.1])
def test_same_seed_same_history(name, lr):
    model, theta = MODELS[name]
    a = gradient_history(model, theta, batch_size=2, n_iter=50, lr=lr, seed=7)
    b = gradient_history(model, theta, batch_size=2, n_iter=50, lr=lr, seed=7)
    c = gradient_history(model, theta, batch_size=2, n_iter=50, lr=lr, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(np.isfinite(a))


def literal_linreg_history(model, theta, batch_size, n_iter, rng):
    """Reference: sample B inputs x ~ N(0, Sigma) and labels t = w*.x + n, average x (w.x - t)."""
    x = np.sqrt(model.h) * rng.standard_normal((n_iter, batch_size, model.dim))
    t = x @ model.w_star + model.noise_std * rng.standard_normal((n_iter, batch_size))
    return np.einsum("tbi,tb->ti", x, x @ theta - t) / batch_size


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("at_optimum", [False, True])
def test_linreg_draws_have_the_law_of_sampled_data(batch_size, at_optimum):
    """The O(B + d) draw against literal sampling: two-sample KS tests on every coordinate, the norm
    and a random projection (the whole law, not only the two moments)."""
    model = GaussianLinearRegression(np.array([1.0, 0.4, 0.1]), w_star=[1.0, -0.5, 2.0], noise_std=0.3)
    theta = model.w_star.copy() if at_optimum else np.array([0.2, 0.3, -0.1])
    fast = gradient_history(model, theta, batch_size=batch_size, n_iter=20000, seed=0)
    slow = literal_linreg_history(model, theta, batch_size, 20000, np.random.default_rng(1))
    direction = np.random.default_rng(2).standard_normal(3)
    for f in (lambda g: g[:, 0], lambda g: g[:, 1], lambda g: g[:, 2], lambda g: np.linalg.norm(g, axis=1),
              lambda g: g @ direction):
        assert stats.ks_2samp(f(fast), f(slow)).pvalue > 1e-3


def test_theta_is_not_modified():
    model, theta = MODELS["nqm"]
    before = theta.copy()
    gradient_history(model, theta, batch_size=1, n_iter=20, lr=0.5, seed=0)
    np.testing.assert_array_equal(theta, before)


def test_noise_free_nqm_trajectory_is_gradient_descent():
    """With c = 0 every row is H theta_t and theta_t = (1 - lr h)^t theta_0."""
    h = np.array([1.0, 0.5, 0.1])
    lr, theta0 = 0.3, np.array([1.0, -2.0, 3.0])
    G = gradient_history(NQM(h, c=np.zeros(3)), theta0, batch_size=1, n_iter=20, lr=lr, seed=0)
    t = np.arange(20)[:, None]
    np.testing.assert_allclose(G, h * (1 - lr * h) ** t * theta0, rtol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_trajectory_iterates_follow_from_the_history(name):
    """Row t is drawn at theta_0 - lr sum_{s<t} G[s]: its mean there is the exact gradient (checked
    for the NQM, whose noise is additive: G[t] - H theta_t is N(0, diag(c) / B)); for every model SGD
    lowers the training loss."""
    model, theta = MODELS[name]
    lr = 0.2
    G = gradient_history(model, theta, batch_size=8, n_iter=400, lr=lr, seed=0)
    iterates = theta - lr * np.concatenate([np.zeros((1, P)), np.cumsum(G, axis=0)])
    if name == "nqm":
        noise = (G - model.h * iterates[:-1]) / np.sqrt(model.c / 8)
        assert abs(noise.mean()) < 5 / np.sqrt(noise.size) and abs(noise.var() - 1) < 5 * np.sqrt(2 / noise.size)
    first, last = (gradient_moments(model, iterates[k], 8)[0] for k in (0, -1))
    assert np.linalg.norm(last) < np.linalg.norm(first)


def test_errors():
    nqm, theta = MODELS["nqm"]
    rf, _ = MODELS["rf"]
    with pytest.raises(TypeError, match="`model` must be an NQM, GaussianLinearRegression or RandomFeatures"):
        gradient_history(object(), theta, batch_size=1, n_iter=2)
    with pytest.raises(ValueError, match=r"`theta` must be a finite array of shape \(8,\); got shape \(3,\)"):
        gradient_history(nqm, np.ones(3), batch_size=1, n_iter=2)
    with pytest.raises(ValueError, match="`theta` must be finite; got 8 non-finite entries"):
        gradient_moments(nqm, np.full(P, np.nan), 1)
    with pytest.raises(ValueError, match=r"`batch_size` must be a float in \[1, 9.0072e\+15\]; got 0.5"):
        gradient_history(nqm, theta, batch_size=0.5, n_iter=2)
    with pytest.raises(TypeError, match="`batch_size` must be an integer; got 2.5"):
        gradient_history(rf, theta, batch_size=2.5, n_iter=2)
    with pytest.raises(ValueError, match=r"`n_iter` must be an integer in \[1, 100000000\]; got 0"):
        gradient_history(nqm, theta, batch_size=1, n_iter=0)
    with pytest.raises(ValueError, match=r"`lr` must be a float in \[0, inf\); got -0.1"):
        gradient_history(nqm, theta, batch_size=1, n_iter=2, lr=-0.1)
    with pytest.raises(ValueError, match="the SGD trajectory diverged"):
        gradient_history(nqm, theta, batch_size=1, n_iter=2000, lr=10.0)
