"""Batch-size rules of deepmodels.train.train (an int, a Schedule, the noise-scale warmup
NoiseScaleBatch), steps and examples to a training-loss target, and resuming such runs.

Everything on scikit-learn's digits with a 64-16-10 MLP and short runs (the file takes seconds)."""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import data, models
from deepmodels.train import NoiseScaleBatch, _Batches, train
from toymodels import Constant, Exponential, PiecewiseConstant, resume
from toymodels.resume import ResumeWarning
from toymodels.schema import validate
from toymodels.stats import crossing_step


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def _run(digits, seed=3, **kw):
    model = models.mlp(64, 10, (16,), seed=seed)
    args = dict(probe_size=32, progress=False)
    args.update(kw)
    ds = train(model, digits, **args)
    validate(ds)
    return ds, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _replay(ds, **kw):
    """The piecewise-constant schedule that holds the rows' ``batch_size_now`` (or ``lr_now``)
    from each probe step on."""
    steps = ds.step.values
    name = kw.get("name", "batch_size_now")
    vals = ds[name].values
    keep = [0] + [i for i in range(1, len(vals)) if vals[i] != vals[i - 1]]
    return PiecewiseConstant(tuple(int(steps[i]) for i in keep[1:]), tuple(float(vals[i]) for i in keep))


def _examples_at(ds, s):
    """Examples drawn up to the (fractional) step s, from the rows: the batch size of the last
    probe at or before floor(s) holds until the next probe."""
    f = math.floor(s)
    i = int(np.searchsorted(ds.step.values, f, side="right")) - 1
    b = float(ds.batch_size_now.values[i])
    return float(ds.examples.values[i]) + b * (f - int(ds.step.values[i])) + (s - f) * b


def test_int_and_constant_schedule_give_identical_runs(digits):
    kw = dict(lr=0.1, n_steps=30, probe_at=[0, 10, 30], target=1.0, eval_every=5)
    a, pa = _run(digits, batch_size=8, **kw)
    b, pb = _run(digits, batch_size=Constant(8), **kw)
    assert torch.equal(pa, pb)
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    for key in ("eval_steps", "eval_loss", "eval_examples"):
        np.testing.assert_array_equal(a.attrs[key], b.attrs[key])
    assert a.attrs["reason"] == b.attrs["reason"] and a.attrs["steps_to_target"] == math.inf
    assert a.attrs["batch_size"] == 8.0 and b.attrs["batch_size"] == repr(Constant(8))
    np.testing.assert_array_equal(a.batch_size_now.values, [8, 8, 8])
    np.testing.assert_array_equal(a.examples.values, [0, 80, 240])
    np.testing.assert_array_equal(a.attrs["eval_examples"], 8 * a.attrs["eval_steps"])
    # a varying schedule: its rounded values from each update on, and the examples add up
    c, _ = _run(digits, lr=0.1, batch_size=PiecewiseConstant((10, 20), (3.6, 16, 5)), n_steps=30,
                probe_at=[0, 10, 15, 20, 30])
    np.testing.assert_array_equal(c.batch_size_now.values, [4, 16, 16, 5, 5])
    np.testing.assert_array_equal(c.examples.values, [0, 40, 120, 200, 250])
    np.testing.assert_array_equal(_Batches(Exponential(4.0, gamma=0.1)).sizes(0, 3), [4, 1, 1])  # at least 1


@pytest.mark.parametrize("estimate", ["biased", "unbiased"])
def test_noise_scale_warmup_follows_the_probes(digits, estimate):
    rule = NoiseScaleBatch(2, 48, factor=0.25, estimate=estimate)
    ds, params = _run(digits, lr=0.1, batch_size=rule, n_steps=150, probe_at=list(range(0, 151, 10)), target=0.6,
                      eval_every=5)
    # the rule, recomputed from the returned noise scales
    name = "noise_scale_unbiased" if estimate == "unbiased" else "noise_scale"
    b, want = 2, []
    for ns in ds[name].sel(layer="total").values:
        if np.isfinite(ns) and ns >= 0:
            b = max(b, int(np.clip(np.rint(0.25 * ns), 2, 48)))
        want.append(b)
    np.testing.assert_array_equal(ds.batch_size_now.values, want)
    assert np.all(np.diff(ds.batch_size_now.values) >= 0) and len(set(want)) >= 2
    steps = ds.step.values
    np.testing.assert_array_equal(ds.examples.values, np.concatenate([[0], np.cumsum(np.diff(steps) * want[:-1])]))
    # the statistics refer to the batch size of the update from the probe on
    total = ds.sel(layer="total")
    np.testing.assert_allclose(total.grad_var.values, total.trace_cov.values / (ds.batch_size_now.values
                                                                                 * total.n_params.values), rtol=1e-12)
    # the target: the crossing of the recorded evaluations, and the examples up to it by hand
    s = ds.attrs["steps_to_target"]
    assert np.isfinite(s) and s == crossing_step(ds.attrs["eval_steps"], ds.attrs["eval_loss"], 0.6)
    assert ds.attrs["eval_loss"][-1] <= 0.6 < ds.attrs["eval_loss"][-2]  # stopped at the first evaluation below
    assert ds.attrs["examples_to_target"] == pytest.approx(_examples_at(ds, s), rel=1e-12)
    for k, ex in zip(ds.attrs["eval_steps"], ds.attrs["eval_examples"]):
        assert ex == _examples_at(ds, k)
    # replayed as a schedule of those batch sizes, the same run: the warmup used them
    again, p_again = _run(digits, lr=0.1, batch_size=_replay(ds), n_steps=int(ds.attrs["eval_steps"][-1]),
                          probe_at=list(steps))
    assert torch.equal(params, p_again)
    xr.testing.assert_identical(ds.drop_attrs(), again.drop_attrs())


