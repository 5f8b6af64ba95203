"""`target_rel`: a training-loss target given as a fraction of the initial loss, beside the absolute
`target`, in train, measure_steps / run_one / summarize, reference_run / predict and predict_steps.

The relative target of a run is r x its own evaluation at step 0 (the evaluation the target is
checked on), so `target_rel=r` gives exactly the crossing of `target = r x L_0`."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import bridge, data, models, predict, steps
from deepmodels.train import train
from toymodels.resume import ResumeWarning
from toymodels.schema import validate


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


def _train(digits, **kw):
    model = models.mlp(64, 10, (16,), seed=3)
    args = dict(lr=0.1, batch_size=8, n_steps=200, probe_at=[0, 50], probe_size=32, eval_every=5, progress=False)
    args.update(kw)
    ds = train(model, digits, **args)
    return ds, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_train_relative_target_equals_the_absolute_one(digits):
    rel, p_rel = _train(digits, target_rel=0.5)
    validate(rel)
    l0 = rel.attrs["eval_loss"][0]  # the run's own initial evaluation
    assert rel.attrs["target_rel"] == 0.5 and rel.attrs["target"] == 0.5 * l0
    with torch.no_grad():  # the initial training loss of the model, computed here independently
        want = float(F.cross_entropy(models.mlp(64, 10, (16,), seed=3)(digits.x_train), digits.y_train))
    assert l0 == pytest.approx(want, rel=1e-6)
    absolute, p_abs = _train(digits, target=0.5 * l0)
    assert 0 < rel.attrs["steps_to_target"] < 200
    assert rel.attrs["steps_to_target"] == absolute.attrs["steps_to_target"]  # exactly
    assert rel.attrs["examples_to_target"] == absolute.attrs["examples_to_target"]
    np.testing.assert_array_equal(rel.attrs["eval_loss"], absolute.attrs["eval_loss"])
    assert torch.equal(p_rel, p_abs)
    assert "target_rel" not in absolute.attrs


def test_train_relative_target_resumes_and_is_other_settings_than_an_absolute_one(digits, tmp_path):
    path = tmp_path / "run.nc"
    _train(digits, target=1.0, path=path)
    with pytest.warns(ResumeWarning, match=r"run\.nc\.pt: it was written for other settings \(`target` is '1\.0' "
                                           r"there and '1\.18\d*' here\)"):
        first, _ = _train(digits, target_rel=0.5, path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        again, _ = _train(digits, target_rel=0.5, path=path)
    xr.testing.assert_identical(again, first)
    with pytest.warns(ResumeWarning, match=r"run\.nc\.pt: it was written for other settings \(`target` is '1\.18"):
        _train(digits, target_rel=0.25, path=path)
    # an absolute target whose value is not that run's: other settings too (an old checkpoint of an absolute
    # target that equals r x L_0 is the same run, and resumes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        same, _ = _train(digits, target=0.25 * first.attrs["eval_loss"][0], path=path)
    assert same.attrs["steps_to_target"] == _train(digits, target_rel=0.25)[0].attrs["steps_to_target"]


def test_at_most_one_target(digits):
    both = re.escape("at most one of `target` (an absolute training loss) and `target_rel` (a fraction in (0, 1) of "
                     "the initial training loss) must be given; got both (target=1.0, target_rel=0.5).")
    with pytest.raises(ValueError, match=both):
        _train(digits, target=1.0, target_rel=0.5)
    with pytest.raises(ValueError, match=r"`target_rel` must be a float in \(0, 1\); got 1\."):
        _train(digits, target_rel=1.0)


@pytest.mark.slow  # 6-14 s (a grid of runs); train and predict take target_rel in the default suite; CI runs it
def test_measure_steps_relative_target_is_each_runs_own(digits, tmp_path):
    fn = models.Factory("mlp", 64, 10, (16,))
    kw = dict(batch_sizes=[4, 16], lrs=[0.1, 0.3], momenta=[0.0, 0.5], seeds=[0, 1], max_steps=300, eval_every=10,
              progress=False, n_boot=20)
    rel = steps.measure_steps(fn, digits, target_rel=0.5, path=str(tmp_path / "runs"), **kw)
    validate(rel)
    assert rel.attrs["target_rel"] == 0.5 and "target" not in rel.attrs
    assert rel.attrs["target_of"] == "each run's own initial train_loss (its evaluation at step 0)"
    assert np.isfinite(rel.steps_to_target.values).sum() >= 12  # (B = 4 at lr 0.3, momentum 0.5 diverges: inf)
    assert np.isfinite(rel.target_value.values).all()
    # each run's absolute target is 0.5 x its own initial loss: the same for the runs of one seed, and
    # different between seeds (their initialisations differ)
    for seed in (0, 1):
        l0 = steps._metric(fn(seed), digits, "train_loss")
        np.testing.assert_array_equal(rel.target_value.sel(seed=seed).values, 0.5 * l0)
    assert rel.target_value.sel(seed=0).values.flat[0] != rel.target_value.sel(seed=1).values.flat[0]
    # the steps equal those of the absolute target computed from the run's own initial loss, exactly
    for b in (4, 16):
        for lr in (0.1, 0.3):
            for m in (0.0, 0.5):
                for seed in (0, 1):
                    at = dict(batch_size=b, lr=lr, momentum=m, seed=seed)
                    one = steps.run_one(fn, digits, batch_size=b, lr=lr, momentum=m, seed=seed,
                                        target=float(rel.target_value.sel(**at)), metric="train_loss", max_steps=300,
                                        eval_every=10)
                    assert float(rel.steps_to_target.sel(**at)) == one
                    assert steps.run_one(fn, digits, batch_size=b, lr=lr, momentum=m, seed=seed, target_rel=0.5,
                                         metric="train_loss", max_steps=300, eval_every=10) == one
    # the effective learning rate of the tuned setting
    np.testing.assert_array_equal(rel.lr_eff_opt.values, rel.lr_opt.values / (1.0 - rel.momentum_opt.values))
    # resumed from the run files: the same result, the absolute targets too
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResumeWarning)
        again = steps.measure_steps(fn, digits, target_rel=0.5, path=str(tmp_path / "runs"), **kw)
    xr.testing.assert_identical(again, rel)
    # runs of an absolute target are other settings for a relative one, and the other way round
    with pytest.warns(ResumeWarning, match=r"it was written for other settings \(`target` is"):
        steps.measure_steps(fn, digits, target=1.0, path=str(tmp_path / "runs"), **dict(kw, batch_sizes=[4]))
    steps.measure_steps(fn, digits, target=1.0, path=str(tmp_path / "abs2"),
                        **dict(kw, batch_sizes=[4], lrs=[0.1], momenta=[0.0], seeds=[0]))
    with pytest.warns(ResumeWarning, match=r"it was written for other settings \(it has no `target_rel` attribute\)"):
        steps.measure_steps(fn, digits, target_rel=0.5, path=str(tmp_path / "abs2"),
                            **dict(kw, batch_sizes=[4], lrs=[0.1], momenta=[0.0], seeds=[0]))
    # summarize records the relative target (the runs' absolute ones are not in `runs`)
    summ = steps.summarize(rel.steps_to_target, target_rel=0.5, max_steps=300, eval_every=10, n_boot=20)
    assert summ.attrs["target_rel"] == 0.5 and "target_value" not in summ
    xr.testing.assert_identical(summ.steps_best, rel.steps_best)


def test_exactly_one_target_for_measured_steps(digits):
    fn = models.Factory("mlp", 64, 10, (16,))
    neither = re.escape("exactly one of `target` (an absolute training loss) and `target_rel` (a fraction in (0, 1) of "
                        "the initial training loss) must be given; got neither.")
    with pytest.raises(ValueError, match=neither):
        steps.measure_steps(fn, digits, batch_sizes=[4], lrs=[0.1], progress=False)
    with pytest.raises(ValueError, match=r"got both \(target=1\.0, target_rel=0\.5\)\."):
        steps.measure_steps(fn, digits, batch_sizes=[4], lrs=[0.1], target=1.0, target_rel=0.5, progress=False)
    with pytest.raises(ValueError, match=r"`target` \(an absolute validation error\) .* got neither\."):
        steps.run_one(fn, digits, batch_size=4, lr=0.1, momentum=0.0, seed=0, metric="val_error", max_steps=2,
                      eval_every=1)
    with pytest.raises(ValueError, match=neither):
        steps.summarize(xr.DataArray(np.ones((1, 1, 1, 1)), dims=("batch_size", "lr", "momentum", "seed")),
                        max_steps=10, eval_every=1)
    with pytest.raises(ValueError, match=neither):
        predict.reference_run(models.mlp(64, 10, (16,)), digits, lr=0.1, batch_size=4, n_steps=10, progress=False)


def test_reference_run_and_predict_take_a_relative_target(digits):
    d = data.digits(seed=0)
    kw = dict(lr=0.2, batch_size=4, n_steps=400, n_probes=8, probe_size=32, progress=False)
    ref, snaps = predict.reference_run(models.mlp(64, 10, (16,), seed=0), d, target_rel=0.5, **kw)
    l0 = float(ref.loss.values[0])  # the probe's loss at step 0 is the run's initial evaluation
    assert l0 == ref.attrs["eval_loss"][0] and ref.attrs["target"] == 0.5 * l0 and ref.attrs["target_rel"] == 0.5
    absolute, _ = predict.reference_run(models.mlp(64, 10, (16,), seed=0), d, target=0.5 * l0, **kw)
    assert math.isfinite(ref.attrs["steps_to_target"])
    assert ref.attrs["steps_to_target"] == absolute.attrs["steps_to_target"]
    pk = dict(batch_sizes=[4, 16], n_segments=1, k=2, dim=10, fit_size=32)
    by_rel = predict.predict(ref, snaps, models.mlp(64, 10, (16,)), F.cross_entropy, d, target_rel=0.5, **pk)
    by_abs = predict.predict(ref, snaps, models.mlp(64, 10, (16,)), F.cross_entropy, d, target=ref.attrs["target"], **pk)
    xr.testing.assert_identical(by_rel, by_abs)
    with pytest.raises(ValueError, match=r"exactly one of `target` .* got both"):
        predict.predict(ref, snaps, models.mlp(64, 10, (16,)), F.cross_entropy, d, target=1.0, target_rel=0.5, **pk)


def test_predict_steps_takes_a_fraction_of_the_nqm_initial_loss(digits):
    model = models.mlp(64, 10, (4,), seed=0)
    fit = bridge.fit_nqm(model, F.cross_entropy, digits.x_train[:64], digits.y_train[:64], k=2, dim=10)
    rel = bridge.predict_steps(fit, [1, 4], target_rel=0.3)
    absolute = bridge.predict_steps(fit, [1, 4], 0.3 * fit.nqm.initial_loss)
    xr.testing.assert_identical(rel.drop_attrs(), absolute.drop_attrs())
    assert rel.attrs["target"] == absolute.attrs["target"] and rel.attrs["target_rel"] == 0.3
    with pytest.raises(ValueError, match=r"exactly one of `target` \(an absolute NQM loss\) .* got neither"):
        bridge.predict_steps(fit, [1, 4])
