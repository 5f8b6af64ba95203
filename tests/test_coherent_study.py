"""The coherent-gradients study runs end to end at its smallest scale, writes valid files and resumes."""

import numpy as np
import pytest
import xarray as xr

from deepmodels import data
from studies import coherent_gradients as cg
from toymodels import schema


@pytest.mark.slow  # ~6 s (a tiny study end to end); CI runs it
def test_coherent_gradients_tiny(tmp_path, monkeypatch):
    res = cg.run(scale="tiny", out=str(tmp_path), progress=False)
    assert (tmp_path / "coherent_gradients.png").stat().st_size > 10_000
    saved = xr.load_dataset(tmp_path / "coherent_gradients.nc")
    schema.validate(saved)
    assert list(saved.optimizer.values) == list(cg.OPTIMIZERS)
    assert set(saved.label_noise.values) == set(cg.SCALES["tiny"]["noise"])
    acc = saved.accuracy
    defined = acc.sel(subset=["train", "pristine", "test"])
    assert np.all((defined >= 0) & (defined <= 1))
    # corrupt examples exist only with noise, easy / hard are tracked on clean labels only
    assert acc.sel(label_noise=0.0, subset="corrupt").isnull().all()
    assert acc.sel(label_noise=1.0, subset="corrupt").notnull().all()
    assert acc.sel(label_noise=0.0, subset=["easy", "hard"]).notnull().all()
    assert acc.sel(label_noise=1.0, subset=["easy", "hard"]).isnull().all()
    n = saved.n_examples
    np.testing.assert_array_equal(n.sel(subset="pristine") + n.sel(subset="corrupt"), n.sel(subset="train"))
    assert 0.05 < float(n.sel(label_noise=1.0, subset="pristine") / n.sel(label_noise=1.0, subset="train")) < 0.15
    # the same initialisation and batches: every optimizer starts from the same network
    np.testing.assert_array_equal(acc.isel(step=0).sel(optimizer="sgd"), acc.isel(step=0).sel(optimizer="rm3"))
    # a rerun loads the saved runs
    n_files = len(list((tmp_path / "coherent_gradients_runs").iterdir()))
    again = cg.run(scale="tiny", out=str(tmp_path), progress=False)
    assert len(list((tmp_path / "coherent_gradients_runs").iterdir())) == n_files
    xr.testing.assert_equal(again.accuracy, res.accuracy)


def test_corrupt_labels_redraw():
    """The paper's randomization: chosen labels are redrawn uniformly, so about a tenth keep their class."""
    y = np.arange(1000) % 10
    out, corrupt = data.corrupt_labels(y, 0.5, 10, seed=0, redraw=True)
    assert np.array_equal(corrupt, out != y) and 0.4 < corrupt.mean() < 0.5
    assert not data.corrupt_labels(y, 0.0, 10, seed=0, redraw=True)[1].any()
    assert 0.85 < data.corrupt_labels(y, 1.0, 10, seed=0, redraw=True)[1].mean() < 0.95
