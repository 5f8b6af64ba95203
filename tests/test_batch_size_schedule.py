"""Batch-size schedules B_k in the exact engine and the Monte Carlo (NQM and linear regression).

A constant schedule reproduces the constant batch size bit for bit; a changing one agrees with Monte
Carlo within 4 standard errors and with an independent numpy recursion to machine precision, and is
told apart from its final batch size; bad batch sizes are refused by name.  The tuned comparison
(``compare_tuned``: the learning rate follows the batch size) is checked the same way: a constant
"schedule" is its tuned constant exactly, the followed learning rates are the log-log interpolation
by hand, and the schedule's steps are the first crossing of the numpy recursion, whose curve agrees
with Monte Carlo.

The 4-SE tolerance: ``loss_sem`` is the sample standard deviation of the per-run losses over
sqrt(n_runs); the per-run loss is a quadratic form of Gaussians (finite fourth moment), so with
n_runs = 2000 the mean is normal to a good approximation and z = (mean - exact) / sem ~ N(0, 1):
P(|z| >= 4) = 6.3e-5 per recorded step, below 1e-3 over the six steps of a test (the seeds are
fixed, so a run is reproducible).  Each such test also checks that a wrong answer is > 10 SE off.
"""

import math

import numpy as np
import pytest

from toymodels import (NQM, SGD, BatchSizeWarmup, Constant, Cosine, Exponential, GaussianLinearRegression, Momentum,
                       PiecewiseConstant, Tabulated)
from toymodels.batch_schedule import compare_tuned, compare_with_constant, cost_to_target, lr_follows_batch
from toymodels.resume import ResumeWarning
from toymodels.schedules import cumulative
from toymodels.schema import validate
from toymodels.sweep import batch_size_sweep, grid_search, tune

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


# ------------------------------------------------------------------------------------------------
# tuned: the learning rate follows the batch size (compare_tuned, lr_follows_batch, Tabulated)
# ------------------------------------------------------------------------------------------------
def test_tabulated_schedule_values_and_engine():
    tab = Tabulated([0.3, 0.2, 0.1])
    np.testing.assert_array_equal(tab.values(6), [0.3, 0.2, 0.1, 0.1, 0.1, 0.1])
    np.testing.assert_array_equal(tab.at(np.array([0, 2, 10**12])), [0.3, 0.1, 0.1])
    assert tab.constant_after == 2 and not tab.piecewise_constant and tab.max_lr == 0.3
    assert repr(tab) == "Tabulated(lrs=(0.3, 0.2, 0.1))" and "<7 values" in repr(Tabulated(np.ones(7)))
    # stepped through the table, the engine gives the jumped piecewise-constant curve and crossing
    pc = PiecewiseConstant((4, 9), (0.8, 0.4, 0.1))
    same = Tabulated(pc.values(10))
    ks = np.array([0, 3, 4, 8, 9, 10, 50, 5000])
    for opt in (SGD, lambda lr: Momentum(lr, 0.6)):
        np.testing.assert_allclose(NQM20.loss_curve(opt(same), 4.0, ks).values,
                                   NQM20.loss_curve(opt(pc), 4.0, ks).values, rtol=1e-12, atol=0)
        t = 0.02 * NQM20.initial_loss
        assert NQM20.steps_to_target(opt(same), 4.0, t) == NQM20.steps_to_target(opt(pc), 4.0, t)
    for bad in ([], [0.1, 0.0], [0.1, math.nan], [[0.1]]):
        with pytest.raises((TypeError, ValueError), match="`lrs` must be"):
            Tabulated(bad)


def test_lr_follows_batch_is_the_log_log_interpolation_by_hand():
    # lr_opt ~ 1 / B between the keys 2 and 8 (0.3 -> 0.075): then lr*(B) = 0.6 / B there exactly
    keys, rates = [2.0, 8.0, 32.0], [0.3, 0.075, 0.05]
    batch = PiecewiseConstant((3, 5, 7, 9, 11, 13), (1.0, 2.0, 3.0, 4.0, 16.0, 32.0, 100.0))
    lr = lr_follows_batch(batch, keys, rates)
    assert isinstance(lr, PiecewiseConstant) and lr.boundaries == batch.boundaries
    # B = 16 is halfway in log between 8 and 32: lr = sqrt(0.075 * 0.05); below 2 and above 32 clamped
    hand = [0.3, 0.3, 0.6 / 3, 0.6 / 4, math.sqrt(0.075 * 0.05), 0.05, 0.05]
    np.testing.assert_allclose(lr.lrs, hand, rtol=1e-14)
    assert lr.lrs[1] == 0.3 and lr.lrs[0] == 0.3 and lr.lrs[-1] == 0.05  # keys and clamped ends exactly
    # every = 1: one value per update up to constant_after, each the interpolation of B_k
    warm = BatchSizeWarmup(2, 32, 20)
    tab = lr_follows_batch(warm, keys, rates)
    assert isinstance(tab, Tabulated) and tab.constant_after == 20
    b = warm.values(25)
    log_hand = np.where(b <= 8, np.log(0.3) + np.log(b / 2) / np.log(4) * np.log(0.25),
                        np.log(0.075) + np.log(b / 8) / np.log(4) * np.log(0.05 / 0.075))
    np.testing.assert_allclose(tab.values(25), np.exp(log_hand), rtol=1e-13)
    # a batch size that never changes gets a constant learning rate
    assert lr_follows_batch(BatchSizeWarmup(8, 8, 5), keys, rates) == Constant(0.075)


