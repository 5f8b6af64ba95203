"""The optimizer-zoo study: its groups hold what they claim, its figure marks unreachable targets as
such, and (slow) the study runs end to end at its tiny scale and resumes."""

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

from studies import optimizer_zoo as zoo  # noqa: E402
from studies._io import load, save  # noqa: E402
from toymodels import NQM  # noqa: E402
from toymodels.schema import validate  # noqa: E402
from toymodels.sweep import batch_size_sweep  # noqa: E402


@pytest.fixture(scope="module")
def small_group(tmp_path_factory):
    paths = {f: str(tmp_path_factory.mktemp("parts") / f"{f}.nc") for f in ("sgd", "ema")}
    return zoo._group(NQM.power_law(10), ("sgd", "ema"), np.array([1.0, 16.0]), 0.01, paths, False, None)


def test_group_holds_the_tuned_sweeps_and_the_bound(small_group):
    ds = small_group
    validate(ds)
    assert list(ds.optimizer.values) == ["sgd", "ema"]
    nqm = NQM.power_law(10)
    target = 0.01 * nqm.initial_loss
    # the same numbers as the library's sweep, and never below the lower bound of any algorithm
    direct = batch_size_sweep(nqm, "ema", [1.0, 16.0], target, progress=False)
    np.testing.assert_array_equal(ds.steps_to_target.sel(optimizer="ema").values, direct.steps_to_target.values)
    np.testing.assert_array_equal(ds.steps_lower_bound.values, [nqm.lower_bound_steps(b, target) for b in (1, 16)])
    assert bool((ds.steps_to_target >= ds.steps_lower_bound).all())
    # a family's extra hyper-parameter is filled where it applies, NaN where it does not
    assert np.isfinite(ds.decay_opt.sel(optimizer="ema")).all() and np.isnan(ds.decay_opt.sel(optimizer="sgd")).all()
    assert np.isnan(ds.momentum_opt).all() and np.isnan(ds.kappa_opt).all()


@pytest.mark.slow  # 2-8 s (draws the figure twice); CI runs it
def test_unreached_targets_are_drawn_and_saved_as_inf(small_group, tmp_path):
    ds = small_group.copy(deep=True)
    ds["steps_to_target"].loc[dict(optimizer="ema", batch_size=1.0)] = math.inf
    ds["reason"].loc[dict(optimizer="ema", batch_size=1.0)] = "no setting reaches the target"
    fig, ax = plt.subplots()
    zoo._steps(ax, ds, top=1e5)
    marks = [ln for ln in ax.get_lines() if ln.get_marker() == "^"]
    assert len(marks) == 1 and "(inf)" in marks[0].get_label()
    np.testing.assert_array_equal(marks[0].get_xdata(), [1.0])
    assert any("lower bound" in ln.get_label() and "bound, not a run" in ln.get_label() for ln in ax.get_lines())
    plt.close(fig)
    # the file keeps inf (not NaN) and the figure redraws from it
    result = {"main": ds}
    save(result, str(tmp_path), "optimizer_zoo")
    name, back = load(str(tmp_path / "optimizer_zoo.nc"))
    assert name == "optimizer_zoo" and np.isinf(back["main"].steps_to_target.sel(optimizer="ema", batch_size=1.0))
    zoo.plot(back, str(tmp_path / "zoo.png"))
    assert (tmp_path / "zoo.png").stat().st_size > 10_000


def test_unknown_scale_is_named():
    with pytest.raises(ValueError, match="`scale` must be one of"):
        zoo.run(scale="huge")


@pytest.mark.slow  # ~30 s on a loaded 2-core machine (accelerated SGD tunes slowly)
def test_optimizer_zoo_tiny_runs_every_family_and_resumes(tmp_path):
    res = zoo.run(scale="tiny", out=str(tmp_path), progress=False)
    assert (tmp_path / "optimizer_zoo.png").stat().st_size > 10_000
    validate(xr.load_dataset(tmp_path / "optimizer_zoo.nc", group="main"))
    assert list(res) == ["main"] and set(res["main"].optimizer.values) == set(zoo.LABELS)
    for ds in res.values():
        assert np.isfinite(ds.steps_to_target).all()
        assert bool((ds.steps_to_target >= ds.steps_lower_bound).all())
    main = res["main"].steps_to_target
    # Zhang et al. 2019: preconditioning beats SGD at every batch size; at B = 1 averaging (EMA) beats
    # momentum, which is no better than SGD at small batch sizes up to the tuning's resolution
    assert bool((main.sel(optimizer="precond") <= main.sel(optimizer="sgd")).all())
    assert main.sel(optimizer="ema", batch_size=1.0) < main.sel(optimizer="momentum", batch_size=1.0)
    again = zoo.run(scale="tiny", out=str(tmp_path), progress=False)  # every family's sweep is resumed
    for group in res:
        xr.testing.assert_equal(again[group].steps_to_target, res[group].steps_to_target)