def test_steps_and_examples_to_target_against_a_recording(digits, tmp_path):
    a, pa = _run(digits, lr=0.1, batch_size=8, n_steps=200, probe_at=[0], target=1.0, eval_every=5)
    rec, _ = _run(digits, lr=0.1, batch_size=8, n_steps=80, probe_at=list(range(0, 81, 5)), eval_every=20)
    assert "steps_to_target" not in rec.attrs  # evaluations without a target are only recorded
    np.testing.assert_array_equal(rec.attrs["eval_loss"], rec.loss.sel(step=[0, 20, 40, 60, 80]).values)
    s = a.attrs["steps_to_target"]
    assert s == crossing_step(rec.step.values, rec.loss.values, 1.0) and 0 < s < 80
    n = len(a.attrs["eval_loss"])
    np.testing.assert_array_equal(a.attrs["eval_loss"], rec.loss.values[:n])  # the same evaluations
    assert a.attrs["examples_to_target"] == pytest.approx(8 * s, rel=1e-14)
    stop = int(a.attrs["eval_steps"][-1])
    assert stop == 5 * math.ceil(s / 5)  # training stopped at the first evaluation at or below the target
    _, p_stop = _run(digits, lr=0.1, batch_size=8, n_steps=stop, probe_at=[0])
    assert torch.equal(pa, p_stop)
    # not reached in n_steps, and diverged: inf with a reason
    short, _ = _run(digits, lr=0.1, batch_size=8, n_steps=12, probe_at=[0], target=1.0)
    assert short.attrs["steps_to_target"] == short.attrs["examples_to_target"] == math.inf
    assert "did not reach the target 1 by step 12 of n_steps = 12" in short.attrs["reason"]
    np.testing.assert_array_equal(short.attrs["eval_steps"], [0, 10, 12])
    # continued to n_steps = 30 from its checkpoint, the evaluation at the former end is not kept
    _run(digits, lr=0.1, batch_size=8, n_steps=12, probe_at=[0], target=0.1, path=tmp_path / "r.nc")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        longer, p_longer = _run(digits, lr=0.1, batch_size=8, n_steps=30, probe_at=[0], target=0.1,
                                path=tmp_path / "r.nc")
    straight, p_straight = _run(digits, lr=0.1, batch_size=8, n_steps=30, probe_at=[0], target=0.1)
    assert torch.equal(p_longer, p_straight)
    xr.testing.assert_identical(longer, straight)
    np.testing.assert_array_equal(longer.attrs["eval_steps"], [0, 10, 20, 30])
    div, _ = _run(digits, lr=1e6, batch_size=8, n_steps=20, probe_at=[0], target=1.0)
    assert div.attrs["steps_to_target"] == math.inf and div.attrs["reason"].startswith("the run diverged")


def test_lr_follows_the_batch_size(digits):
    table = {2: 0.05, 24: 0.3}
    rule = NoiseScaleBatch(2, 48, estimate="biased", lr=table)
    ds, params = _run(digits, batch_size=rule, n_steps=60, probe_at=list(range(0, 61, 10)))
    bs = ds.batch_size_now.values
    assert len(set(bs)) >= 2 and bs.min() < 24 < bs.max()
    want = np.where(bs >= 24, 0.3, 0.05 * (bs / 2) ** (math.log(6) / math.log(12)))  # log-log line, then constant
    np.testing.assert_allclose(ds.lr_now.values, want, rtol=1e-12)
    assert ds.attrs["lr"] == 0.05  # of update 0, at b_min
    # replayed with schedules of those batch sizes and learning rates: the same run
    again, p_again = _run(digits, lr=_replay(ds, name="lr_now"), batch_size=_replay(ds), n_steps=60,
                          probe_at=list(ds.step.values))
    assert torch.equal(params, p_again)
    # a callable
    fn = lambda b: 0.02 * math.sqrt(b)  # noqa: E731
    ds2, _ = _run(digits, batch_size=NoiseScaleBatch(2, 48, lr=fn), n_steps=10, probe_at=[0, 10])
    np.testing.assert_allclose(ds2.lr_now.values, 0.02 * np.sqrt(ds2.batch_size_now.values), rtol=1e-15)
    with pytest.raises(ValueError, match="`lr` must be left out when `batch_size` sets the learning rate"):
        _run(digits, lr=0.1, batch_size=NoiseScaleBatch(2, 48, lr=fn), n_steps=2)
    with pytest.raises(ValueError, match="`lr` must be a float"):
        _run(digits, batch_size=NoiseScaleBatch(2, 48), n_steps=2)
    with pytest.raises(ValueError, match=r"`lr` of NoiseScaleBatch\(.*\) must return a float in \(0, inf\); lr\(2\)"):
        _run(digits, batch_size=NoiseScaleBatch(2, 48, lr=lambda b: -1.0), n_steps=2)


