"""Smoke test: the main study runs end to end at a tiny size and writes valid files."""

import numpy as np
import pytest
import xarray as xr

from studies._io import load

from studies import batch_size_scaling
from toymodels.schema import validate


@pytest.mark.slow  # 5 s; the gallery test runs the study's --quick by default, CI runs this one too
def test_batch_size_scaling_quick(tmp_path):
    res = batch_size_scaling.run(scale="quick", out=str(tmp_path), dim=40, progress=False)
    nc = tmp_path / "batch_size_scaling.nc"
    png = tmp_path / "batch_size_scaling.png"
    assert nc.exists() and png.exists() and png.stat().st_size > 10_000
    saved = xr.load_dataset(nc)
    validate(saved)
    assert set(saved.optimizer.values) == {"sgd", "precond", "momentum", "ema", "sgd_schedule"}
    steps = saved.steps_to_target
    assert np.all(np.isfinite(steps.values))
    # tuned steps never beat the information-theoretic lower bound, and fall with batch size
    assert np.all(steps >= saved.steps_lower_bound)
    assert np.all(steps.diff("batch_size") <= 0)
    # a rerun resumes from the per-family files and gives the same numbers
    again = batch_size_scaling.run(scale="quick", out=str(tmp_path), dim=40, progress=False)
    xr.testing.assert_equal(again.steps_to_target, res.steps_to_target)


def test_interpolation_quick(quick_study):
    """The interpolation study runs, writes three valid netCDF groups and a figure, and shows what it
    claims: an exponential fall without label noise, floors with it."""
    from studies import interpolation

    tmp_path = quick_study("interpolation")  # python -m studies run interpolation --quick, shared with test_gallery
    res = load(str(tmp_path / "interpolation.nc"))[1]
    online, finite = res["online"], res["finite"]
    path = tmp_path / "interpolation.nc"
    assert (tmp_path / "interpolation.png").stat().st_size > 10_000
    for group in ("online", "finite", "finite_mc"):
        validate(xr.load_dataset(path, group=group))
    last = online.loss.isel(step=-1)
    assert last.sel(curve="linreg_interpolating") < 1e-12
    assert last.sel(curve="nqm") > online.loss_lower_bound.values[-1]  # the NQM cannot beat its bound
    assert last.sel(curve="linreg_label_noise") > 1e-3
    k = finite.sq_error.sel(curve="kaczmarz_interpolating").values
    assert np.all(k <= finite.sv_bound.sel(curve="kaczmarz_interpolating").values * (1 + 1e-10))


def test_rf_variance_quick(quick_study):
    """The random-features variance study runs, resumes from its saved points and shows SG-2B = SG-B / 2."""
    from studies import rf_variance

    tmp_path = quick_study("rf_variance")  # python -m studies run rf_variance --quick, shared with test_gallery
    res = load(str(tmp_path / "rf_variance.nc"))[1]
    assert (tmp_path / "rf_variance.png").stat().st_size > 10_000
    saved = xr.load_dataset(tmp_path / "rf_variance.nc")
    validate(saved)
    assert set(saved.estimator.values) == {"sg_b", "sg_2b", "svrg", "gc"}
    np.testing.assert_allclose(res.grad_var.sel(estimator="sg_2b"), res.grad_var.sel(estimator="sg_b") / 2, rtol=1e-12)
    n_points = len(list((tmp_path / "rf_variance_points").iterdir()))
    again = rf_variance.run(scale="quick", out=str(tmp_path), progress=False)
    assert len(list((tmp_path / "rf_variance_points").iterdir())) == n_points
    xr.testing.assert_equal(again.grad_var_max, res.grad_var_max)


# slow (17-22 s each): .ci/run runs them after the default suite
@pytest.mark.slow
@pytest.mark.parametrize("network", ["cnn", "mlp1d"])
def test_nqm_vs_network_tiny(tmp_path, network):
    """The theory-vs-network study runs end to end at a tiny scale and writes valid groups."""
    from studies import nqm_vs_cnn

    res = nqm_vs_cnn.run(scale="tiny", out=str(tmp_path), progress=False, network=network)
    assert (tmp_path / f"nqm_vs_{network}.png").stat().st_size > 10_000
    for group in ("measured", "predicted", "probe", "nqm_stats", "linreg_stats"):
        validate(xr.load_dataset(tmp_path / f"nqm_vs_{network}.nc", group=group))
    assert np.isfinite(res["measured"].steps_best.sel(optimizer="sgd").values).all()
    assert res["predicted"].attrs["calibration"] > 0
    # calibrated at the smallest batch size that reached the target: the SGD curves agree there
    measured = res["measured"].steps_best.sel(optimizer="sgd").values
    j = int(np.flatnonzero(np.isfinite(measured))[0])
    np.testing.assert_allclose(res["predicted"].steps_to_target.sel(optimizer="sgd").values[j], measured[j])


