"""NQM: Monte Carlo agreement, exact first crossings, inf reporting, bad input, lower bound, stats."""

import math

import numpy as np
import pytest
from conftest import OPTIMIZERS, reference_curve

from toymodels import NQM, EMA, SGD, Momentum, PiecewiseConstant, power_law
from toymodels.schema import validate


@pytest.fixture(scope="module")
def nqm():
    return NQM.power_law(20)


def test_monte_carlo_within_four_standard_errors(nqm, optimizer):
    ks = np.array([0, 5, 20, 60, 150])
    exact = nqm.gradient_stats(optimizer, 4, ks)
    mc = nqm.simulate(optimizer, 4, ks, n_runs=4000, seed=3)
    validate(mc)
    z = (mc.loss.values - exact.loss.values) / mc.loss_sem.values
    assert np.all(np.abs(z) < 4), z


def test_monte_carlo_gradient_norm(nqm):
    """E|H theta|^2 along the trajectory: Monte Carlo mean within 4 standard errors of the exact one."""
    from toymodels.montecarlo import simulate_linear_system

    opt = OPTIMIZERS["momentum"]
    ks = np.array([0, 10, 40])
    exact = nqm.gradient_stats(opt, 2, ks).grad_norm_sq.values
    a0, a1, b1 = opt.affine(nqm.h)
    _, gsq = simulate_linear_system(a0, a1, b1, nqm.c / 2, nqm.h, opt.readout, opt.init, nqm.init_sq,
                                    opt.lr.values(40), ks, 4000, np.random.default_rng(11))
    sem = gsq.std(axis=1, ddof=1) / np.sqrt(gsq.shape[1])
    assert np.all(np.abs(gsq.mean(axis=1) - exact) < 4 * sem)


def test_same_seed_same_result(nqm):
    a = nqm.simulate(SGD(0.5), 2, 30, n_runs=50, seed=7)
    b = nqm.simulate(SGD(0.5), 2, 30, n_runs=50, seed=7)
    c = nqm.simulate(SGD(0.5), 2, 30, n_runs=50, seed=8)
    np.testing.assert_array_equal(a.loss.values, b.loss.values)
    assert not np.array_equal(a.loss.values, c.loss.values)


def test_steps_never_off_by_one(nqm, optimizer):
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, optimizer, 64, 3000)  # slow: once for four targets
    for frac in [0.9, 0.5, 0.2, 0.05]:
        target = ref.min() + frac * (ref[0] - ref.min())
        k = nqm.steps_to_target(optimizer, 64, target)
        assert float(k).is_integer(), frac
        k = int(k)
        assert ref[k] <= target < ref[:k].min(), frac


def test_steps_with_piecewise_schedule(nqm):
    opt = SGD(PiecewiseConstant((40,), (1.2, 0.2)))
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 2, 2000)
    for target in [ref[30] * 1.0001, ref[45], ref[500] * 1.0001]:
        k = int(nqm.steps_to_target(opt, 2, target))
        assert ref[k] <= target < ref[:k].min()


def _bisection(curve, target):
    """The reference notebook's approach: bisection assuming a monotone curve."""
    lo, hi = 0, len(curve) - 1
    if curve[hi] > target:
        return math.inf
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if curve[mid] <= target:
            hi = mid
        else:
            lo = mid
    return hi


def test_momentum_first_crossing_where_bisection_misses():
    """One under-damped mode: the loss oscillates; the first dip below target comes early."""
    nqm = NQM([1.0, 0.001], [0.0, 0.0], init_sq=[1.0, 1.0])
    opt = Momentum(1.0, 0.9)
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 1, 20000)
    target = 0.49 * ref[0]
    first = int(np.argmax(ref <= target))
    assert not np.all(np.diff(ref[: first + 50]) <= 0)  # non-monotone
    assert nqm.steps_to_target(opt, 1, target) == first
    assert _bisection(ref, target) != first


def test_sgd_dip_below_floor_found():
    """Modes that start below their noise floor: the loss dips then rises to a floor above target."""
    nqm = NQM([1.0, 0.01], [0.01, 4.0], init_sq=[1.0, 1e-4])
    opt = SGD(0.9)
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 1, 3000)
    floor = nqm.noise_floor(opt, 1)
    target = 0.5 * (ref.min() + min(floor, ref[0]))
    assert ref[-1] > target
    assert floor > target and ref.min() < target
    steps, info = nqm.steps_to_target(opt, 1, target, full_output=True)
    assert steps == int(np.argmax(ref <= target))


