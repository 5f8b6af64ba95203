"""Tuned batch-size sweeps: at least as good as the exact grid optimum, resumable, validated."""

import math
import os

import numpy as np
import pytest
import xarray as xr

from toymodels import NQM, SGD, GaussianLinearRegression
from toymodels.schedules import PiecewiseConstant
from toymodels.schema import validate
from toymodels.sweep import batch_size_sweep, default_grid, grid_search, tune, tune_schedule


@pytest.fixture(scope="module")
def nqm():
    return NQM.power_law(30)


# the two-parameter families' 100 x 20 grids take ~1.5 s each: their batch 64 runs by default, their
# batch sizes 1 and 4096 with -m slow (CI runs them)
_GRID_CASES = [pytest.param(b, f, marks=[pytest.mark.slow] if f in ("momentum", "ema", "asgd") and b != 64 else [])
               for b in (1, 64, 4096) for f in ("sgd", "precond", "momentum", "ema", "asgd")]


@pytest.mark.parametrize("batch_size, family", _GRID_CASES)
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
    assert set(ds.data_vars) >= {"steps_to_target", "lr_opt", "momentum_opt", "lr_eff_opt", "reason"}
    # heavy ball's effective learning rate lr / (1 - beta), where the tuned (lr, beta) pair may jump
    np.testing.assert_array_equal(ds.lr_eff_opt.values, ds.lr_opt.values / (1.0 - ds.momentum_opt.values))
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
    shorter = batch_size_sweep(nqm, "ema", bs[:2], target, progress=False, path=path)  # a rerun with fewer
    xr.testing.assert_allclose(shorter[["steps_to_target"]], full[["steps_to_target"]].isel(batch_size=slice(0, 2)))
    with pytest.raises(TypeError, match="`problem` must be an NQM"):
        tune_schedule(GaussianLinearRegression(nqm.h[:5]), 1, 0.1)


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
        (dict(batch_sizes=[0.5]), "`batch_sizes` must be in \\[1, 9.0072e\\+15\\] everywhere; got min 0.5"),
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
    assert np.all(np.isfinite(ds.steps_to_target.values)) and "momentum_opt" in ds and "lr_eff_opt" in ds
    assert "lr_eff_opt" not in batch_size_sweep(nqm, "ema", [1.0], target, progress=False)  # no beta: not defined
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
        (dict(lr_fractions=[0.5, 1.5]), "`lr_fractions` must be in \\(0, 1\\) everywhere; got min 0.5, max 1.5"),
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


@pytest.mark.parametrize("family", ["momentum", "ema", "sgd"])
def test_compiled_local_search_matches_scipy(family):
    """The compiled Nelder-Mead and Brent reach the minima scipy's implementations reach on the
    same objective from the same start (values within the stopping tolerances)."""
    from scipy import optimize

    from toymodels import _localmin
    from toymodels.sweep import _X_MIN, _Y_MIN, _Evaluator

    nqm = NQM.power_law(200)
    ev = _Evaluator(nqm, family, 16.0, 0.5, 0.99)
    k = 300
    args = ev._fast.kernel_args(k)
    if family == "sgd":
        for lo, hi in [(-6.0, -0.001), (-3.0, -1.0)]:
            x, f, n = _localmin.brent(lo, hi, 1e-5, 500, *args, _X_MIN)
            ref = optimize.minimize_scalar(lambda x: ev.log_loss(k, x), bounds=(lo, hi), method="bounded",
                                           options={"xatol": 1e-5})
            assert f == pytest.approx(ref.fun, abs=1e-8)
            assert x == pytest.approx(ref.x, abs=1e-4)
        return
    for x0, y0 in [(-2.0, -2.0), (-4.0, -0.5), (-0.5, -5.0)]:
        x, y, f, n = _localmin.nelder_mead(x0, y0, 0.3, 1e-6, 1e-12, 2000, *args, _X_MIN, _Y_MIN)
        simplex = np.array([[x0, y0], [x0 + 0.3, y0], [x0, y0 + 0.3]])
        ref = optimize.minimize(lambda z: ev.log_loss(k, z[0], z[1]), [x0, y0], method="Nelder-Mead",
                                options={"initial_simplex": simplex, "xatol": 1e-6, "fatol": 1e-12, "maxfev": 2000})
        assert f == pytest.approx(ref.fun, abs=1e-7)
        assert f == pytest.approx(ev.log_loss(k, x, y), abs=1e-12)  # the value belongs to the point


