"""Batch-size schedules B_k in the exact engine and the Monte Carlo (NQM and linear regression).

A constant schedule reproduces the constant batch size bit for bit; a changing one agrees with Monte
Carlo within 4 standard errors and with an independent numpy recursion to machine precision, and is
told apart from its final batch size; bad batch sizes are refused by name.
"""

import math

import numpy as np
import pytest

from toymodels import (NQM, SGD, BatchSizeWarmup, Constant, Cosine, Exponential, GaussianLinearRegression, Momentum,
                       PiecewiseConstant)
from toymodels.batch_schedule import compare_with_constant, cost_to_target
from toymodels.schedules import cumulative
from toymodels.schema import validate

NQM20 = NQM.power_law(20)
GLR8 = GaussianLinearRegression.power_law(8, noise_std=0.3)
MODELS = {"nqm": NQM20, "linreg": GLR8}

# ------------------------------------------------------------------------------------------------
# a constant schedule is the constant batch size, bit for bit
# ------------------------------------------------------------------------------------------------
LRS = {"constant": lambda a: a, "piecewise": lambda a: PiecewiseConstant((30, 200), (a, a / 3, a / 10)),
       "cosine": lambda a: Cosine(a, 120, a / 10)}
OPTS = {"sgd": lambda lr: SGD(lr), "momentum": lambda lr: Momentum(lr, 0.7)}
CONSTANT_SCHEDULES = {"Constant": lambda b: Constant(b),
                      "equal pieces": lambda b: PiecewiseConstant((7, 90), (b, b, b)),
                      "flat warm-up": lambda b: BatchSizeWarmup(b, b, 60, every=20)}
STEPS = np.unique(np.r_[np.arange(40), np.geomspace(40, 10**7, 25).astype(np.int64)])


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("lr", list(LRS))
def test_constant_schedule_equals_constant_batch_size_exactly(model, opt, lr):
    m = MODELS[model]
    optimizer = OPTS[opt](LRS[lr](0.5 if model == "nqm" else 0.2))
    B = 6.0
    steps = STEPS if model == "nqm" or (opt == "sgd") else STEPS[STEPS <= 5000]  # linreg momentum: stepped
    ref = m.gradient_stats(optimizer, B, steps)
    targets = [f * m.initial_loss for f in (0.3, 0.02)]
    ref_k = [m.steps_to_target(optimizer, B, t, full_output=True) for t in targets]
    for make in CONSTANT_SCHEDULES.values():
        sched = make(B)
        ds = m.gradient_stats(optimizer, sched, steps)
        for name in ref.data_vars:
            assert np.array_equal(ds[name].values, ref[name].values), (name, sched)
        assert np.array_equal(m.loss_curve(optimizer, sched, steps).values, ref.loss.values)
        np.testing.assert_array_equal(ds.batch_size.values, B)
        np.testing.assert_array_equal(ds.examples.values, B * steps)
        for t, (k, info) in zip(targets, ref_k):
            k2, info2 = m.steps_to_target(optimizer, sched, t, full_output=True)
            assert k2 == k and info2["reason"] == info["reason"], (sched, t)


def test_constant_schedule_monte_carlo_is_the_same_draws():
    a = NQM20.simulate(SGD(0.5), 4, 30, n_runs=20, seed=5)
    b = NQM20.simulate(SGD(0.5), PiecewiseConstant((10,), (4, 4)), 30, n_runs=20, seed=5)
    assert np.array_equal(a.loss.values, b.loss.values)
    a = GLR8.simulate(SGD(0.2), 3, 20, n_runs=10, seed=5)
    b = GLR8.simulate(SGD(0.2), Constant(3), 20, n_runs=10, seed=5)
    assert np.array_equal(a.loss.values, b.loss.values)


# ------------------------------------------------------------------------------------------------
# an independent recursion, to machine precision
# ------------------------------------------------------------------------------------------------
def _nqm_sgd_reference(h, c, s0, lrs, bss):
    """E theta_i^2 stepped by hand: s' = (1 - a h)^2 s + a^2 c / B_k; returns the loss at 0..n."""
    s = s0.copy()
    out = [0.5 * np.sum(h * s)]
    for a, b in zip(lrs, bss):
        s = (1.0 - a * h) ** 2 * s + a * a * c / b
        out.append(0.5 * np.sum(h * s))
    return np.array(out)


