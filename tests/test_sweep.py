"""Tuned batch-size sweeps: at least as good as the exact grid optimum, resumable, validated."""

import math

import numpy as np
import pytest
import xarray as xr

from toymodels import NQM, SGD
from toymodels.schema import validate
from toymodels.sweep import batch_size_sweep, default_grid, grid_search, tune, tune_schedule


@pytest.fixture(scope="module")
def nqm():
    return NQM.power_law(30)


@pytest.mark.parametrize("family", ["sgd", "precond", "momentum", "ema"])
@pytest.mark.parametrize("batch_size", [1, 64, 4096])
def test_tuned_at_least_as_good_as_grid(nqm, family, batch_size):
    target = 0.02 * nqm.initial_loss
    res = tune(nqm, family, batch_size, target)
    lrs, extras = default_grid(nqm, family)  # 100 lrs (x 20 betas or decays)
    grid = grid_search(nqm, family, batch_size, target, lr_fractions=lrs, extras=extras)
    assert res["steps"] <= grid["steps"]
    # the tuned setting achieves the reported steps exactly
    opt = __import__("toymodels.sweep", fromlist=["make_optimizer"]).make_optimizer(family, res["lr"], None if math.isnan(res["extra"]) else res["extra"])
    assert nqm.steps_to_target(opt, batch_size, target) == res["steps"]


def test_sweep_shapes_names_and_scaling(nqm, tmp_path):
    bs = 2.0 ** np.arange(0, 13, 3)
    ds = batch_size_sweep(nqm, "momentum", bs, 0.05 * nqm.initial_loss, progress=False)
    validate(ds)
    assert set(ds.data_vars) >= {"steps_to_target", "lr_opt", "momentum_opt", "reason"}
    assert ds.attrs["source"] == "exact" and ds.attrs["optimizer"] == "momentum"
    s = ds.steps_to_target.values
    assert np.all(np.diff(s) <= 0)  # more data per step never hurts when tuned
    assert s[0] / s[1] > 4  # near-linear scaling at small batch (8x batch)
    path = tmp_path / "sweep.nc"
    ds.to_netcdf(path)
    xr.testing.assert_identical(xr.load_dataset(path), ds)


def test_sweep_resumes(nqm, tmp_path):
    bs = 2.0 ** np.arange(0, 10, 3)
    target = 0.05 * nqm.initial_loss
    path = tmp_path / "ema.nc"
    full = batch_size_sweep(nqm, "ema", bs, target, progress=False)
    batch_size_sweep(nqm, "ema", bs[:2], target, progress=False, path=path)  # "interrupted" after 2
    resumed = batch_size_sweep(nqm, "ema", bs, target, progress=False, path=path)
    xr.testing.assert_allclose(resumed[["steps_to_target"]], full[["steps_to_target"]])
    assert xr.load_dataset(path).batch_size.size == bs.size


def test_unreachable_everywhere_reports_reason():
    nqm = NQM.power_law(5)
    ds = batch_size_sweep(nqm, "sgd", [1.0, 2.0], 10 * nqm.initial_loss, progress=False)
    assert np.all(ds.steps_to_target.values == 0)


def test_schedule_tuning_beats_constant(nqm):
    target = 0.02 * nqm.initial_loss
    const = tune(nqm, "sgd", 1, target)
    sched = tune_schedule(nqm, 1, target, n_pieces=3)
    assert sched["steps"] <= const["steps"]
    assert sched["steps"] < 0.9 * const["steps"]  # decaying the lr helps in the noise-dominated regime
    lrs = np.asarray(sched["schedule"].lrs)
    assert lrs.size >= 2 and np.all(np.diff(lrs) < 0)  # the fitted schedule decays
    curve = nqm.loss_curve(SGD(sched["schedule"]), 1, np.array([int(sched["steps"]) - 1, int(sched["steps"])])).values
    assert curve[1] <= target < curve[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(family="adam"), "`family` must be one of"),
        (dict(batch_sizes=[4.0, 2.0]), "`batch_sizes` must be strictly increasing"),
        (dict(batch_sizes=[0.5]), "`batch_size` must be a float in \\[1, inf\\)"),
        (dict(target=0.0), "`target` must be a float in \\(0, inf\\)"),
    ],
)
def test_sweep_bad_input(nqm, kwargs, match):
    args = dict(problem=nqm, family="sgd", batch_sizes=[1.0, 2.0], target=0.1, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        batch_size_sweep(**args)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["momentum", "ema", "momentum_ema"])