@pytest.mark.parametrize("precond", [0.0, 0.5])
def test_compiled_schedule_search_matches_the_exact_curve_and_scipy(precond):
    """The compiled schedule loss equals NQM.loss_curve under the same piecewise-constant schedule (an
    independent exact implementation), and its Nelder-Mead takes scipy's path from the same simplex."""
    from scipy import optimize

    from toymodels import _localmin

    nqm, bs, K, n = NQM.power_law(300, noise_power=0.5), 4.0, 777, 3
    probe = SGD(1.0, precond=precond)
    limit = nqm.lr_limit(probe)
    _, a1, b1 = probe.affine(nqm.h)
    args = (K, n, limit, a1[:, 0, 0].copy(), b1[:, 0].copy(), nqm.c / bs, nqm.init_sq.copy(), nqm.h)
    for z in (np.array([-0.1, -1.0, -3.0, 0.4, -0.7]), np.array([-2.0, -0.5, -0.05, -1.5, 1.2])):
        lrs = limit * np.exp(z[:n])
        w = np.exp(np.r_[0.0, z[n:]])
        bounds = tuple(int(b) for b in np.rint(np.cumsum(w / w.sum())[:-1] * K))
        exact = nqm.loss_curve(SGD(PiecewiseConstant(bounds, tuple(lrs)), precond=precond), bs, np.array([K]))
        assert _localmin.schedule_log_loss(z, *args) == pytest.approx(np.log(float(exact.values[-1])), abs=1e-10)
    assert _localmin.schedule_log_loss(np.array([0.1, -1.0, -1.0, 0.0, 0.0]), *args) == np.inf
    assert _localmin.schedule_log_loss(np.array([-1.0, -1.0, -1.0, 40.0, 0.0]), *args) == np.inf
    z0, steps = np.array([-1.0, -1.5, -2.0, 0.0, 0.0]), np.array([-0.05, -0.075, -0.1, 0.5, 0.5])
    z, f, nfev = _localmin.schedule_nelder_mead(z0, steps, 1e-6, 1e-12, 3000, *args)
    ref = optimize.minimize(lambda v: _localmin.schedule_log_loss(v, *args), z0, method="Nelder-Mead",
                            options={"initial_simplex": z0 + np.vstack([np.zeros(5), np.diag(steps)]),
                                     "xatol": 1e-6, "fatol": 1e-12, "maxfev": 3000})
    # the same path as scipy's step for step, until a tie in the function values: scipy orders the
    # simplex with np.argsort, whose order of equal values depends on the numpy build (SIMD sorts),
    # the compiled search keeps ties in order (stable).  Measured with scipy 1.17 / numpy 2.4: the
    # paths part at evaluation 282 of about 320, and both stop at the same value within 1e-15.
    assert f == pytest.approx(ref.fun, rel=0, abs=1e-12) and nfev <= 3000
    np.testing.assert_allclose(z, ref.x, rtol=0, atol=1e-4)


def test_family_sweeps_equal_one_by_one(nqm, tmp_path):
    """Families run side by side (writing their files at the same time) give exactly the
    sequential results, in the order asked, and resume from their files."""
    from toymodels.sweep import _parallel_backend, family_sweeps

    assert _parallel_backend(10**5) in ("threads", "fork", "serial")
    assert _parallel_backend(10) == "threads"  # serial kernels only: no threading layer needed
    bss = [1.0, 16.0, 256.0]
    fams = ["sgd", "momentum", "ema", "precond"]
    paths = {f: tmp_path / f"{f}.nc" for f in fams}
    together = family_sweeps(nqm, fams, bss, 0.05, n_jobs=2, paths=paths, progress=False)
    assert list(together) == fams
    for fam in fams:
        alone = batch_size_sweep(nqm, fam, bss, 0.05, progress=False)
        xr.testing.assert_identical(together[fam], alone)
        xr.testing.assert_identical(xr.load_dataset(paths[fam]), alone)
    again = family_sweeps(nqm, fams, bss, 0.05, n_jobs=2, paths=paths, progress=False)
    for fam in fams:
        xr.testing.assert_allclose(again[fam], together[fam])


