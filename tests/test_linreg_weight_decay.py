"""Weight decay on linear regression and the power-law random features: the exact risk (a constant
state entry carries the drive wd w*) against Monte Carlo on sampled data and explicit features, the
long-run risk against the ridge solution (closed form, and solved from the features), the stability
edge, steps to a target and a batch-size sweep."""

import math

import numpy as np
import pytest

from toymodels import EMA, SGD, Momentum, Nesterov, PolyakAverage, ScheduleFree
from toymodels.linreg import GaussianLinearRegression
from toymodels.plrf import PowerLawRF
from toymodels.sweep import batch_size_sweep, grid_search

GLR = GaussianLinearRegression.power_law(6, noise_std=0.3)
WD_OPTS = [SGD(0.3, weight_decay=0.3), Momentum(0.15, 0.6, weight_decay=0.3), Nesterov(0.15, 0.7, weight_decay=0.2),
           EMA(Momentum(0.1, 0.5, weight_decay=0.3), 0.8)]
WD_IDS = ["sgd", "momentum", "nesterov", "momentum_ema"]


def _without_wd(opt):
    if isinstance(opt, EMA):
        return EMA(_without_wd(opt.base), opt.decay)
    return type(opt)(**{**opt.__dict__, "weight_decay": 0.0})


def _ridge_risk(model, wd):
    """Excess risk of the ridge solution theta_i = lambda_i w*_i / (lambda_i + wd): its error is
    -wd w*_i / (lambda_i + wd)."""
    return 0.5 * float(np.sum(model.h * (wd * model.w_star / (model.h + wd)) ** 2))


@pytest.mark.parametrize("opt", WD_OPTS, ids=WD_IDS)
def test_weight_decay_exact_matches_monte_carlo(opt):
    """Exact excess risk with weight decay vs runs on sampled data (the gradient plus wd theta):
    within 4 standard errors, while the same optimizer without weight decay is many standard errors
    away (so the check resolves the decay)."""
    ks = [0, 2, 8, 30]
    exact = GLR.loss_curve(opt, 2, ks).values
    mc = GLR.simulate(opt, 2, ks, n_runs=4000, seed=3)
    sem = mc.loss_sem.values[1:]
    z = (mc.loss.values[1:] - exact[1:]) / sem
    assert np.all(np.abs(z) < 4.0), z
    plain = GLR.loss_curve(_without_wd(opt), 2, ks).values
    assert abs(plain[-1] - exact[-1]) / sem[-1] > 8.0


@pytest.mark.parametrize("v, d", [(8, 4), (4, 8)])
def test_plrf_weight_decay_matches_monte_carlo_on_features(v, d):
    """PLRF (K's eigenbasis, the null space of K left out for d > v) with weight decay vs Monte Carlo
    on the explicit features (theta in R^d decayed towards 0): within 4 standard errors."""
    model = PowerLawRF(1.0, 0.5, v, d)
    ks = [0, 3, 10, 40]
    for opt in (SGD(0.5, weight_decay=0.2), Momentum(0.3, 0.5, weight_decay=0.2), EMA(SGD(0.5, weight_decay=0.2), 0.8)):
        exact = model.loss_curve(opt, 2, ks).values
        mc = model.simulate(opt, 2, ks, n_runs=2000, seed=0)
        assert mc.loss.values[0] == pytest.approx(exact[0], rel=1e-12)
        z = (mc.loss.values[1:] - exact[1:]) / mc.loss_sem.values[1:]
        assert np.all(np.abs(z) < 4.0), (opt, z)


