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
from toymodels.stats import bootstrap_critical_batch, crossing_step, fit_critical_batch


@pytest.fixture(scope="module")
def tiny():
    d = data.digits(seed=0)
    keep = d.y_train < 3
    return data.Dataset(d.x_train[keep][:150], d.y_train[keep][:150], d.x_test[:50], d.y_test[:50], 10, "digits3")


def _trajectory(d, batch_size, lr, momentum, seed, n_steps):
    """The protocol written out: SGD with momentum on seeded batches, the training loss on the whole
    training set recorded after every step 0..n_steps (run_one looks only every eval_every steps;
    evaluating consumes no random numbers, so the trajectory is the same)."""
    model = Factory("mlp", 64, 10, (8,))(seed)
    v = [torch.zeros_like(p) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_steps + 1):
        with torch.no_grad():
            out.append(F.cross_entropy(model(d.x_train), d.y_train).item())
        idx = torch.randint(0, d.x_train.shape[0], (batch_size,), generator=gen)
        model.zero_grad()
        F.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
        with torch.no_grad():
            for p, buf in zip(model.parameters(), v):
                buf.mul_(momentum).add_(p.grad)  # torch's heavy ball: v = mu v + g, p -= lr v
                p.sub_(lr * buf)
    return np.array(out)


def test_protocol_equals_a_hand_computed_run(tiny):
    """run_one (evaluating every 5 steps) against the trajectory trained by hand: the first multiple
    of 5 at or below the target, k1, and the crossing interpolated in log loss from k0 = k1 - 5,
    written out.  The hand-written update rounds differently from torch.optim.SGD (p - (lr v) vs
    p + (-lr) v, about 1 float32 ulp per step), so the losses agree to a relative eps ~ 1e-5 (float32
    eps 1.2e-7, x 100 for the accumulation over these few dozen steps), which moves the crossing by
    at most 5 x 2 eps / log(m0 / m1); the losses at k1 and k0 are asserted further than eps from the
    target, so the bracket is the same."""
    target, every, eps = 0.5, 5, 1e-5
    for bs, lr, mom in [(4, 0.2, 0.0), (16, 0.1, 0.9)]:
        got = steps.run_one(Factory("mlp", 64, 10, (8,)), tiny, batch_size=bs, lr=lr, momentum=mom, seed=3,
                            target=target, metric="train_loss", max_steps=300, eval_every=every)
        assert math.isfinite(got)
        m = _trajectory(tiny, bs, lr, mom, 3, every * math.ceil(got / every))
        j = int(np.flatnonzero(m[::every] <= target)[0])
        assert j >= 1
        k1, m1, m0 = every * j, m[every * j], m[every * (j - 1)]
        assert m1 < target * (1 - 10 * eps) and m0 > target * (1 + 10 * eps)
        want = (k1 - every) + every * (math.log(m0) - math.log(target)) / (math.log(m0) - math.log(m1))
        assert k1 - every < got <= k1
        assert got == pytest.approx(want, abs=every * 2 * eps / math.log(m0 / m1))
        assert got != k1  # interpolated, not the evaluated step


def test_run_one_returns_crossing_step_of_what_it_evaluated(tiny, monkeypatch):
    """The crossing is crossing_step of the (step, metric) pairs run_one evaluated, and the run stops
    at the first evaluation at or below the target."""
    seen = []
    original = steps._metric

    def recording(model, d, metric):
        seen.append(original(model, d, metric))
        return seen[-1]

    monkeypatch.setattr(steps, "_metric", recording)
    got = steps.run_one(Factory("mlp", 64, 10, (8,)), tiny, batch_size=8, lr=0.02, momentum=0.5, seed=1,
                        target=0.3, metric="train_loss", max_steps=300, eval_every=7)
    assert len(seen) >= 3 and seen[-1] <= 0.3 and all(v > 0.3 for v in seen[:-1])
    assert got == crossing_step(7 * np.arange(len(seen)), seen, 0.3)
    assert 7 * (len(seen) - 2) < got <= 7 * (len(seen) - 1)


