"""Measured steps to target: the protocol by hand, best over the grid, resume, dask == serial,
and the critical-batch-size fit."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import data, steps
from deepmodels.models import Factory
from toymodels.schema import validate
from toymodels.stats import fit_critical_batch


@pytest.fixture(scope="module")
def tiny():
    d = data.digits(seed=0)
    keep = d.y_train < 3
    return data.Dataset(d.x_train[keep][:150], d.y_train[keep][:150], d.x_test[:50], d.y_test[:50], 10, "digits3")


def _by_hand(d, batch_size, lr, momentum, seed, target, max_steps, eval_every):
    """The protocol written out: SGD with momentum, seeded batches, evaluation every eval_every steps."""
    model = Factory("mlp", 64, 10, (8,))(seed)
    v = [torch.zeros_like(p) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    for k in range(max_steps + 1):
        if k % eval_every == 0:
            with torch.no_grad():
                if F.cross_entropy(model(d.x_train), d.y_train).item() <= target:
                    return float(k)
        if k == max_steps:
            return math.inf
        idx = torch.randint(0, d.x_train.shape[0], (batch_size,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        with torch.no_grad():
            for p, buf in zip(model.parameters(), v):
                buf.mul_(momentum).add_(p.grad)  # torch's heavy ball: v = mu v + g, p -= lr v
                p.sub_(lr * buf)


def test_protocol_equals_a_hand_computed_run(tiny):
    for bs, lr, mom in [(4, 0.2, 0.0), (16, 0.1, 0.9)]:
        got = steps.run_one(Factory("mlp", 64, 10, (8,)), tiny, batch_size=bs, lr=lr, momentum=mom, seed=3,
                            target=0.5, metric="train_loss", max_steps=300, eval_every=5)
        assert got == _by_hand(tiny, bs, lr, mom, 3, 0.5, 300, 5)
        assert math.isfinite(got) and got % 5 == 0


def test_best_over_the_grid_by_hand():
    res = {}
    vals = {(1, 0.1): [10, 12, 30], (1, 0.2): [11, 11, math.inf], (2, 0.1): [8, 9, 7], (2, 0.2): [math.inf] * 3}
    for (b, lr), s in vals.items():
        for seed, v in enumerate(s):
            res[(b, lr, 0.0, seed)] = float(v)
    ds = steps._assemble(res, [1, 2], [0.1, 0.2], [0.0], [0, 1, 2], 0.5, "train_loss", 100, 1)
    validate(ds)
    np.testing.assert_array_equal(ds.steps_best.values, [11.0, 8.0])  # medians 12 vs 11; 8 vs inf
    np.testing.assert_array_equal(ds.lr_opt.values, [0.2, 0.1])


def test_resume_and_dask_give_the_same_dataset(tiny, tmp_path, monkeypatch):
    kw = dict(batch_sizes=[4, 16], lrs=[0.1, 0.3], momenta=[0.0], seeds=[0, 1], target=0.6, max_steps=200,
              eval_every=10, progress=False)
    fn = Factory("mlp", 64, 10, (8,))
    full = steps.measure_steps(fn, tiny, path=str(tmp_path / "a"), **kw)
    validate(full)
    files = sorted((tmp_path / "a").iterdir())
    for f in files[::2]:  # an "interrupted" sweep: half the runs are missing
        f.unlink()
    calls = {"n": 0}
    original = steps.run_one

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(steps, "run_one", counting)
    resumed = steps.measure_steps(fn, tiny, path=str(tmp_path / "a"), **kw)
    assert calls["n"] == len(files[::2])
    xr.testing.assert_identical(resumed, full)
    # saved runs of another sweep (another target) are not reused: everything reruns
    calls["n"] = 0
    from toymodels.resume import ResumeWarning

    with pytest.warns(ResumeWarning, match=r"bs\d+_lr[^ ]*\.nc: it was written for other settings \(`target`"):
        other = steps.measure_steps(fn, tiny, path=str(tmp_path / "a"), **dict(kw, target=0.9))
    assert calls["n"] == len(files)
    fresh = steps.measure_steps(fn, tiny, **dict(kw, target=0.9))
    xr.testing.assert_identical(other.steps_to_target, fresh.steps_to_target)
    monkeypatch.setattr(steps, "run_one", original)
    on_dask = steps.measure_steps(fn, tiny, executor="dask", n_workers=2, **kw)
    xr.testing.assert_identical(on_dask, full)


def test_fit_critical_batch():
    b = 2.0 ** np.arange(0, 12)
    s = 50.0 * (1 + 64.0 / b)
    fit = fit_critical_batch(b, s)
    assert fit["steps_min"] == pytest.approx(50.0) and fit["critical_batch_size"] == pytest.approx(64.0)
    assert fit["rms_relative_error"] < 1e-12
    noisy = s * np.exp(0.05 * np.random.default_rng(0).standard_normal(b.size))
    assert fit_critical_batch(b, noisy)["critical_batch_size"] == pytest.approx(64.0, rel=0.3)
    with pytest.raises(ValueError, match="at least 2 batch sizes"):
        fit_critical_batch([1.0, 2.0], [10.0, math.inf])
    with pytest.raises(ValueError, match="same length"):
        fit_critical_batch([1.0, 2.0], [10.0])


def test_bad_input(tiny):
    fn = Factory("mlp", 64, 10, (8,))
    with pytest.raises(ValueError, match="`metric` must be one of"):
        steps.measure_steps(fn, tiny, batch_sizes=[4], lrs=[0.1], target=0.5, metric="accuracy", progress=False)
    with pytest.raises(ValueError, match="`lrs` must be a float in \\(0, inf\\)"):
        steps.measure_steps(fn, tiny, batch_sizes=[4], lrs=[-0.1], target=0.5, progress=False)
    with pytest.raises(ValueError, match="`name` must be one of"):
        Factory("transformer")


# --- the interpolated crossing (toymodels.stats.crossing_step) ------------------------------------
def test_crossing_step_by_hand():
    import math as _m

    from toymodels.stats import crossing_step

    # between (10, 0.5) and (20, 0.1) in log metric: 10 + 10 * log(0.5 / 0.2) / log(0.5 / 0.1)
    assert crossing_step([0, 10, 20], [1.0, 0.5, 0.1], 0.2) == pytest.approx(10 + 10 * _m.log(2.5) / _m.log(5.0), rel=1e-14)
    assert crossing_step([0, 10, 20], [1.0, 0.5, 0.1], 0.5) == 10.0  # a sample exactly at the target
    assert crossing_step([0, 10], [0.1, 0.05], 0.2) == 0.0  # starts below
    assert crossing_step([0, 10], [1.0, 0.0], 0.5) == 5.0  # m1 = 0: linear in the metric
    assert crossing_step([0, 10], [1.0, 0.9], 0.5) == math.inf  # never reached
    assert crossing_step([0, 10, 20], [1.0, math.nan, 0.1], 0.2) == math.inf  # diverged before
    assert crossing_step([0, 10, 20], [1.0, math.inf, 0.1], 0.2) == math.inf
    with pytest.raises(ValueError, match="`steps` must be strictly increasing"):
        crossing_step([0, 10, 10], [1.0, 0.5, 0.1], 0.2)
