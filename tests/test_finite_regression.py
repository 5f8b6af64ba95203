"""Finite-data linear regression: exact SGD and Kaczmarz moments vs Monte Carlo; interpolation."""

import math

import numpy as np
import pytest

from toymodels.linreg import FiniteLinearRegression


@pytest.fixture(scope="module")
def noisy():
    return FiniteLinearRegression.gaussian(40, 8, spectrum=np.linspace(1.0, 0.1, 8), noise_std=0.5, seed=1)


@pytest.fixture(scope="module")
def interp():
    return FiniteLinearRegression.gaussian(12, 30, seed=2)  # n < d: interpolates


def _within(mc, exact, name="loss", n_se=4.0):
    z = (mc[name].values[1:] - exact[name].values[1:]) / mc[f"{name}_sem"].values[1:]
    assert np.all(np.abs(z) < n_se), z


@pytest.mark.parametrize("bs", [1, 5])
def test_sgd_with_replacement_matches_monte_carlo(noisy, interp, bs):
    ks = np.array([0, 1, 5, 20, 60, 150])
    for model in (noisy, interp):
        lr = 1.0 / model.row_sq.max()
        exact = model.loss_curve(lr, bs, ks)
        mc = model.simulate(lr, bs, ks, n_runs=4000, seed=3)
        _within(mc, exact)
        _within(mc, exact, "sq_error")


def test_without_replacement_differs_only_by_sampling(interp):
    """Epoch sampling also interpolates (converges to zero loss) and is at least as fast late on."""
    lr = 1.0 / interp.row_sq.max()
    ks = np.array([0, 48, 96])
    wo = interp.simulate(lr, 4, ks, replacement=False, n_runs=500, seed=4)
    wr = interp.loss_curve(lr, 4, ks)
    assert wo.loss.values[-1] < 1e-2 * wo.loss.values[0]
    assert wo.loss.values[-1] < wr.loss.values[-1]


def test_interpolation_converges_exponentially_noise_does_not(noisy):
    """Consistent data: the loss falls geometrically at the spectral radius of the (linear) second-
    moment map, found independently by applying one step to a basis of symmetric matrices."""
    model = FiniteLinearRegression.gaussian(40, 8, spectrum=np.linspace(1.0, 0.3, 8), seed=1)
    assert model.interpolating and not noisy.interpolating
    lr, bs = 1.0 / model.row_sq.max(), 2
    d = model.dim
    basis = [(i, j) for i in range(d) for j in range(i, d)]
    T = np.empty((len(basis), len(basis)))
    for col, (i, j) in enumerate(basis):
        E = np.zeros((d, d))
        E[i, j] = E[j, i] = 1.0
        _, out = model._sgd_step(np.zeros(d), E, lr, bs)
        T[:, col] = [out[a, b] for a, b in basis]
    radius = np.max(np.abs(np.linalg.eigvals(T)))
    ks = np.arange(1500, 1801, 50)
    loss = model.loss_curve(lr, bs, ks).loss.values
    rate = math.exp(np.polyfit(ks, np.log(loss), 1)[0])
    assert rate == pytest.approx(radius, rel=1e-6)
    assert rate < 1
    # with residuals the expected excess loss settles at a floor > 0
    lr = 1.0 / noisy.row_sq.max()
    late = noisy.loss_curve(lr, 2, np.array([0, 3000, 6000])).loss.values
    assert late[2] > 0 and late[2] == pytest.approx(late[1], rel=1e-3)


def test_exact_sgd_matches_a_slow_dense_recursion(noisy):
    """Independent check: the moment recursion written out per row, e e^T expanded."""
    lr, bs = 0.3, 3
    X, rho, sig = noisy.X, noisy.residual, noisy.sigma
    e0 = noisy.w0 - noisy.w_ls
    m, S = e0.copy(), np.outer(e0, e0)
    ref = [0.5 * np.trace(sig @ S)]
    for _ in range(10):
        J = np.eye(noisy.dim) - lr * sig
        G = np.zeros_like(S)
        for r in range(noisy.n):
            x = X[r]
            # E[(x.e - rho)^2] = x^T S x - 2 rho x^T m + rho^2
            G += np.outer(x, x) * (x @ S @ x - 2 * rho[r] * x @ m + rho[r] ** 2) / noisy.n
        S = J @ S @ J.T + lr**2 / bs * (G - sig @ S @ sig)
        m = J @ m
        ref.append(0.5 * np.trace(sig @ S))
    np.testing.assert_allclose(noisy.loss_curve(lr, bs, 10).loss.values, ref, rtol=1e-10)


@pytest.mark.parametrize("sampling", ["norm", "uniform"])
def test_kaczmarz_matches_monte_carlo(noisy, interp, sampling):
    ks = np.array([0, 1, 5, 20, 60])
    for model in (noisy, interp):
        exact = model.kaczmarz_curve(ks, sampling=sampling)
        mc = model.kaczmarz_simulate(ks, sampling=sampling, n_runs=4000, seed=5)
        _within(mc, exact, "sq_error")
        _within(mc, exact)


