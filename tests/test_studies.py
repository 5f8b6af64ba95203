"""Smoke test: the main study runs end to end at a tiny size and writes valid files."""

import numpy as np
import xarray as xr

from studies import batch_size_scaling
from toymodels.schema import validate


def test_batch_size_scaling_quick(tmp_path):
    res = batch_size_scaling.run(quick=True, out=str(tmp_path), dim=40, progress=False)
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
    again = batch_size_scaling.run(quick=True, out=str(tmp_path), dim=40, progress=False)
    xr.testing.assert_equal(again.steps_to_target, res.steps_to_target)