def test_unreachable_and_divergent_are_inf(nqm):
    floor = nqm.noise_floor(SGD(0.5), 1)
    steps, info = nqm.steps_to_target(SGD(0.5), 1, 0.5 * floor, full_output=True)
    assert steps == math.inf and "noise floor" in info["reason"]
    steps, info = nqm.steps_to_target(SGD(2.5), 1, 0.1, full_output=True)
    assert steps == math.inf and "diverges" in info["reason"]
    steps, info = nqm.steps_to_target(Momentum(4.0, 0.9), 1, 0.1, full_output=True)
    assert steps == math.inf and "diverges" in info["reason"]
    curve = nqm.loss_curve(SGD(2.5), 1, np.array([0, 10, 10**6]))
    assert curve.attrs["diverged"] and not np.any(np.isnan(curve.values))
    assert nqm.steps_to_target(SGD(0.5), 1, 10 * nqm.initial_loss) == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: SGD(0.0), "`lr` must be a float in \\(0, inf\\)"),
        (lambda: SGD(-0.1), "`lr` must be a float in \\(0, inf\\)"),
        (lambda: SGD(float("nan")), "`lr` must be a float"),
        (lambda: Momentum(0.1, 1.0), "`beta` must be a float in \\[0, 1\\)"),
        (lambda: Momentum(0.1, -0.1), "`beta` must be a float in \\[0, 1\\)"),
        (lambda: EMA(SGD(0.1), 1.0), "`decay` must be a float in \\[0, 1\\)"),
        (lambda: SGD(0.1, precond=1.5), "`precond` must be a float in \\[0, 1\\]"),
        (lambda: NQM([1.0, np.inf]), "`h` must be finite"),
        (lambda: NQM([1.0, -1.0]), "`h` must be > 0"),
        (lambda: NQM([1.0, 0.5], [1.0]), "`c` must have length 2"),
        (lambda: NQM([1.0, 0.5], [1.0, np.nan]), "`c` must be finite"),
        (lambda: NQM([1.0, 0.5], init_sq=[1.0, 0.0]), "`init_sq` must be > 0"),
        (lambda: NQM([]), "`h` must be a non-empty 1-D array"),
        (lambda: NQM.power_law(0), "`dim` must be an integer in \\[1, "),
        (lambda: NQM.power_law(5).loss_curve(SGD(0.1), 0.5, 10), "`batch_size` must be a float in \\[1, 9.0072e\\+15\\]"),
        (lambda: NQM.power_law(5).steps_to_target(SGD(0.1), 0, 0.1), "`batch_size` must be a float"),
        (lambda: NQM.power_law(5).steps_to_target(SGD(0.1), 1, -1.0), "`target` must be a float in \\(0, inf\\)"),
        (lambda: NQM.power_law(5).loss_curve(SGD(0.1), 1, [3, 2]), "`steps` must be strictly increasing"),
        (lambda: NQM.power_law(5).loss_curve(SGD(0.1), 1, -3), "`steps` must be an integer in \\[0, 1000000000000000\\]"),
        (lambda: NQM.power_law(5).simulate(SGD(0.1), 1, 5, n_runs=1), "`n_runs` must be an integer in \\[2, 1000000\\]"),
        (lambda: power_law(3, -1.0), "`power` must be a float in \\[0, 50\\]"),
    ],
)
def test_bad_input_raises_valueerror_naming_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_wrong_types_raise_typeerror():
    with pytest.raises(TypeError, match="`optimizer` must be"):
        NQM.power_law(3).loss_curve("sgd", 1, 3)
    with pytest.raises(TypeError, match="`lr` must be a float in \\(0, inf\\) or a Schedule; got str"):
        SGD("0.1")


def test_information_theoretic_lower_bound(nqm):
    # posterior-variance bound: monotone in n, equals L0 at n = 0, below every optimizer's curve
    n = np.arange(0, 2000)
    lb = nqm.lower_bound_loss(n)
    assert lb[0] == pytest.approx(nqm.initial_loss)
    assert np.all(np.diff(lb) < 0)
    for opt in OPTIMIZERS.values():
        for B in (1, 8):
            curve = nqm.loss_curve(opt, B, 200).values
            assert np.all(curve >= nqm.lower_bound_loss(np.arange(201) * B) * (1 - 1e-12))
    target = 0.1 * nqm.initial_loss
    for B in (1, 4, 1024):
        k = nqm.lower_bound_steps(B, target)
        assert nqm.lower_bound_loss(k * B) <= target < nqm.lower_bound_loss((k - 1) * B) or k == 1
        assert k <= nqm.steps_to_target(SGD(0.5), B, target)