def test_kaczmarz_strohmer_vershynin_bound_holds():
    """Consistent systems, norm sampling: E|e_k|^2 <= (1 - 1/kappa^2)^k |e_0|^2, and not vacuous."""
    for n, d, seed in [(50, 10, 0), (12, 30, 1), (200, 20, 2)]:
        m = FiniteLinearRegression.gaussian(n, d, spectrum=np.geomspace(1.0, 0.05, d), seed=seed)
        assert m.interpolating
        ds = m.kaczmarz_curve(300)
        assert np.all(ds.sq_error.values <= ds.sv_bound.values * (1 + 1e-10))
        assert ds.sq_error.values[-1] < 0.5 * ds.sq_error.values[0]
    # label noise: Kaczmarz stalls at a floor the bound does not describe
    m = FiniteLinearRegression.gaussian(50, 10, noise_std=0.5, seed=0)
    ds = m.kaczmarz_curve(np.array([0, 2000, 3000]))
    assert ds.sq_error.values[-1] > ds.sv_bound.values[-1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(X=np.ones((3, 2)), y=np.ones(4)), "`y` must have shape \\(3,\\)"),
        (dict(X=np.ones(3), y=np.ones(3)), "`X` must be a non-empty 2-D array"),
        (dict(X=np.ones((0, 2)), y=np.ones(0)), "`X` must be a non-empty 2-D array"),
        (dict(X=np.array([[1.0, np.nan]]), y=np.ones(1)), "`X` must be finite"),
        (dict(X=np.ones((2, 2)), y=np.array([1.0, np.inf])), "`y` must be finite"),
        (dict(X=np.array([[1.0, 0.0], [0.0, 0.0]]), y=np.ones(2)), "`X` must not have all-zero rows"),
        (dict(X=np.ones((2, 2)), y=np.ones(2), w0=np.ones(3)), "`w0` must be a finite scalar or have shape \\(2,\\)"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FiniteLinearRegression(**kwargs)


def test_bad_call_arguments(noisy):
    with pytest.raises(ValueError, match="`lr` must be a float in \\(0, inf\\)"):
        noisy.loss_curve(-0.1, 1, 10)
    with pytest.raises(ValueError, match="`sampling` must be one of 'norm', 'uniform'"):
        noisy.kaczmarz_curve(10, sampling="cyclic")
    with pytest.raises(ValueError, match="`batch_size` must be a whole number"):
        noisy.simulate(0.1, 1.5, 10)
    ds = noisy.loss_curve(10.0, 1, 400)  # far above the stable rate: reported as inf, not NaN
    assert ds.loss.values[-1] == math.inf and not np.any(np.isnan(ds.loss.values))


# ----------------------------------------------------------------------------------------------
# weight decay (coupled L2: the update's gradient is g + wd w; the loss reported is unregularised)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [1, 4])
def test_weight_decay_matches_monte_carlo(noisy, interp, bs):
    """The exact moments with weight decay against the numba Monte Carlo (which only adds wd w to
    each update), within 4 standard errors; the decay moves the curve by many standard errors."""
    ks = np.array([0, 1, 5, 20, 60, 150])
    for model in (noisy, interp):
        lr, wd = 1.0 / model.row_sq.max(), 0.5
        exact = model.loss_curve(lr, bs, ks, weight_decay=wd)
        assert exact.attrs["weight_decay"] == wd
        mc = model.simulate(lr, bs, ks, n_runs=4000, seed=13, weight_decay=wd)
        _within(mc, exact)
        _within(mc, exact, "sq_error")
        plain = model.loss_curve(lr, bs, ks)
        z = np.abs(plain.loss.values[-1] - exact.loss.values[-1]) / mc.loss_sem.values[-1]
        assert z > 10.0, z


def test_weight_decay_at_huge_batch_is_gradient_descent_on_the_ridge_objective(noisy):
    """Independent closed form: with B = 2^50 the noise is gone and the mean error follows gradient
    descent on L + wd |w|^2 / 2, e_k - e_r = J^k (e_0 - e_r), J = I - a (Sigma + wd I), around the
    ridge solution e_r = (Sigma + wd I)^-1 Sigma w_ls - w_ls; the loss is e_k^T Sigma e_k / 2."""
    lr, wd, bs = 0.2, 0.3, 2.0**50
    sig, d = noisy.sigma, noisy.dim
    e_r = np.linalg.solve(sig + wd * np.eye(d), sig @ noisy.w_ls) - noisy.w_ls
    J = np.eye(d) - lr * (sig + wd * np.eye(d))
    e = noisy.w0 - noisy.w_ls
    ref = []
    for _ in range(41):
        ref.append(0.5 * e @ sig @ e)
        e = J @ (e - e_r) + e_r
    got = noisy.loss_curve(lr, bs, 40, weight_decay=wd).loss.values
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    late = noisy.loss_curve(lr, bs, [1000], weight_decay=wd).loss.values[0]
    assert late == pytest.approx(0.5 * e_r @ sig @ e_r, rel=1e-6)  # settles at the ridge floor > 0
    assert 0.5 * e_r @ sig @ e_r > 1e-3


def test_weight_decay_in_the_sweep_interface(noisy):
    """steps_to_target and loss_at_step (powers of the moment map) agree with the stepped curve;
    a target below the ridge floor is reported unreachable, not a finite number; lr_limit includes wd."""
    model = FiniteLinearRegression(noisy.X[:, :4], noisy.y)
    from toymodels import SGD

    wd, bs = 0.2, 2
    opt = SGD(0.5 / model.row_sq.max(), weight_decay=wd)
    curve = model.loss_curve(opt.lr.lr, bs, 400, weight_decay=wd).loss.values
    target = 0.5 * (curve[0] + curve[-1]) * 0.2
    k = model.steps_to_target(opt, bs, target)
    assert k == float(np.flatnonzero(curve <= target)[0])
    assert model.loss_at_step(opt, bs, 123) == pytest.approx(curve[123], rel=1e-9)
    floor = curve[-1]
    steps, info = model.steps_to_target(opt, bs, 0.5 * floor, max_steps=20000, full_output=True)
    assert steps == math.inf and "not reached" in info["reason"]
    lam = np.linalg.eigvalsh(model.sigma)[-1]
    assert model.lr_limit(opt) == pytest.approx(2.0 / (lam + wd), rel=1e-12)
    with pytest.raises(ValueError, match="precond"):
        model.steps_to_target(SGD(0.1, precond=0.5), bs, target)