@pytest.mark.slow  # ~6 s (starts a dask cluster); CI runs it
def test_family_sweeps_on_a_dask_cluster_equal_serial(nqm, tmp_path, monkeypatch):
    """A 2-worker dask LocalCluster gives the serial results and writes every family's file, and
    leaves this process's environment as it was (dask's nanny sets its workers' OMP_NUM_THREADS,
    MKL_NUM_THREADS, ... = 1 in it: every process started afterwards would inherit them); a Client
    can be passed as it is."""
    from distributed import Client, LocalCluster

    from toymodels.parallel import _nanny_environ
    from toymodels.sweep import family_sweeps

    keys = _nanny_environ()
    assert {"MKL_NUM_THREADS", "OMP_NUM_THREADS"} <= keys
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # one set before (to 3), the others unset
    bss, fams = [1.0, 64.0], ["sgd", "momentum"]
    paths = {f: str(tmp_path / f"{f}.nc") for f in fams}
    on_dask = family_sweeps(nqm, fams, bss, 0.05, n_jobs=2, paths=paths, progress=False, scheduler="local")
    assert {k: os.environ.get(k) for k in keys} == {k: "3" if k == "OMP_NUM_THREADS" else None for k in keys}
    serial = family_sweeps(nqm, fams, bss, 0.05, n_jobs=1, progress=False)
    for fam in fams:
        xr.testing.assert_identical(on_dask[fam], serial[fam])
        xr.testing.assert_identical(xr.load_dataset(paths[fam]), serial[fam])
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        xr.testing.assert_identical(family_sweeps(nqm, ["sgd"], bss, 0.05, progress=False, scheduler=client)["sgd"],
                                    serial["sgd"])


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(scheduler=3), ValueError, "`scheduler` must be None, 'local'"),
        (dict(families=["sgd", "sgd"]), ValueError, "`families` must not repeat"),
        (dict(families=["adam"]), ValueError, "`family` must be one of"),
        (dict(n_jobs=0), ValueError, "`n_jobs` must be"),
        (dict(momentum=0.9), TypeError, "unexpected keyword arguments \\['momentum'\\]"),
    ],
)
def test_family_sweeps_bad_input(nqm, kwargs, err, match):
    from toymodels.sweep import family_sweeps

    args = dict(families=["sgd"], batch_sizes=[1.0], target=0.05, progress=False)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        family_sweeps(nqm, **args)


def test_brent_search_finds_smooth_minima_and_cliff_edges():
    """sweep._brent (the schedule-free tuner's 1-D search, comparisons only where values are inf)
    finds a smooth minimum to its tolerance in fewer evaluations than golden sections need, the edge
    of a cliff of inf that a function falls towards, and a minimum at an end of the bracket."""
    from toymodels.sweep import _brent

    calls = []

    def smooth(t):
        calls.append(t)
        return (t - 0.3) ** 2 + 0.1 * (t - 0.3) ** 4

    v, t = _brent(smooth, -2.0, 2.0, 1e-4)
    assert abs(t - 0.3) <= 1e-4 and v == smooth(t)
    golden_evals = math.ceil(math.log(4.0 / 1e-4) / math.log((1 + math.sqrt(5)) / 2))
    assert len(calls) < golden_evals

    cliff = lambda t: math.inf if t > 0.7123 else 1.0 - t  # noqa: E731
    v, t = _brent(cliff, -2.0, 2.0, 1e-4)
    assert 0.7123 - 2e-4 <= t <= 0.7123 and v == 1.0 - t

    v, t = _brent(lambda t: t, 1.0, 3.0, 1e-3)  # increasing: the left end
    assert t - 1.0 <= 2e-3