def test_gradient_stats_definitions(nqm):
    ds = nqm.gradient_stats(SGD(0.5), 8, 20)
    validate(ds)
    g2 = ds.grad_norm_sq.values
    tr = nqm.c.sum()
    np.testing.assert_allclose(ds.grad_var.values, tr / 8 / nqm.dim)
    np.testing.assert_allclose(ds.noise_scale.values, tr / g2)
    np.testing.assert_allclose(ds.grad_nvar.values, (tr / 8) / (g2 + tr / 8))
    np.testing.assert_allclose(ds.snr.values, g2 / (tr / 8))
    assert ds.grad_norm_sq.values[0] == pytest.approx(np.sum(nqm.h**2 * nqm.init_sq))
    assert ds.attrs["source"] == "exact" and ds.attrs["model"] == "nqm"


def test_coarsen_is_exact_for_equal_curvatures():
    h = np.repeat([1.0, 0.3, 0.01], [1, 4, 7])
    c = np.linspace(0.5, 2.0, h.size)
    s0 = np.linspace(1.0, 3.0, h.size)
    full = NQM(h, c, s0)
    small = full.coarsen()
    assert small.dim == 3
    for opt in (SGD(0.7), Momentum(0.2, 0.9)):
        np.testing.assert_allclose(small.loss_curve(opt, 4, 200).values, full.loss_curve(opt, 4, 200).values, rtol=1e-12)


def test_coarsen_power_law_is_close():
    full = NQM.power_law(3000)
    small = full.coarsen(0.02)
    assert small.dim < full.dim / 5
    ks = np.array([0, 10, 1000, 10**5])
    for opt in (SGD(0.5), Momentum(0.05, 0.95), EMA(SGD(0.5), 0.99)):
        np.testing.assert_allclose(small.loss_curve(opt, 8, ks).values, full.loss_curve(opt, 8, ks).values, rtol=1e-4)


def test_cached_initial_moments_are_not_mutated():
    from toymodels import Cosine

    nqm = NQM.power_law(10)
    opt = Momentum(Cosine(0.5, total_steps=50), 0.9)
    before = nqm._S0(opt).copy()
    a = nqm.loss_curve(opt, 2, 60).values
    nqm.steps_to_target(opt, 2, 0.5 * nqm.initial_loss)
    np.testing.assert_array_equal(nqm._S0(opt), before)
    np.testing.assert_array_equal(nqm.loss_curve(opt, 2, 60).values, a)


@pytest.mark.parametrize("family", ["sgd", "momentum"])
def test_steps_with_smooth_schedules(family):
    """Cosine / warm-up / exponential: stepped exactly while they change, closed form afterwards."""
    from toymodels import Cosine, Exponential, Warmup

    nqm = NQM.power_law(15)
    for sched in (Cosine(0.8, total_steps=80, final_lr=0.05), Warmup(Cosine(0.8, total_steps=80, final_lr=0.05), 20),
                  Exponential(0.9, gamma=0.98, min_lr=0.02)):
        opt = SGD(sched) if family == "sgd" else Momentum(sched, 0.5)
        ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 4, 3000)
        for target in (ref[40] * 1.0001, ref[2500] * 1.0001):
            k = int(nqm.steps_to_target(opt, 4, target))
            assert ref[k] <= target < ref[:k].min()
    steps, info = nqm.steps_to_target(SGD(Cosine(0.5, total_steps=50)), 4, 1e-9, full_output=True)
    assert steps == math.inf and "decays to 0" in info["reason"]
    steps, info = nqm.steps_to_target(SGD(Exponential(0.5, gamma=0.9)), 4, 1e-9, full_output=True, max_steps=5000)
    assert steps == math.inf and "not reached" in info["reason"]


def test_steps_after_a_briefly_unstable_piece():
    """A first piece above the stability limit is stepped exactly; the state then carries on."""
    nqm = NQM.power_law(12)
    opt = SGD(PiecewiseConstant((3,), (2.3, 0.4)))  # lr * h_1 = 2.3 > 2 for three updates
    ref = reference_curve(nqm.h, nqm.c, nqm.init_sq, opt, 4, 2000)
    target = ref[300] * 1.0001
    k = int(nqm.steps_to_target(opt, 4, target))
    assert ref[k] <= target < ref[:k].min()