CONSTANT_ROWS = {"nqm sgd": (NQM20, "sgd", 0.05), "nqm momentum": (NQM20, "momentum", 0.05),
                 "linreg sgd": (GLR8, "sgd", 0.1)}


@pytest.mark.parametrize("case", list(CONSTANT_ROWS))
def test_compare_tuned_constant_schedule_is_the_tuned_constant(case):
    model, family, frac = CONSTANT_ROWS[case]
    target, sizes = frac * model.initial_loss, [2.0, 8.0, 32.0]
    for sched in (PiecewiseConstant((), (8.0,)), BatchSizeWarmup(8, 8, 3)):
        ds = compare_tuned(model, family, sched, sizes, target, progress=False)
        validate(ds)
        row = ds.sel(batch_size=8.0)
        assert ds.attrs["schedule_steps"] == row.steps_to_target and ds.attrs["examples_saved"] <= 0
        assert ds.attrs["schedule_examples"] == row.examples_to_target == 8 * row.steps_to_target
        assert ds.attrs["lr_schedule"] == repr(Constant(float(row.lr_opt)))
        # the grid of fixed lrs holds lr*(8): no worse than the tuned constant (the tuner's optimum)
        assert ds.attrs["fixed_lr_steps"] == row.steps_to_target and ds.attrs["fixed_lr"] == row.lr_opt
    assert ds.attrs["optimizer"] == family and (family == "sgd") == math.isnan(ds.attrs["momentum"])


def test_compare_tuned_reuses_a_sweep():
    target, sizes, sched = 0.05 * NQM20.initial_loss, [1.0, 4.0, 16.0], BatchSizeWarmup(1, 16, 30, every=15)
    tuned = batch_size_sweep(NQM20, "momentum", sizes, target, extra=0.9, progress=False)
    ds = compare_tuned(NQM20, "momentum", sched, sizes, target, progress=False)
    assert compare_tuned(NQM20, "momentum", sched, sizes, target, tuned=tuned).identical(ds)
    for kwargs, what in [(dict(momentum=0.5), "fixed beta"), (dict(target=target / 2), "target"),
                         (dict(batch_sizes=[1.0, 4.0]), "batch sizes"), (dict(family="sgd"), "optimizer"),
                         (dict(problem=GLR8), "model")]:
        args = dict(problem=NQM20, family="momentum", schedule=sched, batch_sizes=sizes, target=target, tuned=tuned)
        with pytest.raises(ValueError, match=f"`tuned` must be the batch_size_sweep of these settings; got one with "
                                             f".*{what}"):
            compare_tuned(**(args | kwargs))


def _follow(ds, schedule):
    ok = np.isfinite(ds.lr_opt.values)
    return lr_follows_batch(schedule, ds.batch_size.values[ok], ds.lr_opt.values[ok])


def test_compare_tuned_nqm_momentum_warmup_exact_and_monte_carlo():
    """lr follows a doubling warm-up; the row's steps are the first crossing of an independent numpy
    recursion, its curve agrees with Monte Carlo within 4 SE (and the lr of the final batch size
    throughout is far off), and the attrs are the comparison of the numbers."""
    sched, beta = BatchSizeWarmup(1, 16, 40, every=10), 0.9
    target = 0.05 * NQM20.initial_loss
    ds = compare_tuned(NQM20, "momentum", sched, 2.0 ** np.arange(6), target, momentum=beta, progress=False)
    validate(ds)
    lr = _follow(ds, sched)
    assert isinstance(lr, PiecewiseConstant) and ds.attrs["lr_schedule"] == repr(lr)
    np.testing.assert_array_equal(lr.lrs, ds.lr_opt.values[:5])  # stage j: B = 2^j, its own tuned lr
    opt = Momentum(lr, beta)
    S = int(ds.attrs["schedule_steps"])
    n = S + 20
    ref = _nqm_reference(NQM20.h, NQM20.c, NQM20.init_sq, opt, lr.values(n), sched.values(n))
    assert ref[S] <= target < ref[:S].min()
    assert ds.attrs["schedule_examples"] == np.sum(sched.values(S))
    # Monte Carlo of the same lr and batch-size schedules
    ks = np.array([5, 15, 30, S - 1, S, n])
    mc = NQM20.simulate(opt, sched, ks, n_runs=2000, seed=11)
    z = _z(ref[ks], mc)
    assert np.all(np.abs(z) < 4), z
    wrong = NQM20.loss_curve(Momentum(float(lr.lrs[-1]), beta), sched, ks).values
    assert np.max(np.abs(_z(wrong, mc))) > 10
    a = ds.attrs
    assert a["best_steps"] == ds.steps_to_target.min() and a["steps_saved"] == a["best_steps"] - S
    assert a["best_examples"] == ds.examples_to_target.min()
    assert a["examples_saved"] == a["best_examples"] - a["schedule_examples"]
    assert a["fixed_lr_steps"] == NQM20.steps_to_target(Momentum(a["fixed_lr"], beta), sched, target)


