"""critical_batch_scaling: B_crit over (model size, target) from exact tuned steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from toymodels import NQM, PowerLawRF
from toymodels.critical import critical_batch_scaling
from toymodels.schema import validate
from toymodels.stats import fit_critical_batch
from toymodels.sweep import batch_size_sweep

BS = 2.0 ** np.arange(0, 9)


def test_grid_values_are_the_sweep_and_fit_one_at_a_time():
    """Each grid point is batch_size_sweep's tuned steps (the same integers) and its fit."""
    sizes, targets = [6, 20], [0.1, 0.05]
    grid = critical_batch_scaling(NQM.power_law, sizes, targets, BS, n_jobs=2)
    validate(grid)
    assert grid.b_crit.dims == ("n_features", "target")
    for d in sizes:
        for t in targets:
            sw = batch_size_sweep(NQM.power_law(d), "sgd", BS, t, progress=False)
            got = grid.sel(n_features=d, target=t)
            np.testing.assert_array_equal(got.steps_to_target.values, sw.steps_to_target.values)
            fit = fit_critical_batch(BS, sw.steps_to_target.values)
            assert got.b_crit == pytest.approx(fit["critical_batch_size"], rel=1e-12)
            assert got.s_min == pytest.approx(fit["steps_min"], rel=1e-12)
            assert got.e_min == pytest.approx(fit["steps_min"] * fit["critical_batch_size"], rel=1e-12)
            assert got.b_crit_fit_lo <= got.b_crit <= got.b_crit_fit_hi


def test_plrf_grid_equals_the_sweep_tuner():
    f = lambda d: PowerLawRF(1.0, 0.7, 120, d)  # noqa: E731
    grid = critical_batch_scaling(f, [30], [6e-3], BS[::2])
    sweep = critical_batch_scaling(f, [30], [6e-3], BS[::2], tuner="sweep")
    assert np.all(np.isfinite(grid.steps_to_target.values))
    np.testing.assert_array_equal(grid.steps_to_target.values, sweep.steps_to_target.values)
    assert float(grid.irreducible_risk[0]) == pytest.approx(f(30).irreducible_risk)


def test_nqm_limits_are_the_closed_form():
    """One NQM direction (h = 1, noise c, L0 = 1), SGD tuned over the learning rate.  As B -> 0 the
    best learning rate -> 0 and B S(B) -> E_min = min_x c ln((L0 - eps x) / (eps (1 - x))) / (8 eps h x)
    (the continuous-time limit: floor eta c / 4 with eta = lr / B, x = eta c / (4 eps)); as
    B -> inf, S(B) -> S_min = 1 (lr = 1 / h reaches 0 in one step).  B_crit = E_min / S_min
    (McCandlish et al. 2018) is what the fit approaches."""
    c, eps = 1e4, 0.01
    nqm = lambda d: NQM(np.ones(d), np.full(d, c), 2.0)  # noqa: E731
    e = optimize.minimize_scalar(lambda x: c * math.log((1 - eps * x) / (eps * (1 - x))) / (8 * eps * x),
                                 bounds=(1e-6, 1 - 1e-9), method="bounded", options={"xatol": 1e-12}).fun
    big = critical_batch_scaling(nqm, [1], [eps], [2.0**30, 2.0**40])
    assert np.all(big.steps_to_target.values == 1)
    small = critical_batch_scaling(nqm, [1], [eps], [1.0, 2.0])
    bs_ = small.steps_to_target.values[0, 0] * small.batch_size.values
    # B S(B) = E_min (1 + O(B / B_crit)) with B_crit = E_min ~ 6e4: within 1e-3 at B = 1, 2
    np.testing.assert_allclose(bs_, e, rtol=1e-3)
    # exact invariance: noise c -> s c scales B_crit by s (S(B; s c) = S(B / s; c))
    grid = critical_batch_scaling(lambda d: NQM.power_law(d), [10], [0.05], BS)
    scaled = critical_batch_scaling(lambda d: NQM(NQM.power_law(d).h, 8 * NQM.power_law(d).c), [10], [0.05], 8 * BS)
    np.testing.assert_array_equal(grid.steps_to_target.values, scaled.steps_to_target.values)
    assert scaled.b_crit.item() == pytest.approx(8 * grid.b_crit.item(), rel=1e-9)


def test_unreachable_target_is_inf_with_a_reason():
    f = lambda d: PowerLawRF(1.0, 0.7, 100, d)  # noqa: E731
    irr = f(10).irreducible_risk
    ds = critical_batch_scaling(f, [10], [0.5 * irr], [1, 2, 4])
    assert np.all(np.isinf(ds.steps_to_target.values)) and math.isinf(ds.b_crit.item())
    assert "fewer than two" in str(ds.reason.values[0, 0])
    with pytest.raises(ValueError, match="family"):
        critical_batch_scaling(NQM.power_law, [5], [0.1], [1, 2], family="momentum")


def test_fit_interval_is_a_point_on_an_exact_hyperbola_and_widens_with_the_level():
    from toymodels.critical import _fit_interval

    b = 2.0 ** np.arange(8)
    exact = _fit_interval(b, 100 * (1 + 16 / b), 0.95)
    assert exact["b_crit"] == pytest.approx(16) and exact["e_min"] == pytest.approx(1600)
    assert exact["b_crit_fit_hi"] - exact["b_crit_fit_lo"] < 1e-6
    bent = 100 * (1 + 16 / b) * (1 + 0.05 * np.cos(b))
    narrow, wide = _fit_interval(b, bent, 0.5), _fit_interval(b, bent, 0.99)
    assert wide["b_crit_fit_lo"] < narrow["b_crit_fit_lo"] < narrow["b_crit"] < narrow["b_crit_fit_hi"] < wide["b_crit_fit_hi"]
