"""Random-features teacher-student model (Faghri et al. Sec. 4.2/4.3)."""

import numpy as np
import pytest

from toymodels.features import RandomFeatures
from toymodels.schema import validate


def test_per_example_gradients_match_finite_differences():
    rf = RandomFeatures(30, input_dim=5, teacher_hidden=4, student_hidden=12, seed=1)
    theta = np.random.default_rng(0).normal(size=12) * 0.5
    G = rf.per_example_grads(theta)
    eps = 1e-6
    for i in (0, 7, 29):
        def li(t, i=i):
            return np.logaddexp(0.0, -rf.y[i] * rf.phi[i] @ t)
        fd = np.array([(li(theta + eps * e) - li(theta - eps * e)) / (2 * eps) for e in np.eye(12)])
        np.testing.assert_allclose(G[i], fd, rtol=1e-6, atol=1e-9)
    fd_mean = np.array([(rf.loss(theta + eps * e) - rf.loss(theta - eps * e)) / (2 * eps) for e in np.eye(12)])
    np.testing.assert_allclose(G.mean(axis=0), fd_mean, rtol=1e-6, atol=1e-9)


def test_data_teacher_and_duplicates():
    rf = RandomFeatures(200, input_dim=10, teacher_hidden=5, student_hidden=50, duplicates=0.5, seed=2)
    assert set(np.unique(rf.y)) == {-1.0, 1.0}
    assert 0.2 < np.mean(rf.y > 0) < 0.8  # centred labels: both classes well represented
    np.testing.assert_allclose(np.linalg.norm(rf.theta1, axis=0), 1.0)
    dup = rf.X[rf.is_duplicate]
    assert dup.shape[0] == 100 and np.unique(dup, axis=0).shape[0] == 5
    assert np.unique(rf.X[~rf.is_duplicate], axis=0).shape[0] == 100
    assert rf.overparametrization == 0.25


def test_training_and_estimator_statistics():
    rf = RandomFeatures(100, input_dim=10, teacher_hidden=5, student_hidden=200, duplicates=0.5, seed=3)
    ds = rf.train(0.5, 10, 600, log_every=100, update_every=300, seed=0)
    validate(ds)
    assert ds.loss.values[-1] < 0.9 * ds.loss.values[0]
    assert list(ds.estimator.values) == ["sg_b", "sg_2b", "svrg", "gc"]
    np.testing.assert_allclose(ds.grad_var.sel(estimator="sg_2b"), ds.grad_var.sel(estimator="sg_b") / 2, rtol=1e-12)
    # right after a refresh SVRG is exact (zero variance) and GC exploits the duplicates
    at_refresh = ds.sel(step=300)
    assert at_refresh.grad_var.sel(estimator="svrg") < 1e-20
    assert at_refresh.grad_var.sel(estimator="gc") < at_refresh.grad_var.sel(estimator="sg_b")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_train=1), "`n_train` must be"),
        (dict(n_train=50, duplicates=1.0), "`duplicates` must be a float in \\[0, 1\\)"),
        (dict(n_train=50, duplicates=0.04), "`duplicates` must make up at least n_duplicated=5"),
        (dict(n_train=50, student_hidden=0), "`student_hidden` must be"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomFeatures(**kwargs)


def test_bad_train_arguments():
    rf = RandomFeatures(20, student_hidden=8)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        rf.train(0.1, 21, 10)
    with pytest.raises(ValueError, match="`lr` must be a float in \\(0, inf\\)"):
        rf.train(0.0, 2, 10)
    with pytest.raises(ValueError, match="`theta2` must be a finite array of shape \\(8,\\)"):
        rf.loss(np.zeros(3))