def test_tuned_beats_grid_at_larger_dimension(family):
    """d = 1000, the oscillating families: tuned <= exact optimum of the 100 x 20 grid (about a minute)."""
    nqm = NQM.power_law(1000)
    target = 0.01 * nqm.initial_loss
    lrs, extras = default_grid(nqm, family)
    for batch_size in (256.0, 65536.0):
        res = tune(nqm, family, batch_size, target)
        grid = grid_search(nqm, family, batch_size, target, lr_fractions=lrs, extras=extras)
        assert res["steps"] <= grid["steps"]


def test_momentum_ema_family(nqm):
    target = 0.05 * nqm.initial_loss
    ds = batch_size_sweep(nqm, "momentum_ema", [1.0, 64.0], target, progress=False)
    validate(ds)
    assert np.all(np.isfinite(ds.steps_to_target.values)) and "momentum_opt" in ds
    lrs, extras = default_grid(nqm, "momentum_ema", n_lr=30, n_extra=6)
    grid = grid_search(nqm, "momentum_ema", 64.0, target, lr_fractions=lrs, extras=extras)
    assert ds.steps_to_target.values[1] <= grid["steps"]


def test_tune_through_the_coarsened_model():
    """Above 2000 modes the tuner searches on NQM.coarsen() first; the result is exact and beats the grid."""
    nqm = NQM.power_law(3000)
    target = 0.02 * nqm.initial_loss
    res = tune(nqm, "sgd", 64, target)
    assert nqm.steps_to_target(SGD(res["lr"]), 64, target) == res["steps"]
    lrs, extras = default_grid(nqm, "sgd")
    assert res["steps"] <= grid_search(nqm, "sgd", 64, target, lr_fractions=lrs, extras=extras)["steps"]


@pytest.mark.parametrize("family", ["sgd", "precond", "momentum", "ema", "momentum_ema"])
def test_fast_family_evaluation_matches_optimizer_objects(family):
    """The tuner's fast path (A, b affine in the hyper-parameter) equals building each optimizer."""
    from toymodels.sweep import _EXTRA, _Evaluator, make_optimizer

    nqm = NQM.power_law(60)
    ev = _Evaluator(nqm, family, 8.0, 0.5, 0.99)
    assert (ev._fast is not None) == (family != "momentum_ema")  # 3-state systems use the slow path
    for x, y in [(-1.0, -2.0), (-5.0, -0.5), (-0.01, -8.0), (-12.0, -0.01)]:
        y = y if _EXTRA[family] else None
        extra = None if y is None else 1 - math.exp(y)
        probe = make_optimizer(family, 1.0, extra, precond=0.5, decay=0.99)
        slow = math.log(nqm.loss_at_step(probe, 8.0, 500, lr=math.exp(x) * nqm.lr_limit(probe)))
        assert ev.log_loss(500, x, y) == pytest.approx(slow, abs=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr_fractions=[0.5, 1.5]), "`lr_fractions` must be a non-empty 1-D array of values in \\(0, 1\\)"),
        (dict(lr_fractions=[]), "`lr_fractions` must be a non-empty"),
        (dict(extras=[0.9]), "`extras` must be \\[None\\]"),
        (dict(family="momentum", extras=[None]), "`extras` must hold momentum values"),
        (dict(family="momentum", extras=[1.0]), "`extras` must be a float in \\[0, 1\\)"),
        (dict(target=-1.0), "`target` must be a float in \\(0, inf\\)"),
    ],
)
def test_grid_search_bad_input(nqm, kwargs, match):
    args = dict(family="sgd", batch_size=1.0, target=0.1, lr_fractions=[0.1, 0.5], extras=[None])
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        grid_search(nqm, **args)
