"""deepmodels.predict: the reference run, its checkpoints, and the predictors on a network."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepmodels import data, models, predict
from toymodels.schema import validate


def test_segments_by_hand():
    steps = [0, 5, 10, 20, 40, 80]
    loss = [2.0, 1.5, 1.6, 0.9, 0.45, 0.2]
    # levels 2 (0.25/2)^(j/3): 1.0, 0.5 -> first probes at or below: step 20 (0.9), step 40 (0.45)
    cps, seg, ratios = predict.segments(steps, loss, 0.25, 70.0, n_segments=3)
    np.testing.assert_array_equal(cps, [0, 20, 40])
    np.testing.assert_array_equal(seg, [20, 20, 30])
    np.testing.assert_allclose(ratios, [0.9 / 2.0, 0.45 / 0.9, 0.25 / 0.45])
    # a probe whose loss rose above the previous checkpoint's is never a checkpoint
    cps, _, ratios = predict.segments([0, 5, 10], [2.0, 0.5, 0.6], 0.3, 20.0, n_segments=2)
    assert list(cps) == [0, 5] and np.all(ratios < 1)
    with pytest.raises(ValueError, match="`steps` must start at 0"):
        predict.segments([1, 5], [2.0, 1.0], 0.5, 10.0)
    with pytest.raises(ValueError, match="`target` must lie in"):
        predict.segments([0, 5], [2.0, 1.0], 3.0, 10.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = data.digits(seed=0)
    model = models.mlp(64, 10, (16,), seed=0)
    path = str(tmp_path_factory.mktemp("ref") / "ref.nc")
    ref, snaps = predict.reference_run(model, d, lr=0.2, batch_size=4, target=1.0, n_steps=400, n_probes=16,
                                       probe_size=64, path=path, progress=False)
    return d, ref, snaps, path


def test_reference_run_keeps_a_snapshot_per_probe_and_resumes(reference):
    d, ref, snaps, path = reference
    assert math.isfinite(ref.attrs["steps_to_target"]) and ref.attrs["steps_to_target"] > 0
    assert set(int(k) for k in ref.step.values) <= set(snaps)
    assert "noise_scale_unbiased_ci" in ref and "noise_scale_ci" in ref
    # the snapshot at a probe step is the model there: its training loss is the row's loss
    k = int(ref.step.values[len(ref.step) // 2])
    net = models.mlp(64, 10, (16,), seed=0)
    net.load_state_dict(snaps[k])
    with torch.no_grad():
        assert float(F.cross_entropy(net(d.x_train), d.y_train)) == pytest.approx(float(ref.loss.sel(step=k)), rel=1e-5)
    # a rerun on the same path trains nothing and returns the same rows and snapshots
    again, snaps2 = predict.reference_run(models.mlp(64, 10, (16,), seed=0), d, lr=0.2, batch_size=4, target=1.0,
                                          n_steps=400, n_probes=16, probe_size=64, path=path, progress=False)
    np.testing.assert_array_equal(again.loss.values, ref.loss.values)
    assert all(torch.equal(snaps2[s][n], snaps[s][n]) for s in snaps for n in snaps[s])


def test_predict_returns_every_predictor_anchored_at_the_reference(reference):
    d, ref, snaps, _ = reference
    out = predict.predict(ref, snaps, models.mlp(64, 10, (16,), seed=0), F.cross_entropy, d,
                          batch_sizes=[4, 16, 64, 256], target=1.0, n_segments=3, k=8, dim=512)
    validate(out)
    assert list(out.predictor.values) == list(predict.PREDICTORS)
    assert out.attrs["source"] == "theory"
    s_ref = ref.attrs["steps_to_target"]
    # the noise-scale predictors reproduce the reference exactly; the quadratics within their lr
    # search's resolution (one step of each quadratic, scaled by its calibration)
    for p in ("noise_scale", "noise_scale_biased", "nqm_at_init"):
        assert float(out.steps_to_target.sel(predictor=p, batch_size=4.0)) == pytest.approx(s_ref, rel=1e-9)
    assert float(out.steps_to_target.sel(predictor="piecewise_nqm", batch_size=4.0)) == pytest.approx(s_ref, rel=0.05)
    for p in out.predictor.values:
        s = out.steps_to_target.sel(predictor=p).values
        assert np.all(np.diff(s[np.isfinite(s)]) <= 1e-9 * s[0])  # more examples per step never hurt here
    # the interval of the noise-scale predictor brackets it
    ns = out.sel(predictor="noise_scale")
    assert float(ns.b_crit_lo) <= float(ns.b_crit) <= float(ns.b_crit_hi)
    assert len(out.attrs["local_b_crit"]) == len(out.attrs["checkpoints"]) >= 2
    with pytest.raises(ValueError, match="`snapshots` must hold"):
        predict.predict(ref, {0: snaps[0]}, models.mlp(64, 10, (16,), seed=0), F.cross_entropy, d,
                        batch_sizes=[4, 16], target=1.0, n_segments=3, k=8, dim=512)


def test_float32_fits_predict_what_float64_fits_do(reference):
    """The fits run in float32 by default (3x faster on a CPU); the Lanczos tolerance is set for
    float32 (1e-5), so its spectra, and the predictions, agree with float64's to that accuracy."""
    d, ref, snaps, _ = reference
    kw = dict(batch_sizes=[4, 16, 64, 256], target=1.0, n_segments=3, k=8, dim=512)
    a, b = (predict.predict(ref, snaps, models.mlp(64, 10, (16,), seed=0), F.cross_entropy, d, dtype=dt, **kw)
            for dt in (torch.float32, torch.float64))
    for p in ("piecewise_nqm", "nqm_at_init"):
        # equal here; allowed: a flip of each segment's discrete lr choice or first crossing (about 1%
        # of the reference steps per segment, 3 segments)
        diff = np.abs(a.steps_to_target.sel(predictor=p).values - b.steps_to_target.sel(predictor=p).values)
        assert np.all(diff <= 3 * float(ref.attrs["steps_to_target"]) / 100), (p, diff)
        assert float(a.b_crit.sel(predictor=p)) == pytest.approx(float(b.b_crit.sel(predictor=p)), rel=0.05)
    np.testing.assert_allclose(a.attrs["local_b_crit"], b.attrs["local_b_crit"], rtol=0.05)