def test_command_line_lists_runs_and_redraws(tmp_path, capsys, quick_study):
    """`python -m studies list | run NAME | plot FILE.nc`: the listing names every study, `run` passes
    the flags on, and `plot` redraws a figure from the saved file alone (groups or a single dataset)."""
    from studies import STUDIES
    from studies.__main__ import main

    main(["list"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in STUDIES)
    # `run interpolation --quick --out DIR` (shared with test_gallery): its files are in DIR
    out = quick_study("interpolation")
    assert (out / "interpolation.nc").exists() and (out / "interpolation.png").exists()
    main(["plot", str(out / "interpolation.nc"), "--out", str(tmp_path / "interpolation.png")])
    assert (tmp_path / "interpolation.png").stat().st_size > 10_000
    main(["plot", str(quick_study("batch_size_scaling") / "batch_size_scaling.nc"), "--out", str(tmp_path / "again.png")])
    assert (tmp_path / "again.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as info:  # a user error: one line, status 2 (more in tests/test_cli.py)
        main(["run", "nope"])
    assert info.value.code == 2 and "unknown study 'nope'" in capsys.readouterr().err
    xr.Dataset({"loss": ("step", [1.0])}).to_netcdf(tmp_path / "other.nc")
    with pytest.raises(SystemExit) as info:
        main(["plot", str(tmp_path / "other.nc")])
    assert info.value.code == 2 and "no `study` attribute" in capsys.readouterr().err


def test_rate_vs_floor_matches_the_closed_form_and_monte_carlo(quick_study):
    """The per-direction curves equal E l(k) = (1-ah)^2k l0 + (1-(1-ah)^2k) a c / (2B(2-ah)), written out
    here independently, and the Monte Carlo means lie within 4.5 standard errors of them."""
    from studies import rate_vs_floor as rvf

    tmp_path = quick_study("rate_vs_floor")  # python -m studies run rate_vs_floor --quick, shared with test_gallery
    res = load(str(tmp_path / "rate_vs_floor.nc"))[1]
    exact, sims = res["exact"], res["simulation"]
    for name, h in rvf.CURVATURES.items():
        for lr in exact.lr.values:
            def formula(k):
                r = (1 - lr * h) ** (2 * np.asarray(k, dtype=float))
                return r * 0.5 * h + (1 - r) * lr * h / (2 * rvf.BATCH_SIZE * (2 - lr * h))

            np.testing.assert_allclose(exact.loss.sel(curve=name, lr=lr).values, formula(exact.step.values), rtol=1e-10)
            m = sims.sel(curve=name, lr=lr)
            e = formula(m.step.values)
            ok = m.step.values > 0
            assert np.all(np.abs(m.loss.values[ok] - e[ok]) <= 4.5 * m.loss_sem.values[ok])
    trade = res["tradeoff"]
    for name, h in rvf.CURVATURES.items():  # the engine's noise floor is a h / (2 B (2 - a h)) with c = h
        a = trade.lr.values
        np.testing.assert_allclose(trade.loss_inf.sel(curve=name), a * h / (2 * rvf.BATCH_SIZE * (2 - a * h)), rtol=1e-9)
    floor = trade.loss_inf.sel(curve="high")
    assert np.all(np.diff(floor.values) > 0)  # the floor rises with the learning rate


def test_hessian_vs_covariance_directions():
    """Along the top Hessian eigenvectors v^T H v are the Lanczos eigenvalues; along the top covariance
    eigenvectors v^T C v are the covariance's top eigenvalues (dense, from the per-example gradients);
    both exceed the random directions' quotients."""
    import torch
    import torch.nn.functional as F

    from deepmodels import data, hessian, models, pergrad
    from studies import hessian_vs_covariance as hvc

    d = data.digits(seed=0)
    model = models.mlp(64, 10, (16,), seed=1).double()
    x, y = d.x_train[:128].double(), d.y_train[:128]
    r = hvc._measure(model, x, y, 5, seed=0)
    np.testing.assert_allclose(r.curvature.sel(curve="hessian"), hessian.top_eigenvalues(model, F.cross_entropy, x, y, 5),
                               rtol=1e-5)
    G = pergrad.flatten(pergrad.per_example_grads(model, F.cross_entropy, x, y))
    Gc = G - G.mean(0)
    top_c = torch.linalg.eigvalsh(Gc.T @ Gc / G.shape[0]).flip(0)[:5].numpy()
    np.testing.assert_allclose(r.noise_variance.sel(curve="covariance"), top_c, rtol=1e-8)
    assert r.curvature.sel(curve="hessian").min() > r.curvature.sel(curve="random").max()
    assert r.noise_variance.sel(curve="covariance").min() > r.noise_variance.sel(curve="random").max()
    assert hvc.log_correlation([1.0, 10.0, 100.0, -1.0], [2.0, 20.0, 200.0, 5.0]) == pytest.approx(1.0)


def test_network_variance_quick(quick_study):
    """SG-2B has exactly half SG-B's variance, SVRG's is zero at its snapshot (step 0), and every
    normalized variance lies in [0, 1]."""
    from studies import network_variance as nv

    tmp_path = quick_study("network_variance")  # python -m studies run network_variance --quick, shared with test_gallery
    res = load(str(tmp_path / "network_variance.nc"))[1]
    validate(xr.load_dataset(tmp_path / "network_variance.nc"))
    np.testing.assert_allclose(res.grad_var.sel(estimator="sg_2b"), res.grad_var.sel(estimator="sg_b") / 2, rtol=1e-10)
    assert np.all(res.grad_var.sel(estimator="svrg", step=0) < 1e-12 * res.grad_var.sel(estimator="sg_b", step=0))
    assert np.all(res.grad_var.sel(estimator="svrg").isel(step=slice(1, None)) > 0)
    assert np.all((res.grad_nvar >= 0) & (res.grad_nvar <= 1))


def test_schedule_sweep_resumes_only_on_the_same_grid(tmp_path):
    """A saved schedule sweep over other batch sizes is not relabelled onto a new grid."""
    from studies.batch_size_scaling import _schedule_sweep
    from toymodels import NQM

    nqm = NQM.power_law(200)
    target, path = 0.05 * nqm.initial_loss, str(tmp_path / "schedule.nc")
    _schedule_sweep(nqm, np.array([1.0, 16.0, 256.0]), target, path, False)
    from toymodels.resume import ResumeWarning

    with pytest.warns(ResumeWarning, match=r"schedule\.nc: it was written for another grid"):
        again = _schedule_sweep(nqm, np.array([1.0, 2.0, 4.0]), target, path, False)
    fresh = _schedule_sweep(nqm, np.array([1.0, 2.0, 4.0]), target, str(tmp_path / "fresh.nc"), False)
    xr.testing.assert_identical(again, fresh)


@pytest.mark.slow  # 19-22 s: .ci/run runs it after the default suite
def test_theory_vs_practice_tiny(tmp_path, monkeypatch):
    """The prediction study runs end to end at a tiny scale, writes valid groups, and resumes: a rerun
    trains nothing and gives the same numbers."""
    import torch

    from studies import theory_vs_practice

    res = theory_vs_practice.run(scale="tiny", out=str(tmp_path), progress=False)
    assert (tmp_path / "theory_vs_practice.png").stat().st_size > 10_000
    for group in ("summary", "measured", "predicted", "along", "warmup", "aggregations", "reference_cnn_sgd"):
        validate(xr.load_dataset(tmp_path / "theory_vs_practice.nc", group=group))
    summ, pred = res["summary"], res["predicted"]
    agg = res["aggregations"]
    assert list(agg.aggregation.values) == list(theory_vs_practice.AGGREGATIONS)
    # the dS_min-weighted aggregation is the noise-scale predictor's B_crit
    np.testing.assert_allclose(agg.b_crit_pred.sel(aggregation="ds_min_weighted", estimate="unbiased").values,
                               pred.b_crit.sel(predictor="noise_scale").values, rtol=1e-9)
    assert "within 2x" in theory_vs_practice.aggregation_table(agg)
    assert list(pred.predictor.values) == ["noise_scale", "noise_scale_biased", "piecewise_nqm", "nqm_at_init"]
    assert np.isfinite(summ.b_crit.values).all() and (summ.b_crit_lo <= summ.b_crit).all()
    # every predictor is anchored at the reference run: S(B_ref) = its steps to target
    ref_steps = float(pred.attrs.get("reference_steps", np.nan)) if "reference_steps" in pred.attrs else None
    s_ref = pred.steps_to_target.sel(batch_size=4.0, predictor="noise_scale").values
    np.testing.assert_allclose(pred.steps_to_target.sel(batch_size=4.0, predictor="nqm_at_init").values, s_ref,
                               rtol=1e-9)
    assert ref_steps is None or np.isfinite(ref_steps)

    def no_training(*a, **k):
        raise AssertionError("the rerun trained a network")

    monkeypatch.setattr(torch.optim.SGD, "step", no_training)  # every run of the study uses SGD (momentum or not)
    again = theory_vs_practice.run(scale="tiny", out=str(tmp_path), progress=False)
    xr.testing.assert_allclose(again["summary"], summ)


@pytest.mark.slow  # two DDP processes start (about 20 s on 2 cores); CI runs it
def test_transformer_noise_tiny(tmp_path):
    """The study's three estimators on the same examples: DDP (2 gloo processes x 2 accumulation steps)
    equals one process accumulating the same 4 micro-batches, step by step; the per-example estimate
    carries its bootstrap interval; a rerun reuses the saved runs."""
    from studies import transformer_noise as tn

    res = tn.run(scale="tiny", out=str(tmp_path), progress=False)
    assert (tmp_path / "transformer_noise.png").stat().st_size > 10_000
    for ds in res.values():
        validate(ds)
    s, ddp, pe = res["single"], res["ddp"], res["per_example"]
    assert s.attrs["batch_size"] == 16 and int(s.n_micro_batches[0]) == 4 and int(ddp.n_micro_batches[0]) == 4
    np.testing.assert_allclose(ddp.noise_scale_unbiased.values, s.noise_scale_unbiased.values, rtol=1e-4)
    np.testing.assert_allclose(ddp.loss.values, s.loss.values, rtol=1e-5)
    assert s.attrs["max_rel_diff_ddp"] < 1e-4
    lo, hi = pe.noise_scale_unbiased_ci.sel(bound="low"), pe.noise_scale_unbiased_ci.sel(bound="high")
    assert list(pe.step.values) == [0, 6] and bool((lo <= hi).all())
    again = tn.run(scale="tiny", out=str(tmp_path), progress=False)  # reuses the three saved runs
    xr.testing.assert_identical(again["ddp"], ddp)


@pytest.mark.slow  # 8-25 s (MNIST-1D generation, the MLP runs); CI runs it explicitly
def test_deep_bootstrap_tiny(tmp_path):
    """The deep-bootstrap study runs at its test scale, writes valid groups and a figure, shows the exact
    linear-regression claims (equal at step 0, later bootstrap error smaller for more data), measures the
    MLP's errors, resumes from its saved runs with the same numbers, and redraws from the file."""
    from studies import deep_bootstrap as db
    from studies.__main__ import main

    res = db.run(scale="tiny", out=str(tmp_path), progress=False)
    path = tmp_path / "deep_bootstrap.nc"
    assert (tmp_path / "deep_bootstrap.png").stat().st_size > 10_000
    for group in ("linear", "mlp"):
        validate(xr.load_dataset(path, group=group))
    lin, net = res["linear"], res["mlp"]
    assert np.all(np.abs(lin.bootstrap_error.isel(step=0).values) <= 1e-12)
    final = lin.bootstrap_error.isel(step=-1).values
    assert np.all(np.diff(final) < 0)  # n = 10, 40, 160: more data, smaller bootstrap error
    small = lin.sel(n_train=lin.n_train.values[0]).isel(step=-1)
    assert small.offline_train_loss < small.offline_risk + lin.attrs["noise_floor"]  # the small set is fit
    for v in ("online_test_error", "offline_test_error", "offline_train_error"):
        assert np.all((net[v].values >= 0) & (net[v].values <= 1))
    first = net.sel(n_train=net.n_train.values[0]).isel(step=-1)
    assert first.offline_train_error < first.offline_test_error
    assert len(list((tmp_path / "deep_bootstrap_points").glob("*.nc"))) == 3  # online + two offline runs
    again = db.run(scale="tiny", out=str(tmp_path), progress=False)
    xr.testing.assert_equal(again["mlp"], net)
    main(["plot", str(path), "--out", str(tmp_path / "redrawn.png")])
    assert (tmp_path / "redrawn.png").stat().st_size > 10_000


@pytest.mark.slow  # 35 s on the loaded 2-core machine (20 s of it drawing the six log-log panels)
def test_scaling_laws_tiny(tmp_path):
    """The PLRF scaling-law study runs at a tiny scale, writes valid groups, and a rerun reuses the
    critical-batch grid saved per model size."""
    from studies import scaling_laws

    res = scaling_laws.run(scale="tiny", out=str(tmp_path), progress=False)
    assert (tmp_path / "scaling_laws.png").stat().st_size > 10_000
    name, saved = load(str(tmp_path / "scaling_laws.nc"))
    assert name == "scaling_laws" and set(saved) == {"curves", "frontier", "critical"}
    for ds in saved.values():
        validate(ds)
    crit = saved["critical"]
    assert crit.b_crit.dims == ("n_features", "target")
    assert np.isfinite(crit.b_crit.values).sum() >= 3  # the largest model reaches every target
    ok = np.isfinite(crit.b_crit.values)
    assert np.all((crit.b_crit_fit_lo.values[ok] <= crit.b_crit.values[ok]) & (crit.b_crit.values[ok] <= crit.b_crit_fit_hi.values[ok]))
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = scaling_laws.run(scale="tiny", out=str(tmp_path), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    xr.testing.assert_equal(again["critical"].b_crit, res["critical"].b_crit)