class _Stop(Exception):
    pass


def test_an_interrupted_warmup_resumes_to_the_same_run(digits, tmp_path):
    calls = {"n": 0}

    def flaky(out, target):  # training batches have 2..24 examples; probes 32, evaluations all, train's check 1
        if 2 <= out.shape[0] <= 24 and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 33:
                raise _Stop
        return F.cross_entropy(out, target)

    rule = NoiseScaleBatch(2, 24, factor=0.25, estimate="biased", lr={2: 0.05, 24: 0.3})
    kw = dict(batch_size=rule, n_steps=200, probe_at=list(range(0, 201, 20)), target=0.7, eval_every=5,
              loss_fn=flaky)
    path = tmp_path / "run.nc"
    with pytest.raises(_Stop):
        _run(digits, path=path, **kw)
    assert calls["n"] == 33  # interrupted in update 32, after the evaluation of step 30; checkpoint at 20
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        resumed, p_resumed = _run(digits, path=path, **kw)
    n_resumed = calls["n"] - 33
    straight, p_straight = _run(digits, **kw)
    assert n_resumed == int(straight.attrs["eval_steps"][-1]) - 20  # resumed at the probe of step 20
    assert torch.equal(p_resumed, p_straight)
    xr.testing.assert_identical(resumed, straight)  # rows and attrs: evaluations, steps and examples to target
    assert np.isfinite(straight.attrs["steps_to_target"]) and straight.attrs["steps_to_target"] > 40
    assert np.any(np.diff(straight.batch_size_now.values)[1:] > 0)  # the warmup went on after the resume
    # the finished run is returned at once; another rule or target trains afresh
    before = calls["n"]
    again, _ = _run(digits, path=path, **kw)
    assert calls["n"] == before
    xr.testing.assert_identical(again, straight)
    xr.testing.assert_identical(resume.read(path), straight)  # the results file: the same run
    for change in (dict(batch_size=dataclasses.replace(rule, factor=0.5)), dict(target=0.8)):
        with pytest.warns(ResumeWarning, match=r"run\.nc\.pt: it was written for other settings"):
            other, _ = _run(digits, path=path, **dict(kw, **change))
        assert other.attrs["batch_size"] == repr(change.get("batch_size", rule))


def test_bad_rules_are_refused(digits):
    with pytest.raises(ValueError, match=r"`b_max` must be >= `b_min` = 8; got 4\."):
        NoiseScaleBatch(8, 4)
    for factor in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="`factor` must be a float in"):
            NoiseScaleBatch(2, 8, factor=factor)
    with pytest.raises(ValueError, match="`estimate` must be one of 'unbiased', 'biased'; got 'median'"):
        NoiseScaleBatch(2, 8, estimate="median")
    with pytest.raises(ValueError, match="`b_min` must be"):
        NoiseScaleBatch(0, 8)
    with pytest.raises(ValueError, match=r"`lr` must be a callable lr\(batch_size\) -> float or a dict"):
        NoiseScaleBatch(2, 8, lr={0: 0.1})
    with pytest.raises(TypeError, match="`factor` must be"):
        NoiseScaleBatch(2, 8, factor="1")
    with pytest.raises(TypeError):
        NoiseScaleBatch(2, 8, 1.0)  # factor is keyword-only
    rule = NoiseScaleBatch(2, 48, lr={32: 0.4, 2: 0.05})
    assert repr(rule) == "NoiseScaleBatch(b_min=2, b_max=48, factor=1.0, estimate='unbiased', lr={2: 0.05, 32: 0.4})"
    assert list(rule.lr) == [2, 32] and hash(rule) == hash(NoiseScaleBatch(2, 48, lr={2: 0.05, 32: 0.4}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rule.b_min = 4
    assert rule._next(8, math.nan) == 8 and rule._next(8, -3.0) == 8 and rule._next(8, math.inf) == 8
    assert rule._next(8, 4.0) == 8 and rule._next(8, 20.5) == 20 and rule._next(8, 1e300) == 48
    with pytest.raises(ValueError, match="`batch_size` must be a schedule of batch sizes at most 2147483647"):
        _run(digits, lr=0.1, batch_size=Constant(1e10), n_steps=2)
    with pytest.raises(TypeError, match="`batch_size` must be an integer in"):
        _run(digits, lr=0.1, batch_size="8", n_steps=2)
    with pytest.raises(ValueError, match="`target` must be a float in"):
        _run(digits, lr=0.1, batch_size=8, n_steps=2, target=-1.0)
    with pytest.raises(ValueError, match="`eval_every` must be an integer in"):
        _run(digits, lr=0.1, batch_size=8, n_steps=2, eval_every=0)