def _nqm_reference(h, c, s0, optimizer, lrs, bss):
    """Any optimizer: S' = A S A^T + (c / B_k) b b^T per mode with A, b from optimizer.transition."""
    u = optimizer.init
    S = s0[:, None, None] * np.outer(u, u)[None]
    r = optimizer.readout
    out = [0.5 * np.sum(h * S[:, r, r])]
    for a, bk in zip(lrs, bss):
        A, b = optimizer.transition(h, a)
        S = np.einsum("ijk,ikl,iml->ijm", A, S, A) + (c / bk)[:, None, None] * np.einsum("ij,ik->ijk", b, b)
        out.append(0.5 * np.sum(h * S[:, r, r]))
    return np.array(out)


def _linreg_sgd_reference(lam, sigma2, s0, lrs, bss):
    """s_i' = (1 - a lam_i)^2 s_i + a^2 (lam_i^2 s_i + lam_i sum_j lam_j s_j + sigma^2 lam_i) / B_k."""
    s = s0.copy()
    out = [0.5 * np.sum(lam * s)]
    for a, b in zip(lrs, bss):
        s = (1.0 - a * lam) ** 2 * s + a * a * (lam**2 * s + lam * np.sum(lam * s) + sigma2 * lam) / b
        out.append(0.5 * np.sum(lam * s))
    return np.array(out)


# jumped pieces, stepped pieces and their mixtures
BATCH_SCHEDULES = {
    "pieces": PiecewiseConstant((15, 70, 200), (2.0, 5.5, 16.0, 40.0)),
    "geometric": BatchSizeWarmup(2, 48, 150),
    "doubling": BatchSizeWarmup(2, 64, 250, every=50),
}
LR_SCHEDULES = {"constant": 0.5, "pieces": PiecewiseConstant((40, 100), (0.8, 0.5, 0.2)),
                "cosine": Cosine(0.8, 300, 0.1)}


@pytest.mark.parametrize("bname", list(BATCH_SCHEDULES))
@pytest.mark.parametrize("lname", list(LR_SCHEDULES))
def test_nqm_sgd_matches_numpy_recursion(bname, lname):
    nqm = NQM.power_law(12, 1.0, 0.5)
    batch, lr = BATCH_SCHEDULES[bname], LR_SCHEDULES[lname]
    opt = SGD(lr)
    n = 400
    ref = _nqm_sgd_reference(nqm.h, nqm.c, nqm.init_sq, opt.lr.values(n), batch.values(n))
    ks = np.array([0, 1, 14, 15, 16, 49, 70, 149, 150, 151, 233, 250, 301, 400])
    got = nqm.loss_curve(opt, batch, ks).values
    np.testing.assert_allclose(got, ref[ks], rtol=1e-13, atol=0)
    # the exact first crossing of the same curve, across jumped and stepped pieces
    for frac in (0.5, 0.1, 0.03):
        target = ref.min() + frac * (ref[0] - ref.min())
        k = int(nqm.steps_to_target(opt, batch, target))
        assert ref[k] <= target < ref[:k].min()


def test_nqm_momentum_matches_numpy_recursion():
    nqm = NQM.power_law(10)
    batch = BatchSizeWarmup(1, 30, 80)
    opt = Momentum(PiecewiseConstant((50,), (0.3, 0.1)), 0.8)
    ref = _nqm_reference(nqm.h, nqm.c, nqm.init_sq, opt, opt.lr.values(200), batch.values(200))
    np.testing.assert_allclose(nqm.loss_curve(opt, batch, 200).values, ref, rtol=1e-12, atol=0)
    target = ref.min() + 0.2 * (ref[0] - ref.min())
    k = int(nqm.steps_to_target(opt, batch, target))
    assert ref[k] <= target < ref[:k].min()


@pytest.mark.parametrize("bname", list(BATCH_SCHEDULES))
def test_linreg_sgd_matches_numpy_recursion(bname):
    glr = GaussianLinearRegression.power_law(6, noise_std=0.2)
    batch = BATCH_SCHEDULES[bname]
    opt = SGD(Cosine(0.3, 100, 0.1))
    n = 22_000 + 300  # beyond change + 20000: the closed form of the tail is used too
    lrs, bss = opt.lr.values(n), batch.values(n)
    ref = _linreg_sgd_reference(glr.h, glr.noise_std**2, glr.init_sq, lrs, bss)
    ks = np.array([0, 1, 15, 99, 100, 150, 251, 1000, 20_300, n])
    np.testing.assert_allclose(glr.loss_curve(opt, batch, ks).values, ref[ks], rtol=1e-11, atol=0)
    target = ref.min() + 0.05 * (ref[0] - ref.min())
    k = int(glr.steps_to_target(opt, batch, target))
    assert ref[k] <= target < ref[:k].min()