def test_run_one_by_hand_with_a_scripted_metric(tiny, monkeypatch):
    """A metric scripted per evaluation: 1.0, 0.5, 0.1 at steps 0, 10, 20 crosses 0.2 at
    10 + 10 log(0.5 / 0.2) / log(0.5 / 0.1) and is not evaluated again; NaN before the crossing is
    a divergence (inf); never reaching the target is inf; starting at the target is 0."""
    def scripted(values):
        it = iter(values)
        calls = []

        def metric(model, d, name):
            calls.append(1)
            return next(it)

        return metric, calls

    kw = dict(batch_size=2, lr=0.1, momentum=0.0, seed=0, target=0.2, metric="train_loss", eval_every=10)
    fn = Factory("mlp", 64, 10, (8,))
    metric, calls = scripted([1.0, 0.5, 0.1, 0.05, 0.01])
    monkeypatch.setattr(steps, "_metric", metric)
    assert steps.run_one(fn, tiny, max_steps=100, **kw) == pytest.approx(
        10 + 10 * math.log(2.5) / math.log(5.0), rel=1e-14)
    assert len(calls) == 3
    monkeypatch.setattr(steps, "_metric", scripted([1.0, math.nan, 0.1])[0])
    assert steps.run_one(fn, tiny, max_steps=100, **kw) == math.inf
    monkeypatch.setattr(steps, "_metric", scripted([1.0, 0.9, 0.8])[0])
    assert steps.run_one(fn, tiny, max_steps=20, **kw) == math.inf
    monkeypatch.setattr(steps, "_metric", scripted([0.2])[0])
    assert steps.run_one(fn, tiny, max_steps=20, **kw) == 0.0


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
    np.testing.assert_array_equal(ds.lr_eff_opt.values, [0.2, 0.1])  # lr / (1 - momentum), momentum 0
    np.testing.assert_array_equal(ds.steps_per_seed.values, [[11.0, 11.0, math.inf], [8.0, 9.0, 7.0]])
    fit = fit_critical_batch([1.0, 2.0], [11.0, 8.0])
    assert float(ds.b_crit) == fit["critical_batch_size"] == ds.attrs["critical_batch_size"]
    assert float(ds.s_min) == fit["steps_min"] == ds.attrs["steps_min"]
    # a resample that draws seed 2 twice or more has an infinite median at (B = 1, lr = 0.2), but lr = 0.1
    # is then re-chosen (its runs are all finite): no resample fails
    assert ds.attrs["n_boot_failed"] == 0 and ds.attrs["ci_note"] == ""
    # those resamples (probability 7/27 > 2.5%) have S = 30 at B = 1 and 7 at B = 2 (seed 2's), falling
    # faster than 1/B: B_crit = inf, S_min = 0 there, so the 95% interval reaches them
    assert float(ds.b_crit_hi) == math.inf and float(ds.s_min_lo) == 0.0
    assert 0 < float(ds.b_crit_lo) <= float(ds.b_crit) and float(ds.s_min) <= float(ds.s_min_hi) < math.inf


def test_one_seed_and_no_fit():
    """One seed: the point estimates and NaN bounds, said in ``ci_note``; fewer than 2 batch sizes with
    a finite tuned median: all six NaN.  Both pass the schema (NaN is allowed in these variables)."""
    res = {(1, 0.1, 0.0, 0): 30.0, (2, 0.1, 0.0, 0): 20.0, (4, 0.1, 0.0, 0): math.inf}
    ds = steps._assemble(res, [1, 2, 4], [0.1], [0.0], [0], 0.5, "train_loss", 100, 1)
    validate(ds)
    fit = fit_critical_batch([1.0, 2.0], [30.0, 20.0])
    assert float(ds.b_crit) == fit["critical_batch_size"] and float(ds.s_min) == fit["steps_min"]
    assert np.isnan([ds.b_crit_lo, ds.b_crit_hi, ds.s_min_lo, ds.s_min_hi]).all()
    assert ds.attrs["ci_note"] == "one seed: no interval"
    np.testing.assert_array_equal(ds.steps_per_seed.values, [[30.0], [20.0], [math.inf]])
    res[(2, 0.1, 0.0, 0)] = math.inf
    ds = steps._assemble(res, [1, 2, 4], [0.1], [0.0], [0], 0.5, "train_loss", 100, 1)
    validate(ds)
    assert np.isnan([ds[k] for k in ("b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi")]).all()
    assert ds.attrs["ci_note"].startswith("no fit of S(B): need at least 2 batch sizes")
    assert "critical_batch_size" not in ds.attrs


def _count_runs(monkeypatch) -> dict:
    """Count the training runs measure_steps starts (``calls["n"]``: its tasks call ``steps._run``,
    the body of ``run_one``)."""
    calls = {"n": 0}
    original = steps._run

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(steps, "_run", counting)
    return calls