def test_zero_weight_decay_is_the_old_system_and_the_limit_is_continuous():
    """wd = 0 uses the spec's own system and initial moments unchanged (the results of before, bit for
    bit); a tiny wd > 0 goes through the augmented system and agrees with it to rounding."""
    opt = Momentum(0.15, 0.6)
    a0, a1, b1 = opt.affine(GLR.h)
    for got, want in zip(GLR._affine(opt), (a0, a1, b1)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(GLR._S0(opt), GLR.init_sq[:, None, None] * np.outer(opt.init, opt.init)[None])
    for opt in (SGD(0.3), Momentum(0.15, 0.6), EMA(SGD(0.3), 0.8)):
        tiny = EMA(SGD(0.3, weight_decay=1e-13), 0.8) if isinstance(opt, EMA) else type(opt)(
            **{**opt.__dict__, "weight_decay": 1e-13})
        assert GLR._affine(tiny)[0].shape[1] == opt.n_state + 1
        np.testing.assert_allclose(GLR.loss_curve(tiny, 2, [0, 5, 300]).values,
                                   GLR.loss_curve(opt, 2, [0, 5, 300]).values, rtol=1e-10)
        assert GLR.stationary_loss(tiny, 2) == pytest.approx(GLR.stationary_loss(opt, 2), rel=1e-10)
    assert GLR.stable_lr(SGD(1.0, weight_decay=1e-13), 2) == pytest.approx(GLR.stable_lr(SGD(1.0), 2), rel=1e-9)


@pytest.mark.parametrize("opt", WD_OPTS, ids=WD_IDS)
def test_stationary_risk_with_weight_decay(opt):
    """The closed-form stationary risk (ridge mean plus fluctuations) equals the stepped curve after
    many steps; at a batch size of 2^52 (no gradient noise left) both equal the ridge solution's risk,
    and the noise adds to it at B = 2."""
    wd = opt.hyperparameters["weight_decay"]
    stat = GLR.stationary_loss(opt, 2)
    assert GLR.loss_curve(opt, 2, [3000]).values[0] == pytest.approx(stat, rel=1e-9)
    ridge = _ridge_risk(GLR, wd)
    assert GLR.stationary_loss(opt, 2.0**52) == pytest.approx(ridge, rel=1e-12)
    assert GLR.loss_curve(opt, 2.0**52, [3000]).values[0] == pytest.approx(ridge, rel=1e-9)
    assert stat > 1.05 * ridge


def test_plrf_long_run_risk_is_the_ridge_solution_of_the_features():
    """Full-batch limit of the PLRF with weight decay: the risk P of theta = (M^T M + wd)^-1 M^T c
    (M = D^(1/2) W, solved from the explicit features) equals the model's stationary risk, which
    runs through K's eigenbasis and the regression's closed form."""
    wd = 0.2
    for v, d in [(8, 4), (4, 8), (12, 12)]:
        model = PowerLawRF(1.0, 0.5, v, d)
        M, c = model._M, model._c
        theta = np.linalg.solve(M.T @ M + wd * np.eye(d), M.T @ c)
        ridge = model.risk(theta)
        assert model.stationary_loss(SGD(0.5, weight_decay=wd), 2.0**52) == pytest.approx(ridge, rel=1e-9)
        assert model.loss_curve(Momentum(0.3, 0.5, weight_decay=wd), 2.0**52, [4000]).values[0] == pytest.approx(
            ridge, rel=1e-8)


def test_stable_lr_with_weight_decay_is_the_stability_edge():
    """stable_lr with weight decay: the centred second-moment map (diag + rank one) has spectral
    radius 1 there, the stationary risk is finite just below and infinite just above, and a run just
    above it grows without bound.  With a strong decay it lies above lr_limit B / (B + 1), the edge
    without weight decay (the noise scales with lambda, the contraction with lambda + wd)."""
    for bs, wd in [(1, 0.5), (4, 0.2), (1, 2.0)]:
        opt = SGD(1.0, weight_decay=wd)
        lr = GLR.stable_lr(opt, bs)
        assert lr < GLR.lr_limit(opt)
        if wd == 2.0:
            assert lr > 1.5 * GLR.lr_limit(opt) * bs / (bs + 1)
        a, u, v, _ = GLR._sgd_system(opt, bs, lr)
        rho = np.max(np.abs(np.linalg.eigvals(np.diag(a) + np.outer(u, v))))
        assert rho == pytest.approx(1.0, abs=1e-9)
        assert math.isfinite(GLR.stationary_loss(SGD(0.999 * lr, weight_decay=wd), bs))
        assert GLR.stationary_loss(SGD(1.001 * lr, weight_decay=wd), bs) == math.inf
        curve = GLR.loss_curve(SGD(1.01 * lr, weight_decay=wd), bs, [2000, 4000]).values
        assert curve[1] > 10 * curve[0]


def test_steps_to_target_with_weight_decay():
    """The first crossing L_{k-1} > target >= L_k by stepping; a target below the stationary risk is
    unreachable with that floor as the reason; PLRF adds its irreducible risk to both."""
    for opt in (SGD(0.3, weight_decay=0.3), Momentum(0.15, 0.6, weight_decay=0.3)):
        floor = GLR.stationary_loss(opt, 2)
        target = 1.2 * floor
        k = GLR.steps_to_target(opt, 2, target)
        curve = GLR.loss_curve(opt, 2, int(k)).values
        assert curve[-1] <= target < curve[:-1].min()
        s, info = GLR.steps_to_target(opt, 2, 0.9 * floor, full_output=True, max_steps=5000)
        assert s == math.inf and info["reason"].startswith("unreachable: noise floor")
        assert info["noise_floor"] == pytest.approx(floor, rel=1e-12)
    model = PowerLawRF(1.0, 0.5, 8, 4)
    opt = SGD(0.5, weight_decay=0.2)
    target = 1.1 * model.stationary_loss(opt, 2)
    k = model.steps_to_target(opt, 2, target)
    curve = model.loss_curve(opt, 2, int(k)).values
    assert curve[-1] <= target < curve[:-1].min()


def test_what_weight_decay_cannot_do_is_refused_by_name():
    """SGD's secular closed form does not carry the mean: modal_form refuses weight decay by name
    (the sweeps then step); the time-varying averages have no closed form either (they are stepped,
    with weight decay too: tests/test_linreg_time_varying.py)."""
    with pytest.raises(NotImplementedError, match="weight_decay"):
        GLR.modal_form(SGD(0.3, weight_decay=0.1), 2)
    with pytest.raises(NotImplementedError, match="weight_decay"):
        PowerLawRF(1.0, 0.5, 8, 4).modal_form(SGD(0.3, weight_decay=0.1), 2)
    for opt in (PolyakAverage(SGD(0.1, weight_decay=0.1)), ScheduleFree(0.1, weight_decay=0.1)):
        with pytest.raises(NotImplementedError, match="closed form"):
            GLR.modal_form(opt, 2)
        assert np.all(np.isfinite(GLR.loss_curve(opt, 2, 5).values))
    # loss_at_step steps SGD with weight decay exactly (no closed form), up to the stepping limit
    opt = SGD(0.3, weight_decay=0.3)
    assert GLR.loss_at_step(opt, 2, 40) == GLR.loss_curve(opt, 2, [40]).values[0]
    with pytest.raises(ValueError, match="`k` must be reached.*weight_decay 0.3"):
        GLR.loss_at_step(opt, 2, 10**10)


def test_batch_size_sweep_with_weight_decay():
    """A small sweep with weight decay: every tuned point is reached exactly at its steps (by SGD with
    that decay) and is at least as good as the exact optimum over a grid of learning rates."""
    m = GaussianLinearRegression.power_law(6, 1.0, noise_std=0.1)
    wd = 0.05
    target = 1.5 * _ridge_risk(m, wd) + 0.02
    ds = batch_size_sweep(m, "sgd", [1.0, 8.0], target, progress=False, weight_decay=wd)
    assert ds.attrs["weight_decay"] == wd
    for bs, steps, lr in zip(ds.batch_size.values, ds.steps_to_target.values, ds.lr_opt.values):
        assert math.isfinite(steps)
        assert m.steps_to_target(SGD(lr, weight_decay=wd), bs, target) == steps
        grid = grid_search(m, "sgd", bs, target, lr_fractions=np.geomspace(0.02, 0.9, 12), extras=[None],
                           weight_decay=wd)
        assert steps <= grid["steps"]


def test_family_sweeps_pass_weight_decay_on():
    """family_sweeps with weight decay on the NQM (the compiled family path, and schedule-free SGD's
    own tuner): each tuned point is reached exactly at its steps by the optimizer with that decay."""
    from toymodels import NQM
    from toymodels.sweep import _extra_from_value, family_sweeps, make_optimizer

    nqm, wd, target = NQM.power_law(30), 0.01, 0.05
    out = family_sweeps(nqm, ["sgd", "momentum", "schedule_free"], [2.0, 8.0], target, progress=False, n_jobs=1,
                        weight_decay=wd)
    for fam, ds in out.items():
        assert ds.attrs["weight_decay"] == wd
        extras = ds["momentum_opt"].values if "momentum_opt" in ds else [None] * ds.batch_size.size
        for bs, steps, lr, extra in zip(ds.batch_size.values, ds.steps_to_target.values, ds.lr_opt.values, extras):
            extra = None if extra is None else _extra_from_value(fam, float(extra))
            opt = make_optimizer(fam, float(lr), extra, weight_decay=wd)
            assert opt.hyperparameters["weight_decay"] == wd
            assert math.isfinite(steps) and nqm.steps_to_target(opt, bs, target) == steps, (fam, bs)