def test_gradient_stats_use_the_batch_size_of_the_step():
    batch = BATCH_SCHEDULES["pieces"]
    ks = np.array([0, 14, 15, 69, 70, 500])
    ds = NQM20.gradient_stats(SGD(0.5), batch, ks)
    validate(ds)
    B = batch.at(ks)
    np.testing.assert_array_equal(ds.batch_size.values, B)
    np.testing.assert_allclose(ds.grad_var.values, np.sum(NQM20.c) / (B * NQM20.dim), rtol=1e-15)
    np.testing.assert_array_equal(ds.examples.values, np.r_[0.0, 28.0, 30.0, 30 + 54 * 5.5, 30 + 55 * 5.5,
                                                             30 + 55 * 5.5 + 130 * 16 + 300 * 40])


@pytest.mark.parametrize("batch", [BatchSizeWarmup(3, 700, 1000), BatchSizeWarmup(1, 33, 90, every=7, integer=True),
                                   Exponential(5.0, 0.999), PiecewiseConstant((4,), (1.5, 2.5))])
def test_cumulative_is_the_sum_of_the_values(batch):
    ks = np.array([0, 1, 5, 89, 90, 91, 999, 1000, 1001, 2500])
    ref = np.r_[0.0, np.cumsum(batch.values(2500))][ks]
    np.testing.assert_allclose(cumulative(batch, ks), ref, rtol=1e-12)


def test_batch_size_warmup_values():
    np.testing.assert_array_equal(BatchSizeWarmup(8, 128, 100, every=25).values(120)[::25], [8, 16, 32, 64, 128])
    starts, vals = BatchSizeWarmup(3, 3 * 2**5, 5 * 7, every=7).pieces()
    np.testing.assert_array_equal(starts, [0, 7, 14, 21, 28, 35])
    np.testing.assert_array_equal(vals, 3.0 * 2.0 ** np.arange(6))
    w = BatchSizeWarmup(2, 50, 40)
    k = np.arange(45)
    np.testing.assert_allclose(w.at(k), np.where(k < 40, 2 * 25.0 ** (k / 40), 50), rtol=1e-14)
    assert not w.piecewise_constant and w.constant_after == 40
    wi = BatchSizeWarmup(2, 50, 40, integer=True)
    assert np.all(wi.values(45) == np.floor(w.values(45) + 0.5))
    down = BatchSizeWarmup(64, 4, 10)
    assert down.at([0])[0] == 64 and down.at([10])[0] == 4 and np.all(np.diff(down.values(11)) < 0)


# ------------------------------------------------------------------------------------------------
# Monte Carlo, and a test that can fail
# ------------------------------------------------------------------------------------------------
def _z(exact, mc):
    return (mc.loss.values - exact) / mc.loss_sem.values


MC_CASES = {
    "sgd warm-up": (SGD(0.5), BatchSizeWarmup(1, 32, 40)),
    "momentum pieces": (Momentum(0.2, 0.8), PiecewiseConstant((10, 30), (1.0, 4.0, 24.0))),
    "sgd lr and batch schedules": (SGD(PiecewiseConstant((25,), (0.8, 0.3))), BatchSizeWarmup(2, 64, 60, every=6)),
}


@pytest.mark.parametrize("case", list(MC_CASES))
def test_nqm_monte_carlo_within_four_standard_errors(case):
    opt, batch = MC_CASES[case]
    ks = np.array([0, 5, 12, 25, 40, 70])
    exact = NQM20.loss_curve(opt, batch, ks).values
    mc = NQM20.simulate(opt, batch, ks, n_runs=3000, seed=1)
    validate(mc)
    np.testing.assert_array_equal(mc.batch_size.values, batch.at(ks))
    z = _z(exact, mc)
    assert np.all(np.abs(z[1:]) < 4), z
    # the final batch size throughout, or the first, is far off: the test has power
    for B in (batch.at([10**6])[0], batch.at([0])[0]):
        wrong = NQM20.loss_curve(opt, float(B), ks).values
        assert np.max(np.abs(_z(wrong, mc))) > 10


def test_linreg_monte_carlo_within_four_standard_errors():
    glr = GaussianLinearRegression.power_law(6, noise_std=0.3)
    batch = BatchSizeWarmup(1, 16, 30, integer=True)
    for opt in (SGD(Cosine(0.4, 40, 0.1)), Momentum(0.15, 0.7)):
        ks = np.array([0, 4, 10, 20, 35, 50])
        exact = glr.loss_curve(opt, batch, ks).values
        mc = glr.simulate(opt, batch, ks, n_runs=2000, seed=2)
        validate(mc)
        z = _z(exact, mc)
        assert np.all(np.abs(z[1:]) < 4), (opt, z)
        wrong = glr.loss_curve(opt, 16, ks).values
        assert np.max(np.abs(_z(wrong, mc))) > 10