def test_measure_steps_with_an_interval_end_to_end(tiny, tmp_path, monkeypatch):
    """3 seeds on a tiny MLP: the new variables, the schema, steps_per_seed at the tuned setting, the
    interval equal to bootstrap_critical_batch of the runs, and resume: a run file of the former
    crossing rule (no ``crossing`` attribute, an integer crossing) is recomputed with a warning."""
    fn = Factory("mlp", 64, 10, (8,))
    kw = dict(batch_sizes=[2, 8, 32], lrs=[0.1, 0.3], seeds=[0, 1, 2], target=0.3, max_steps=200, eval_every=10,
              progress=False, ci=0.9, n_boot=300)
    ds = steps.measure_steps(fn, tiny, path=str(tmp_path), **kw)
    validate(ds)
    for name in ("b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi"):
        assert ds[name].dims == () and np.isfinite(ds[name].values), name
    assert ds.steps_per_seed.dims == ("batch_size", "seed")
    assert ds.attrs["ci_level"] == 0.9 and ds.attrs["n_boot"] == 300 and ds.attrs["crossing"] == "log-interpolated"
    s = ds.steps_to_target.values
    fin = s[np.isfinite(s)]
    assert np.any(fin % 10 != 0)  # interpolated crossings, not multiples of eval_every
    for b in ds.batch_size.values:
        at = ds.sel(batch_size=b)
        want = ds.steps_to_target.sel(batch_size=b, lr=float(at.lr_opt), momentum=float(at.momentum_opt))
        np.testing.assert_array_equal(at.steps_per_seed.values, want.values)
        assert float(at.steps_best) == np.median(want.values)
        assert float(at.lr_eff_opt) == float(at.lr_opt) / (1.0 - float(at.momentum_opt))
    boot = bootstrap_critical_batch(ds.batch_size.values, s.reshape(3, 2, 3), level=0.9, n_boot=300, seed=0)
    for name in ("b_crit", "b_crit_lo", "b_crit_hi", "s_min", "s_min_lo", "s_min_hi"):
        assert float(ds[name]) == boot[name], name
    assert float(ds.b_crit) == ds.attrs["critical_batch_size"] and float(ds.s_min) == ds.attrs["steps_min"]
    assert ds.b_crit_lo <= ds.b_crit_hi and ds.s_min_lo <= ds.s_min_hi
    # the same summary from the runs alone (grids measured in parts)
    parts = xr.concat([ds.steps_to_target.isel(batch_size=[0]), ds.steps_to_target.isel(batch_size=[1, 2])],
                      dim="batch_size")
    xr.testing.assert_identical(steps.summarize(parts, target=0.3, max_steps=200, eval_every=10, ci=0.9, n_boot=300),
                                ds)
    # an old run file: its crossing rounded up to the evaluation, without the `crossing` attribute
    from toymodels import resume
    from toymodels.resume import ResumeWarning

    old = steps._task_file(str(tmp_path), 8, 0.3, 0.0, 1)
    saved = xr.load_dataset(old)
    saved["steps_to_target"] = 10.0 * np.ceil(saved.steps_to_target / 10.0)
    del saved.attrs["crossing"]
    resume.write(saved, old)
    calls = _count_runs(monkeypatch)
    with pytest.warns(ResumeWarning, match=r"bs8_lr0\.3_mom0_seed1\.nc: it was written for other settings \(it "
                                           r"has no `crossing` attribute\)"):
        again = steps.measure_steps(fn, tiny, path=str(tmp_path), **kw)
    assert calls["n"] == 1
    xr.testing.assert_identical(again, ds)


def test_resume_gives_the_same_dataset(tiny, tmp_path, monkeypatch):
    kw = dict(batch_sizes=[4, 16], lrs=[0.1, 0.3], momenta=[0.0], seeds=[0, 1], target=0.6, max_steps=200,
              eval_every=10, progress=False)
    fn = Factory("mlp", 64, 10, (8,))
    full = steps.measure_steps(fn, tiny, path=str(tmp_path / "a"), **kw)
    validate(full)
    files = sorted((tmp_path / "a").iterdir())
    for f in files[::2]:  # an "interrupted" sweep: half the runs are missing
        f.unlink()
    calls = _count_runs(monkeypatch)
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


@pytest.mark.slow  # 6 s to start a cluster; the default suite's dask test is test_sweep's; CI runs this one
def test_dask_gives_the_same_dataset(tiny):
    kw = dict(batch_sizes=[4, 16], lrs=[0.1, 0.3], momenta=[0.0], seeds=[0, 1], target=0.6, max_steps=200,
              eval_every=10, progress=False)
    fn = Factory("mlp", 64, 10, (8,))
    on_dask = steps.measure_steps(fn, tiny, executor="dask", n_workers=2, **kw)
    xr.testing.assert_identical(on_dask, steps.measure_steps(fn, tiny, **kw))


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
        Factory("nosuch")


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
