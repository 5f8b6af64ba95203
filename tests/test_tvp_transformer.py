"""The transformer as one network of the theory-vs-practice study: sequence labels (n, T) and logits
(B, V, T) through measure_steps, the reference run, the predictions, the branch runs, the warmup,
the aggregations and the figure."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from deepmodels import data, models, steps
from toymodels.schema import validate


def test_metric_in_chunks_equals_one_pass(monkeypatch):
    """The training loss and validation error of a sequence model, evaluated in chunks of examples
    (as a corpus too large for one forward pass is), equal the one-pass values."""
    d = data.text_corpus(context_length=8, max_bytes=2**13, seed=0)
    model = models.transformer(256, 8, d_model=8, n_layers=1, n_heads=2, seed=0)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(d.x_train), d.y_train))
        err = float((model(d.x_test).argmax(1) != d.y_test).float().mean())
    assert steps._metric(model, d, "train_loss") == loss  # one chunk: the one-pass value itself
    monkeypatch.setattr(steps, "_EVAL_LABELS", 8 * 37)  # chunks of 37 windows, the last one shorter
    assert d.x_train.shape[0] % 37 and d.x_test.shape[0] % 37
    np.testing.assert_allclose(steps._metric(model, d, "train_loss"), loss, rtol=1e-6)
    np.testing.assert_allclose(steps._metric(model, d, "val_error"), err, rtol=1e-6)
    assert 0.0 < err <= 1.0


def test_networks_argument_is_checked(tmp_path):
    from studies import theory_vs_practice as tvp

    assert "transformer" in tvp.NETWORKS and "transformer" in tvp.CONFIG["full"]["networks"]
    assert all("transformer" not in tvp.CONFIG[s]["networks"] for s in ("tiny", "quick", "default"))
    for bad in [("foo",), (), "cnn2"]:
        with pytest.raises(ValueError, match="`networks` must be"):
            tvp.run(scale="tiny", out=str(tmp_path), networks=bad)
    with pytest.raises(ValueError, match="`optimizers` must be"):
        tvp.run(scale="tiny", out=str(tmp_path), networks=("transformer",), optimizers=("adam",))


@pytest.mark.slow  # about 40 s on a quiet 2-core machine: CI runs it
def test_theory_vs_practice_transformer_tiny(tmp_path):
    """The transformer case runs end to end at the tiny scale: every group has the study's dims, every
    number is finite or an explicit inf (never NaN where a run was made), the steps are plausible
    (the smallest batch size needs more steps than the largest, the reference run at the smallest
    batch size crosses the target after step 0), and the figure is written."""
    from studies import theory_vs_practice as tvp

    res = tvp.run(scale="tiny", out=str(tmp_path), progress=False, networks=("transformer",))
    assert (tmp_path / "theory_vs_practice.png").stat().st_size > 10_000
    for group in ("summary", "measured", "predicted", "along", "warmup", "aggregations",
                  "reference_transformer_sgd"):
        validate(xr.load_dataset(tmp_path / "theory_vs_practice.nc", group=group))
    summ, meas, pred, along, warm = (res[k] for k in ("summary", "measured", "predicted", "along", "warmup"))
    assert list(summ.network.values) == ["transformer"] and list(summ.optimizer.values) == ["sgd"]
    assert "transformer, stdlib text" in str(summ.attrs["networks"])
    bs = tvp.CONFIG["tiny"]["batch_sizes"]
    assert meas.steps_best.dims == ("network", "optimizer", "batch_size")
    assert meas.steps_best.shape == (1, 1, len(bs)) and meas.steps_per_seed.sizes["seed"] == 2
    best = meas.steps_best.values.ravel()
    assert not np.isnan(best).any() and (best > 0).all()
    assert np.isfinite(best).all(), f"the tiny target must be reached at every batch size: {best}"
    assert best[0] > best[-1]  # B = 4 needs more steps than B = 32
    assert pred.steps_to_target.dims == ("network", "optimizer", "predictor", "batch_size")
    assert pred.sizes["predictor"] == 4 and pred.sizes["batch_size"] == len(bs)
    assert not np.isnan(pred.steps_to_target.values).any() and (pred.steps_to_target.values > 0).all()
    assert not np.isnan(pred.b_crit.values).any()
    ref = res["reference_transformer_sgd"]
    assert ref.attrs["batch_size"] == bs[0] and 0 < ref.attrs["steps_to_target"] < math.inf
    # every predictor reproduces the reference run's own steps at its batch size
    np.testing.assert_allclose(pred.steps_to_target.sel(batch_size=float(bs[0])).values.ravel(),
                               ref.attrs["steps_to_target"], rtol=1e-9)
    for v in ("local_b_crit", "noise_scale", "noise_scale_unbiased", "b_crit_pred", "loss"):
        assert along[v].dims == ("network", "optimizer", "checkpoint") and not np.isnan(along[v].values).any(), v
    assert warm.steps_to_target.shape == (1, 1, 3) and not np.isnan(warm.steps_to_target.values).any()
    assert not np.isnan(res["aggregations"].b_crit_pred.values).any()
    assert "not reached" in meas.attrs["note"]


def test_networks_flag(capsys):
    """``--networks`` names the networks to run; a name that is none is a one-line error, status 2."""
    from studies import theory_vs_practice as tvp
    from studies.__main__ import main

    assert tvp._network_names("transformer, cnn") == ("transformer", "cnn")
    with pytest.raises(SystemExit) as exit_:
        main(["run", "theory_vs_practice", "--quick", "--networks", "cnn,gpt"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "`--networks` must be comma-separated names of cnn, mlp1d, resnet, transformer" in err


def test_unreachable_target_is_inf_with_a_reason(tmp_path, monkeypatch):
    """A loss target below what the grid reaches: every run is inf (never a finite-looking number),
    and the case stops with an error that names the network, the target and the step budget."""
    from studies import theory_vs_practice as tvp

    make_data, make_factory, label, targets = tvp.NETWORKS["transformer"]
    monkeypatch.setitem(tvp.NETWORKS, "transformer", (make_data, make_factory, label, dict(targets, tiny=0.5)))
    monkeypatch.setitem(tvp.OVERRIDES, ("transformer", "tiny"),
                        dict(tvp.OVERRIDES[("transformer", "tiny")], max_steps=20, seeds=[0]))
    with pytest.raises(RuntimeError, match=r"transformer, stdlib text, sgd: no batch size and learning rate of the "
                                           r"grid reaches the target 0.5 within 20 steps"):
        tvp._case("transformer", "sgd", tvp.CONFIG["tiny"], "tiny", str(tmp_path), None, False)
    # the grid the case measured, read back from its run files (no training)
    (folder,) = tmp_path.glob("theory_vs_practice_transformer_sgd_tiny-*")
    cfg = dict(tvp.CONFIG["tiny"], **tvp.OVERRIDES[("transformer", "tiny")])
    run_kw = dict(target=0.5, max_steps=20, eval_every=10, progress=False, executor="serial")
    measured = tvp._measure(make_factory("tiny"), make_data("tiny"), cfg["lrs"], 0.0, cfg, str(folder), run_kw)
    assert measured.steps_best.shape == (len(cfg["batch_sizes"]),)
    assert np.isinf(measured.steps_best.values).all() and np.isinf(measured.steps_per_seed.values).all()
    assert np.isnan(measured.b_crit.values) and "no fit" in measured.attrs["ci_note"]