def test_schedule_changes_the_answer():
    """The final batch size throughout reaches the target at another step (and costs more examples)."""
    opt, batch = SGD(0.5), BatchSizeWarmup(2, 64, 300)
    target = 0.05 * NQM20.initial_loss
    k = NQM20.steps_to_target(opt, batch, target)
    k_final = NQM20.steps_to_target(opt, 64, target)
    assert math.isfinite(k) and k > k_final + 20
    cost = cost_to_target(NQM20, opt, batch, target)
    assert cost["steps"] == k and cost["examples"] == cumulative(batch, [int(k)])[0] < 64 * k_final


# ------------------------------------------------------------------------------------------------
# the comparison with constant batch sizes
# ------------------------------------------------------------------------------------------------
def test_compare_with_constant():
    opt, target = SGD(0.5), 0.05 * NQM20.initial_loss
    sizes = [4.0, 16.0, 64.0]
    ds = compare_with_constant(NQM20, opt, BatchSizeWarmup(4, 64, 200, every=20), sizes, target)
    validate(ds)
    for b, s, e in zip(sizes, ds.steps_to_target.values, ds.examples_to_target.values):
        assert s == NQM20.steps_to_target(opt, b, target) and e == s * b
    assert ds.attrs["best_steps"] == ds.steps_to_target.min() and ds.attrs["best_steps_batch_size"] == 64.0
    assert ds.attrs["steps_saved"] == ds.attrs["best_steps"] - ds.attrs["schedule_steps"]
    # a "schedule" that is one of the constants saves nothing over it
    same = compare_with_constant(GLR8, opt, Constant(16.0), [16.0], 0.1 * GLR8.initial_loss)
    assert same.attrs["steps_saved"] == 0 and same.attrs["examples_saved"] == 0


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
BAD = [0.5, 0, -3, math.nan, math.inf, "8", None, True, [8, 16], Constant(0.5), PiecewiseConstant((5,), (8.0, 0.5)),
       Exponential(4.0, 0.5)]


def _calls(model, batch):
    return [lambda: model.loss_curve(SGD(0.1), batch, 10), lambda: model.gradient_stats(SGD(0.1), batch, 10),
            lambda: model.steps_to_target(SGD(0.1), batch, 0.01), lambda: model.simulate(SGD(0.1), batch, 10, n_runs=2),
            lambda: cost_to_target(model, SGD(0.1), batch, 0.01)]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_batch_size_is_refused_by_name(model, bad):
    for call in _calls(MODELS[model], bad):
        with pytest.raises((TypeError, ValueError), match="`batch_size` must be"):
            call()


@pytest.mark.parametrize("model", list(MODELS))
def test_batch_size_below_one_later_is_refused_when_reached(model):
    late = Exponential(1000.0, 0.9)  # below 1 from update 66 on: checked as it is computed
    m = MODELS[model]
    m.loss_curve(SGD(0.1), late, 60)
    with pytest.raises(ValueError, match=r"`batch_size` must be a schedule of batch sizes in \[1, .*\] at every "
                                         r"update; got 0.9.* at update 66"):
        m.loss_curve(SGD(0.1), late, 100)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        m.simulate(SGD(0.1), late, 100, n_runs=2)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        m.steps_to_target(SGD(0.1), late, 1e-9, max_steps=200)


def test_sampled_data_needs_whole_batch_sizes():
    with pytest.raises(ValueError, match="`batch_size` must be whole numbers for sampled data; got 1.1.* at update 1"):
        GLR8.simulate(SGD(0.1), BatchSizeWarmup(1, 8, 20), 10, n_runs=2)
    GLR8.simulate(SGD(0.1), BatchSizeWarmup(1, 8, 20, integer=True), 10, n_runs=2)
    NQM20.simulate(SGD(0.1), BatchSizeWarmup(1, 8, 20), 10, n_runs=2)  # the NQM needs only c / B


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=0.5, final=8, warmup_steps=10), "`start` must be"),
    (dict(start=1, final=math.nan, warmup_steps=10), "`final` must be"),
    (dict(start=1, final=8, warmup_steps=0), "`warmup_steps` must be"),
    (dict(start=1, final=8, warmup_steps=10, every=0), "`every` must be"),
    (dict(start=1.5, final=8, warmup_steps=10, integer=True), "`start` must be a whole number"),
    (dict(start=1, final=8, warmup_steps=10, integer="yes"), "`integer` must be"),
])
def test_batch_size_warmup_bad_input(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        BatchSizeWarmup(**kwargs)
