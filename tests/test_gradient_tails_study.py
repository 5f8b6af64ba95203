"""Smoke test of studies.gradient_tails at its quick scale: valid files, resumable, and the study's
headline facts (Gaussian NQM noise, power-law dimension-wise gradients, c - 1 outliers, ~1/B)."""

import numpy as np
import pytest
import xarray as xr

from studies import gradient_tails
from toymodels.schema import validate


def test_count_outliers():
    bulk = np.arange(1.0, 101.0) ** -1.0
    assert gradient_tails.count_outliers(bulk) == 0
    assert gradient_tails.count_outliers(np.concatenate([[50.0, 40.0, 30.0], bulk])) == 3


@pytest.mark.slow  # 30 s: the gradient-tails tests and helpers above stay in the default suite
def test_gradient_tails_quick(tmp_path):
    res = gradient_tails.run(scale="quick", out=str(tmp_path), progress=False)
    toy, deep = res["toy"], res["deep"]
    for name in ("gradient_tails.png", "gradient_tails_tests.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    for group in ("toy", "deep"):
        saved = xr.load_dataset(tmp_path / "gradient_tails.nc", group=group)
        validate(saved)
        assert list(saved.kind.values) == list(gradient_tails.KINDS)
    assert toy.attrs["source"] == "simulation" and deep.attrs["source"] == "measurement"

    nqm = gradient_tails._select(toy, model="nqm", state="init", batch_size=100.0).isel(case=0)
    assert nqm.gaussian_rate.sel(kind="iteration") > 0.8  # Gaussian noise by construction
    assert nqm.power_law_rate.sel(kind="dimension") > 0.8  # scales c_i = 1 / i: power-law rows
    assert abs(float(toy.eigenvalue_batch_slope.sel(curve="nqm")) + 1) < 1e-6
    assert abs(float(deep.eigenvalue_batch_slope.sel(curve="cnn")) + 1) < 0.15
    cnn = gradient_tails._select(deep, model="cnn", state="init", batch_size=1.0)
    assert dict(zip(cnn.n_classes.values, cnn.n_outliers.values)) == {10: 9, 2: 1}  # c - 1 outliers

    n_points = len(list((tmp_path / "gradient_tails_points").iterdir()))
    again = gradient_tails.run(scale="quick", out=str(tmp_path), progress=False)
    toy2, deep2 = again["toy"], again["deep"]
    assert len(list((tmp_path / "gradient_tails_points").iterdir())) == n_points
    xr.testing.assert_identical(deep2.zipf_exponent, deep.zipf_exponent)
    xr.testing.assert_identical(toy2.gaussian_rate, toy.gaussian_rate)