def test_compare_tuned_linreg_per_update_warmup_exact_and_monte_carlo():
    """Label noise, a batch size that grows at every update (integer, for sampled data): the lr is
    tabulated per update; exact first crossing against the numpy recursion, curve against Monte
    Carlo within 4 SE."""
    glr = GaussianLinearRegression.power_law(6, noise_std=0.3)
    sched = BatchSizeWarmup(1, 16, 30, integer=True)
    target = 0.1 * glr.initial_loss
    ds = compare_tuned(glr, "sgd", sched, [1.0, 2.0, 4.0, 8.0, 16.0], target, lrs=[0.2, 0.4], progress=False)
    validate(ds)
    lr = _follow(ds, sched)
    assert isinstance(lr, Tabulated) and ds.attrs["lr_schedule"] == repr(lr)
    S = int(ds.attrs["schedule_steps"])
    n = 40
    ref = _linreg_sgd_reference(glr.h, glr.noise_std**2, glr.init_sq, lr.values(n), sched.values(n))
    assert 0 < S < n and ref[S] <= target < ref[:S].min()
    assert ds.attrs["schedule_examples"] == np.sum(sched.values(S))
    ks = np.array([2, 5, 10, S - 1, S, n])
    mc = glr.simulate(SGD(lr), sched, ks, n_runs=2000, seed=12)
    z = _z(ref[ks], mc)
    assert np.all(np.abs(z) < 4), z
    wrong = glr.loss_curve(SGD(float(lr.lrs[0])), sched, ks).values  # lr*(1) throughout
    assert np.max(np.abs(_z(wrong, mc))) > 10
    # the fixed-lr row: the better of the two given rates
    best = min((glr.steps_to_target(SGD(a), sched, target), a) for a in (0.2, 0.4))
    assert (ds.attrs["fixed_lr_steps"], ds.attrs["fixed_lr"]) == best


def test_fixed_momentum_tuner():
    """extra= holds beta: the tuned lr is at least as good as an exact lr grid at that beta, and
    refused where the family has no beta; a sweep that tunes beta does not resume a fixed-beta file."""
    target = 0.05 * NQM20.initial_loss
    res = tune(NQM20, "momentum", 4.0, target, extra=0.8)
    grid = grid_search(NQM20, "momentum", 4.0, target, lr_fractions=np.geomspace(1e-3, 0.9, 60), extras=[0.8])
    assert res["extra"] == 0.8 and len(res["theta"]) == 1 and res["steps"] <= grid["steps"]
    assert NQM20.steps_to_target(Momentum(res["lr"], 0.8), 4.0, target) == res["steps"]
    with pytest.raises(ValueError, match="`extra` must be None for 'sgd'"):
        tune(NQM20, "sgd", 4.0, target, extra=0.8)


def test_fixed_momentum_sweep_resume(tmp_path):
    path = tmp_path / "sweep.nc"
    target = 0.1 * NQM20.initial_loss
    fixed = batch_size_sweep(NQM20, "momentum", [2.0, 8.0], target, extra=0.5, progress=False, path=path)
    np.testing.assert_array_equal(fixed.momentum_opt.values, 0.5)
    again = batch_size_sweep(NQM20, "momentum", [2.0, 8.0], target, extra=0.5, progress=False, path=path)
    assert again.identical(fixed)
    with pytest.warns(ResumeWarning, match="holds the extra hyper-parameter fixed"):
        batch_size_sweep(NQM20, "momentum", [2.0], target, progress=False, path=path)


@pytest.mark.parametrize("call, match", [
    (lambda: compare_tuned(NQM20, "ema", Constant(4.0), [1.0, 4.0], 0.1), "`family` must be one of"),
    (lambda: compare_tuned(NQM20, "sgd", Constant(4.0), [4.0, 1.0], 0.1), "`batch_sizes` must be strictly increasing"),
    (lambda: compare_tuned(NQM20, "sgd", PiecewiseConstant((3,), (4.0, 0.5)), [1.0], 0.1), "`schedule` must be"),
    (lambda: compare_tuned(NQM20, "momentum", Constant(4.0), [1.0], 0.1, momentum=1.0), "`momentum` must be"),
    (lambda: lr_follows_batch(Constant(4.0), [1.0, 2.0], [0.1]), "`lrs` must have one learning rate per batch size"),
    (lambda: lr_follows_batch(Constant(4.0), [2.0, 2.0], [0.1, 0.2]), "`batch_sizes` must be strictly increasing"),
    (lambda: lr_follows_batch(Exponential(64.0, 0.99), [1.0], [0.1]), "`schedule` must become constant"),
    (lambda: lr_follows_batch(Constant(4.0), [1.0], [-0.1]), "`lrs` must be"),
])
def test_compare_tuned_bad_input(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()
